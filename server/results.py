"""The run's results file from what the server learned: with secure aggregation, the SecAgg+ sums of the
devices' statistics (plus, in simulation only, per-user and per-cohort tables computed from the virtual
devices' own files on the simulation's disk, labelled as such); without, each device's statistics."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message

from proper_fed.atomic import atomic_write_text
from proper_fed.data import FederationSplit
from proper_fed.data.metric_stats import add_stats, metrics_from_stats, parse_rate
from proper_fed.data.metrics import cohort_labels
from proper_fed.data.task_spec import TaskSpec
from proper_fed.federation.run_settings import RunSettings, device_stats_path
from proper_fed.federation.secure_sum import DEVICES_KEY
from proper_fed.federation.wire import METRICS
from server.method_costs import method_costs
from server.secure_metrics import SecureRelease

LOCAL_TABLES = (
    "simulation only: computed from the virtual devices' own statistics on the simulation's disk "
    "(device_outputs/_nodes/stats), never sent to the server, without any DP noise"
)
NO_TABLES = "none: with secure aggregation the server learns only sums over devices"


@dataclass
class DeviceReply:
    node_id: int
    has_base: bool = False
    sent_train: int = 0
    metrics: dict[str, float] | None = None
    ready: bool = False  # finished the user stage; with secure aggregation its statistics wait for the sum
    error: str | None = None
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)

    def account(self, phase: str, sent: int, received: int) -> None:
        self.bytes[phase] = {"sent": sent, "received": received}

    def take_reply(self, msg: Message) -> None:
        from server.wire import payload_bytes

        received = payload_bytes(msg.content) if msg.has_content() else 0
        self.account("train_user", self.sent_train, received)
        if msg.has_error():
            self.error = f"device error {msg.error.code}: {msg.error.reason}"
        elif METRICS in msg.content:
            self.metrics = dict(msg.content[METRICS])
        else:
            self.ready = True


def by_method(numbers: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per method: its statistics, from keys '<method>.<stat>'. A further scoring protocol's
    '<method>@<protocol>.<stat>' is a method of its own ('proper@rank'); a stat may hold a dot ('tp.3')."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in numbers.items():
        method, _, stat = key.partition(".")
        if stat:
            out[method][stat] = float(value)
    return dict(out)


def method_tables(
    task: TaskSpec, pooled: Mapping[str, float], users: int, per_device: Mapping[str, Mapping[str, float]]
) -> dict:
    """Per method: the pooled metrics from the summed statistics of `users` devices, costs per user (sums
    divided by `users`), and per-user and per-cohort tables from `per_device` statistics (empty: no tables)."""
    history = {n: int(s.get("history_len", 0)) for n, s in per_device.items()}
    cohort_of = cohort_labels(history) if history else {}
    devices = {n: by_method(s) for n, s in per_device.items()}
    methods = {}
    for method, stats in by_method(pooled).items():
        own = {n: d[method] for n, d in devices.items() if method in d}
        cohorts: dict[str, list[dict]] = defaultdict(list)
        for n, s in own.items():
            cohorts[cohort_of[n]].append(s)
        methods[method] = {
            "metrics": metrics_from_stats(task, stats),
            "parse_rate": parse_rate(stats),
            "per_user": {n: metrics_from_stats(task, s) for n, s in own.items()},
            "cohorts": {c: metrics_from_stats(task, add_stats(v)) for c, v in sorted(cohorts.items())},
            "train_seconds_per_user": stats.get("train_s", 0.0) / users,
            "eval_seconds_per_user": stats.get("eval_s", 0.0) / users,
            "trainable_parameters_per_user": stats.get("trainable_params", 0.0) / users,
            "train_tokens_per_user": stats.get("train_tokens", 0.0) / users,
            "users": users,
        }
    return {"methods": methods, "history_len": history}


def aggregate(split: FederationSplit, replies: dict[int, DeviceReply]) -> dict:
    """Without secure aggregation: every device's own statistics reached the server."""
    per_device = {str(n): r.metrics for n, r in replies.items() if r.metrics is not None}
    return method_tables(split.task, add_stats(per_device.values()), max(len(per_device), 1), per_device)


