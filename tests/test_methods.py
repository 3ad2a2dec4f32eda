"""The method registry is the one list of methods: run settings, device, server variants, schema and report read it."""

from __future__ import annotations

import dataclasses

import pytest

from proper_fed.config import ProperConfig
from proper_fed.errors import ConfigError
from proper_fed.methods import (
    DEVICE_METHODS,
    LABEL_BASELINES,
    MATCHED,
    METHODS,
    PROPER,
    REPORT_ORDER,
    VARIANTS,
    ExpertMix,
    Kind,
    Stage,
    Trains,
    method,
    server_models_for,
)


def test_every_method_has_one_entry_saying_where_it_trains_and_what_it_serves():
    assert REPORT_ORDER == tuple(METHODS)
    assert set(DEVICE_METHODS) | set(VARIANTS) | set(LABEL_BASELINES) == set(METHODS)
    for m in METHODS.values():
        assert m.trains_user_stage == (m.user_mix is not None)
        assert (m.server is not None) == (m.kind is Kind.VARIANT)
        assert (m.serves is None) == (m.kind is Kind.LABEL_BASELINE)
        if m.kind is Kind.VARIANT:  # PROPER's user stage on the variant's own group model
            assert m.trains is Trains.SERVER and m.server_model == m.name
            assert m.user_mix is ExpertMix.LORA_ROUTER_FROM_GROUP and m.personal_embedding
        elif m.kind is Kind.DEVICE:
            assert m.server_model in (PROPER, MATCHED)
            # the device trains for it: a user stage, or (proper_group) only the user's own embedding
            assert (m.trains is Trains.DEVICE) == (m.trains_user_stage or m.personal_embedding)
            if m.server_model == MATCHED:  # the matched model has no groups: nothing may route
                assert m.user_mix in (None, ExpertMix.NONE) and not m.personal_embedding


def test_the_names_and_modes_are_those_results_report():
    assert DEVICE_METHODS == (
        "zero_shot",
        "population",
        "population_matched",
        "oppu",
        "oppu_matched",
        "proper_group",
        "proper_group_unknown",
        "proper_uniform_experts",
        "proper_no_lora_router",
        "proper_no_router_init",
        "proper_no_embedding_fit",
        "proper",
    )
    assert LABEL_BASELINES == ("majority", "user_majority")
    got = {
        n: (m.serves, m.user_mix, m.personal_embedding, m.server_model)
        for n, m in METHODS.items()
        if m.kind is Kind.DEVICE
    }
    assert got == {
        "zero_shot": (Stage.BASE, None, False, PROPER),
        "population": (Stage.POPULATION, None, False, PROPER),
        "population_matched": (Stage.POPULATION, None, False, MATCHED),
        "oppu": (Stage.USER, ExpertMix.NONE, False, PROPER),
        "oppu_matched": (Stage.USER, ExpertMix.NONE, False, MATCHED),
        "proper_group": (Stage.GROUP, None, True, PROPER),
        "proper_group_unknown": (Stage.GROUP, None, False, PROPER),
        "proper_uniform_experts": (Stage.USER, ExpertMix.UNIFORM, False, PROPER),
        "proper_no_lora_router": (Stage.USER, ExpertMix.USER_ROUTER, True, PROPER),
        "proper_no_router_init": (Stage.USER, ExpertMix.LORA_ROUTER, True, PROPER),
        "proper_no_embedding_fit": (Stage.USER, ExpertMix.LORA_ROUTER_FROM_GROUP, False, PROPER),
        "proper": (Stage.USER, ExpertMix.LORA_ROUTER_FROM_GROUP, True, PROPER),
    }


def test_a_run_trains_proper_then_the_server_models_its_methods_and_variants_need():
    assert server_models_for(["oppu", "proper"], []) == (PROPER,)
    assert server_models_for(["oppu_matched", "population_matched", "proper"], ["proper_k2"]) == (
        PROPER,
        MATCHED,
        "proper_k2",
    )


def test_the_matched_model_has_propers_server_rank_and_budget_in_one_lora():
    from server.server_stages import variant_config

    cfg = ProperConfig()
    matched, e2e = variant_config(cfg, MATCHED)
    a = cfg.adapters
    assert not e2e
    assert matched.adapters.population_rank == a.population_rank + a.num_experts * a.group_rank
    assert matched.population.epochs == cfg.population.epochs + cfg.group.epochs
    assert (
        matched.population.lr == cfg.population.lr
        and matched.population.batch_size == cfg.population.batch_size
    )


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
