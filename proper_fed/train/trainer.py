"""The one optimisation loop every stage uses: AdamW on the stage's parameters, a progress bar, a checkpoint
after each epoch and resume from the last one; in one process, or data-parallel over several (`Ranks`), where
each process trains its shard of the same global batch and the result is the same."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from proper_fed.atomic import atomic_write_bytes
from proper_fed.config import TrainConfig
from proper_fed.data.example import Example
from proper_fed.errors import CheckpointError
from proper_fed.model.proper_model import UNKNOWN_USER, ProperModel
from proper_fed.train.batching import (
    IGNORE,
    Encoded,
    collate,
    encode_all,
    predicting_positions,
    target_loss_at,
)
from proper_fed.train.distributed import Ranks

log = logging.getLogger(__name__)


@dataclass
class Shard:
    """The part of one global batch this process trains on (all of it in a single process).

    batch: the collated rows (b, T); rows: their user-table rows (b,); batch_rows: the user-table rows of the
    whole global batch (B,), identical on every rank; `rows` and `batch_rows` are None outside the group stage.
    """

    batch: dict[str, torch.Tensor]
    rows: torch.Tensor | None
    batch_rows: torch.Tensor | None


# extra_loss(model, shard) -> scalar added to the cross-entropy (the group constraint loss)
ExtraLoss = Callable[[ProperModel, Shard], torch.Tensor]


class Checkpointer(Protocol):
    """Where a stage keeps its per-epoch checkpoint (a folder on the server, an encrypted store on a device)."""

    def save(self, data: bytes) -> None: ...

    def load(self) -> bytes | None: ...


class FolderCheckpointer:
    def __init__(self, folder: str | Path, stage: str):
        self.path = Path(folder) / f"{stage}.ckpt"

    def save(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, data)

    def load(self) -> bytes | None:
        return self.path.read_bytes() if self.path.exists() else None


@dataclass
class StageResult:
    stage: str
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    trainable_parameters: int = 0
    resumed_from_epoch: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run_stage(
    model: ProperModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    stage: str,
    trainable: list[torch.nn.Parameter],
    user_rows_fn: Callable[[list[str], int], torch.Tensor] | None = None,
    extra_loss: ExtraLoss | None = None,
    checkpointer: Checkpointer | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Train `trainable` on `examples`; `cfg.batch_size` is the global batch. With `ranks`, this process
    trains its shard of every global batch under DDP (call it on every rank); rank 0 checkpoints."""
    if not examples:
        raise ValueError(f"{stage} stage got no training examples")
    torch.manual_seed(cfg.seed)
    encoded = encode_all(model.backbone, examples, cfg.max_length)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = StageResult(stage, trainable_parameters=sum(p.numel() for p in trainable))
    start = _resume(checkpointer, trainable, opt, result, stage)
    forward = ranks.wrap(model) if ranks is not None else model
    loop = _Epochs(model, forward, encoded, cfg, stage, opt, user_rows_fn, extra_loss, ranks)
    del forward
    _set_training(model, cfg, True)
    t0 = time.perf_counter()
    try:
        for epoch in range(start, cfg.epochs):
            result.epoch_losses.append(loop.run(epoch, result))
            if loop.main:
                loss, seconds = result.epoch_losses[-1], time.perf_counter() - t0
                log.info("%s epoch %d/%d loss %.4f (%.0f s)", stage, epoch + 1, cfg.epochs, loss, seconds)
            if checkpointer is not None and loop.main:
                checkpointer.save(_checkpoint_bytes(trainable, opt, epoch + 1, result.epoch_losses))
    finally:
        _set_training(model, cfg, False)
        del loop  # drops DDP's hooks: the next stage wraps its own scope
    result.seconds = time.perf_counter() - t0
    for p in trainable:
        p.requires_grad_(False)  # each stage is frozen before the next starts
    return result


def _set_training(model: ProperModel, cfg: TrainConfig, on: bool) -> None:
    """Gradient checkpointing (when configured) on for training; off, and the recorded routing cleared, after."""
    lm = model.backbone.model
    if cfg.grad_checkpointing and on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
    elif cfg.grad_checkpointing:
        lm.gradient_checkpointing_disable()
        lm.eval()
    if not on:
        model.ctx.record = False
        model.ctx.gates = []


