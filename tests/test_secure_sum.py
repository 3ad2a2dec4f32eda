"""The secure sum: devices' statistics become fixed-length integer vectors that Flower's real SecAgg+ (the
1.41 `SecAggPlusWorkflow` and `secaggplus_mod`, driven by our ServerApp and ClientApp code) sums exactly;
the server never holds a vector unmasked, a sum covers at least min-devices devices, a vector is summed once,
and the optional DP noise has the scale its (epsilon, delta) states.

The federation here is in-process: `LoopbackGrid` hands the server's messages, serialized and parsed as on
the wire, to the real ClientApp of each node, and records every reply."""

from __future__ import annotations

import itertools
import json
import math
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from test_reply_schema import device_reply

from proper_fed.data.synthetic import synthetic_spec
from proper_fed.errors import ConfigError, PrivacyError
from proper_fed.federation import secure_sum
from proper_fed.federation.dp import gaussian_delta, gaussian_sigma
from proper_fed.federation.reply_schema import run_reply_schema
from proper_fed.federation.run_settings import RunSettings
from proper_fed.federation.secure_sum import DEVICES_KEY, sum_plan

RUN = {"methods": "zero_shot,proper", "min-nodes": 4, "min-devices": 3}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages can only be built inside a Flower task; give this process the identity a SuperLink would.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _copy(content: RecordDict) -> RecordDict:
    """Content as the other side sees it: serialized and parsed, nothing shared."""
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    raw = recorddict_to_proto(content).SerializeToString()
    return recorddict_from_proto(ProtoRecordDict.FromString(raw))


class LoopbackGrid:
    """The Grid of a ServerApp whose devices are in-process ClientApp calls. `drop(node, stage)` loses the
    reply of a node in a SecAgg+ stage (the device went away); `replies` keeps every reply that reached the
    server, `stages` the stage of every message sent."""

    def __init__(self, contexts: dict[int, Context], drop=None) -> None:
        from client.client_app import app

        self.app, self.contexts, self.drop = app, contexts, drop or (lambda node, stage: False)
        self.run = SimpleNamespace(run_id=1)
        self.pending: dict[str, Message] = {}
        self.replies: list[Message] = []
        self.stages: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            incoming = Message(
                _copy(msg.content), dst_node_id=node, message_type=msg.metadata.message_type, group_id="1"
            )
            incoming.metadata.__dict__["_message_id"] = mid
            stage = _stage(incoming)  # before secaggplus_mod pops it
            self.stages.append(stage)
            reply = self.app(incoming, self.contexts[node])
            if not self.drop(node, stage):
                wire = Message(error=reply.error, reply_to=incoming) if reply.has_error() else None
                self.pending[mid] = wire or Message(_copy(reply.content), reply_to=incoming)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        got = [self.pending.pop(i) for i in list(message_ids) if i in self.pending]
        self.replies += got
        return got

    def send_and_receive(self, messages, *, timeout=None):
        ids = self.push_messages(messages)
        return self.pull_messages(ids)


def _stage(msg: Message) -> str:
    config = msg.content.get(RECORD_KEY_CONFIGS)
    return "" if config is None else str(config.get(Key.STAGE, ""))


def _federation(n: int, run: dict | None = None, seed: int = 0):
    """`n` devices holding their statistics (kept by the real user-stage code path), and the server's plan."""
    from client.secure_metrics import keep_for_secure_sum

    run = {**RUN, **(run or {})}
    settings = RunSettings.from_run_config(run)
    task = synthetic_spec(settings.synthetic.labels)
    numbers, contexts = {}, {}
    for i, node in enumerate(range(101, 101 + n)):
        stats = device_reply(task, methods=settings.methods, seed=seed + i)
        stats.update(history_len=float(7 * i + 3), device_total_s=1.2345 + i)  # different per device
        ctx = Context(
            run_id=1, node_id=node, node_config={"partition-id": i}, state=RecordDict(), run_config=run
        )
        keep_for_secure_sum(ctx, stats)
        numbers[node], contexts[node] = stats, ctx
    plan = sum_plan(run_reply_schema(settings, task), settings)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run)
    return SimpleNamespace(numbers=numbers, contexts=contexts, plan=plan, server=server, settings=settings)


