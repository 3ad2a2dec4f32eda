"""Data-parallel training of a stage over N local processes (DistributedDataParallel): this process's place
among them (`Ranks`), its shard of a global batch, the group constraint loss across shards, and the launcher.

Every rank holds the whole data set and draws the same batch order, so each takes its strided share of the
same global batch a single process would train on; losses are scaled so that DDP's gradient average equals the
single-process gradient of that global batch. NCCL on GPUs (one per rank), gloo on CPU.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from proper_fed.errors import ConfigError, ProperFedError

log = logging.getLogger(__name__)
T = TypeVar("T")
_RESULT = "rank0_result.pt"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the `world` processes that train one stage together."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, checkpoints and saves; the others hold identical copies of the adapters."""
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """Positions of a global batch of `n` items that this rank trains on (strided, like
        DistributedSampler); empty when n < world."""
        return list(range(self.rank, n, self.world))

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over every rank, outside autograd."""
        total = t.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def barrier(self) -> None:
        dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the parameters that require grad right now: wrap again whenever the trainable scope
        changes (DDP registers its hooks at construction). Every trainable parameter of our stages gets a
        gradient in every step (the user table's gradient is dense, an empty shard still runs a forward),
        so find_unused_parameters stays off; DDP raises a clear error should that ever change."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # The frozen base has identical buffers on every rank: no need to broadcast them every step.
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def constraint_loss_across_ranks(
    gates_per_layer: list[torch.Tensor],
    mask: torch.Tensor,
    rows: torch.Tensor,
    batch_rows: torch.Tensor,
    ranks: Ranks,
    unknown_idx: int = 0,
) -> torch.Tensor:
    """`routing.constraint_loss` of the whole global batch, computed from this rank's shard.

    The loss compares different users' mean routing vectors within a batch, so a shard alone would see only
    some users and some of their tokens. Each rank sums its tokens' routing weights per user of the global
    batch; the sums are added up across ranks (an all-reduce), and every rank computes the same global loss
    from them. The gradient flows only through the rank's own sums, scaled by `world`, so that after DDP
    averages the gradients over ranks each rank's tokens get exactly the single-process gradient.

    gates_per_layer: (b, T, k) per layer for this rank's b rows; mask (b, T); rows (b,) this rank's user
    rows; batch_rows (B,) the global batch's user rows (identical on every rank).
    """
    users = batch_rows[batch_rows != unknown_idx].unique()  # (U,), the same on every rank
    if users.numel() < 2 or not gates_per_layer:
        return mask.new_zeros((), dtype=torch.float32)
    one_hot = (rows.unsqueeze(1) == users.unsqueeze(0)).float()  # (b, U); unknown rows match no user
    m = mask.float().unsqueeze(-1)  # (b, T, 1)
    counts = one_hot.T @ m.sum(1)  # (U, 1) tokens per user on this rank
    sums = torch.stack([one_hot.T @ (g.float() * m).sum(1) for g in gates_per_layer])  # (L, U, k)
    total_counts = ranks.all_sum(counts)
    # value: the global sums; gradient: world x this rank's own sums (see above)
    total = ranks.all_sum(sums) + ranks.world * (sums - sums.detach())  # (L, U, k)
    v = torch.nn.functional.normalize(total / total_counts.clamp_min(1.0), dim=-1)  # (L, U, k)
    sim = v @ v.transpose(1, 2)  # (L, U, U)
    n = sim.shape[-1]
    off_diagonal = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)  # (L,)
    return (off_diagonal / (n * (n - 1))).mean()


def launch(world: int, fn: Callable[..., T], *args: Any, device: str = "auto", threads: int = 1) -> T:
    """Run `fn(ranks, *args)` in `world` spawned processes that form one process group, and return what
    rank 0 returned. `fn` must be importable (a module-level function). Call this from a non-daemon process:
    a daemon cannot have children. This process never touches CUDA; each rank picks its own GPU.

    device: the backbone's device setting ("cpu", "cuda", "auto"), resolved inside each rank: on CUDA rank i
    uses GPU i and NCCL, on CPU gloo. threads: torch CPU threads of each rank."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, spawn

    if world < 1:
        raise ConfigError(f"devices={world} is invalid: use 1 or more")
    with tempfile.TemporaryDirectory(prefix="proper-fed-ranks-") as tmp:
        log.info("training on %d processes (%d threads each)", world, threads)
        try:
            spawn(_rank_main, args=(world, device, threads, tmp, fn, args), nprocs=world, join=True)
        except ProcessRaisedException as err:
            raise ProperFedError(f"rank {err.error_index} of {world} failed:\n{err}") from None
        except ProcessExitedException as err:
            raise ProperFedError(
                f"rank {err.error_index} of {world} died (exit code {err.exit_code}): out of memory, or killed"
            ) from None
        return torch.load(Path(tmp) / _RESULT, weights_only=False)  # our own file, written by rank 0


def _rank_device(rank: int, world: int, device: str) -> torch.device:
    from proper_fed.model.backbone import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return torch.device("cpu")
    if torch.cuda.device_count() < world:
        raise ConfigError(
            f"server devices={world} is invalid: only {torch.cuda.device_count()} CUDA GPUs are visible; "
            "use at most that many"
        )
    torch.cuda.set_device(rank)  # before anything else touches CUDA in this rank
    return torch.device("cuda", rank)


def _rank_main(
    rank: int, world: int, device: str, threads: int, tmp: str, fn: Callable[..., Any], args: tuple
) -> None:
    torch.set_num_threads(threads)
    dev = _rank_device(rank, world, device)
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
    )
    try:
        value = fn(Ranks(rank, world, dev), *args)
        if rank == 0:
            torch.save(value, Path(tmp) / _RESULT)
    finally:
        dist.destroy_process_group()
