"""PROPER's three progressive stages, and the end-to-end variant for the ablation.

Each stage switches on the adapters it needs, trains exactly its own scope, and leaves it frozen:
population (stage 1) -> group experts + user-aware router + user embeddings (stage 2) -> user LoRA +
LoRA-aware router (stage 3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from proper_fed.config import TrainConfig
from proper_fed.data.example import Example
from proper_fed.errors import ConfigError
from proper_fed.methods import ExpertMix, Stage, as_expert_mix, as_stage
from proper_fed.model.proper_model import ProperModel
from proper_fed.model.routing import constraint_loss
from proper_fed.train.distributed import Ranks, constraint_loss_across_ranks
from proper_fed.train.trainer import (
    Checkpointer,
    ExtraLoss,
    Shard,
    StageResult,
    run_stage,
    unknown_user_dropout,
)

# How the device-side stage may mix the frozen experts: PROPER's LoRA-aware router started at the user's stage-2
# routing, the paper's LoRA-aware router alone, the user's frozen stage-2 routing (no LoRA-aware router), the
# uniform mix (ablation), or no experts at all (OPPU: population + a per-user LoRA). The mixes that read the
# user embedding use this device user's row of the user table (`fit_user_embedding`).
USER_EXPERT_MIXES = (
    ExpertMix.LORA_ROUTER_FROM_GROUP,
    ExpertMix.LORA_ROUTER,
    ExpertMix.USER_ROUTER,
    ExpertMix.UNIFORM,
    ExpertMix.NONE,
)


def train_population(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Stage 1: one LoRA on all users' data; afterwards frozen. With `ranks`: data-parallel, call on every rank."""
    model.set_mode(population=True)
    trainable = model.set_trainable(["population"])
    return run_stage(model, examples, cfg, "population", trainable, checkpointer=checkpointer, ranks=ranks)


def _constraint(weight: float, ranks: Ranks | None) -> ExtraLoss | None:
    """The constraint loss of the global batch. Across ranks it needs every shard's routing sums (it compares
    users of the whole batch): `constraint_loss_across_ranks` all-reduces them, so N ranks train the loss of
    the same batches as one process, not N smaller per-shard losses."""

    def extra(model: ProperModel, shard: Shard) -> torch.Tensor:
        mask = shard.batch["attention_mask"]
        if ranks is None:
            return weight * constraint_loss(model.ctx.gates, mask, shard.rows)
        return weight * constraint_loss_across_ranks(
            model.ctx.gates, mask, shard.rows, shard.batch_rows, ranks
        )

    return extra if weight > 0 else None


def _group_like(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    scopes: list[str],
    stage: str,
    checkpointer: Checkpointer | None,
    ranks: Ranks | None,
) -> StageResult:
    model.set_users(ex.user_id for ex in examples)
    model.set_mode(population=True, experts=ExpertMix.USER_ROUTER)
    model.ctx.record = cfg.constraint_weight > 0
    trainable = model.set_trainable(scopes)
    return run_stage(
        model,
        examples,
        cfg,
        stage,
        trainable,
        user_rows_fn=unknown_user_dropout(model, cfg.unknown_user_prob, cfg.seed),
        extra_loss=_constraint(cfg.constraint_weight, ranks),
        checkpointer=checkpointer,
        ranks=ranks,
    )


