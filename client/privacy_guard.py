"""The one place that decides what may leave a device in the user stage: with secure aggregation (the
default) nothing but "done" (the statistics follow through SecAgg+, checked against the same schema by
`client/secure_metrics.py`); without it, metrics in the run's exact schema.

The schema (`proper_fed/federation/reply_schema.py`) is derived from public facts only: the run config (methods,
variants, scoring protocols) and the task's public label set. A reply passes only if it is one MetricRecord named
"metrics" whose every key is in the schema and whose every value is a finite number in the key's range, or an
error whose code and message are exactly a row of the fixed table (`proper_fed.errors.ERROR_TABLE`).

Anything else (an ArrayRecord, a ConfigRecord, a record under another name, a key outside the schema, a text,
NaN, a count out of range, a free-text error) is replaced by error 451 with a fixed message; the reason is
logged on the device only, and it never repeats the offending key or value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, MetricRecord

from proper_fed.errors import ERROR_TABLE, PrivacyError, public_error
from proper_fed.federation.reply_schema import ReplySchema, run_reply_schema
from proper_fed.federation.run_settings import RunSettings
from proper_fed.federation.wire import METRICS

log = logging.getLogger(__name__)

ALLOWED_RECORD = METRICS
PRIVACY_ERROR_CODE = PrivacyError.code
# Node-config keys that can change the task; the rest (partition id, store, keys) cannot change the schema.
_TASK_NODE_KEYS = ("data-path", "task")
_SCHEMAS: dict[tuple, ReplySchema] = {}


def error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def blocked_reply(msg: Message) -> Message:
    return error_reply(msg, PrivacyError.code, PrivacyError.public_message)


def reply_schema_for(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ReplySchema:
    """The run's reply schema on this device (cached: it depends only on the run and the task)."""
    from client.device import device_task

    task_node = tuple(sorted((k, str(node_config[k])) for k in _TASK_NODE_KEYS if k in node_config))
    key = (tuple(sorted(run_config.items())), task_node)
    if key not in _SCHEMAS:
        settings = RunSettings.from_run_config(dict(run_config))
        _SCHEMAS[key] = run_reply_schema(settings, device_task(settings, dict(node_config)))
    return _SCHEMAS[key]


def error_violation(error: Error) -> str | None:
    """An error reply may only be a row of the fixed table: a known code with exactly its message."""
    if ERROR_TABLE.get(error.code) != error.reason:
        return "an error reply that is not a fixed code with its fixed message"
    return None


def violation(reply: Message, schema: ReplySchema | None) -> str | None:
    """Why `reply` may not leave the device, or None. The reason is fixed text (see module docstring)."""
    if reply.has_error():
        return error_violation(reply.error)
    for name, record in reply.content.items():
        if name != ALLOWED_RECORD:
            return f"a record other than {ALLOWED_RECORD!r}"
        if not isinstance(record, MetricRecord):
            return f"a record of type {type(record).__name__} (only a MetricRecord may leave the device)"
        why = "no reply schema for this run" if schema is None else schema.violation(record)
        if why is not None:
            return why
    return None


def secure_violation(reply: Message) -> str | None:
    """With secure aggregation the user stage's reply says only "done": its statistics leave the device only
    through SecAgg+ (`client/secure_metrics.py`)."""
    if reply.has_error():
        return error_violation(reply.error)
    if len(reply.content) != 0:
        return "a record in a secure-aggregation run (statistics leave the device only through SecAgg+)"
    return None


def _checked(msg: Message, reply: Message, context: Context) -> Message:
    try:
        if RunSettings.from_run_config(dict(context.run_config)).secure_aggregation:
            why = secure_violation(reply)
        else:
            schema = None if reply.has_error() else reply_schema_for(context.run_config, context.node_config)
            why = violation(reply, schema)
    except Exception:  # a reply the guard could not check does not leave
        log.exception("privacy guard could not derive the reply schema; the reply is blocked")
        return blocked_reply(msg)
    if why is None:
        return reply
    log.error("privacy guard blocked a reply: %s", why)
    return blocked_reply(msg)


def privacy_guard(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower mod for the user-stage handler: check every reply before it is sent. An exception escaping the
    handler becomes the fixed 500 reply here, since Flower's own error reply would carry its text."""
    try:
        reply = call_next(msg, context)
    except Exception as err:
        log.exception("the user stage raised")
        return error_reply(msg, *public_error(err))
    return _checked(msg, reply, context)
