"""Stages 1 and 2 on the server's own users, resumable from the state folder, plus the other server models:
the matched baseline (one LoRA with PROPER's server rank and budget) and the server-side ablations (end-to-end,
no constraint loss, other k). Each gives a population and (except the matched one) a group stage that ship in
the bundle; the user table ships only its unknown-user row (devices fit their own row)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from proper_fed.config import ProperConfig
from proper_fed.data.example import Example
from proper_fed.errors import CheckpointError
from proper_fed.methods import PROPER, server_change
from proper_fed.model.backbone import Backbone
from proper_fed.model.proper_model import UNKNOWN_USER, ProperModel
from proper_fed.train import stages
from proper_fed.train.distributed import Ranks
from proper_fed.train.trainer import FolderCheckpointer

log = logging.getLogger(__name__)


@dataclass
class ServerModel:
    """The frozen population and group adapters of one variant, ready to ship."""

    name: str
    adapters: dict  # AdapterConfig as a dict
    population: dict
    group: dict  # {} for a population-only model; the user table cut to its unknown-user row
    metrics: dict[str, float]

    @property
    def user_rows(self) -> int:
        """Rows of the user table that ship (the unknown-user row; 0 without a group stage)."""
        return int(self.group[USER_TABLE].shape[0]) if self.group else 0


USER_TABLE = "lora_user_embedding.weight"


def shipped_group(model: ProperModel) -> dict:
    """The group stage as it ships: the server users' embedding rows stay on the server; devices get the
    unknown-user row and fit their own from it."""
    group = model.scope_state_dict("group")
    group[USER_TABLE] = group[USER_TABLE][UNKNOWN_USER : UNKNOWN_USER + 1].clone()
    return group


def variant_config(cfg: ProperConfig, variant: str) -> tuple[ProperConfig, bool]:
    """The config of a server model or variant (its `ServerChange` in the method registry) and whether it
    trains end to end. PROPER itself (no change) gives `cfg` unchanged."""
    change = server_change(variant)
    if change.population_only:
        a, p = cfg.adapters, cfg.population
        rank = a.population_rank + a.num_experts * a.group_rank
        return dataclasses.replace(
            cfg,
            adapters=dataclasses.replace(a, population_rank=rank),
            population=dataclasses.replace(p, epochs=p.epochs + cfg.group.epochs),
        ), False
    if change.num_experts is not None:
        cfg = dataclasses.replace(
            cfg, adapters=dataclasses.replace(cfg.adapters, num_experts=change.num_experts)
        )
    if change.constraint_weight is not None:
        cfg = dataclasses.replace(
            cfg, group=dataclasses.replace(cfg.group, constraint_weight=change.constraint_weight)
        )
    if change.end_to_end:
        joint = dataclasses.replace(cfg.group, epochs=cfg.population.epochs + cfg.group.epochs)
        cfg = dataclasses.replace(cfg, group=joint)
    return cfg, change.end_to_end


def _stage_done(folder: Path, scope: str) -> bool:
    return (folder / f"{scope}.safetensors").exists() and (folder / f"{scope}.json").exists()


def _save_scope(model: ProperModel, scope: str, folder: Path, ranks: Ranks | None) -> None:
    """Rank 0 writes the scope; the barriers keep every rank's `_stage_done` checks on the same side of it."""
    if ranks is None:
        model.save_scope(scope, folder)
        return
    ranks.barrier()
    if ranks.is_main:
        model.save_scope(scope, folder)
    ranks.barrier()


