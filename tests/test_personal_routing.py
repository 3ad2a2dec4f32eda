"""A device's own group routing: it fits its user's embedding row with stage 2 frozen, and its user stage
starts exactly at that personal stage-2 model (the LoRA-aware router added to the frozen stage-2 routing)."""

import dataclasses

import torch
from model_helpers import batch_for, fresh_model, logits, planted_groups

from proper_fed.config import TrainConfig
from proper_fed.methods import ExpertMix
from proper_fed.train import stages
from server.server_stages import shipped_group

FAST = TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False, seed=0)
FIT = dataclasses.replace(FAST, embedding_epochs=3, embedding_lr=5e-2)


def _server_and_device(tiny_backbone):
    """A server model trained on planted groups, and a device copy that received it as shipped (the user
    table cut to its unknown-user row)."""
    exs = planted_groups(8, 12)
    server = fresh_model(tiny_backbone)
    stages.train_population(server, exs, FAST)
    stages.train_group(server, exs, dataclasses.replace(FAST, epochs=2))
    device = fresh_model(tiny_backbone)
    device.load_scope_state_dict("population", server.scope_state_dict("population"))
    group = shipped_group(server)
    device.resize_user_table(group["lora_user_embedding.weight"].shape[0])
    device.load_scope_state_dict("group", group)
    return server, device, exs


def _loss(model, exs, mode):
    from proper_fed.train.batching import target_loss

    stages.serving_mode(model, mode)
    batch = batch_for(model, exs)
    out = logits(model, batch, [e.user_id for e in exs])
    return target_loss(out, batch["labels"]).item()


def test_the_bundle_ships_only_the_unknown_user_row(tiny_backbone):
    server, device, _ = _server_and_device(tiny_backbone)
    assert server.lora_user_embedding.weight.shape[0] == 9  # unknown + 8 server users
    shipped = shipped_group(server)["lora_user_embedding.weight"]
    assert shipped.shape[0] == 1
    assert torch.equal(shipped[0], server.lora_user_embedding.weight[0].detach())
    assert device.user_index == {}


def test_the_device_fits_only_its_own_row_starting_from_the_unknown_row(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    unknown_loss = _loss(device, mine, "group")
    before = {n: p.detach().clone() for n, p in device.named_parameters()}
    r = stages.fit_user_embedding(device, "user3", mine, FIT)
    table = device.lora_user_embedding.weight
    assert table.shape[0] == 2 and device.user_index == {"user3": 1}
    assert torch.equal(table[0], before["lora_user_embedding.weight"][0])  # the unknown row is untouched
    assert not torch.equal(table[1], table[0])  # started there, then moved
    others = [n for n in before if n != "lora_user_embedding.weight"]
    params = dict(device.named_parameters())
    changed = [n for n in others if not torch.equal(params[n], before[n])]
    assert changed == [], changed  # every adapter and the base stay frozen
    assert r.trainable_parameters == table.shape[1] and r.tokens > 0  # one row of the table
    assert _loss(device, mine, "group") < unknown_loss  # its own routing fits its history better


def test_zero_embedding_epochs_leave_the_user_on_the_unknown_row(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    unknown = _loss(device, mine, "group")
    r = stages.fit_user_embedding(device, "user3", mine, dataclasses.replace(FIT, embedding_epochs=0))
    assert r.steps == 0 and torch.equal(
        device.lora_user_embedding.weight[1], device.lora_user_embedding.weight[0]
    )
    assert _loss(device, mine, "group") == unknown


def test_the_user_stage_starts_exactly_at_the_users_stage2_model(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    stages.fit_user_embedding(device, "user3", mine, FIT)
    batch, users = batch_for(device, mine), ["user3"] * len(mine)
    stages.serving_mode(device, "group")
    group = logits(device, batch, users)
    device.reset_user(7, router_from_group=True)
    stages.serving_mode(device, "user", ExpertMix.LORA_ROUTER_FROM_GROUP)
    torch.testing.assert_close(logits(device, batch, users), group, rtol=0, atol=1e-5)
    # the paper's router from a random init does not start there (so the check above can fail)
    device.reset_user(7)
    stages.serving_mode(device, "user", ExpertMix.LORA_ROUTER)
    assert (logits(device, batch, users) - group).abs().max() > 1e-3


def test_the_router_started_at_stage2_still_learns(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    stages.fit_user_embedding(device, "user3", mine, FIT)
    r = stages.train_user(device, mine, dataclasses.replace(FAST, epochs=2))
    assert r.trainable_parameters == device.count_parameters("user")  # W_beta trains too
    assert all(layer.lora_beta.abs().sum() > 0 for layer in device.layers.values())


def test_a_stored_user_state_carries_the_users_own_row(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    stages.fit_user_embedding(device, "user3", mine, FIT)
    stages.train_user(device, mine, FAST)
    state = device.user_state("user3")
    _, other, _ = _server_and_device(tiny_backbone)
    other.load_user_state("user3", state)
    batch, users = batch_for(device, mine), ["user3"] * len(mine)
    for m in (device, other):
        stages.serving_mode(m, "user")
    torch.testing.assert_close(logits(other, batch, users), logits(device, batch, users))


def test_a_method_without_the_embedding_fit_routes_the_user_as_unknown(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    unknown = _loss(device, mine, "group")
    stages.fit_user_embedding(device, "user3", mine, FIT)
    own = _loss(device, mine, "group")
    device.route_own_row("user3", own=False)
    assert _loss(device, mine, "group") == unknown
    device.route_own_row("user3", own=True)
    assert _loss(device, mine, "group") == own


def test_a_row_kept_from_federated_stage_2_is_where_the_fit_starts(tiny_backbone):
    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    kept = torch.randn(device.lora_user_embedding.weight.shape[1])
    none = dataclasses.replace(FIT, embedding_epochs=0)
    stages.fit_user_embedding(device, "user3", mine, none, start=kept)
    assert torch.equal(device.lora_user_embedding.weight[1].detach(), kept)
    assert not torch.equal(device.lora_user_embedding.weight[0], kept)  # the unknown row stays


def test_personalize_user_fits_the_embedding_from_the_devices_own_row(monkeypatch, tiny_backbone):
    from proper_fed.data.tasks import get_task
    from proper_fed.train import personalize

    _, device, exs = _server_and_device(tiny_backbone)
    mine = [e for e in exs if e.user_id == "user3"]
    kept = torch.randn(device.lora_user_embedding.weight.shape[1])
    starts = []
    real = stages.fit_user_embedding

    def spy(model, user_id, history, cfg, checkpointer=None, start=None):
        starts.append(start)
        return real(model, user_id, history, cfg, checkpointer, start=start)

    monkeypatch.setattr(stages, "fit_user_embedding", spy)
    task = get_task("synthetic_groups")
    personalize.personalize_user(device, ["proper_group"], task, mine[:4], mine[4:6], FIT, own_row=kept)
    personalize.personalize_user(device, ["proper_group"], task, mine[:4], mine[4:6], FIT)
    assert starts[0] is kept and starts[1] is None
