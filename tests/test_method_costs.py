"""results.json "costs": what each method stands on (server stages, device training, adapter bytes), so a table
that compares methods shows whether their budgets were matched."""

import torch

from proper_fed.methods import METHODS
from server.method_costs import method_costs, server_stages_of
from server.server_stages import ServerModel


def _model(name: str, metrics: dict, pop_numel: int, group_numel: int) -> ServerModel:
    group = {"g": torch.zeros(group_numel)} if group_numel else {}
    return ServerModel(name, {}, {"p": torch.zeros(pop_numel)}, group, metrics)


MODELS = {
    "proper": _model(
        "proper",
        {
            "population.trainable_parameters": 100.0,
            "population.tokens": 1000.0,
            "group.trainable_parameters": 300.0,
            "group.tokens": 1500.0,
        },
        25,
        75,
    ),
    "matched": _model(
        "matched", {"population.trainable_parameters": 350.0, "population.tokens": 2500.0}, 90, 0
    ),
}


def test_each_method_counts_the_server_stages_it_stands_on():
    assert server_stages_of(METHODS["zero_shot"]) == ()
    assert server_stages_of(METHODS["population"]) == ("population",)
    assert server_stages_of(METHODS["oppu"]) == ("population",)  # no experts: the group stage is unused
    assert server_stages_of(METHODS["proper_group"]) == ("population", "group")
    assert server_stages_of(METHODS["proper"]) == ("population", "group")


def test_costs_put_the_matched_baselines_beside_proper():
    reported = {
        "population": {"trainable_parameters_per_user": 0, "train_tokens_per_user": 0.0},
        "oppu_matched": {"trainable_parameters_per_user": 40, "train_tokens_per_user": 600.0},
        "proper": {"trainable_parameters_per_user": 48, "train_tokens_per_user": 1000.0},
        "proper@rank": {"trainable_parameters_per_user": 48, "train_tokens_per_user": 1000.0},
        "majority": {},
    }
    costs = method_costs(reported, MODELS)
    assert set(costs) == {"population", "oppu_matched", "proper", "proper@rank"}  # no LLM, no cost row
    assert costs["population"]["server_trainable_parameters"] == 100
    assert costs["population"]["shipped_adapter_bytes"] == 25 * 4
    assert costs["proper"]["server_trainable_parameters"] == 400
    assert (
        costs["proper"]["server_training_tokens"] == 2500 == costs["oppu_matched"]["server_training_tokens"]
    )
    assert costs["proper"]["shipped_adapter_bytes"] == (25 + 75) * 4
    assert costs["oppu_matched"]["shipped_adapter_bytes"] == 90 * 4
    assert costs["proper"]["device_training_tokens_per_user"] == 1000.0
    assert costs["proper@rank"] == costs["proper"]


def test_federated_stages_record_no_server_tokens_and_the_table_shows_a_dash():
    from simulations.report import cost_table

    federated = {"proper": _model("proper", {"population.trainable_parameters": 100.0}, 25, 0)}
    costs = method_costs({"population": {}}, federated)
    assert costs["population"]["server_training_tokens"] is None  # never NaN: results.json stays JSON
    assert costs["population"]["server_trainable_parameters"] == 100
    assert "| `population` | 100 | — |" in cost_table({"costs": costs})
