"""The device phase's reply collection: the timeout counts from the last reply, not from the start."""

import time
from types import SimpleNamespace

from server.audit import AuditedGrid
from server.progress import Progress
from server.server_app import collect


def _msg(i):
    meta = SimpleNamespace(message_id=f"m{i}", dst_node_id=i, src_node_id=0, message_type="train.user")
    return SimpleNamespace(metadata=meta)


def _reply(i):
    meta = SimpleNamespace(reply_to_message_id=f"m{i}", src_node_id=i, message_type="train.user")
    return SimpleNamespace(metadata=meta, has_error=lambda: False)


class QueueGrid:
    """Devices that take turns: device i answers at `due[i]` seconds after the push (None = never)."""

    def __init__(self, due):
        self.due, self.sent = due, set()

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        now = time.monotonic() - self.t0
        ready = [i for i, d in enumerate(self.due) if d is not None and d <= now and i not in self.sent]
        self.sent.update(ready)
        return [_reply(i) for i in ready if f"m{i}" in ids]


def test_devices_that_answer_one_after_another_are_not_cut_off_and_a_silent_one_is_given_up(tmp_path):
    due = [0.0, 0.9, 1.8, 2.7, None]  # the whole queue takes longer than the timeout
    messages = [_msg(i) for i in range(len(due))]
    start = time.monotonic()
    got = list(collect(AuditedGrid(QueueGrid(due)), messages, timeout_s=1.2, progress=Progress(tmp_path)))
    waited = time.monotonic() - start
    assert sorted(r.metadata.src_node_id for r in got) == [0, 1, 2, 3]
    assert waited < 2.7 + 1.2 + 1.0  # gave up on the silent device about timeout_s after the last reply
