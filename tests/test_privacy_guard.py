"""The privacy guard lets metrics leave a device and nothing else."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.privacy_guard import PRIVACY_ERROR_CODE, privacy_guard, violation


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages can only be built inside a Flower task; give this process the identity a SuperNode would.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _incoming() -> Message:
    return Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=1, message_type="train.user")


def _ctx() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _through_guard(reply_content: RecordDict) -> Message:
    incoming = _incoming()
    return privacy_guard(incoming, _ctx(), lambda m, c: Message(reply_content, reply_to=m))


def test_metrics_pass_unchanged():
    out = _through_guard(
        RecordDict({"metrics": MetricRecord({"proper.n": 3, "proper.tp.BUG": 1.0, "history_len": 12})})
    )
    assert not out.has_error() and dict(out.content["metrics"])["proper.n"] == 3


def test_arrays_are_blocked():
    arr = ArrayRecord(array_dict={"w": Array(np.zeros(3, dtype=np.float32))})
    out = _through_guard(RecordDict({"metrics": arr}))
    assert out.has_error() and out.error.code == PRIVACY_ERROR_CODE and "ArrayRecord" in out.error.reason
    assert not out.has_content()


def test_text_is_blocked_in_configs_and_in_metric_names():
    assert "record 'preds'" in violation(
        Message(RecordDict({"preds": ConfigRecord({"q1": "my secret text"})}), reply_to=_incoming())
    )
    out = _through_guard(RecordDict({"metrics": MetricRecord({"my secret text typed by the user": 1.0})}))
    assert out.has_error() and "not a statistic name" in out.error.reason


def test_long_error_texts_are_blocked():
    from flwr.app import Error

    reply = Message(error=Error(code=1, reason="x" * 5000), reply_to=_incoming())
    assert "error text" in violation(reply)
