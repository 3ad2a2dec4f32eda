"""How long a simulation will take, estimated before it starts from a short measurement on this machine.

The run's work is counted exactly from its data and settings (training tokens of every server stage and of
every device method, evaluation tokens), then priced with a per-token training time measured on this machine:
a few real training steps of the run's own backbone, precision and server examples, at the server's thread
count and at one thread (a virtual device's). What the measurement cannot see is priced with factors measured
once on our 2-core machines (`FACTORS`); the estimate is a guide, not a promise, and `results.json` carries the
real times to compare with.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from proper_fed.data.example import Example

# Measured on 2-core CPUs (SmolLM2-135M, short prompts), as ratios to what the estimate measures:
FACTORS = {
    "nf4": 1.35,  # a device's nf4 training step / the same step in full precision (1 thread, fp32 compute)
    "eval_per_token": 0.45,  # evaluation (forward only, generate or rank) per token / training per token
    "fixed_s": 15.0,  # Flower + Ray start, the ServerApp's set-up, the results file
    "nf4_load": 3.5,  # loading + quantizing the base to nf4 / loading it in full precision (per device worker)
}
PLOT_EXAMPLES = 256  # the routing plots run the server model over this many server examples
MEASURED_STEPS = 2


@dataclass(frozen=True)
class Work:
    """Tokens the run trains and evaluates on, counted from its data and settings."""

    server_tokens: int  # summed over every server stage's epochs
    device_train_tokens: list[int]  # per device user, summed over the methods that train on the device
    device_eval_tokens: list[int]  # per device user, forward tokens of evaluating every method


@dataclass(frozen=True)
class Estimate:
    server_s: float
    device_s: float
    other_s: float
    train_s_per_token: float  # server threads, measured
    device_s_per_token: float  # one thread, measured
    precision: str
    busy: float = 0.0  # the 1-minute load average beyond this run's own measurement, when it was taken

    @property
    def total_s(self) -> float:
        return self.server_s + self.device_s + self.other_s

    def describe(self) -> str:
        return (
            f"estimated time on this machine: {self.total_s / 60:.1f} min (server stages "
            f"{self.server_s / 60:.1f}, devices {self.device_s / 60:.1f}, start-up and report "
            f"{self.other_s / 60:.1f}; measured {1 / self.train_s_per_token:.0f} training tokens/s in "
            f"{self.precision})"
            + (
                f"; the machine was busy (load {self.busy:.1f}): the estimate is high"
                if self.busy >= 1.0
                else ""
            )
        )


def _tokens(lengths: Sequence[int], batch_size: int) -> int:
    """Tokens a stage computes per epoch: every batch is padded to its longest example."""
    # Batches are random; the expected padded width is close to the mean of each batch's max, which for
    # short, similar prompts is near the overall 90th percentile.
    if not lengths:
        return 0
    ordered = sorted(lengths)
    width = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return math.ceil(len(lengths) / batch_size) * batch_size * width


def count_work(settings, split, lengths_of) -> Work:
    """`lengths_of(examples, max_length)` gives each example's token count as training encodes it."""
    from proper_fed.data import device_eval_examples, device_training_examples, server_training_examples
    from proper_fed.methods import METHODS, server_change, server_models_for

    cfg = settings.proper
    server = lengths_of(server_training_examples(split), cfg.population.max_length)
    per_epoch_p = _tokens(server, cfg.population.batch_size)
    per_epoch_g = _tokens(server, cfg.group.batch_size)
    epochs = cfg.population.epochs * per_epoch_p + cfg.group.epochs * per_epoch_g
    for model in server_models_for(settings.methods, settings.variants)[1:]:
        change = server_change(model)  # another group stage (end-to-end or population-only: both stages)
        epochs += cfg.group.epochs * per_epoch_g
        if change.end_to_end or change.population_only:
            epochs += cfg.population.epochs * per_epoch_g
    methods = (*settings.methods, *settings.variants)
    trained = [m for m in methods if METHODS[m].trains_user_stage]
    # one embedding fit per server model whose methods use the device user's own embedding
    trained_epochs = len(trained) * cfg.user.epochs + cfg.user.embedding_epochs * len(
        {METHODS[m].server_model for m in methods if METHODS[m].personal_embedding}
    )
    evaluated = len(settings.methods) + len(settings.variants)
    protocols = settings.scoring
    candidates = len(split.task.labels) or 1  # rating tasks list their scale as labels
    train, evals = [], []
    for user in split.device_users:
        hist = lengths_of(device_training_examples(split.task, user), cfg.user.max_length)
        queries = lengths_of(device_eval_examples(split.task, user), cfg.user.max_length)
        train.append(trained_epochs * _tokens(hist, cfg.user.batch_size))
        # generate: the prompt, then a few decoded tokens; rank: the prompt once, then every candidate's
        # few tokens after its shared cache
        per_method = sum(
            sum(queries) + len(queries) * (3 * candidates if p == "rank" else 8) for p in protocols
        )
        evals.append(evaluated * per_method)
    return Work(epochs, train, evals)


