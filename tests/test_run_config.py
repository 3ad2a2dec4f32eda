"""The run config: one source of defaults (the dataclasses), one loader for simulation and deployment."""

import tomllib
from pathlib import Path

import pytest

from proper_fed.errors import ConfigError
from proper_fed.federation.run_config import (
    default_run_config,
    flatten_config,
    load_run_config,
    parse_assignments,
    resolve,
    write_run_config,
)
from proper_fed.federation.run_settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "simulations" / "configs"


def test_pyproject_lists_every_key_with_exactly_the_dataclass_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    listed, defaults = flatten_config(pyproject), default_run_config()
    assert sorted(set(defaults) - set(listed)) == [], "keys Flower would refuse to override"
    assert sorted(set(listed) - set(defaults)) == [], "keys no dataclass defines"
    differ = {k: (listed[k], defaults[k]) for k in defaults if listed[k] != defaults[k]}
    assert differ == {}, "pyproject value != dataclass default"
    assert RunSettings.from_run_config(listed) == RunSettings()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_simulation_configs_only_override_defaults(path):
    flat = load_run_config(path).flat
    defaults = default_run_config()
    repeated = sorted(k.replace("_", "-") for k, v in flat.items() if defaults.get(k.replace("_", "-")) == v)
    assert repeated == [], f"{path.name} repeats defaults: drop them"


def test_round_trip_load_flatten_write_load(tmp_path):
    loaded = load_run_config(CONFIGS / "default.toml")
    flat, settings = resolve(loaded.flat, {"out": str(tmp_path / "run")})
    written = write_run_config(flat, tmp_path / "run_config.toml")
    again = load_run_config(written)
    assert again.flat == flat and again.federation == {}
    assert RunSettings.from_run_config(again.flat) == settings
    assert settings.proper.user.epochs == 3 and settings.proper.user.max_length == 64  # the main job's


def test_paths_are_made_absolute_and_names_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text("")
    flat, settings = resolve({"data": "synthetic", "task": "spec.toml"}, {"out": "run", "min-nodes": 4})
    assert flat["out"] == str(tmp_path / "run") and flat["data"] == "synthetic" and settings.min_nodes == 4
    assert flat["task"] == str(tmp_path / "spec.toml")
    flat, _ = resolve({"task": "LaMP-2", "state-dir": "s"}, {"backbone.model": None})
    assert flat["task"] == "LaMP-2" and flat["state-dir"] == str(tmp_path / "s")
    assert "backbone.model" not in flat  # None = not set


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown"):
        resolve({}, {"epochs": 1})


def test_assignments_parse_toml_values_or_bare_strings():
    assert parse_assignments(["user.epochs=2", "methods=oppu,proper", "task='x y'", "user.lr=1e-3"]) == {
        "user.epochs": 2,
        "methods": "oppu,proper",
        "task": "x y",
        "user.lr": 0.001,
    }


@pytest.mark.parametrize("bad", ["user.epochs", "=2", " =x", ""])
def test_assignment_without_key_and_value_is_refused(bad):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments([bad])


def test_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("user = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(tmp_path / "bad.toml")
