"""The wrapped model: identity at init, exact merge, save/load, batched experts, the unknown-user row."""

import torch
from model_helpers import SMALL, batch_for, fresh_model, logits, planted_groups

from proper_fed.model.proper_linear import ProperLinear
from proper_fed.train.stages import serving_mode

MODES = ["base", "population", "group", "user"]


def test_adapted_model_equals_base_at_init_in_every_stage(tiny_backbone):
    exs = planted_groups(4, 2)
    model = fresh_model(tiny_backbone)
    batch = batch_for(model, exs)
    users = [e.user_id for e in exs]
    model.set_users(users)
    serving_mode(model, "base")
    base = logits(model, batch)
    for mode in MODES[1:]:
        serving_mode(model, mode)
        torch.testing.assert_close(logits(model, batch, users), base, rtol=0, atol=1e-6, msg=mode)


def test_only_target_linears_are_wrapped(tiny_backbone):
    model = fresh_model(tiny_backbone)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.lm.named_modules() if isinstance(m, ProperLinear)}
    assert wrapped == {"gate_proj", "up_proj", "down_proj"}
    assert len(model.layers) == 3 * tiny_backbone.model.config.num_hidden_layers


def _randomize(model, scopes):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in scopes:
            for p in model.scope_parameters(s).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_population_merge_is_exact(tiny_backbone):
    model = fresh_model(tiny_backbone)
    _randomize(model, ["population"])
    batch = batch_for(model, planted_groups(2, 2))
    serving_mode(model, "population")
    before = logits(model, batch)
    model.merge_population()
    after = logits(model, batch)
    assert not torch.equal(before, logits(fresh_model(tiny_backbone), batch))  # the adapter did something
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_save_then_load_reproduces_logits(tiny_backbone, tmp_path):
    exs = planted_groups(4, 2)
    users = [e.user_id for e in exs]
    model = fresh_model(tiny_backbone)
    model.set_users(users)
    _randomize(model, ["population", "group", "user"])
    for scope in ("population", "group", "user"):
        model.save_scope(scope, tmp_path)
    batch = batch_for(model, exs)
    serving_mode(model, "user")
    want_user = logits(model, batch, users)
    serving_mode(model, "group")
    want_group = logits(model, batch, users)

    other = fresh_model(tiny_backbone, seed=5)
    for scope in ("population", "group", "user"):
        other.load_scope(scope, tmp_path)
    serving_mode(other, "user")
    torch.testing.assert_close(logits(other, batch, users), want_user, rtol=0, atol=0)
    serving_mode(other, "group")
    torch.testing.assert_close(logits(other, batch, users), want_group, rtol=0, atol=0)


def test_loading_into_a_model_with_other_ranks_fails_clearly(tiny_backbone, tmp_path):
    import dataclasses

    import pytest

    from proper_fed.errors import CheckpointError

    model = fresh_model(tiny_backbone)
    model.save_scope("population", tmp_path)
    other = fresh_model(tiny_backbone, dataclasses.replace(SMALL, population_rank=2))
    with pytest.raises(CheckpointError, match="adapter config"):
        other.load_scope("population", tmp_path)
    with pytest.raises(CheckpointError, match="no saved user adapter"):
        other.load_scope("user", tmp_path)


def test_batched_experts_match_a_loop_over_experts(tiny_backbone):
    """The fused forward's expert term (all k experts in one matmul) equals a loop over the experts, weighted
    by the routing weights that same forward recorded."""
    model = fresh_model(tiny_backbone)
    _randomize(model, ["group"])
    layer = next(iter(model.layers.values()))
    x = torch.randn(2, 5, layer.in_features)
    model.set_mode(experts="user_router")
    model.ctx.user_emb = torch.randn(2, model.cfg.user_embedding_dim)
    model.ctx.record, model.ctx.gates = True, []
    with torch.no_grad():
        delta = layer(x) - layer.base(x)  # (2, 5, out)
    gates = model.ctx.gates[-1]  # (2, 5, k)
    model.ctx.record, model.ctx.gates = False, []
    want = sum(
        gates[..., i : i + 1] * layer.s_g * (x @ layer.lora_expert_A[i].T @ layer.lora_expert_B[i].T)
        for i in range(layer.k)
    )
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)


def test_unseen_users_get_the_unknown_user_row(tiny_backbone):
    model = fresh_model(tiny_backbone)
    model.set_users(["alice", "bob"])
    rows = model.user_rows(["alice", "mallory", "bob", "nobody"])
    assert rows.tolist() == [model.user_index["alice"], 0, model.user_index["bob"], 0]
    _randomize(model, ["group"])
    exs = planted_groups(2, 1)
    batch = batch_for(model, exs[:1] * 2)
    serving_mode(model, "group")
    unseen = logits(model, batch, ["mallory", "nobody"])
    torch.testing.assert_close(unseen[0], unseen[1])
    assert not torch.allclose(logits(model, batch, ["alice", "alice"])[0], unseen[0])
