"""The three stages: each trains exactly its own parameters, freezes what came before, and learns."""

import dataclasses

import pytest
import torch
from model_helpers import batch_for, fresh_model, planted_groups

from proper_fed.config import TrainConfig
from proper_fed.model.routing import per_user_routing
from proper_fed.train import stages
from proper_fed.train.trainer import FolderCheckpointer

FAST = TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False, seed=0)


def _snapshot(model):
    named = dict(model.lm.named_parameters())
    named["lora_user_embedding.weight"] = model.lora_user_embedding.weight
    named.update({f"buffer:{n}": b for n, b in model.lm.named_buffers()})
    return {n: t.detach().clone() for n, t in named.items()}


def _changed(before, model):
    after = _snapshot(model)
    return {
        n
        for n in before
        if n in after and (before[n].shape != after[n].shape or not torch.equal(before[n], after[n]))
    }


def _scope_names(model, scope):
    return {n.replace("lm.", "", 1) if n.startswith("lm.") else n for n in model.scope_parameters(scope)}


@pytest.mark.parametrize("stage", ["population", "group", "user", "end_to_end"])
def test_each_stage_changes_exactly_its_own_parameters(tiny_backbone, stage):
    exs = planted_groups(4, 4)
    model = fresh_model(tiny_backbone)
    model.set_users(e.user_id for e in exs)  # so the user table keeps its shape across the stage
    if stage in ("group", "user"):
        stages.train_population(model, exs, FAST)
    if stage == "user":
        stages.train_group(model, exs, FAST)
    before = _snapshot(model)
    run = {
        "population": stages.train_population,
        "group": stages.train_group,
        "user": stages.train_user,
        "end_to_end": stages.train_end_to_end,
    }[stage]
    result = run(model, exs[:8] if stage == "user" else exs, FAST)
    changed = _changed(before, model)
    scopes = {
        "population": ["population"],
        "group": ["group"],
        "user": ["user"],
        "end_to_end": ["population", "group"],
    }[stage]
    expected = set().union(*(_scope_names(model, s) for s in scopes))
    full = {n if n == "lora_user_embedding.weight" else n for n in expected}
    # every changed tensor belongs to the stage's scope, and every tensor of the scope changed
    assert changed == full, (sorted(changed - full)[:5], sorted(full - changed)[:5])
    assert result.trainable_parameters == sum(
        model.scope_parameters(s)[n].numel() for s in scopes for n in model.scope_parameters(s)
    )
    assert not any(p.requires_grad for p in model.parameters()), "a stage must leave everything frozen"


@pytest.mark.parametrize("mix", ["lora_router", "lora_router_from_group"])
def test_lora_aware_router_receives_gradients(tiny_backbone, mix):
    exs = planted_groups(2, 4)
    model = fresh_model(tiny_backbone)
    stages.train_population(model, exs, FAST)
    stages.train_group(model, exs, FAST)
    # one manual step in user mode: the router must get a non-zero gradient once B_u moved off zero
    model.reset_user(0, router_from_group=mix == "lora_router_from_group")
    stages.serving_mode(model, "user", mix)
    model.set_trainable(["user"])
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_user_B.normal_(0, 0.01)
    batch = batch_for(model, exs)
    from proper_fed.train.batching import target_loss

    rows = model.user_rows([e.user_id for e in exs])
    out = model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False)
    target_loss(out.logits, batch["labels"]).backward()
    grads = [layer.lora_beta.grad for layer in model.layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_user_stage_ablations_train_only_the_user_lora(tiny_backbone):
    exs = planted_groups(2, 4)
    model = fresh_model(tiny_backbone)
    stages.train_group(model, exs, FAST)
    for mix in ("uniform", "none", "user_router"):
        r = stages.train_user(model, exs[:4], FAST, expert_mix=mix)
        betas = sum(layer.lora_beta.numel() for layer in model.layers.values())
        assert r.trainable_parameters == model.count_parameters("user") - betas
    with pytest.raises(ValueError, match="expert_mix"):
        stages.train_user(model, exs[:4], FAST, expert_mix="bogus")


def _mean_loss(model, exs, users=True):
    from proper_fed.train.batching import target_loss

    batch = batch_for(model, exs)
    rows = model.user_rows([e.user_id for e in exs]) if users else None
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False)
    return target_loss(out.logits, batch["labels"]).item()


