"""Stages 1-2 trained federated: each consenting device trains the stage locally on its own history, starting
from the server's shared tensors, and sends only its update of those tensors (under SecAgg+, see
`federation/shared_vector.py`); the server averages the updates (FedAvg) and sends the new shared tensors
out for the next round. This module is the device's local training and the server's bookkeeping of the shared
tensors; the rounds themselves are run by the Flower apps. Nothing here imports Flower.

What is shared (the same for every device, derived from the adapter config):
- stage 1: the population LoRA;
- stage 2: the k expert LoRAs, the user-aware router, and the unknown-user row of the user table (trained,
  as on the server, by the examples the unknown-user dropout routes through it).
The device user's own row of the user table is trained in stage 2 too, but never leaves the device: the
device keeps it between rounds (`LocalUpdate.own_row`) and it is in no vector.

The constraint loss is OFF in federated stage 2: it compares different users' routing within a batch, and a
device holds one user. Computing it against other users' routing would need their routing on the device,
which the server does not have and must not learn; so the experts are kept apart only by the users' data
(and the unknown-user dropout). The ablation `proper_no_constraint` measures what that costs centrally.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from proper_fed.config import TrainConfig
from proper_fed.data.example import Example
from proper_fed.errors import ConfigError
from proper_fed.methods import ExpertMix
from proper_fed.model.proper_model import UNKNOWN_USER, ProperModel
from proper_fed.train import stages
from proper_fed.train.trainer import StageResult, run_stage, unknown_user_dropout

FEDERATED_STAGES = ("population", "group")
USER_TABLE = "lora_user_embedding.weight"
OWN_ROW = 1  # on a device the user table is [unknown-user row (shared), the device user's own row]


def _check_stage(stage: str) -> None:
    if stage not in FEDERATED_STAGES:
        raise ConfigError(f"stage {stage!r} is not trained federated; use one of {FEDERATED_STAGES}")


def shared_tensors(model: ProperModel, stage: str) -> dict[str, torch.Tensor]:
    """A copy of the stage's shared tensors: the population scope, or the group scope with the user table cut
    to its unknown-user row (the form a bundle ships the group stage in)."""
    _check_stage(stage)
    state = model.scope_state_dict(stage)
    if stage == "group":
        state[USER_TABLE] = state[USER_TABLE][UNKNOWN_USER : UNKNOWN_USER + 1].clone()
    return state


def initial_own_row(user_id: str, dim: int, seed: int) -> torch.Tensor:
    """A device user's own row before its first group round: N(0, 1) like the server's rows (`set_users`),
    drawn from the user id, so users start apart and every run starts the same."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(dim, generator=gen)


def load_shared(
    model: ProperModel,
    stage: str,
    shared: Mapping[str, torch.Tensor],
    user_id: str = "",
    own_row: torch.Tensor | None = None,
) -> None:
    """Put the shared tensors of `stage` into `model`. For the group stage with `user_id`: the user table
    becomes [shared unknown-user row, `own_row`] and `user_id` is routed through its own row."""
    _check_stage(stage)
    state = dict(shared)
    if stage == "group":
        unknown = state[USER_TABLE]
        if unknown.shape[0] != 1:
            raise ConfigError(
                f"the shared user table has {unknown.shape[0]} rows; it ships only the unknown row"
            )
        rows = [unknown] if not user_id else [unknown, own_row.reshape(1, -1).to(unknown)]
        table = torch.cat(rows).to(model.backbone.device)
        model.lora_user_embedding = nn.Embedding.from_pretrained(table.clone(), freeze=False)
        model.user_index = {user_id: OWN_ROW} if user_id else {}
        state[USER_TABLE] = table
    model.load_scope_state_dict(stage, state)


def local_config(cfg: TrainConfig, stage: str, epochs: int, round_index: int) -> TrainConfig:
    """The stage's training config for one device round: `epochs` local epochs, a seed per round (other
    batch orders each round), no progress bars, and the constraint loss off in stage 2 (see the module
    docstring)."""
    _check_stage(stage)
    local = dataclasses.replace(cfg, epochs=epochs, seed=cfg.seed + round_index, progress=False)
    return dataclasses.replace(local, constraint_weight=0.0) if stage == "group" else local


@dataclass
class LocalUpdate:
    """One device's round: its shared tensors after local training, the update (local - global), how many
    examples it trained on, its own user row (stage 2; never sent) and the training's result (never sent)."""

    shared: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    examples: int
    own_row: torch.Tensor | None
    result: StageResult


def train_local_stage(
    model: ProperModel,
    stage: str,
    user_id: str,
    examples: Sequence[Example],
    cfg: TrainConfig,
    shared: Mapping[str, torch.Tensor],
    population: Mapping[str, torch.Tensor] | None = None,
    own_row: torch.Tensor | None = None,
) -> LocalUpdate:
    """One device's local training of `stage` for `cfg.epochs` epochs (use `local_config`), on its own
    `examples`, starting from the server's `shared` tensors. Stage 2 also needs the federated `population`
    (frozen) and the user's `own_row` from the previous round (None: `initial_own_row`)."""
    _check_stage(stage)
    if not examples:
        raise ConfigError("a device with no history cannot train a federated stage")
    if any(ex.user_id != user_id for ex in examples):
        raise ConfigError("a device trains a federated stage on its own user's examples only")
    if stage == "population":
        load_shared(model, "population", shared)
        result = stages.train_population(model, examples, cfg)
    else:
        if population is None:
            raise ConfigError("federated stage 2 needs the federated population adapter")
        model.load_scope_state_dict("population", dict(population))
        if own_row is None:
            own_row = initial_own_row(user_id, model.cfg.user_embedding_dim, cfg.seed)
        load_shared(model, "group", shared, user_id, own_row)
        result = _train_group_locally(model, examples, cfg)
    local = shared_tensors(model, stage)
    delta = {k: local[k].double() - shared[k].double() for k in shared}
    row = None
    if stage == "group":
        row = model.lora_user_embedding.weight[OWN_ROW].detach().to("cpu", copy=True)
    return LocalUpdate(local, delta, len(examples), row, result)


def _train_group_locally(model: ProperModel, examples: Sequence[Example], cfg: TrainConfig) -> StageResult:
    """Stage 2 on one user, as `stages.train_group` but on the table `load_shared` set up (no new rows) and
    without the constraint loss (one user: nothing to push apart)."""
    if cfg.constraint_weight > 0:
        raise ConfigError("the constraint loss needs several users in a batch; use local_config for stage 2")
    model.set_mode(population=True, experts=ExpertMix.USER_ROUTER)
    model.ctx.record = False
    trainable = model.set_trainable(["group"])
    rows = unknown_user_dropout(model, cfg.unknown_user_prob, cfg.seed)
    return run_stage(model, examples, cfg, "group", trainable, user_rows_fn=rows)