def _sum(fed, grid, nodes=None):
    from server.secure_metrics import secure_sums

    return secure_sums(grid, fed.server, sorted(nodes or fed.numbers), fed.plan, timeout_s=30)


def _expected(fed, nodes):
    keys = set(itertools.chain.from_iterable(fed.numbers[n] for n in nodes))
    return {k: sum(fed.numbers[n].get(k, 0.0) for n in nodes) for k in keys}


def _check_exact(fed, sums, nodes):
    want = _expected(fed, nodes)
    assert sums.nodes == tuple(sorted(nodes)) and sums.sums[DEVICES_KEY] == len(nodes)
    for key, rule in fed.plan.schema.rules.items():
        got, exp = sums.sums[key], want.get(key, 0.0)
        if rule.integer:
            assert got == exp, key  # counts: exact
        else:
            assert abs(got - exp) <= len(nodes) * secure_sum.resolution(rule) / 2 + 1e-9, key


# ---- through Flower's real SecAgg+ ----


def test_secagg_plus_sums_every_statistic_exactly():
    fed = _federation(4)
    grid = LoopbackGrid(fed.contexts)
    sums = _sum(fed, grid)
    _check_exact(fed, sums, list(fed.numbers))
    assert grid.stages.count(Stage.COLLECT_MASKED_VECTORS) == 4 and not [
        m for m in grid.replies if m.has_error()
    ]


def test_the_server_never_receives_a_vector_in_the_clear():
    fed = _federation(4)
    plain = {n: fed.contexts[n].state["proper-fed.secure-sum"]["limbs"].numpy().copy() for n in fed.numbers}
    grid = LoopbackGrid(fed.contexts)
    assert _sum(fed, grid) is not None
    masked = 0
    for reply in grid.replies:
        config = reply.content[RECORD_KEY_CONFIGS]
        assert set(reply.content) <= {RECORD_KEY_CONFIGS, "fitres.metrics", "fitres.num_examples",
                                      "fitres.parameters", "fitres.status"}  # fmt: skip
        if Key.MASKED_PARAMETERS not in config:
            continue
        masked += 1
        assert len(reply.content["fitres.parameters"]) == 0 and len(reply.content["fitres.metrics"]) == 0
        assert dict(reply.content["fitres.num_examples"]) == {"num_examples": 1}  # the same for everyone
        vector = bytes_to_ndarray(config[Key.MASKED_PARAMETERS][1])  # [0] is the weight factor
        sender = plain[reply.metadata.src_node_id]
        assert vector.shape == sender.shape
        # Plain limbs are < 2^16; masked ones are uniform over [0, 2^32): nearly all are larger.
        assert (vector >= 2**16).mean() > 0.99 and not np.array_equal(vector, sender)
        for limbs in plain.values():
            assert not np.array_equal(vector % 2**16, limbs)
    assert masked == 4
    # A device's vector is summed once: it is gone from the device's state.
    assert all("proper-fed.secure-sum" not in c.state for c in fed.contexts.values())


def test_a_device_that_drops_out_is_left_out_of_the_sum():
    fed = _federation(4)
    gone = 103
    grid = LoopbackGrid(
        fed.contexts,
        drop=lambda node, stage: node == gone and stage == Stage.COLLECT_MASKED_VECTORS,
    )
    sums = _sum(fed, grid)
    _check_exact(fed, sums, [n for n in fed.numbers if n != gone])


def test_fewer_devices_than_min_devices_release_nothing():
    fed = _federation(3)  # min-devices = 3: one dropout leaves too few
    grid = LoopbackGrid(
        fed.contexts,
        drop=lambda node, stage: node == 102 and stage == Stage.COLLECT_MASKED_VECTORS,
    )
    assert _sum(fed, grid) is None
    assert _sum(_federation(3), LoopbackGrid({}), nodes=[101, 102]) is None  # never started with two


