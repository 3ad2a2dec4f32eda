"""The one place that decides what may leave a device in the user stage: metrics, nothing else.

A reply that carries an ArrayRecord, a ConfigRecord, a record under another name, a metric name that is not a
plain statistic name, or an error text longer than a short sentence is refused: it is replaced by an error
reply that says a privacy violation was blocked, and the original never leaves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from flwr.app import Context, Error, Message, MetricRecord

log = logging.getLogger(__name__)

ALLOWED_RECORD = "metrics"
# "<method>.<stat>" or "<method>.<tp|fp|fn>.<label>" or a device-level number like "history_len"; a label is
# from the task's public label set, so it may contain letters, digits and a few separators, never spaces.
METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-:/+]+){0,2}$")
MAX_ERROR_CHARS = 400
PRIVACY_ERROR_CODE = 451


def violation(reply: Message) -> str | None:
    """Why `reply` may not leave the device, or None when it is metrics only."""
    if reply.has_error():
        reason = reply.error.reason or ""
        return (
            f"error text of {len(reason)} characters (max {MAX_ERROR_CHARS})"
            if len(reason) > MAX_ERROR_CHARS
            else None
        )
    for name, record in reply.content.items():
        if name != ALLOWED_RECORD:
            return f"record {name!r} (only {ALLOWED_RECORD!r} may leave the device)"
        if not isinstance(record, MetricRecord):
            return f"a {type(record).__name__} (only a MetricRecord may leave the device)"
        for key, value in record.items():
            if not METRIC_NAME.match(key):
                return f"metric name {key[:40]!r} is not a statistic name"
            if not isinstance(value, int | float):
                return f"metric {key!r} is a {type(value).__name__}, not a number"
    return None


def privacy_guard(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower mod for the user-stage handler: check every reply before it is sent."""
    reply = call_next(msg, context)
    why = violation(reply)
    if why is None:
        return reply
    log.error("privacy guard blocked a reply: %s", why)
    return Message(
        error=Error(code=PRIVACY_ERROR_CODE, reason=f"privacy guard blocked the reply: {why}"), reply_to=msg
    )
