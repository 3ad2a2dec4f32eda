"""The device's side of federated stages 1-2 (run config `server-data = "federated"`): answer whether it
consents, and in each round train the stage locally on its own history from the global shared tensors the
SecAgg+ round's FitIns carries, then hand SecAgg+ its update as the fixed-length vector of limbs
(`federation/shared_vector.py`). The user's own row of the user table stays in the node state between
rounds and is never in a reply; the reply passes `secure_metrics.secagg_guard` like the metrics' does.

Consent: a device trains stages 1-2 unless its node config says `federated-training = false` (a device
enrolled in a federated run has agreed to the run's public config; this is how it opts out)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.device import device_user, load_device_backbone
from proper_fed.artifacts.base_store import find_base
from proper_fed.data import device_training_examples
from proper_fed.data.example import Example
from proper_fed.errors import BundleError, ConfigError
from proper_fed.federation import secure_sum, wire
from proper_fed.federation.run_settings import FEDERATED, RunSettings
from proper_fed.federation.shared_vector import SharedLayout, encode_update
from proper_fed.model.proper_model import ProperModel
from proper_fed.train.federated import FEDERATED_STAGES, local_config, shared_tensors, train_local_stage

log = logging.getLogger(__name__)

CONSENT_KEY = "federated-training"  # node config: false = this device does not train stages 1-2
OWN_ROW_STATE = "proper-fed.own-row"  # node state: the user's own row of the user table, between rounds
_ROW = "row"


def consents(node_config: Mapping[str, Any]) -> bool:
    value = node_config.get(CONSENT_KEY, True)
    return str(value).strip().lower() not in ("false", "0", "no", "off")


def consent_reply(msg: Message, context: Context) -> Message:
    """query.consent: 1 when the run trains stages 1-2 federated and this device takes part."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    yes = settings.server_data == FEDERATED and consents(context.node_config)
    return Message(RecordDict({wire.CONSENT: MetricRecord({wire.CONSENTS: int(yes)})}), reply_to=msg)


def _global_tensors(
    fitins: FitIns, layouts: Mapping[str, SharedLayout], stage: str
) -> dict[str, dict[str, torch.Tensor]]:
    """The FitIns arrays, split by the public layouts (population, then group up to `stage`)."""
    arrays = parameters_to_ndarrays(fitins.parameters)
    upto = FEDERATED_STAGES[: FEDERATED_STAGES.index(stage) + 1]
    if len(arrays) != sum(len(layouts[s].names) for s in upto):
        raise ConfigError("the federated round's tensors do not fit this run's adapter config")
    out, at = {}, 0
    for s in upto:
        layout = layouts[s]
        tensors = {}
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            a = np.array(arrays[at], dtype=np.float32, copy=True)
            if a.shape != shape:
                raise ConfigError(f"the federated round's tensor {name} has shape {a.shape}, not {shape}")
            tensors[name], at = torch.from_numpy(a), at + 1
        out[s] = tensors
    return out


def device_examples(settings: RunSettings, node_config: Mapping[str, Any]) -> tuple[str, list[Example]]:
    """This device's user and its training examples: its own history, as in the user stage."""
    me = device_user(settings, node_config)
    return me.user.user_id, list(device_training_examples(me.task, me.user))


def federated_own_row(context: Context) -> torch.Tensor | None:
    """The user's own embedding row this device trained in federated stage 2 (kept in the node state, never
    sent), or None: no federated stage ran on this device in this run."""
    row = context.state.get(OWN_ROW_STATE)
    return torch.from_numpy(row[_ROW].numpy().copy()) if isinstance(row, ArrayRecord) else None


def stage_update_reply(msg: Message, context: Context, fitins: FitIns) -> Message:
    """One federated round on this device: train, encode the update, reply as SecAgg+ wants (a legacy FitRes
    with the limbs as floats, num_examples = 1, no metrics)."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    if settings.server_data != FEDERATED or not consents(context.node_config):
        raise ConfigError("this device does not train stages 1-2 in this run")
    stage, round_index = str(fitins.config[wire.STAGE]), int(fitins.config[wire.ROUND])
    if stage not in FEDERATED_STAGES:
        raise ConfigError(f"unknown federated stage {stage!r}")
    node = dict(context.node_config)
    extra = tuple(str(node[k]) for k in ("base-folder",) if k in node)
    folder = find_base(str(fitins.config[wire.PROBE_HASH]), extra, str(fitins.config[wire.PROBE_MODEL]))
    if folder is None:
        raise BundleError("this device holds no base with the federated round's hash")
    user_id, examples = device_examples(settings, node)
    backbone = load_device_backbone(folder, settings)
    model = ProperModel(backbone, settings.proper.adapters, seed=settings.proper.population.seed)
    try:
        layouts = {s: SharedLayout.of(shared_tensors(model, s)) for s in FEDERATED_STAGES}
        tensors = _global_tensors(fitins, layouts, stage)
        own = federated_own_row(context)
        cfg = local_config(
            getattr(settings.proper, stage), stage, settings.federated_local_epochs, round_index
        )
        update = train_local_stage(
            model,
            stage,
            user_id,
            examples,
            cfg,
            tensors[stage],
            population=tensors.get("population") if stage == "group" else None,
            own_row=own,
        )
    finally:
        model.remove()
    if update.own_row is not None:  # stays on the device, for the next round
        context.state[OWN_ROW_STATE] = ArrayRecord({_ROW: Array(update.own_row.numpy())})
    encoded = encode_update(update.delta, update.examples, layouts[stage])
    if encoded.clipped:
        log.warning(
            "federated %s round %d: %d values clipped to the codec's range",
            stage,
            round_index,
            encoded.clipped,
        )
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([secure_sum.to_secagg(encoded.limbs)]),
        num_examples=1,
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