def test_devices_refuse_a_setup_below_their_threshold(monkeypatch):
    """A server asking for a lower SecAgg+ threshold than the run's min-devices (it could then unmask a sum
    of fewer devices) gets a fixed error from every device, and no sum."""
    from server import secure_metrics

    fed = _federation(4)
    monkeypatch.setattr(fed, "plan", secure_sum.SumPlan(fed.plan.schema, fed.plan.layout, min_devices=2))
    grid = LoopbackGrid(fed.contexts)
    assert _sum(fed, grid) is None
    assert grid.replies and all(r.has_error() and r.error.code == PrivacyError.code for r in grid.replies)
    assert secure_metrics  # the workflow halted at setup: nothing was masked or unmasked


def test_a_vector_is_summed_once():
    fed = _federation(4)
    assert _sum(fed, LoopbackGrid(fed.contexts)) is not None
    again = LoopbackGrid(fed.contexts)
    assert _sum(fed, again) is None
    assert any(r.has_error() and r.error.code == ConfigError.code for r in again.replies)


def test_too_few_connected_devices_refuse_to_start():
    from server.secure_metrics import check_enough_devices

    with pytest.raises(ConfigError, match="min-devices=3"):
        check_enough_devices([1, 2], 3)
    with pytest.raises(ConfigError, match="min-nodes=2 is invalid.*min-devices=3"):
        RunSettings.from_run_config({"min-nodes": 2})
    with pytest.raises(ConfigError, match="min-devices"):
        RunSettings.from_run_config({"min-devices": 1})
    RunSettings.from_run_config(
        {"min-nodes": 1, "secure-aggregation": False}
    )  # the clear path has no threshold


def test_a_simulation_with_too_few_device_users_refuses_to_start(tmp_path):
    from simulations.run import plan

    config = tmp_path / "few.toml"
    config.write_text('[run]\nserver-fraction = 0.5\nout = "x"\n[synthetic]\nusers = 4\ngroups = 2\n')
    with pytest.raises(ConfigError, match="min-nodes=2 is invalid.*min-devices=3"):
        plan(str(config))


# ---- the encoding ----


@pytest.mark.parametrize("name", ["LaMP-2", "LaMP-3", "LaMP-4"])
def test_encode_decode_is_exact_for_counts_and_within_resolution_for_sums(name):
    from proper_fed.data import get_task
    from proper_fed.data.baselines import has_label_baselines
    from proper_fed.federation.reply_schema import reply_schema

    task = get_task(name)
    methods = ("zero_shot", "proper")
    schema = reply_schema(methods, task.type, len(task.labels), label_baselines=has_label_baselines(task))
    layout = secure_sum.sum_layout(schema)
    devices = [device_reply(task, methods=methods, seed=s) for s in range(5)]
    limbs = [secure_sum.encode(d, schema, layout) for d in devices]
    assert {v.shape for v in limbs} == {(layout.length,)} and all(v.max() < 2**16 for v in limbs)
    total = np.sum(limbs, axis=0)
    # What the workflow hands back: the mean of the floats (flwr's own quantize / dequantize arithmetic).
    floats = [secure_sum.to_secagg(v) for v in limbs]
    mean = np.mean(floats, axis=0)
    assert np.array_equal(secure_sum.limb_sums_from_mean(mean, 5), total)
    sums = secure_sum.decode(total, layout, 5)
    for key, rule in schema.rules.items():
        exp = sum(d.get(key, 0.0) for d in devices)
        assert sums[key] == exp if rule.integer else abs(sums[key] - exp) <= 5 * secure_sum.resolution(rule)


