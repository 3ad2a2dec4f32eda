"""The Flower ClientApp of a device: `query.base` says whether the device holds the base, `train.user` runs
the user stage on the device's own history and replies with metrics only (checked by the privacy guard)."""

from __future__ import annotations

import logging
import os
import time

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
from client.privacy_guard import privacy_guard
from proper_fed.base_store import find_base
from proper_fed.errors import ProperFedError, public_error
from proper_fed.run_settings import RunSettings

log = logging.getLogger(__name__)
app = ClientApp()

if os.environ.get("PROPER_FED_THREADS"):
    torch.set_num_threads(int(os.environ["PROPER_FED_THREADS"]))


def _arrays(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def _error(msg: Message, err: BaseException) -> Message:
    """The only error reply a device sends: a code and its fixed message, never the exception's text."""
    code, message = public_error(err)
    return Message(error=Error(code=code, reason=message), reply_to=msg)


@app.query("base")
def has_base(msg: Message, context: Context) -> Message:
    digest = str(msg.content["base"]["hash"])
    extra = tuple(str(context.node_config[k]) for k in ("base-folder",) if k in context.node_config)
    model_id = str(msg.content["base"].get("model", ""))
    try:
        found = find_base(digest, extra, model_id) is not None
    except Exception as err:  # Flower's own error reply would carry the text (a local path)
        log.exception("looking for the base failed")
        return _error(msg, err)
    return Message(RecordDict({"base": MetricRecord({"has-base": int(found)})}), reply_to=msg)


@app.train("user", mods=[privacy_guard])
def train_user(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        settings = RunSettings.from_run_config(dict(context.run_config))
        node = dict(context.node_config)
        if settings.device_outputs:
            note_partition(settings.device_outputs, node, context.node_id)
        bundle = receive_bundle(
            _arrays(msg.content["bundle-arrays"]), dict(msg.content["bundle-config"]), settings, node
        )
        base = msg.content.get("base-arrays")
        folder = base_folder(
            bundle,
            node,
            _arrays(base) if base is not None else None,
            dict(msg.content["base-files"]) if base is not None else None,
            str(msg.content["base-meta"]["dtypes"]) if base is not None else "",
        )
        me = device_user(settings, node)
        backbone = load_device_backbone(folder, settings)
        run = msg.content["run"]
        store = store_for(node, context.node_id)
        numbers, predictions = personalize_device(
            me,
            bundle,
            backbone,
            settings,
            store,
            str(run["majority-label"]) if "majority-label" in run else None,
        )
        keep_bundle(bundle, store)
        if settings.device_outputs:
            write_local_predictions(settings.device_outputs, me, predictions, context.node_id)
    except ProperFedError as err:
        # The detail (user ids, field values, paths) stays in this device's log; the server gets a fixed text.
        log.error("user stage refused (%s): %s", type(err).__name__, err)
        return _error(msg, err)
    except Exception as err:
        log.exception("user stage failed unexpectedly")
        return _error(msg, err)
    numbers["device_total_s"] = time.perf_counter() - t0
    return Message(RecordDict({"metrics": MetricRecord(numbers)}), reply_to=msg)
