"""Aggregate what devices reported (numbers only) into the run's results file."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message

from proper_fed.atomic import atomic_write_text
from proper_fed.data import FederationSplit
from proper_fed.data.metric_stats import add_stats, metrics_from_stats, parse_rate
from proper_fed.data.metrics import cohort_labels
from proper_fed.federation.reply_schema import COST_KEYS
from proper_fed.federation.run_settings import RunSettings
from proper_fed.federation.wire import METRICS
from server.method_costs import method_costs


@dataclass
class DeviceReply:
    node_id: int
    has_base: bool = False
    sent_train: int = 0
    metrics: dict[str, float] | None = None
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
        else:
            self.metrics = dict(msg.content[METRICS])

    def methods(self) -> dict[str, dict[str, float]]:
        """Per method: its statistics, from keys '<method>.<stat>'. A further scoring protocol's
        '<method>@<protocol>.<stat>' is a method of its own ('proper@rank'); a stat may hold a dot ('tp.3')."""
        out: dict[str, dict[str, float]] = defaultdict(dict)
        for key, value in (self.metrics or {}).items():
            method, _, stat = key.partition(".")
            if stat:
                out[method][stat] = float(value)
        return dict(out)


def aggregate(split: FederationSplit, replies: dict[int, DeviceReply]) -> dict:
    task = split.task
    ok = {n: r for n, r in replies.items() if r.metrics is not None}
    per_method: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    history = {n: int(r.metrics.get("history_len", 0)) for n, r in ok.items()}
    for n, r in ok.items():
        for method, stats in r.methods().items():
            per_method[method][n] = stats
    cohort_of = cohort_labels(history)
    methods = {}
    for method, by_node in per_method.items():
        stats = {n: {k: v for k, v in s.items() if k not in COST_KEYS} for n, s in by_node.items()}
        cohorts: dict[str, list[dict]] = defaultdict(list)
        for n, s in stats.items():
            cohorts[cohort_of[n]].append(s)
        costs = {k: [s[k] for s in by_node.values() if k in s] for k in COST_KEYS}
        pooled = add_stats(stats.values())
        methods[method] = {
            "metrics": metrics_from_stats(task, pooled),
            "parse_rate": parse_rate(pooled),
            "per_user": {str(n): metrics_from_stats(task, s) for n, s in stats.items()},
            "cohorts": {c: metrics_from_stats(task, add_stats(v)) for c, v in sorted(cohorts.items())},
            "train_seconds_per_user": statistics.fmean(costs["train_s"]) if costs["train_s"] else 0.0,
            "eval_seconds_per_user": statistics.fmean(costs["eval_s"]) if costs["eval_s"] else 0.0,
            "trainable_parameters_per_user": max(costs["trainable_params"], default=0),
            "train_tokens_per_user": statistics.fmean(costs["train_tokens"])
            if costs["train_tokens"]
            else 0.0,
            "users": len(stats),
        }
    return {"methods": methods, "history_len": {str(n): h for n, h in history.items()}}


def write_results(
    settings: RunSettings,
    split: FederationSplit,
    models: dict,
    replies: dict[int, DeviceReply],
    timings: dict[str, float],
    base_hash: str,
) -> Path:
    agg = aggregate(split, replies)
    device_s = timings.get("device_phase_s", 0.0)
    answered = sum(r.metrics is not None for r in replies.values())
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
        "failed": {
            str(n): r.error or "no reply: reply-timeout-s passed without any device replying"
            for n, r in replies.items()
            if r.metrics is None
        },
        "methods": agg["methods"],
        "history_len": agg["history_len"],
        "server": {name: m.metrics for name, m in models.items()},
        "costs": method_costs(agg["methods"], models),
        "config": _jsonable(settings),
        # what dtype="auto" resolved to on the server's machine (the simulated devices share it), and why
        "precision": _precision(settings),
        "base_hash": base_hash,
        "timings": {**timings, "device_users_per_hour": 3600 * answered / device_s if device_s else 0.0},
        "bytes": {
            "per_device": {str(n): r.bytes for n, r in replies.items()},
            "total_sent": sum(p["sent"] for r in replies.values() for p in r.bytes.values()),
            "total_received": sum(p["received"] for r in replies.values() for p in r.bytes.values()),
        },
    }
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))


def _precision(settings: RunSettings) -> dict:
    from proper_fed.model.backbone import resolve_device
    from proper_fed.model.precision import resolve_precision

    cfg = settings.proper.backbone
    return resolve_precision(cfg.dtype, resolve_device(cfg.device)).to_dict()


def _jsonable(settings: RunSettings) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