def test_values_outside_the_schema_or_the_fixed_point_range_are_refused():
    task = synthetic_spec(5)
    settings = RunSettings.from_run_config(RUN)
    plan = sum_plan(run_reply_schema(settings, task), settings)
    good = device_reply(task, methods=settings.methods)
    with pytest.raises(PrivacyError):
        plan.device_vector({**good, "proper.correct": good["proper.n"] + 1})  # more right than asked
    with pytest.raises(PrivacyError):
        plan.device_vector({**good, "proper.tp.secret-label": 1.0})  # a key outside the schema
    with pytest.raises(PrivacyError):
        plan.device_vector({**good, "history_len": float("nan")})
    with pytest.raises(ConfigError, match="fixed-point range"):
        secure_sum.encode(good, plan.schema, plan.layout, noise={"history_len": 1e30})
    with pytest.raises(ConfigError, match="1 to 65535 devices"):
        secure_sum.limb_sums_from_mean(np.zeros(4), 70_000)


def test_the_layout_is_public_and_the_same_whatever_the_data():
    task = synthetic_spec(5)
    settings = RunSettings.from_run_config(RUN)
    plan = sum_plan(run_reply_schema(settings, task), settings)
    few = {k: v for k, v in device_reply(task, methods=settings.methods).items() if ".tp." not in k}
    assert (
        plan.device_vector(few).shape
        == plan.device_vector(device_reply(task, methods=settings.methods, seed=3)).shape
    )
    assert plan.layout.keys[0] == DEVICES_KEY and plan.layout.keys[1:] == tuple(plan.schema.rules)


# ---- differential privacy ----


def test_gaussian_sigma_meets_its_delta_exactly():
    """The calibrated sigma gives exactly the stated delta: checked against a direct numerical integral of
    the privacy-loss profile (the hockey-stick divergence of N(0, s^2) and N(D, s^2))."""
    for eps, delta, sens in [(1.0, 1e-5, 1.0), (0.5, 1e-6, 3.0), (4.0, 1e-5, 10.0)]:
        sigma = gaussian_sigma(eps, delta, sens)
        x = np.linspace(-12 * sigma, sens + 12 * sigma, 400_001)
        p = np.exp(-(x**2) / (2 * sigma**2))
        q = np.exp(-((x - sens) ** 2) / (2 * sigma**2))
        hockey = np.trapezoid(np.maximum(p - math.exp(eps) * q, 0), x) / (sigma * math.sqrt(2 * math.pi))
        assert hockey == pytest.approx(delta, rel=1e-3)
        assert gaussian_delta(sigma * 0.99, eps, sens) > delta  # and no smaller sigma would do
        if eps < 1:  # the classical bound (Dwork & Roth, Thm 3.22) is looser
            assert sigma <= sens * math.sqrt(2 * math.log(1.25 / delta)) / eps


def test_dp_noise_in_a_sum_has_the_stated_scale_and_clipping_bounds_the_sensitivity():
    run = {**RUN, "dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-max-queries": 8, "dp-max-history": 50}
    settings = RunSettings.from_run_config(run)
    task = synthetic_spec(5)
    plan = sum_plan(run_reply_schema(settings, task), settings)
    dp = plan.dp
    assert dp.sigma == pytest.approx(gaussian_sigma(1.0, 1e-5, dp.sensitivity))
    assert not any(k.endswith((".train_s", ".trainable_params")) for k in plan.layout.keys)  # costs not sent
    # Clipping: any statistics, however large, end within sqrt(groups) in units; within bounds: unchanged.
    rng = np.random.default_rng(0)
    for _ in range(200):
        wild = {k: float(rng.exponential(40)) for k in dp.units}
        z = np.array([v / dp.units[k] for k, v in dp.clip(wild).items()])
        assert np.linalg.norm(z) <= math.sqrt(len(set(dp.groups.values()))) + 1e-9
    small = device_reply(task, methods=settings.methods)
    small["history_len"] = 40.0
    for k, v in dp.clip(small).items():
        assert v == pytest.approx(small.get(k, 0.0)), k
    # The noise of a sum over t = min-devices devices, decoded from real vectors: std = unit * sigma.
    devices, trials = settings.min_devices, 300
    errors = []
    for _ in range(trials):
        vectors = [plan.device_vector(small, rng) for _ in range(devices)]
        sums = plan.sums(np.sum(vectors, axis=0), devices)
        errors.append(sums["proper.n"] - devices * small["proper.n"])
    assert np.std(errors) == pytest.approx(8 * dp.sigma, rel=0.15)
    acc = dp.accounting(devices)
    assert acc["epsilon"] == 1.0 and acc["noise_std"]["n"] == pytest.approx(8 * dp.sigma)
    json.dumps(acc)  # results.json carries it