def test_planted_groups_each_stage_lowers_loss_and_groups_route_apart(tiny_backbone):
    exs = planted_groups(8, 12)
    model = fresh_model(tiny_backbone)
    cfg = TrainConfig(
        epochs=6, lr=1e-2, batch_size=8, progress=False, constraint_weight=0.5, unknown_user_prob=0.0
    )
    stages.serving_mode(model, "base")
    base_loss = _mean_loss(model, exs, users=False)
    stages.train_population(model, exs, cfg)
    stages.serving_mode(model, "population")
    pop_loss = _mean_loss(model, exs, users=False)
    stages.train_group(model, exs, dataclasses.replace(cfg, epochs=12))
    stages.serving_mode(model, "group")
    group_loss = _mean_loss(model, exs)
    # a device user the server never saw, with a taste of their own: only stage 3 can learn it
    newcomer = [dataclasses.replace(e, user_id="newcomer", target="gamma") for e in exs[:12]]
    stages.serving_mode(model, "group")
    group_loss_new = _mean_loss(model, newcomer)
    stages.train_user(model, newcomer, dataclasses.replace(cfg, epochs=10))
    stages.serving_mode(model, "user")
    user_loss_new = _mean_loss(model, newcomer)
    assert base_loss > pop_loss > group_loss, (base_loss, pop_loss, group_loss)
    assert user_loss_new < 0.5 * group_loss_new, (user_loss_new, group_loss_new)

    # routing: mean routing of group-0 users vs group-1 users, over all recorded layers
    batch = batch_for(model, exs)
    rows = model.user_rows([e.user_id for e in exs])
    stages.serving_mode(model, "group")
    model.ctx.record = True
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False)
    model.ctx.record = False
    group_of = torch.tensor([int(e.user_id[4:]) % 2 for e in exs])
    g = torch.stack(
        [per_user_routing(x, batch["attention_mask"], group_of) for x in model.ctx.gates]
    )  # (L, 2, k)
    l1 = (g[:, 0] - g[:, 1]).abs().sum(-1)  # (L,) L1 distance between the two groups' routing
    assert l1.mean() > 0.2, l1
    assert (g[:, 0].argmax(-1) != g[:, 1].argmax(-1)).float().mean() >= 0.5


def test_resume_from_epoch_checkpoint_continues_where_it_stopped(tiny_backbone, tmp_path):
    exs = planted_groups(4, 4)
    cfg = dataclasses.replace(FAST, epochs=3)
    straight = fresh_model(tiny_backbone)
    full = stages.train_population(straight, exs, cfg)

    interrupted = fresh_model(tiny_backbone)
    ck = FolderCheckpointer(tmp_path, "population")
    stages.train_population(interrupted, exs, dataclasses.replace(cfg, epochs=2), checkpointer=ck)
    resumed = fresh_model(tiny_backbone)
    r = stages.train_population(resumed, exs, cfg, checkpointer=ck)
    assert r.resumed_from_epoch == 2 and r.steps == full.steps // 3
    assert r.epoch_losses == pytest.approx(full.epoch_losses, rel=1e-5)
    for name, p in straight.scope_parameters("population").items():
        torch.testing.assert_close(resumed.scope_parameters("population")[name], p, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_shape_is_refused(tiny_backbone, tmp_path):
    from model_helpers import SMALL

    from proper_fed.errors import CheckpointError

    exs = planted_groups(2, 2)
    ck = FolderCheckpointer(tmp_path, "population")
    stages.train_population(fresh_model(tiny_backbone), exs, FAST, checkpointer=ck)
    other = fresh_model(tiny_backbone, dataclasses.replace(SMALL, population_rank=2))
    with pytest.raises(CheckpointError, match="does not match"):
        stages.train_population(other, exs, dataclasses.replace(FAST, epochs=2), checkpointer=ck)
