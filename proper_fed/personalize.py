"""What a device does with the frozen server stages and its own history: evaluate the server's models, train
its user stage (PROPER, and the baselines that share the same base), evaluate each on its held-out queries.

The result is numbers (sufficient statistics, timings, sizes) plus, kept on the device, the raw predictions
and the user adapter. Nothing here talks to Flower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from proper_fed import stages
from proper_fed.config import TrainConfig
from proper_fed.data.task_spec import TaskSpec
from proper_fed.example import Example
from proper_fed.generate import generate
from proper_fed.metric_stats import query_stats
from proper_fed.proper_model import ProperModel
from proper_fed.trainer import Checkpointer

log = logging.getLogger(__name__)

# method -> (serving stage, user-stage expert mix or None when the method trains nothing on the device)
DEVICE_METHODS: dict[str, tuple[str, str | None]] = {
    "zero_shot": ("base", None),
    "population": ("population", None),
    "proper_group": ("group", None),
    "oppu": ("user", "none"),
    "proper": ("user", "lora_router"),
    "proper_no_lora_router": ("user", "uniform"),
}
# Server-side ablations: a different group model each; the device trains the PROPER user stage on top.
VARIANT_METHODS = ("proper_end_to_end", "proper_no_constraint", "proper_k2", "proper_k5", "proper_k8")


@dataclass
class MethodResult:
    stats: dict[str, float]
    predictions: list[str]
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    trainable_parameters: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def max_new_tokens_for(task: TaskSpec) -> int:
    return {"classification": 8, "rating": 4}.get(task.type, 48)


def evaluate(
    model: ProperModel, task: TaskSpec, queries: Sequence[Example], batch_size: int = 8
) -> tuple[dict[str, float], list[str], float]:
    t0 = time.perf_counter()
    preds = generate(
        model,
        [q.prompt for q in queries],
        [q.user_id for q in queries],
        max_new_tokens=max_new_tokens_for(task),
        batch_size=batch_size,
    )
    return query_stats(task, preds, [q.target for q in queries]), preds, time.perf_counter() - t0


def run_method(
    model: ProperModel,
    method: str,
    task: TaskSpec,
    history: Sequence[Example],
    queries: Sequence[Example],
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
) -> MethodResult:
    """Evaluate one method for one user. `method` is a key of DEVICE_METHODS or a server variant name (which
    means: the PROPER user stage on that variant's group model, already loaded in `model`)."""
    stage, mix = DEVICE_METHODS.get(method, ("user", "lora_router"))
    result = MethodResult(stats={}, predictions=[])
    if mix is not None:
        if not history:
            log.warning("user has no history: %s falls back to the group model", method)
            stage = "group"
        else:
            r = stages.train_user(model, history, cfg, expert_mix=mix, checkpointer=checkpointer)
            result.train_seconds, result.trainable_parameters = r.seconds, r.trainable_parameters
            result.epoch_losses = r.epoch_losses
    stages.serving_mode(model, stage, expert_mix=mix or "lora_router")
    result.stats, result.predictions, result.eval_seconds = evaluate(model, task, queries)
    return result


def personalize_user(
    model: ProperModel,
    methods: Sequence[str],
    task: TaskSpec,
    history: Sequence[Example],
    queries: Sequence[Example],
    cfg: TrainConfig,
    checkpointer_for: Callable[[str], Checkpointer | None] | None = None,
    on_trained: Callable[[str, ProperModel], None] | None = None,
) -> dict[str, MethodResult]:
    """Run every requested device method for one user on the same history and the same queries.

    on_trained(method, model) is called right after each user stage, before the next method resets it:
    the device stores its adapter there.
    """
    unknown = [m for m in methods if m not in DEVICE_METHODS]
    if unknown:
        raise ValueError(f"unknown device method(s) {unknown}; use {sorted(DEVICE_METHODS)}")
    out: dict[str, MethodResult] = {}
    for method in methods:
        ck = checkpointer_for(method) if checkpointer_for else None
        out[method] = run_method(model, method, task, history, queries, cfg, ck)
        if on_trained is not None and DEVICE_METHODS[method][1] is not None and history:
            on_trained(method, model)
    torch.manual_seed(cfg.seed)
    return out
