"""RunSettings: overrides validate, bad keys are refused with the key named (pyproject: test_run_config.py)."""

from pathlib import Path

import pytest

from proper_fed.errors import ConfigError
from proper_fed.federation.run_settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


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
    from proper_fed.federation.run_config import load_run_config
    from simulations.run import CONFIGS

    for path in CONFIGS.glob("*.toml"):
        RunSettings.from_run_config(load_run_config(path).flat)


def test_server_threads_default_to_every_usable_core_and_can_be_set():
    import os

    assert RunSettings.from_run_config({}).threads == len(os.sched_getaffinity(0))
    assert RunSettings.from_run_config({"server-threads": 3}).threads == 3
