"""The device's side of the secure sum (`proper_fed.federation.secure_sum`): after the user stage the device
keeps its statistics, encoded as its vector, in its Flower node state and tells the server only that it is
done; the vector leaves the device once, masked, in the SecAgg+ round that follows (Flower's `train`
messages, handled by `secaggplus_mod`), and is then deleted.

`secagg_guard` wraps that handler: it checks that the server's SecAgg+ setup is the run's public one (the
threshold at least min-devices, the quantization the layout was made for), lets out only the protocol's own
records (public keys, encrypted shares, the masked vector, key shares) and the legacy FitRes records with
nothing in them but `num_examples = 1`, and turns any exception into a fixed error reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.privacy_guard import blocked_reply, error_reply, error_violation, reply_schema_for
from proper_fed.atomic import atomic_write_text
from proper_fed.errors import ConfigError, public_error
from proper_fed.federation import secure_sum
from proper_fed.federation.run_settings import RunSettings, device_stats_path
from proper_fed.federation.secure_sum import SumPlan

log = logging.getLogger(__name__)

PENDING = "proper-fed.secure-sum"  # node-state record: the vector waiting for the SecAgg+ round
_LIMBS = "limbs"
# What a SecAgg+ reply may carry: the protocol's keys, and the FitRes records secaggplus_mod leaves.
_PROTOCOL_KEYS = frozenset(
    {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS}
    | {Key.NODE_ID_LIST, Key.SHARE_LIST}
)
_FITRES = {"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}
_PLANS: dict[tuple, SumPlan] = {}


def sum_plan_for(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SumPlan:
    """The run's sum plan on this device (cached like the reply schema it is made from)."""
    key = (tuple(sorted(run_config.items())), tuple(sorted((k, str(v)) for k, v in node_config.items())))
    if key not in _PLANS:
        settings = RunSettings.from_run_config(dict(run_config))
        _PLANS[key] = secure_sum.sum_plan(reply_schema_for(run_config, node_config), settings)
    return _PLANS[key]


def keep_for_secure_sum(context: Context, numbers: Mapping[str, float]) -> None:
    """Encode this device's statistics (checked against the schema, with its DP noise share when the run has
    DP) and keep the vector in the node state until the SecAgg+ round takes it."""
    vector = sum_plan_for(context.run_config, context.node_config).device_vector(numbers)
    context.state[PENDING] = ArrayRecord({_LIMBS: Array(vector)})


def secure_sum_reply(msg: Message, context: Context) -> Message:
    """The vector as SecAgg+ wants it (a legacy FitRes, num_examples = 1, no metrics), taken out of the node
    state: a vector is summed once."""
    record = context.state.get(PENDING)
    if not isinstance(record, ArrayRecord) or _LIMBS not in record:
        raise ConfigError(
            "the server asked for this device's statistics, but none are waiting: the device did not finish "
            "the user stage of this run, or its vector was already summed"
        )
    limbs = record[_LIMBS].numpy()
    del context.state[PENDING]
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([secure_sum.to_secagg(limbs)]), num_examples=1, metrics={}
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def setup_violation(config: Mapping[str, Any], min_devices: int) -> str | None:
    """Why the server's SecAgg+ setup is not the run's public one, or None."""
    expected = {
        Key.CLIPPING_RANGE: secure_sum.CLIPPING_RANGE,
        Key.TARGET_RANGE: secure_sum.QUANTIZATION_RANGE,
        Key.MOD_RANGE: secure_sum.MODULUS_RANGE,
        Key.MAX_WEIGHT: secure_sum.MAX_WEIGHT,
    }
    wrong = sorted(k for k, v in expected.items() if config.get(k) != v)
    if wrong:
        return f"the SecAgg+ setup changes {wrong}, which the run's vector layout fixes"
    if not isinstance(config.get(Key.THRESHOLD), int) or config[Key.THRESHOLD] < min_devices:
        return f"a SecAgg+ threshold below min-devices={min_devices}"
    return None


def reply_violation(reply: Message) -> str | None:
    """Why a SecAgg+ reply may not leave the device, or None (errors are checked by the caller)."""
    for name, record in reply.content.items():
        if name == RECORD_KEY_CONFIGS and isinstance(record, ConfigRecord):
            if not set(record) <= _PROTOCOL_KEYS:
                return "a SecAgg+ reply with keys outside the protocol"
        elif name not in _FITRES:
            return f"a record {name!r} in a SecAgg+ reply"
    if _FITRES & set(reply.content):
        content = reply.content
        if (
            set(content) != {RECORD_KEY_CONFIGS, *_FITRES}
            or len(content["fitres.metrics"]) != 0
            or len(content["fitres.parameters"]) != 0
            or dict(content["fitres.num_examples"]) != {"num_examples": 1}
            or not isinstance(content["fitres.num_examples"], MetricRecord)
        ):
            return "a SecAgg+ masked-vector reply carrying more than the masked vector"
    return None


def secagg_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod, outermost on the SecAgg+ handler (see module docstring)."""
    try:
        config = msg.content[RECORD_KEY_CONFIGS]
        why = None
        if config.get(Key.STAGE) == Stage.SETUP:
            why = setup_violation(config, sum_plan_for(context.run_config, context.node_config).min_devices)
        reply = call_next(msg, context) if why is None else None
    except Exception as err:  # Flower's own error reply would carry the exception's text
        log.exception("the secure sum failed on this device")
        return error_reply(msg, *public_error(err))
    if reply is not None:
        why = error_violation(reply.error) if reply.has_error() else reply_violation(reply)
    if why is not None:
        log.error("secure-sum guard blocked a message: %s", why)
        return blocked_reply(msg)
    return reply if reply is not None else blocked_reply(msg)


def write_local_stats(folder: str, node_id: int, numbers: Mapping[str, float]) -> Path:
    """Simulation only: the device's own statistics (before any DP noise), on the simulation's disk
    (`<device_outputs>/_nodes/stats/<node id>.json`), for the per-user and per-cohort tables that the
    simulation computes from them; the server never receives them."""
    path = device_stats_path(folder, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(dict(numbers), sort_keys=True))