def train_server_model(
    backbone: Backbone,
    examples: list[Example],
    cfg: ProperConfig,
    folder: Path,
    name: str = PROPER,
    end_to_end: bool = False,
    population_from: Path | None = None,
    ranks: Ranks | None = None,
) -> ServerModel:
    """Train (or resume) one variant's server stages in `folder`; a finished stage is loaded, not retrained.
    With `ranks`, every rank calls this and trains its shard of each batch; rank 0 writes the files."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ProperModel(backbone, cfg.adapters, seed=cfg.population.seed)
    population_only = server_change(name).population_only
    try:
        if end_to_end:
            metrics = _end_to_end(model, examples, cfg, folder, ranks)
        else:
            pop_folder = population_from or folder
            metrics = _progressive(model, examples, cfg, folder, pop_folder, ranks, not population_only)
        saved = _record_metrics(folder, metrics) if ranks is None or ranks.is_main else metrics
        return ServerModel(
            name,
            model.scope_meta("group")["adapters"],
            model.scope_state_dict("population"),
            {} if population_only else shipped_group(model),
            saved,
        )
    except CheckpointError as err:
        raise CheckpointError(f"{err} (server state in {folder}: delete it to retrain from scratch)") from err
    finally:
        model.remove()


def _end_to_end(
    model: ProperModel, examples: list[Example], cfg: ProperConfig, folder: Path, ranks: Ranks | None
) -> dict[str, float]:
    """The ablation's joint stage, or its saved result."""
    if _stage_done(folder, "group") and _stage_done(folder, "population"):
        model.load_scope("population", folder)
        model.load_scope("group", folder)
        return {}
    r = stages.train_end_to_end(model, examples, cfg.group, FolderCheckpointer(folder, "end_to_end"), ranks)
    _save_scope(model, "population", folder, ranks)
    _save_scope(model, "group", folder, ranks)
    return _stage_metrics("end_to_end", r)


def _progressive(
    model: ProperModel,
    examples: list[Example],
    cfg: ProperConfig,
    folder: Path,
    pop_folder: Path,
    ranks: Ranks | None,
    with_group: bool = True,
) -> dict[str, float]:
    """Stage 1 (or PROPER's, from `pop_folder`), then stage 2 (`with_group`); a finished stage is loaded,
    not retrained."""
    metrics: dict[str, float] = {}
    if _stage_done(pop_folder, "population"):
        model.load_scope("population", pop_folder)
        if pop_folder != folder:  # each variant folder holds its whole server model
            _save_scope(model, "population", folder, ranks)
    else:
        r = stages.train_population(
            model, examples, cfg.population, FolderCheckpointer(folder, "population"), ranks
        )
        metrics.update(_stage_metrics("population", r))
        _save_scope(model, "population", folder, ranks)
    if not with_group:
        return metrics
    if _stage_done(folder, "group"):
        model.load_scope("group", folder)
    else:
        r = stages.train_group(model, examples, cfg.group, FolderCheckpointer(folder, "group"), ranks)
        metrics.update(_stage_metrics("group", r))
        _save_scope(model, "group", folder, ranks)
    return metrics


def _record_metrics(folder: Path, metrics: dict[str, float]) -> dict[str, float]:
    """Merge this run's stage metrics into `<folder>/metrics.json` (kept from earlier, resumed runs)."""
    metrics_file = folder / "metrics.json"
    saved = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    saved.update(metrics)
    metrics_file.write_text(json.dumps(saved, indent=2))
    return saved


def _stage_metrics(stage: str, r) -> dict[str, float]:
    return {
        f"{stage}.final_loss": r.epoch_losses[-1] if r.epoch_losses else float("nan"),
        f"{stage}.seconds": r.seconds,
        f"{stage}.steps": float(r.steps),
        f"{stage}.trainable_parameters": float(r.trainable_parameters),
        f"{stage}.tokens": float(r.tokens),
    }


def train_all(
    backbone: Backbone,
    examples: list[Example],
    cfg: ProperConfig,
    state: Path,
    variants: tuple[str, ...],
    ranks: Ranks | None = None,
) -> dict[str, ServerModel]:
    """PROPER's server stages and every other server model `variants` names (the matched model, ablations);
    those with PROPER's population config reuse its population stage. With `ranks`: data-parallel, every rank
    calls this; rank 0's return value is the result."""
    out = {PROPER: train_server_model(backbone, examples, cfg, state / PROPER, ranks=ranks)}
    for variant in variants:
        if variant == PROPER:
            continue
        vcfg, e2e = variant_config(cfg, variant)
        if vcfg == cfg and not e2e:
            out[variant] = dataclasses.replace(out[PROPER], name=variant)
            continue
        log.info("server model %s", variant)
        same_population = (vcfg.adapters.population_rank, vcfg.population) == (
            cfg.adapters.population_rank,
            cfg.population,
        )
        out[variant] = train_server_model(
            backbone,
            examples,
            vcfg,
            state / variant,
            variant,
            e2e,
            population_from=state / PROPER if same_population and not e2e else None,
            ranks=ranks,
        )
    return out
