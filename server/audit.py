"""Everything that reaches the server, seen in one place: `AuditedGrid` wraps the Flower Grid the ServerApp
gets, so every reply of every phase (the base probe, the user stage, the four SecAgg+ stages) passes it.

With $PROPER_FED_RECORD_REPLIES=<file> (the deployment tests' audit) each reply is appended as one JSON
line: its device, type, error text, record types and exact content bytes. Message types in `accounted` are
also counted per device (bytes sent and received), for results.json.
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from server.wire import payload_bytes


def reply_entry(msg: Message, node: int) -> dict[str, Any]:
    """One reply as the audit file records it."""
    content = msg.content if msg.has_content() else None
    return {
        "node": node,
        "sender": msg.metadata.src_node_id,
        "type": msg.metadata.message_type,
        "error": msg.error.reason if msg.has_error() else None,
        "records": {k: type(v).__name__ for k, v in content.items()} if content else {},
        "content": base64.b64encode(recorddict_to_proto(content).SerializeToString()).decode()
        if content
        else "",
    }


class AuditedGrid:
    """A Grid that passes every call through and notes each reply (see module docstring). `device_of` names
    the device a reply is about, also when the SuperLink answers for a device that went away."""

    def __init__(self, grid: Grid, record_path: str = "", accounted: Iterable[str] = ()) -> None:
        self._grid, self._path, self._accounted = grid, record_path, frozenset(accounted)
        self._dst: dict[str, int] = {}
        self.bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def device_of(self, reply: Message) -> int:
        return self._dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        for msg, mid in zip(messages, ids, strict=True):
            self._dst[mid] = msg.metadata.dst_node_id
            if msg.metadata.message_type in self._accounted:
                self.bytes[msg.metadata.dst_node_id]["sent"] += payload_bytes(msg.content)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            node = self.device_of(reply)
            if reply.metadata.message_type in self._accounted and reply.has_content():
                self.bytes[node]["received"] += payload_bytes(reply.content)
            if self._path:
                with open(self._path, "a") as f:
                    f.write(json.dumps(reply_entry(reply, node)) + "\n")
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's send_and_receive, through this grid's push and pull (polling every half second)."""
        ids = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while ids and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(ids))
            replies += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if ids:
                time.sleep(0.5)
        return replies
