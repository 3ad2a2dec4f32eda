"""The Flower ClientApp of a device: `query.base` says whether the device holds the base, `train.user` runs
the user stage on the device's own history and keeps its statistics for the secure sum (or, without secure
aggregation, replies with them; checked by the privacy guard), `train` is Flower's SecAgg+ round that sums
them (`client/secure_metrics.py`) or, with server-data = federated, this device's update of a federated
stage (`client/federated_stages.py`; the round's FitIns config says which); `query.consent` says whether the
device trains stages 1-2."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.compat.common import recorddict_compat as compat

from client.device import (
    base_folder,
    device_user,
    keep_bundle,
    load_device_backbone,
    note_partition,
    personalize_device,
    receive_bundle,
    store_for,
    write_local_predictions,
)
from client.federated_stages import consent_reply, federated_own_row, stage_update_reply
from client.privacy_guard import error_reply, privacy_guard
from client.secure_metrics import keep_for_secure_sum, secagg_guard, secure_sum_reply, write_local_stats
from client.store import DEVICE_KEY_ENV, use_device_key
from proper_fed.artifacts.base_store import find_base
from proper_fed.errors import ProperFedError, public_error
from proper_fed.federation import wire
from proper_fed.federation.run_settings import RunSettings
from proper_fed.federation.wire import QUERY_BASE, QUERY_CONSENT, TRAIN_USER
from proper_fed.model.backbone import cache_root, use_cache_dir

log = logging.getLogger(__name__)
app = ClientApp()

# The environment is read here, at the app's entry point, and nowhere below it: the device's cache folder (bases,
# converted models), its store folder and key, its CPU threads.
use_cache_dir(cache_root(os.environ))
use_device_key(os.environ.get(DEVICE_KEY_ENV, ""))
STORE_DIR = os.environ.get("PROPER_FED_STORE", "")  # unless the node config names one (`store-dir`)
if os.environ.get("PROPER_FED_THREADS"):
    torch.set_num_threads(int(os.environ["PROPER_FED_THREADS"]))


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _error(msg: Message, err: BaseException) -> Message:
    """The only error reply a device sends: a code and its fixed message, never the exception's text."""
    return error_reply(msg, *public_error(err))


@app.query(QUERY_BASE.name)
def has_base(msg: Message, context: Context) -> Message:
    probe = msg.content[wire.BASE_PROBE]
    extra = tuple(str(context.node_config[k]) for k in ("base-folder",) if k in context.node_config)
    try:
        found = find_base(str(probe[wire.PROBE_HASH]), extra, str(probe.get(wire.PROBE_MODEL, "")))
    except Exception as err:  # Flower's own error reply would carry the text (a local path)
        log.exception("looking for the base failed")
        return _error(msg, err)
    return Message(
        RecordDict({wire.BASE_PROBE: MetricRecord({wire.HAS_BASE: int(found is not None)})}), reply_to=msg
    )


@app.query(QUERY_CONSENT.name)
def consent(msg: Message, context: Context) -> Message:
    try:
        return consent_reply(msg, context)
    except Exception as err:  # Flower's own error reply would carry the text
        log.exception("answering the consent query failed")
        return _error(msg, err)


@app.train(TRAIN_USER.name, mods=[privacy_guard])
def train_user(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        numbers = _personalize(msg, context)
    except ProperFedError as err:
        # The detail (user ids, field values, paths) stays in this device's log; the server gets a fixed text.
        log.error("user stage refused (%s): %s", type(err).__name__, err)
        return _error(msg, err)
    except Exception as err:
        log.exception("user stage failed unexpectedly")
        return _error(msg, err)
    numbers["device_total_s"] = time.perf_counter() - t0
    return _reply_with(msg, context, numbers)


def _reply_with(msg: Message, context: Context, numbers: dict[str, float]) -> Message:
    """With secure aggregation: keep the statistics for the SecAgg+ round and say only "done" (in simulation
    they are also kept on the simulation's disk, for its per-user tables); without: send them."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    if not settings.secure_aggregation:
        return Message(RecordDict({wire.METRICS: MetricRecord(numbers)}), reply_to=msg)
    try:
        keep_for_secure_sum(context, numbers)
        if settings.device_outputs:
            write_local_stats(settings.device_outputs, context.node_id, numbers)
    except Exception as err:
        log.exception("the statistics could not be kept for the secure sum")
        return _error(msg, err)
    return Message(RecordDict(), reply_to=msg)


@app.train(mods=[secagg_guard, secaggplus_mod])
def secure_sum(msg: Message, context: Context) -> Message:
    """Flower's SecAgg+ round (plain `train` messages, four stages run by secaggplus_mod): this handler is
    called in its masked-vector stage and hands over the vector kept by the user stage, or trains a federated
    stage and hands over its update, as the round's FitIns config says (errors: secagg_guard's fixed reply)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    if fitins.config.get(wire.SECAGG_TASK, wire.TASK_METRICS) == wire.TASK_STAGE:
        return stage_update_reply(msg, context, fitins)
    return secure_sum_reply(msg, context)


def _personalize(msg: Message, context: Context) -> dict[str, float]:
    """One train.user message: verify the bundle, get the base, run every method on this device's user,
    keep the bundle (and, in simulation, the predictions); the numbers to reply with."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    node = dict(context.node_config)
    if settings.device_outputs:
        note_partition(settings.device_outputs, node, context.node_id)
    content = msg.content
    bundle = receive_bundle(
        _arrays(content[wire.BUNDLE_ARRAYS]), dict(content[wire.BUNDLE_CONFIG]), settings, node
    )
    folder = base_folder(bundle, node, *_received_base(content))
    me = device_user(settings, node)
    backbone = load_device_backbone(folder, settings)
    store = store_for(node, context.node_id, STORE_DIR)
    ranking = content[wire.RUN].get(wire.RUN_LABEL_RANKING)
    numbers, predictions = personalize_device(
        me,
        bundle,
        backbone,
        settings,
        store,
        None if ranking is None else [str(r) for r in ranking],
        own_row=federated_own_row(context),
    )
    keep_bundle(bundle, store)
    if settings.device_outputs:
        write_local_predictions(settings.device_outputs, me, predictions, context.node_id)
    return numbers


def _received_base(content: RecordDict) -> tuple[dict[str, np.ndarray] | None, dict[str, bytes] | None, str]:
    """(arrays, side files, dtype table) of the base the server sent, or (None, None, "") when it sent none."""
    arrays = content.get(wire.BASE_ARRAYS)
    if arrays is None:
        return None, None, ""
    meta = content[wire.BASE_META]
    return _arrays(arrays), dict(content[wire.BASE_FILES]), str(meta[wire.META_DTYPES])
