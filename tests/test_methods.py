"""The method registry is the one list of methods: run settings, device, server variants, schema and report read it."""

from __future__ import annotations

import dataclasses

import pytest

from proper_fed.config import ProperConfig
from proper_fed.errors import ConfigError
from proper_fed.methods import (
    DEVICE_METHODS,
    LABEL_BASELINES,
    METHODS,
    REPORT_ORDER,
    VARIANTS,
    ExpertMix,
    Kind,
    Stage,
    Trains,
    method,
)


def test_every_method_has_one_entry_saying_where_it_trains_and_what_it_serves():
    assert REPORT_ORDER == tuple(METHODS)
    assert set(DEVICE_METHODS) | set(VARIANTS) | set(LABEL_BASELINES) == set(METHODS)
    for m in METHODS.values():
        assert m.trains_user_stage == (m.user_mix is not None)
        assert (m.server is not None) == (m.kind is Kind.VARIANT)
        assert (m.serves is None) == (m.kind is Kind.LABEL_BASELINE)
        if m.kind is Kind.VARIANT:  # PROPER's user stage on the variant's own group model
            assert (
                m.trains is Trains.SERVER and m.user_mix is ExpertMix.LORA_ROUTER and m.server_model == m.name
            )
        elif m.kind is Kind.DEVICE:
            assert m.server_model == "proper"
            assert (m.trains is Trains.DEVICE) == m.trains_user_stage


def test_the_names_and_modes_are_those_results_report():
    assert DEVICE_METHODS == (
        "zero_shot",
        "population",
        "oppu",
        "proper_group",
        "proper_no_lora_router",
        "proper",
    )
    assert LABEL_BASELINES == ("majority", "user_majority")
    assert {n: (m.serves, m.user_mix) for n, m in METHODS.items() if m.kind is Kind.DEVICE} == {
        "zero_shot": (Stage.BASE, None),
        "population": (Stage.POPULATION, None),
        "proper_group": (Stage.GROUP, None),
        "oppu": (Stage.USER, ExpertMix.NONE),
        "proper": (Stage.USER, ExpertMix.LORA_ROUTER),
        "proper_no_lora_router": (Stage.USER, ExpertMix.UNIFORM),
    }


def test_variants_change_the_server_config_as_named():
    from server.server_stages import variant_config

    cfg = ProperConfig()
    assert variant_config(cfg, "proper_k2")[0].adapters.num_experts == 2
    assert variant_config(cfg, "proper_no_constraint")[0].group.constraint_weight == 0.0
    joint, e2e = variant_config(cfg, "proper_end_to_end")
    assert e2e and joint.group.epochs == cfg.population.epochs + cfg.group.epochs
    k5 = dataclasses.replace(cfg, adapters=dataclasses.replace(cfg.adapters, num_experts=5))
    assert variant_config(k5, "proper_k5") == (k5, False)  # no change: the device reuses PROPER's model


def test_unknown_names_and_mixes_are_typed_errors_not_asserts():
    from proper_fed.federation.run_settings import RunSettings
    from proper_fed.model.routing import RoutingContext

    with pytest.raises(ConfigError, match="unknown method 'bogus'"):
        method("bogus")
    with pytest.raises(ConfigError, match="expert_mix='bogus'"):
        RoutingContext().set_mode(True, "bogus", False)
    with pytest.raises(ConfigError, match="methods"):
        RunSettings(methods=("proper_k2",))  # a variant is not a device method
    with pytest.raises(ConfigError, match="variants"):
        RunSettings(variants=("oppu",))
