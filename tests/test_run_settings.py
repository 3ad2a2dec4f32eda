"""The run config: pyproject's [tool.flwr.app.config] parses, overrides validate, bad keys are refused."""

import tomllib
from pathlib import Path

import pytest

from proper_fed.errors import ConfigError
from proper_fed.run_settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def _flat(table, prefix=""):
    out = {}
    for k, v in table.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_pyproject_run_config_is_complete_and_matches_library_defaults():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings = RunSettings.from_run_config(_flat(cfg))
    assert settings.proper.backbone.model == "smollm2-135m"
    assert settings.proper.adapters.num_experts == 5 and settings.proper.adapters.population_rank == 8
    assert settings.methods[-1] == "proper"
    assert settings.synthetic.users == 40


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"popluation.epochs": 1}, "unknown section 'popluation'"),
        ({"epochs": 1}, "run config key 'epochs' is unknown"),
        ({"methods": "proper,magic"}, "methods="),
        ({"server-fraction": 1.5}, "server-fraction=1.5"),
        ({"adapters.num-experts": 0}, "num_experts=0"),
        ({"device-quantization": "int3"}, "device-quantization"),
        ({"server-threads": -1}, "server-threads=-1"),
    ],
)
def test_bad_run_config_is_refused_with_the_key_named(flat, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        RunSettings.from_run_config(flat)


def test_simulation_configs_all_parse():
    from proper_fed.run_settings import flatten_config as _flatten
    from simulations.run import CONFIGS

    for path in CONFIGS.glob("*.toml"):
        raw = tomllib.loads(path.read_text())
        raw.pop("federation", None)
        run = raw.pop("run", {})
        RunSettings.from_run_config({**_flatten(run), **_flatten(raw)})


def test_server_threads_default_to_every_usable_core_and_can_be_set():
    import os

    assert RunSettings.from_run_config({}).threads == len(os.sched_getaffinity(0))
    assert RunSettings.from_run_config({"server-threads": 3}).threads == 3
