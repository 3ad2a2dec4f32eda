"""PROPER's three progressive stages, and the end-to-end variant for the ablation.

Each stage switches on the adapters it needs, trains exactly its own scope, and leaves it frozen:
population (stage 1) -> group experts + user-aware router + user embeddings (stage 2) -> user LoRA +
LoRA-aware router (stage 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proper_fed.config import TrainConfig
from proper_fed.distributed import Ranks, constraint_loss_across_ranks
from proper_fed.example import Example
from proper_fed.proper_model import ProperModel
from proper_fed.routing import constraint_loss
from proper_fed.trainer import Checkpointer, ExtraLoss, Shard, StageResult, run_stage, unknown_user_dropout

# How the device-side stage mixes the frozen experts: PROPER's LoRA-aware router, the ablation's uniform mix,
# or no experts at all (OPPU: population + a per-user LoRA).
USER_EXPERT_MIXES = {"lora_router": "lora_router", "uniform": "uniform", "none": "none"}


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
    model.set_mode(population=True, experts="user_router")
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


def train_user(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    expert_mix: str = "lora_router",
    checkpointer: Checkpointer | None = None,
) -> StageResult:
    """Stage 3, on one user's own history: a fresh user LoRA and LoRA-aware router over the frozen experts.

    expert_mix: "lora_router" (PROPER), "uniform" (ablation: experts mixed 1/k) or "none" (OPPU).
    """
    if expert_mix not in USER_EXPERT_MIXES:
        raise ValueError(f"expert_mix={expert_mix!r}; use one of {sorted(USER_EXPERT_MIXES)}")
    model.reset_user(cfg.seed)
    model.set_mode(population=True, experts=USER_EXPERT_MIXES[expert_mix], user=True)
    trainable = model.set_trainable(["user"])
    if expert_mix != "lora_router":  # the router is unused: do not count or update it
        trainable = [p for n, p in model.scope_parameters("user").items() if not n.endswith("lora_beta")]
        model.set_trainable([])
        for p in trainable:
            p.requires_grad_(True)
    return run_stage(model, examples, cfg, "user", trainable, checkpointer=checkpointer)


def serving_mode(model: ProperModel, stage: str, expert_mix: str = "lora_router") -> None:
    """Switch the adapters on for inference after `stage` ("base", "population", "group" or "user")."""
    if stage == "base":
        model.set_mode()
    elif stage == "population":
        model.set_mode(population=True)
    elif stage == "group":
        model.set_mode(population=True, experts="user_router")
    elif stage == "user":
        model.set_mode(population=True, experts=USER_EXPERT_MIXES[expert_mix], user=True)
    else:
        raise ValueError(f"stage={stage!r}; use base, population, group or user")