def measure_s_per_token(model, examples: Sequence[Example], cfg, threads: int) -> float:
    """Seconds per training token of a few real population-stage steps at `threads` CPU threads."""
    from proper_fed.train.batching import collate, encode_all, predicting_positions, target_loss_at

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.set_mode(population=True)
        params = model.set_trainable(["population"])
        opt = torch.optim.AdamW(params, lr=0.0)  # a real step that changes nothing
        items = encode_all(model.backbone, list(examples)[: cfg.batch_size], cfg.max_length)
        batch = collate(items, model.backbone.tokenizer.pad_token_id, model.backbone.device)
        seconds = []
        for _ in range(MEASURED_STEPS + 1):  # the first step warms up
            t0 = time.perf_counter()
            keep = predicting_positions(batch["labels"])  # as the trainer does
            out = model(batch["input_ids"], batch["attention_mask"], use_cache=False, logits_to_keep=keep)
            target_loss_at(out.logits, batch["labels"], keep).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
        return min(seconds[1:]) / batch["input_ids"].numel()
    finally:
        torch.set_num_threads(before)


def estimate_run(settings, split, device_parallel: int, with_plots: bool) -> Estimate:
    """Load the run's backbone, measure, count, price."""
    from proper_fed.data import server_training_examples
    from proper_fed.model.backbone import load_backbone
    from proper_fed.model.proper_model import ProperModel
    from proper_fed.train.batching import encode

    t0 = time.perf_counter()
    backbone = load_backbone(settings.proper.backbone)
    load_s = time.perf_counter() - t0
    model = ProperModel(backbone, settings.proper.adapters)
    try:

        def lengths_of(examples: Sequence[Example], max_length: int) -> list[int]:
            return [len(encode(backbone, ex, max_length).input_ids) for ex in examples]

        work = count_work(settings, split, lengths_of)
        examples = server_training_examples(split)
        plot_tokens = sum(lengths_of(examples[:PLOT_EXAMPLES], settings.proper.population.max_length))
        server_rate = measure_s_per_token(model, examples, settings.proper.population, settings.threads)
        device_rate = measure_s_per_token(model, examples, settings.proper.population, 1)
    finally:
        model.remove()
    device_core_s = sum(
        t * device_rate * (FACTORS["nf4"] if settings.device_quantization == "nf4" else 1.0)
        + e * device_rate * FACTORS["eval_per_token"]
        for t, e in zip(work.device_train_tokens, work.device_eval_tokens, strict=True)
    )
    parallel = max(1, min(device_parallel, len(work.device_train_tokens)))
    quantized = settings.device_quantization == "nf4"
    device_s = device_core_s / parallel + load_s * (FACTORS["nf4_load"] if quantized else 1.0)
    plots_s = load_s + plot_tokens * server_rate * FACTORS["eval_per_token"]
    other = FACTORS["fixed_s"] + (plots_s if with_plots else 0.0)
    return Estimate(
        work.server_tokens * server_rate,
        device_s,
        other,
        server_rate,
        device_rate,
        backbone.config.dtype,
        busy=_load_average(),
    )


def _load_average() -> float:
    """Other work on the machine when the measurement ran (threads fight over cores: on a busy machine a
    multi-threaded measurement is many times too slow)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0
