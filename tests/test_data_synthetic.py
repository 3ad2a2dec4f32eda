"""The synthetic generator is deterministic, and its planted structure is measurable."""

import json
import statistics

import pytest

from proper_fed.data import SyntheticConfig, generate_synthetic, load_dataset, write_synthetic
from proper_fed.data.synthetic import lamp_documents
from proper_fed.errors import ConfigError, DataError


def test_same_seed_same_data_other_seed_other_data():
    a = lamp_documents(generate_synthetic(SyntheticConfig(seed=7)))
    b = lamp_documents(generate_synthetic(SyntheticConfig(seed=7)))
    c = lamp_documents(generate_synthetic(SyntheticConfig(seed=8)))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["questions.json"] != c["questions.json"]


def test_defaults_fit_the_embedded_run():
    data = generate_synthetic()
    users = data.dataset.users
    sizes = [len(u.profile) for u in users]
    assert len(users) == 40 and len(set(data.groups.values())) == 4
    assert 4 <= len(data.dataset.task.labels) <= 6
    assert min(sizes) >= 4 and max(sizes) <= 40
    assert statistics.median(sizes) < statistics.mean(sizes)  # Pareto: a long tail of heavy users
    assert all(2 <= len(u.queries) <= 3 for u in users)
    # Prompts stay short: a 135M model trains on them on a CPU (about 1.3 tokens per word).
    assert max(len(q.input.split()) for q in data.dataset.queries) <= 25


def test_planted_structure_orders_the_predictors():
    data = generate_synthetic(SyntheticConfig(users=200, seed=1))
    c = data.ceilings()
    assert c["user_majority"] > c["majority"]
    assert c["oracle_user_rule"] > c["group_rule"] > c["population_rule"]
    assert c["oracle_user_rule"] > c["user_majority"] and c["oracle_user_rule"] > c["majority"]
    assert c["oracle_user_rule"] == pytest.approx(c["oracle_expected"], abs=0.05)


def test_noise_free_oracle_is_perfect():
    data = generate_synthetic(SyntheticConfig(users=20, noise=0.0))
    assert data.ceilings()["oracle_user_rule"] == 1.0 and data.expected_oracle_accuracy == 1.0


def test_written_dataset_loads_back_identically(tmp_path):
    data = generate_synthetic(SyntheticConfig(users=12, labels=4, seed=5))
    out = write_synthetic(data, tmp_path / "syn")
    assert sorted(p.name for p in out.iterdir()) == [
        "latent.json",
        "outputs.json",
        "questions.json",
        "task.toml",
    ]
    loaded = load_dataset(out)
    assert loaded.task == data.dataset.task  # the folder's task.toml, with its 4 labels
    assert loaded.users == data.dataset.users


def test_write_refuses_a_non_empty_folder_unless_forced(tmp_path):
    data = generate_synthetic(SyntheticConfig(users=4, groups=2))
    out = tmp_path / "syn"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty; .*--force"):
        write_synthetic(data, out)
    assert (out / "keep.txt").read_text() == "mine"
    write_synthetic(data, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "questions.json").is_file()


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    data = generate_synthetic(SyntheticConfig(users=4, groups=2))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("proper_fed.data.synthetic._spec_toml", boom)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(data, tmp_path / "syn")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change", [{"users": 1}, {"groups": 0}, {"labels": 9}, {"min_history": 50}, {"noise": 1.5}]
)
def test_bad_config_is_a_config_error(change):
    with pytest.raises(ConfigError, match="SyntheticConfig"):
        SyntheticConfig(**change)