def train_group(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Stage 2: k expert LoRAs, the user-aware router and the user embeddings, with the constraint loss;
    the population adapter stays frozen. The users of `examples` get rows in the user table. With `ranks`:
    data-parallel, call on every rank."""
    return _group_like(model, examples, cfg, ["group"], "group", checkpointer, ranks)


def train_end_to_end(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Ablation: the population LoRA, experts, router and user embeddings trained jointly from scratch
    (what stages 1 and 2 learn progressively). Give it the epochs of both stages for a fair comparison."""
    return _group_like(model, examples, cfg, ["population", "group"], "end_to_end", checkpointer, ranks)


def _own_rows(model: ProperModel):
    """User rows of a device's batches: its user's row of the table (row 0 if the table does not know it)."""
    return lambda user_ids, step: model.user_rows(user_ids)


def fit_user_embedding(
    model: ProperModel,
    user_id: str,
    examples: Sequence[Example],
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
    start: torch.Tensor | None = None,
) -> StageResult:
    """On a device: this user's own row of the user table, fitted on its history with the stage-2 router and
    experts frozen (cfg.embedding_epochs at cfg.embedding_lr). The table the bundle carries has only the
    unknown-user row; the new row starts there, so with 0 epochs the user is routed as an unknown user, or at
    `start` (the row the device trained in federated stage 2, which never left it)."""
    row = model.add_user(user_id)
    if start is not None:
        with torch.no_grad():
            model.lora_user_embedding.weight[row] = start.to(model.lora_user_embedding.weight)
    model.set_mode(population=True, experts=ExpertMix.USER_ROUTER)
    model.set_trainable([])
    if cfg.embedding_epochs == 0:
        return StageResult("embedding")
    table = model.lora_user_embedding.weight
    table.requires_grad_(True)
    fit = dataclasses.replace(cfg, epochs=cfg.embedding_epochs, lr=cfg.embedding_lr, weight_decay=0.0)
    r = run_stage(
        model, examples, fit, "embedding", [table], user_rows_fn=_own_rows(model), checkpointer=checkpointer
    )
    r.trainable_parameters = table.shape[1]  # only the user's own row gets gradients (the unknown row none)
    return r


def train_user(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    expert_mix: ExpertMix | str = ExpertMix.LORA_ROUTER_FROM_GROUP,
    checkpointer: Checkpointer | None = None,
) -> StageResult:
    """Stage 3, on one user's own history: a fresh user LoRA (and LoRA-aware router, for the mixes that have
    one) over the frozen population and experts.

    expert_mix: "lora_router_from_group" (PROPER: starts exactly at the user's stage-2 model), "lora_router"
    (the paper's router from a random init), "user_router" (the user's stage-2 routing, frozen), "uniform"
    (experts mixed 1/k) or "none" (OPPU).
    """
    mix = _user_mix(expert_mix)
    model.reset_user(cfg.seed, router_from_group=mix is ExpertMix.LORA_ROUTER_FROM_GROUP)
    model.set_mode(population=True, experts=mix, user=True)
    trainable = model.set_trainable(["user"])
    if not mix.has_lora_router:  # the router is unused: do not count or update it
        trainable = [p for n, p in model.scope_parameters("user").items() if not n.endswith("lora_beta")]
        model.set_trainable([])
        for p in trainable:
            p.requires_grad_(True)
    rows = _own_rows(model) if mix.reads_user_embedding else None
    return run_stage(model, examples, cfg, "user", trainable, user_rows_fn=rows, checkpointer=checkpointer)


def _user_mix(value: ExpertMix | str) -> ExpertMix:
    mix = as_expert_mix(value)
    if mix not in USER_EXPERT_MIXES:
        raise ConfigError(f"expert_mix={value!r} in the user stage; use one of {list(USER_EXPERT_MIXES)}")
    return mix


def serving_mode(
    model: ProperModel, serves: Stage | str, expert_mix: ExpertMix | str = ExpertMix.LORA_ROUTER_FROM_GROUP
) -> None:
    """Switch the adapters on for inference after `serves` ("base", "population", "group" or "user")."""
    after = as_stage(serves)
    if after is Stage.BASE:
        model.set_mode()
    elif after is Stage.POPULATION:
        model.set_mode(population=True)
    elif after is Stage.GROUP:
        model.set_mode(population=True, experts=ExpertMix.USER_ROUTER)
    else:
        model.set_mode(population=True, experts=_user_mix(expert_mix), user=True)
