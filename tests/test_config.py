"""Bad configuration values fail on construction with a message that names the field and the fix."""

import dataclasses

import pytest

from proper_fed.config import AdapterConfig, BackboneConfig, ProperConfig, TrainConfig
from proper_fed.errors import ConfigError


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (AdapterConfig, {"population_rank": 0}, "population_rank=0"),
        (AdapterConfig, {"user_rank": 2.5}, "user_rank=2.5"),
        (AdapterConfig, {"num_experts": 0}, "num_experts=0"),
        (AdapterConfig, {"target_modules": ()}, "target_modules"),
        (AdapterConfig, {"alpha": -1}, "alpha=-1"),
        (BackboneConfig, {"dtype": "fp16"}, "dtype='fp16'"),
        (BackboneConfig, {"device": "tpu"}, "device='tpu'"),
        (TrainConfig, {"lr": 0}, "lr=0"),
        (TrainConfig, {"epochs": 0}, "epochs=0"),
        (TrainConfig, {"constraint_weight": -0.1}, "constraint_weight=-0.1"),
        (TrainConfig, {"unknown_user_prob": 1.0}, "unknown_user_prob=1.0"),
    ],
)
def test_invalid_values_name_the_field(cls, kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")) as err:
        cls(**kwargs)
    assert "use" in str(err.value)  # says how to fix it


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="unknown field.*'rnak'"):
        AdapterConfig.from_dict({"rnak": 4})
    with pytest.raises(ConfigError, match="unknown section"):
        ProperConfig.from_dict({"stage4": {}})


def test_from_dict_round_trip():
    cfg = ProperConfig.from_dict(
        {"adapters": {"num_experts": 8, "target_modules": ["up_proj"]}, "group": {"constraint_weight": 0.0}}
    )
    assert cfg.adapters.num_experts == 8 and cfg.adapters.target_modules == ("up_proj",)
    assert cfg.group.constraint_weight == 0.0
    assert AdapterConfig.from_dict(cfg.adapters.to_dict()) == cfg.adapters


def test_a_partial_section_keeps_that_sections_defaults():
    """`[user] epochs = 4` leaves the user stage's own defaults (batch 4), as pyproject's full config does."""
    cfg = ProperConfig.from_dict({"user": {"epochs": 4}})
    assert cfg.user == dataclasses.replace(ProperConfig().user, epochs=4)
