"""What a device does with the frozen server stages and its own history: evaluate the server's models, train
its user stage (PROPER, and the baselines that share the same base), evaluate each on its held-out queries.

The result is numbers (sufficient statistics, timings, sizes) plus, kept on the device, the answers (what was
scored, and the raw generations) and the user adapter. Each method is evaluated under every scoring protocol
of the run (see `scoring.py`); training happens once. Nothing here talks to Flower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from proper_fed.config import TrainConfig
from proper_fed.data.example import Example
from proper_fed.data.metric_stats import query_stats
from proper_fed.data.scoring import scored_answer
from proper_fed.data.task_spec import TaskSpec
from proper_fed.errors import ConfigError
from proper_fed.methods import DEVICE_METHODS, METHODS, ExpertMix, Kind, Method, Stage, method
from proper_fed.model.proper_model import ProperModel
from proper_fed.train import stages
from proper_fed.train.generate import generate
from proper_fed.train.rank import rank_answers
from proper_fed.train.trainer import Checkpointer, StageResult

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One method under one protocol: its statistics, the answers scored (parsed, as text) and the raw ones."""

    stats: dict[str, float]
    answers: list[str]
    raw: list[str]
    seconds: float = 0.0


@dataclass
class MethodResult:
    """One method for one user: its evaluations, and what its device-side training cost (the embedding fit
    included for the methods that use the user's own embedding)."""

    scored: dict[str, Scored] = field(default_factory=dict)  # protocol -> its evaluation, in run order
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    train_tokens: int = 0
    epoch_losses: list[float] = field(default_factory=list)

    def add_training(self, r: StageResult) -> None:
        self.train_seconds += r.seconds
        self.trainable_parameters += r.trainable_parameters
        self.train_tokens += r.tokens


def max_new_tokens_for(task: TaskSpec, tokenizer=None) -> int:  # noqa: ANN001 - any HF tokenizer
    """Greedy budget: room for the longest label plus a short lead-in ("The tag is ..."), so a model that
    names a label in a sentence is not cut off before it (a cut answer parses as no label)."""
    if task.type == "classification" and tokenizer is not None:
        longest = max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in task.labels)
        return max(16, longest + 12)
    return {"classification": 16, "rating": 8}.get(task.type, 48)


def _answers(
    model: ProperModel, task: TaskSpec, queries: Sequence[Example], protocol: str, batch_size: int
) -> list[str]:
    prompts, users = [q.prompt for q in queries], [q.user_id for q in queries]
    if protocol == "rank":
        return rank_answers(model, prompts, users, task.labels)
    if protocol != "generate":
        raise ConfigError(f"scoring protocol {protocol!r}; use generate or rank")
    budget = max_new_tokens_for(task, model.backbone.tokenizer)
    return generate(model, prompts, users, max_new_tokens=budget, batch_size=batch_size)


def evaluate(
    model: ProperModel,
    task: TaskSpec,
    queries: Sequence[Example],
    protocol: str = "generate",
    batch_size: int = 8,
) -> Scored:
    """Answer every query under one protocol (`rank`: the chosen label is the answer) and score it."""
    t0 = time.perf_counter()
    raw = _answers(model, task, queries, protocol, batch_size)
    stats = query_stats(task, raw, [q.target for q in queries])
    answers = [scored_answer(task, r) for r in raw]
    return Scored(stats, answers, raw, time.perf_counter() - t0)


def run_method(
    model: ProperModel,
    name: str,
    task: TaskSpec,
    history: Sequence[Example],
    queries: Sequence[Example],
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
    protocols: Sequence[str] = ("generate",),
) -> MethodResult:
    """Evaluate one method for one user under each scoring protocol. `name` is a device method or a server
    variant (the PROPER user stage on that variant's group model, already loaded in `model`)."""
    spec = _llm_method(name)
    serves, result = spec.serves, MethodResult()
    if spec.trains_user_stage:
        if not history:
            log.warning("user has no history: %s falls back to the group model", name)
            serves = Stage.GROUP if spec.user_mix is not ExpertMix.NONE else Stage.POPULATION
        else:
            r = stages.train_user(model, history, cfg, expert_mix=spec.user_mix, checkpointer=checkpointer)
            result.add_training(r)
            result.epoch_losses = r.epoch_losses
    stages.serving_mode(model, serves, expert_mix=spec.user_mix or ExpertMix.LORA_ROUTER_FROM_GROUP)
    result.scored = {p: evaluate(model, task, queries, p) for p in protocols}
    return result


def _llm_method(name: str) -> Method:
    spec = method(name)
    if not spec.uses_llm:
        raise ConfigError(f"{name} is a label baseline (no model): the device computes it from labels")
    return spec


def personalize_user(
    model: ProperModel,
    methods: Sequence[str],
    task: TaskSpec,
    history: Sequence[Example],
    queries: Sequence[Example],
    cfg: TrainConfig,
    checkpointer_for: Callable[[str], Checkpointer | None] | None = None,
    on_trained: Callable[[str, ProperModel], None] | None = None,
    protocols: Sequence[str] = ("generate",),
    own_row: torch.Tensor | None = None,
) -> dict[str, MethodResult]:
    """Run every requested method for one user on the same history and the same queries, all on `model`
    (one server model: PROPER's, a variant's or the matched one). Methods that use the user's own embedding
    share one fit of it, done first (from `own_row` when the device trained one in federated stage 2, else
    from the unknown-user row); the others route the user through the unknown-user row.

    on_trained(method, model) is called right after each user stage, before the next method resets it:
    the device stores its adapter there.
    """
    unknown = [m for m in methods if m not in METHODS or METHODS[m].kind not in (Kind.DEVICE, Kind.VARIANT)]
    if unknown:
        raise ConfigError(f"unknown device method(s) {unknown}; use {list(DEVICE_METHODS)}")
    user_id = (queries or history)[0].user_id
    fit = _fit_embedding(model, [METHODS[m] for m in methods], user_id, history, cfg, own_row)
    out: dict[str, MethodResult] = {}
    for name in methods:
        spec = METHODS[name]
        model.route_own_row(user_id, own=spec.personal_embedding and fit is not None)
        ck = checkpointer_for(name) if checkpointer_for else None
        out[name] = run_method(model, name, task, history, queries, cfg, ck, protocols)
        if spec.personal_embedding and fit is not None:
            out[name].add_training(fit)
        if on_trained is not None and spec.trains_user_stage and history:
            on_trained(name, model)
    torch.manual_seed(cfg.seed)
    return out


def _fit_embedding(
    model: ProperModel,
    specs: Sequence[Method],
    user_id: str,
    history: Sequence[Example],
    cfg: TrainConfig,
    start: torch.Tensor | None,
) -> StageResult | None:
    """The user's own embedding row, fitted once for every method that uses it (None: no method does, or
    the user has no history to fit it on)."""
    if not history or not any(s.personal_embedding for s in specs):
        return None
    return stages.fit_user_embedding(model, user_id, history, cfg, start=start)