def test_dp_settings_are_validated():
    with pytest.raises(ConfigError, match="dp-epsilon"):
        RunSettings.from_run_config({"dp-epsilon": 1.0, "secure-aggregation": False, "min-nodes": 1})
    with pytest.raises(ConfigError, match="dp-delta"):
        RunSettings.from_run_config({"dp-epsilon": 1.0, "dp-delta": 0.0})
    with pytest.raises(ConfigError, match="dp-max-queries"):
        RunSettings.from_run_config({"dp-epsilon": 1.0, "dp-max-queries": 0})


# ---- results.json ----


def test_results_hold_the_sums_and_simulation_tables_from_the_devices_files(tmp_path):
    """write_results from a secure sum: pooled metrics from the sums; per-user and per-cohort tables only from
    the virtual devices' own files (simulation), keyed by node id as before; a ready device that dropped out of
    SecAgg+ is named with why; in a deployment (no device files) there are no per-user tables."""
    from client.secure_metrics import write_local_stats
    from proper_fed.federation.run_settings import load_split
    from server.results import DeviceReply, write_results
    from server.secure_metrics import SecureRelease

    fed = _federation(4)
    grid = LoopbackGrid(
        fed.contexts, drop=lambda node, stage: node == 104 and stage == Stage.COLLECT_MASKED_VECTORS
    )
    sums = _sum(fed, grid)
    summed = [101, 102, 103]
    outputs = tmp_path / "device_outputs"
    for node in fed.numbers:
        write_local_stats(str(outputs), node, fed.numbers[node])
    replies = {n: DeviceReply(n, ready=True) for n in fed.numbers}
    release = SecureRelease(fed.plan, sums, list(fed.numbers))
    split = load_split(fed.settings)
    for folder in ("sim", "deploy"):
        settings = RunSettings.from_run_config(
            {**RUN, "out": str(tmp_path / folder), "device-outputs": str(outputs) if folder == "sim" else ""}
        )
        path = write_results(settings, split, {}, replies, {"device_phase_s": 1.0}, "h" * 64, release)
        res = json.loads(path.read_text())
        secure, proper = res["secure_aggregation"], res["methods"]["proper"]
        assert secure["nodes"] == [str(n) for n in summed] and res["users"]["devices_answered"] == 3
        assert "dropped out of the secure sum" in res["failed"]["104"]
        want = _expected(fed, summed)
        assert proper["metrics"]["accuracy"] == pytest.approx(want["proper.correct"] / want["proper.n"])
        assert secure["sums"]["proper.n"] == want["proper.n"] and proper["users"] == 3
        if folder == "sim":
            assert set(proper["per_user"]) == {str(n) for n in summed} and proper["cohorts"]
            assert res["history_len"] == {str(n): int(fed.numbers[n]["history_len"]) for n in summed}
            assert "simulation only" in secure["tables"]
        else:
            assert proper["per_user"] == {} and proper["cohorts"] == {} and res["history_len"] == {}
    nothing = SecureRelease(fed.plan, None, list(fed.numbers))
    path = write_results(settings, split, {}, replies, {"device_phase_s": 1.0}, "h" * 64, nothing)
    res = json.loads(path.read_text())
    assert not res["secure_aggregation"]["released"] and res["methods"] == {} and len(res["failed"]) == 4