def aggregate_sums(split: FederationSplit, release: SecureRelease, device_outputs: str) -> dict:
    """With secure aggregation: the sums; per-user tables only in simulation (`device_outputs`), from the
    virtual devices' own files of exactly the devices in the sum."""
    if release.sums is None:
        return {"methods": {}, "history_len": {}}
    local = {}
    for node in release.sums.nodes if device_outputs else ():
        path = device_stats_path(device_outputs, node)
        if path.is_file():
            local[str(node)] = json.loads(path.read_text())
    pooled = {k: v for k, v in release.sums.sums.items() if k != DEVICES_KEY}
    return method_tables(split.task, pooled, len(release.sums.nodes), local)


def secure_summary(release: SecureRelease, device_outputs: str) -> dict:
    """What results.json says about the secure sum: who is in it, the layout, DP, and where tables come from."""
    sums = release.sums
    if sums is None:
        return {
            "released": False,
            "reason": f"fewer than min-devices={release.plan.min_devices} devices completed the secure sum "
            f"({len(release.ready)} were ready): the server unmasked nothing",
            "ready": len(release.ready),
        }
    totals = {k: sums.sums[k] for k in ("history_len", "queries", "device_total_s") if k in sums.sums}
    return {
        "released": True,
        **release.plan.describe(len(sums.nodes)),
        "nodes": [str(n) for n in sums.nodes],
        "device_totals": totals,
        "sums": sums.sums,  # everything the server learned about the devices' statistics
        "tables": LOCAL_TABLES if device_outputs else NO_TABLES,
    }


def write_results(
    settings: RunSettings,
    split: FederationSplit,
    models: dict,
    replies: dict[int, DeviceReply],
    timings: dict[str, float],
    base_hash: str,
    release: SecureRelease | None = None,
) -> Path:
    """results.json; `release`: the secure-sum phase (None: the run sent statistics in the clear)."""
    if release is None:
        agg, counted = aggregate(split, replies), {n for n, r in replies.items() if r.metrics is not None}
    else:
        agg = aggregate_sums(split, release, settings.device_outputs)
        counted = set(release.sums.nodes if release.sums else ())
    device_s = timings.get("device_phase_s", 0.0)
    answered = len(counted)
    results = {
        "answered": f"{answered} of {len(split.device_users)} devices answered",
        "task": split.task.name,
        "task_type": split.task.type,
        "users": {
            "server": len(split.server_users),
            "devices": len(split.device_users),
            "devices_connected": len(replies),
            "devices_answered": answered,
        },
        "failed": {str(n): _failure(r, release) for n, r in replies.items() if n not in counted},
        "methods": agg["methods"],
        "history_len": agg["history_len"],
        "secure_aggregation": None if release is None else secure_summary(release, settings.device_outputs),
        "server": {name: m.metrics for name, m in models.items()},
        "server_data": settings.server_data,  # what trained stages 1-2: "central" or "federated"
        "costs": method_costs(agg["methods"], models),
        "config": _jsonable(settings),
        # what dtype="auto" resolved to on the server's machine (the simulated devices share it), and why
        "precision": _precision(settings),
        "base_hash": base_hash,
        "timings": {**timings, "device_users_per_hour": 3600 * answered / device_s if device_s else 0.0},
        "bytes": _bytes(replies),
    }
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))


def _bytes(replies: dict[int, DeviceReply]) -> dict:
    """What each device's phases moved (bytes sent to it and received from it), and the totals."""
    return {
        "per_device": {str(n): r.bytes for n, r in replies.items()},
        "total_sent": sum(p["sent"] for r in replies.values() for p in r.bytes.values()),
        "total_received": sum(p["received"] for r in replies.values() for p in r.bytes.values()),
    }


def _failure(reply: DeviceReply, release: SecureRelease | None) -> str:
    if reply.error:
        return reply.error
    if reply.ready and release is not None:
        if release.sums is None:
            return "finished the user stage; no secure sum was released (fewer than min-devices completed it)"
        return "finished the user stage but dropped out of the secure sum (SecAgg+)"
    return "no reply: reply-timeout-s passed without any device replying"


def _precision(settings: RunSettings) -> dict:
    from proper_fed.model.backbone import resolve_device
    from proper_fed.model.precision import resolve_precision

    cfg = settings.proper.backbone
    return resolve_precision(cfg.dtype, resolve_device(cfg.device)).to_dict()


def _jsonable(settings: RunSettings) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
