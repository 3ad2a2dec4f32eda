"""The privacy guard lets exactly the run's metric schema leave a device, and error replies only as a fixed code
with its fixed message. Real LaMP label sets: "[1]"/"[2]", movie tags and news categories with spaces and "&"."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from test_reply_schema import device_reply

from client.privacy_guard import PRIVACY_ERROR_CODE, privacy_guard, reply_schema_for, violation
from proper_fed.data import get_task
from proper_fed.errors import ERROR_TABLE, BundleError, ConfigError, DataError, PrivacyError, public_error

CANARY = "secretcanarylabel"
METHODS = ("zero_shot", "proper")


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages can only be built inside a Flower task; give this process the identity a SuperNode would.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _incoming(content: RecordDict | None = None) -> Message:
    content = content or RecordDict({"x": ConfigRecord({"a": 1})})
    return Message(content, dst_node_id=1, message_type="train.user")


def _ctx(task: str = "LaMP-2", scoring: str = "generate", node: dict | None = None) -> Context:
    run = {"data": "/nowhere/lamp", "task": task, "methods": ",".join(METHODS), "scoring": scoring}
    # The clear path (secure runs: test_secure_aggregation_lets_out_only_done).
    run["secure-aggregation"] = False
    return Context(
        run_id=1, node_id=1, node_config=node or {"partition-id": 0}, state=RecordDict(), run_config=run
    )


def _through_guard(reply: RecordDict | Error, ctx: Context | None = None) -> Message:
    def handler(m: Message, c: Context) -> Message:
        if isinstance(reply, Error):
            return Message(error=reply, reply_to=m)
        return Message(reply, reply_to=m)

    return privacy_guard(_incoming(), ctx or _ctx(), handler)


def _metrics(values: dict) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})


def _blocked(out: Message) -> bool:
    return out.has_error() and (out.error.code, out.error.reason) == (
        PRIVACY_ERROR_CODE,
        PrivacyError.public_message,
    )


@pytest.mark.parametrize("task", ["LaMP-1", "LaMP-2", "LaMP-2N", "LaMP-3", "LaMP-4"])
def test_a_reply_with_real_lamp_labels_passes_unchanged(task):
    reply = device_reply(get_task(task), methods=METHODS)
    out = _through_guard(_metrics(reply), _ctx(task))
    assert not out.has_error() and dict(out.content["metrics"]) == reply


@pytest.mark.parametrize("task", ["LaMP-1", "LaMP-2", "LaMP-2N", "LaMP-3"])
def test_a_second_scoring_protocol_passes_under_its_own_names(task):
    reply = device_reply(get_task(task), methods=METHODS, protocols=("generate", "rank"))
    assert not _through_guard(_metrics(reply), _ctx(task, "generate,rank")).has_error()
    assert _blocked(_through_guard(_metrics(reply), _ctx(task, "generate")))


def _bad_replies(reply: dict) -> list[tuple[RecordDict, str]]:
    """Replies outside the schema, each with the text that must not appear in the refusal."""
    return [
        (_metrics({**reply, f"proper.tp.{CANARY}": 1}), CANARY),
        (_metrics({**reply, "proper.fn.dark comedy": 1}), "dark comedy"),
        (_metrics({**reply, "proper.fp.15": 1}), "fp.15"),  # 15 tags: indices 0..14
        (_metrics({**reply, "proper.tp.-1": 1}), "tp.-1"),
        (_metrics({**reply, CANARY: 1.0}), CANARY),
        (_metrics({**reply, "proper.n": math.nan}), "nan"),
        (_metrics({**reply, "proper.eval_s": math.inf}), "inf"),
        (_metrics({**reply, "proper.correct": -1}), "-1"),
        (_metrics({**reply, "history_len": 987654321}), "987654321"),
        (_metrics({**reply, "proper.trainable_params": 1.5}), "1.5"),
        (RecordDict({"metrics": ConfigRecord({"proper.n": CANARY})}), CANARY),
        (RecordDict({"metrics": MetricRecord(reply), CANARY: MetricRecord({"n": 1})}), CANARY),
        (
            RecordDict({"metrics": ArrayRecord(array_dict={CANARY: Array(np.zeros(3, dtype=np.float32))})}),
            CANARY,
        ),
    ]


def test_anything_outside_the_schema_is_refused_with_a_fixed_text():
    reply = device_reply(get_task("LaMP-2"), methods=METHODS)
    schema = reply_schema_for(_ctx().run_config, _ctx().node_config)
    for content, secret in _bad_replies(reply):
        out = _through_guard(content)
        assert _blocked(out) and not out.has_content(), secret
        why = violation(Message(content, reply_to=_incoming()), schema) or ""
        assert secret.lower() not in (why + out.error.reason).lower(), why


def test_a_string_metric_value_is_refused():
    # MetricRecord itself takes numbers only; a string can only travel in another record type.
    with pytest.raises(TypeError):
        MetricRecord({"proper.n": CANARY})
    out = _through_guard(RecordDict({"metrics": ConfigRecord({"proper.n": CANARY})}))
    assert _blocked(out) and CANARY not in out.error.reason


def test_arrays_are_blocked():
    arr = ArrayRecord(array_dict={"w": Array(np.zeros(3, dtype=np.float32))})
    out = _through_guard(RecordDict({"metrics": arr}))
    assert _blocked(out) and not out.has_content()
    assert "ArrayRecord" in violation(Message(RecordDict({"metrics": arr}), reply_to=_incoming()), None)


def test_errors_pass_only_as_a_fixed_code_with_its_fixed_message():
    for code, message in ERROR_TABLE.items():
        out = _through_guard(Error(code=code, reason=message))
        assert (out.error.code, out.error.reason) == (code, message)
    for bad in (
        Error(code=422, reason=f"DataError: label = {CANARY!r} is not in the label set"),
        Error(code=422, reason=ConfigError.public_message),  # a real message, but another code's
        Error(code=999, reason=DataError.public_message),
        Error(code=400, reason=""),
    ):
        out = _through_guard(bad)
        assert _blocked(out) and CANARY not in out.error.reason


def test_every_error_class_has_its_own_code_and_a_data_free_message():
    assert ERROR_TABLE[500] and ERROR_TABLE[451] == PrivacyError.public_message
    assert public_error(BundleError(f"bundle for {CANARY}")) == (409, BundleError.public_message)
    assert public_error(KeyError(CANARY)) == (500, ERROR_TABLE[500])
    assert len(set(ERROR_TABLE.values())) == len(ERROR_TABLE)


def test_a_handler_that_raises_replies_the_fixed_500():
    def handler(m: Message, c: Context) -> Message:
        raise RuntimeError(f"/home/alice/{CANARY}.json")

    out = privacy_guard(_incoming(), _ctx(), handler)
    assert (out.error.code, out.error.reason) == (500, ERROR_TABLE[500])


def _lamp2_user_file(folder, tag: str):
    """One LaMP-2 user in the official layout whose history holds `tag`."""
    folder.mkdir()
    question = (
        "Which tag does this movie relate to among the following tags? Just answer with the tag name without "
        f"further explanation. tags: [{get_task('LaMP-2').labels_text}] description: A quiet film."
    )
    profile = [
        {"id": "u015-h0", "description": "A robot learns to paint.", "tag": tag},
        {"id": "u015-h1", "description": "Two rivals share a flat.", "tag": "comedy"},
    ]
    q = [{"id": "q1", "input": question, "profile": profile, "user_id": "u015"}]
    (folder / "dev_questions.json").write_text(json.dumps(q))
    (folder / "dev_outputs.json").write_text(
        json.dumps({"task": "LaMP_2", "golds": [{"id": "q1", "output": "classic"}]})
    )
    return folder / "dev_questions.json"


def test_a_device_whose_data_is_invalid_replies_a_code_without_the_data(tmp_path, monkeypatch, caplog):
    """The real ClientApp with its guard: the DataError names the canary label, the reply does not."""
    import client.client_app as client_app
    from client.client_app import app

    path = _lamp2_user_file(tmp_path / "data", CANARY)
    monkeypatch.setattr(client_app, "receive_bundle", lambda *a, **k: object())
    monkeypatch.setattr(client_app, "base_folder", lambda *a, **k: tmp_path)
    node = {"data-path": str(path), "task": "LaMP-2"}
    msg = _incoming(RecordDict({"bundle-arrays": ArrayRecord(), "bundle-config": ConfigRecord()}))
    with caplog.at_level("ERROR"):
        out = app._registered_funcs["train.user"](msg, _ctx(node=node))
    assert (out.error.code, out.error.reason) == (DataError.code, DataError.public_message)
    assert (
        CANARY not in out.error.reason
        and "u015" not in out.error.reason
        and str(tmp_path) not in out.error.reason
    )
    assert CANARY in caplog.text  # the detail stays in the device's own log


def test_the_schema_comes_from_the_devices_task_file_without_its_users(tmp_path):
    """A deployment device names its task by its data; the label set comes from the public task spec."""
    path = _lamp2_user_file(tmp_path / "data", "comedy")
    reply = device_reply(get_task("LaMP-2"), methods=METHODS)
    ctx = _ctx(task="", node={"data-path": str(path)})
    assert not _through_guard(_metrics(reply), ctx).has_error()
    assert _blocked(_through_guard(_metrics({**reply, "proper.tp.15": 1}), ctx))


def test_secure_aggregation_lets_out_only_done(monkeypatch):
    """With secure aggregation (the default) the user stage's reply is empty: the statistics, checked against
    the same schema, wait in the node state for SecAgg+. Statistics sent in the clear are blocked."""
    import client.client_app as client_app

    ctx = _ctx(task="LaMP-2")
    ctx.run_config["secure-aggregation"] = True
    reply = device_reply(get_task("LaMP-2"), methods=METHODS)
    assert _blocked(_through_guard(_metrics(reply), ctx))  # clear metrics may not leave in a secure run

    monkeypatch.setattr(client_app, "_personalize", lambda msg, context: dict(reply))
    out = client_app.app._registered_funcs["train.user"](_incoming(), ctx)
    assert not out.has_error() and len(out.content) == 0
    assert ctx.state["proper-fed.secure-sum"]["limbs"].numpy().max() < 2**16

    fresh = _ctx(task="LaMP-2")
    fresh.run_config["secure-aggregation"] = True
    monkeypatch.setattr(
        client_app, "_personalize", lambda msg, context: {**reply, f"proper.tp.{CANARY}": 1.0}
    )
    out = client_app.app._registered_funcs["train.user"](_incoming(), fresh)
    assert _blocked(out) and "proper-fed.secure-sum" not in fresh.state