@dataclass
class _Epochs:
    """One stage's optimisation loop over its encoded examples (`forward`: the model, or its DDP wrapper)."""

    model: ProperModel
    forward: torch.nn.Module
    encoded: list[Encoded]
    cfg: TrainConfig
    stage: str
    opt: torch.optim.Optimizer
    user_rows_fn: Callable[[list[str], int], torch.Tensor] | None
    extra_loss: ExtraLoss | None
    ranks: Ranks | None

    @property
    def main(self) -> bool:
        return self.ranks is None or self.ranks.is_main

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.encoded) / self.cfg.batch_size)

    def run(self, epoch: int, result: StageResult) -> float:
        """One epoch in its seeded order; counts steps and tokens into `result`; the mean batch loss."""
        cfg, n = self.cfg, self.n_batches
        order = torch.randperm(
            len(self.encoded), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        )
        desc = f"{self.stage} epoch {epoch + 1}/{cfg.epochs}"
        bar = tqdm(range(n), desc=desc, disable=not (cfg.progress and self.main), leave=False)
        total = 0.0
        for step in bar:
            items = [self.encoded[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            value = self.step(items, epoch * n + step)
            total += value
            result.steps += 1
            result.tokens += sum(len(it.input_ids) for it in items)
            bar.set_postfix(loss=f"{value:.3f}")
        return total / n

    def step(self, items: list[Encoded], global_step: int) -> float:
        """One optimiser step on one global batch; its loss (averaged over ranks)."""
        # rows of the whole global batch, on every rank: the unknown-user dropout draws as in one process
        ids = [it.user_id for it in items]
        batch_rows = self.user_rows_fn(ids, global_step) if self.user_rows_fn else None
        loss = _step_loss(self.model, self.forward, items, batch_rows, self.extra_loss, self.ranks)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item() if self.ranks is None else self.ranks.all_sum(loss).item() / self.ranks.world


def _target_tokens(items: Sequence[Encoded]) -> int:
    """Target tokens the loss counts (labels shifted by one, as `target_loss_at`)."""
    return sum(label != IGNORE for it in items for label in it.labels[1:])


def _step_loss(
    model: ProperModel,
    forward: torch.nn.Module,
    items: list[Encoded],
    batch_rows: torch.Tensor | None,
    extra_loss: ExtraLoss | None,
    ranks: Ranks | None,
) -> torch.Tensor:
    """This process's loss for one global batch. Under DDP, the cross-entropy of the shard is weighted by its
    share of the global batch's target tokens times `world`, so that DDP's gradient average is the gradient
    of the global batch's token-mean loss, as in one process."""
    local = list(range(len(items))) if ranks is None else ranks.shard(len(items))
    # A rank whose shard is empty (last batch smaller than world) still runs a forward and backward on one
    # row with weight 0: every rank must take part in the gradient all-reduce.
    shard_items = [items[i] for i in local] or items[:1]
    batch = collate(shard_items, model.backbone.tokenizer.pad_token_id, model.backbone.device)
    rows = None
    if batch_rows is not None:
        rows = batch_rows[local] if local else torch.full_like(batch_rows[:1], UNKNOWN_USER)
    keep = predicting_positions(batch["labels"])  # (K,): the LM head runs only where a target is predicted
    out = forward(
        batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False, logits_to_keep=keep
    )
    loss = target_loss_at(out.logits, batch["labels"], keep)
    if ranks is not None:
        share = _target_tokens([items[i] for i in local]) / _target_tokens(items)
        loss = loss * (share * ranks.world)
    if extra_loss is not None:
        loss = loss + extra_loss(model, Shard(batch, rows, batch_rows))
    return loss


def _checkpoint_bytes(
    trainable: list[torch.nn.Parameter], opt: torch.optim.Optimizer, epoch: int, losses: list[float]
) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "epoch": epoch,
            "losses": losses,
            "params": [p.detach().cpu() for p in trainable],
            "optimizer": opt.state_dict(),
        },
        buf,
    )
    return buf.getvalue()


def _resume(
    checkpointer: Checkpointer | None,
    trainable: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    result: StageResult,
    stage: str,
) -> int:
    data = checkpointer.load() if checkpointer is not None else None
    if data is None:
        return 0
    state = torch.load(io.BytesIO(data), weights_only=True)
    saved = state["params"]
    if len(saved) != len(trainable) or any(s.shape != p.shape for s, p in zip(saved, trainable, strict=True)):
        raise CheckpointError(
            f"the {stage} checkpoint does not match this model's {stage} parameters; delete it "
            "or use the model and adapter config it was made with"
        )
    with torch.no_grad():
        for s, p in zip(saved, trainable, strict=True):
            p.copy_(s.to(p.device, p.dtype))
    opt.load_state_dict(state["optimizer"])
    result.epoch_losses = list(state["losses"])
    result.resumed_from_epoch = int(state["epoch"])
    log.info("%s: resumed after epoch %d", stage, result.resumed_from_epoch)
    return result.resumed_from_epoch


def unknown_user_dropout(
    model: ProperModel, prob: float, seed: int
) -> Callable[[list[str], int], torch.Tensor]:
    """User rows for a group-stage batch, with a fraction `prob` replaced by the unknown-user row (cold start)."""

    def rows(user_ids: list[str], step: int) -> torch.Tensor:
        r = model.user_rows(user_ids)
        if prob > 0:
            drop = (
                torch.rand(len(user_ids), generator=torch.Generator().manual_seed(seed * 104729 + step))
                < prob
            )
            r = torch.where(drop.to(r.device), torch.full_like(r, UNKNOWN_USER), r)
        return r

    return rows
