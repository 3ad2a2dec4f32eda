"""The server stages in a process of their own. Flower runs a ServerApp's main in a worker thread beside its
own busy threads (in simulation, inside the Ray driver); trained there, the stages ran at about half the
speed of a plain process on a 2-core machine. A spawned child trains them with every core (resuming from the
state folder as after a crash) and hands the finished server models back. With `server-devices = N > 1` that
child launches N data-parallel processes (DDP: one GPU each, or CPU with the cores shared out) and hands
back rank 0's models. The cache folder of the built-in models is handed to both explicitly: a spawned process
starts afresh, and the library reads no environment."""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from proper_fed.errors import ProperFedError
from proper_fed.federation.run_settings import RunSettings
from proper_fed.methods import server_models_for
from proper_fed.train.distributed import Ranks, launch
from server.server_stages import ServerModel, train_all


def train_server_stages_in_child(
    run_config: dict[str, Any], progress_t0: float, cache: Path | None = None
) -> dict[str, ServerModel]:
    """Train (or resume) every server model of the run in a spawned process and return them; raise its
    error here. Each finished epoch goes to the run's progress file; the process's own output (progress bars, warnings) to
    `<state-dir>/server_stages.log`. `cache`: the built-in models' folder (default: this process's `cache_dir()`)."""
    from proper_fed.model.backbone import cache_dir

    cache = cache or cache_dir()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_train, dict(run_config), progress_t0, cache).result()
        except BrokenProcessPool as err:
            raise ProperFedError(
                "the server-stage process died (out of memory, or killed); its finished epochs are "
                "checkpointed in the state folder: run again to resume"
            ) from err


class _EpochsToProgress(logging.Handler):
    def __init__(self, progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress(f"server {record.getMessage()}")


def _report_epochs(settings: RunSettings, progress_t0: float) -> None:
    from server.progress import Progress

    for name in ("proper_fed.train.trainer", "proper_fed.train.distributed", "server.server_stages"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(_EpochsToProgress(Progress(settings.out, t0=progress_t0, append=True)))


def _train(run_config: dict[str, Any], progress_t0: float, cache: Path) -> dict[str, ServerModel]:
    settings = RunSettings.from_run_config(run_config)
    settings.state_path.mkdir(parents=True, exist_ok=True)
    with open(settings.state_path / "server_stages.log", "a") as out:
        os.dup2(out.fileno(), 1)  # the ranks' processes inherit these
        os.dup2(out.fileno(), 2)
    _report_epochs(settings, progress_t0)
    n = settings.server_devices
    if n == 1:
        import torch

        torch.set_num_threads(settings.threads)
        return _train_stages(settings, None, cache)
    return launch(
        n,
        _train_rank,
        run_config,
        progress_t0,
        cache,
        device=settings.proper.backbone.device,
        threads=max(1, settings.threads // n),
    )


def _train_rank(
    ranks: Ranks, run_config: dict[str, Any], progress_t0: float, cache: Path
) -> dict[str, ServerModel] | None:
    """One of `server-devices` processes (DDP): trains its shard of every batch; rank 0 reports the epochs
    and its result is the run's."""
    settings = RunSettings.from_run_config(run_config)
    if ranks.is_main:
        _report_epochs(settings, progress_t0)
    models = _train_stages(settings, ranks, cache)
    return models if ranks.is_main else None


def _train_stages(settings: RunSettings, ranks: Ranks | None, cache: Path) -> dict[str, ServerModel]:
    from proper_fed.data import server_training_examples
    from proper_fed.federation.run_settings import load_split
    from proper_fed.model.backbone import load_backbone

    split = load_split(settings)
    backbone = load_backbone(settings.proper.backbone, cache)
    return train_all(
        backbone,
        server_training_examples(split),
        settings.proper,
        settings.state_path,
        server_models_for(settings.methods, settings.variants),
        ranks,
    )
