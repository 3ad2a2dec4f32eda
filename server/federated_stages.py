"""The server's side of federated stages 1-2 (run config `server-data = "federated"`): ask the devices whether
they consent, refuse to start with fewer than min-devices, then run each stage's rounds. A round is one
SecAgg+ round (`secure_metrics.secure_limb_sums`) whose FitIns carries the global shared tensors; the server
learns only the sum of the devices' weighted updates and applies FedAvg (`federation/shared_vector.py`).
The outcome is PROPER's ServerModel, which ships in the bundle exactly as one from central stages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.serverapp import Grid

from proper_fed.errors import ConfigError, ProperFedError
from proper_fed.federation import wire
from proper_fed.federation.run_settings import RunSettings
from proper_fed.federation.shared_vector import FedAvg, SharedLayout, apply_mean, decode_mean
from proper_fed.federation.wire import tensor_to_numpy
from proper_fed.methods import PROPER
from proper_fed.model.backbone import Backbone
from proper_fed.model.proper_model import ProperModel
from proper_fed.train.federated import FEDERATED_STAGES, shared_tensors
from server.secure_metrics import secure_limb_sums
from server.server_stages import ServerModel
from server.wire import make_message

log = logging.getLogger(__name__)


def consenting_nodes(grid: Grid, nodes: list[int], timeout_s: float) -> list[int]:
    """The devices that answer query.consent with 1 (an error or no answer: no)."""
    asks = [make_message(RecordDict(), n, wire.QUERY_CONSENT) for n in nodes]
    yes = []
    for msg in grid.send_and_receive(asks, timeout=timeout_s):
        if msg.has_content() and int(msg.content[wire.CONSENT][wire.CONSENTS]) == 1:
            yes.append(msg.metadata.src_node_id)
    return sorted(yes)


def check_enough_consent(consenting: list[int], connected: int, min_devices: int) -> None:
    """Refuse to train anything when fewer devices consent than a secure sum may cover."""
    if len(consenting) < min_devices:
        raise ConfigError(
            f"only {len(consenting)} of {connected} connected device(s) consent to train stages 1-2, but "
            f"each federated round is a secure sum over at least min-devices={min_devices} devices: nothing "
            "was trained or sent. Start more consenting devices, lower min-devices, or use server-data = central"
        )


def _arrays(layout: SharedLayout, tensors: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    return [tensor_to_numpy(tensors[n].float()) for n in layout.names]


def stage_fitins(
    stage: str,
    round_index: int,
    global_tensors: Mapping[str, Mapping[str, torch.Tensor]],
    layouts: Mapping[str, SharedLayout],
    base: tuple[str, str],
) -> FitIns:
    """The FitIns of one federated round: the global shared tensors of the stages so far (population layout,
    then group layout), the stage, the round, and the base the devices must train on (hash, model id)."""
    upto = FEDERATED_STAGES[: FEDERATED_STAGES.index(stage) + 1]
    arrays = [a for s in upto for a in _arrays(layouts[s], global_tensors[s])]
    config = {
        wire.SECAGG_TASK: wire.TASK_STAGE,
        wire.STAGE: stage,
        wire.ROUND: round_index,
        wire.PROBE_HASH: base[0],
        wire.PROBE_MODEL: base[1],
    }
    return FitIns(ndarrays_to_parameters(arrays), config)


def federated_round(
    grid: Grid,
    context: Context,
    nodes: list[int],
    stage: str,
    round_index: int,
    global_tensors: dict[str, dict[str, torch.Tensor]],
    layouts: Mapping[str, SharedLayout],
    base: tuple[str, str],
    settings: RunSettings,
) -> tuple[dict[str, torch.Tensor], FedAvg]:
    """One round of `stage`: the new global shared tensors (FedAvg of the devices' updates) and what the
    server learned. ProperFedError when fewer than min-devices devices completed the round."""
    fitins = stage_fitins(stage, round_index, global_tensors, layouts, base)
    summed = secure_limb_sums(grid, context, nodes, settings.min_devices, settings.reply_timeout_s, fitins)
    if summed is None:
        raise ProperFedError(
            f"federated {stage} round {round_index + 1}: fewer than min-devices={settings.min_devices} devices "
            "completed the secure sum, so nothing was released; the run stops here"
        )
    limb_sums, devices = summed
    avg = decode_mean(limb_sums, layouts[stage], len(devices))
    return apply_mean(global_tensors[stage], avg.mean), avg


def _moved(grid: Grid) -> dict[str, float]:
    """Bytes the grid has moved so far to and from all devices (an AuditedGrid counts them; another: 0)."""
    counted = getattr(grid, "bytes", {})
    return {k: float(sum(c[k] for c in counted.values())) for k in ("sent", "received")}


def train_federated_stages(
    grid: Grid,
    context: Context,
    settings: RunSettings,
    nodes: list[int],
    backbone: Backbone,
    base: tuple[str, str],
    progress: Callable[[str], None] = log.info,
) -> dict[str, ServerModel]:
    """Stages 1-2 on the consenting devices among `nodes`; PROPER's server model (the only one a federated
    run has). `backbone`: the base, only to initialise the shared tensors; `base`: its (hash, model id)."""
    consenting = consenting_nodes(grid, nodes, settings.node_wait_s)
    check_enough_consent(consenting, len(nodes), settings.min_devices)
    cfg = settings.proper
    model = ProperModel(backbone, cfg.adapters, seed=cfg.population.seed)
    try:
        global_tensors = {s: shared_tensors(model, s) for s in FEDERATED_STAGES}
        adapters = model.scope_meta("group")["adapters"]
    finally:
        model.remove()
    layouts = {s: SharedLayout.of(t) for s, t in global_tensors.items()}
    rounds = {"population": settings.federated_population_rounds, "group": settings.federated_group_rounds}
    metrics: dict[str, float] = {}
    for stage in FEDERATED_STAGES:
        before = _moved(grid)
        for r in range(rounds[stage]):
            progress(
                f"federated {stage} round {r + 1}/{rounds[stage]} on {len(consenting)} devices (SecAgg+)"
            )
            global_tensors[stage], avg = federated_round(
                grid, context, consenting, stage, r, global_tensors, layouts, base, settings
            )
        per_round = rounds[stage] * max(1, len(consenting))
        moved = {k: (v - before[k]) / per_round for k, v in _moved(grid).items()}
        metrics.update(
            {
                f"{stage}.bytes_to_device_per_round": moved["sent"],  # mean over devices and rounds
                f"{stage}.bytes_from_device_per_round": moved["received"],
                f"{stage}.rounds": float(rounds[stage]),
                f"{stage}.devices_last_round": float(avg.devices),
                f"{stage}.examples_last_round": float(avg.weight),  # a sum over the devices (capped weights)
                f"{stage}.trainable_parameters": float(layouts[stage].values),
                f"{stage}.vector_integers_per_device": float(layouts[stage].length),
            }
        )
    return {
        PROPER: ServerModel(PROPER, adapters, global_tensors["population"], global_tensors["group"], metrics)
    }
