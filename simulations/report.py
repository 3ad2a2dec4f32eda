"""report.md from results.json: the comparison table, each stage's relative gain, cohorts, costs, plots."""

from __future__ import annotations

import json
from pathlib import Path

from proper_fed.atomic import atomic_write_text
from proper_fed.data.metric_stats import PRIMARY_METRIC
from proper_fed.methods import METHODS, PROPER, REPORT_ORDER

PRIMARY = PRIMARY_METRIC  # task type -> (metric, higher is better)
NO_LLM = tuple(name for name, m in METHODS.items() if not m.uses_llm)
PROTOCOLS = {
    "generate": "LaMP's protocol: the greedy answer, parsed (parse rate: the share of answers naming a valid "
    "label or number)",
    "rank": "the label with the highest log-likelihood under the model (the standard protocol for small models)",
}


def protocols(results: dict) -> list[str]:
    scoring = results.get("config", {}).get("scoring") or ["generate"]
    return [scoring] if isinstance(scoring, str) else list(scoring)


def by_protocol(results: dict) -> dict[str, dict]:
    """results.json's methods per scoring protocol: the first protocol's are '<method>', every other's
    '<method>@<protocol>'; the baselines without an LLM belong to every protocol's table."""
    methods, names = results["methods"], protocols(results)
    out = {names[0]: {k: v for k, v in methods.items() if "@" not in k}}
    for p in names[1:]:
        out[p] = {k: v for k, v in methods.items() if k in NO_LLM}
        out[p].update({k.removesuffix(f"@{p}"): v for k, v in methods.items() if k.endswith(f"@{p}")})
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def relative_gain(before: float, after: float, higher_better: bool) -> float:
    """Relative improvement of `after` over `before` (positive = better), as the paper reports stage gains."""
    if before == 0:
        return float("nan")
    return (after - before) / abs(before) if higher_better else (before - after) / abs(before)


def ordered_methods(results: dict) -> list[str]:
    names = list(results["methods"])
    return [m for m in REPORT_ORDER if m in names] + sorted(m for m in names if m not in REPORT_ORDER)


def score_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison's columns (metrics of the task, parse rate when reported) and one row per method, in
    report order, formatted: what report.md and the CLI both print."""
    methods = results["methods"]
    metric_names = sorted({k for m in methods.values() for k in m["metrics"]})
    parse = any("parse_rate" in m for m in methods.values())
    head = ["method", *metric_names, *(["parse rate"] if parse else [])]
    rows = [
        [
            name,
            *(_fmt(methods[name]["metrics"].get(k)) for k in metric_names),
            *([_fmt(methods[name].get("parse_rate"))] if parse else []),
        ]
        for name in ordered_methods(results)
    ]
    return head, rows


def table(results: dict) -> str:
    """report.md's table: the scores, then each method's cost."""
    methods = results["methods"]
    head, rows = score_rows(results)
    head = [*head, "train s / user", "trainable params / user"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, *cells in rows:
        m = methods[name]
        cost = [f"{m['train_seconds_per_user']:.1f}", f"{int(m['trainable_parameters_per_user']):,}"]
        lines.append("| " + " | ".join([f"`{name}`", *cells, *cost]) + " |")
    return "\n".join(lines)


def cost_table(results: dict) -> str:
    """What each method costs (results.json "costs"): server and device training, adapter bytes shipped."""
    costs = {k: v for k, v in results.get("costs", {}).items() if "@" not in k}
    head = ["method", "server params", "server tokens", "device params", "device tokens / user", "adapter MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in costs.items():
        cells = [
            _count(c["server_trainable_parameters"]),
            _count(c["server_training_tokens"]),
            f"{c['device_trainable_parameters']:,.0f}",
            f"{c['device_training_tokens_per_user']:,.0f}",
            f"{c['shipped_adapter_bytes'] / 2**20:.2f}",
        ]
        lines.append("| " + " | ".join([f"`{name}`", *cells]) + " |")
    return "\n".join(lines)


def _count(value: float | None) -> str:
    """A cost cell; None (not recorded: federated stages' tokens stay on the devices) as a dash."""
    return "—" if value is None or value != value else f"{value:,.0f}"


def answer_spread(out: Path, results: dict) -> str:
    """How varied each method's answers are (from predictions/<method>.json): distinct answers and the most
    frequent answer's share. A model that answers one label for nearly every query has collapsed."""
    from collections import Counter

    lines = ["| method | distinct answers | most frequent answer | its share |", "|---|---|---|---|"]
    for name in ordered_methods(results):
        path = out / "predictions" / f"{name}.json"
        if not path.is_file():
            continue
        answers = Counter(str(g["output"]) for g in json.loads(path.read_text())["golds"])
        if not answers:
            continue
        top, count = answers.most_common(1)[0]
        share = count / sum(answers.values())
        lines.append(f"| `{name}` | {len(answers)} | `{top[:24]}` | {share:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cohort_table(results: dict, metric: str) -> str:
    methods = results["methods"]
    cohorts = sorted({c for m in methods.values() for c in m["cohorts"]})
    rows = ["| method | " + " | ".join(cohorts) + " |", "|" + "---|" * (len(cohorts) + 1)]
    for name in ordered_methods(results):
        rows.append(
            f"| `{name}` | "
            + " | ".join(_fmt(methods[name]["cohorts"].get(c, {}).get(metric)) for c in cohorts)
            + " |"
        )
    return "\n".join(rows)


def gains(results: dict) -> list[str]:
    metric, higher = PRIMARY[results.get("task_type", "classification")]
    m = {k: v["metrics"].get(metric) for k, v in results["methods"].items()}
    lines = []
    for a, b, label in (
        ("population", "proper_group", "stage 1 -> 2"),
        ("proper_group", "proper", "stage 2 -> 3"),
        ("population_matched", "proper_group", "matched server LoRA -> stages 1-2 (same rank, same budget)"),
        ("oppu", "proper", "OPPU -> PROPER"),
        ("oppu_matched", "proper", "OPPU on the matched server LoRA -> PROPER"),
        ("proper_group_unknown", "proper_group", "unknown-user row -> the device's own embedding (stage 2)"),
        ("proper_no_embedding_fit", "proper", "unknown-user row -> the device's own embedding"),
        ("proper_no_router_init", "proper", "random LoRA-aware router -> started at stage 2"),
        ("proper_no_lora_router", "proper", "frozen stage-2 routing -> LoRA-aware router"),
        ("proper_uniform_experts", "proper", "uniform experts -> PROPER's routing"),
        ("proper_end_to_end", "proper", "end-to-end -> progressive"),
        ("proper_no_constraint", "proper", "no constraint loss -> constraint loss"),
    ):
        if m.get(a) is not None and m.get(b) is not None:
            lines.append(
                f"- {label}: {_fmt(m[a])} -> {_fmt(m[b])} {metric} "
                f"({100 * relative_gain(m[a], m[b], higher):+.1f} % relative)"
            )
    return lines


def _protocol_sections(results: dict, metric: str) -> list[str]:
    lines: list[str] = []
    for protocol, methods in by_protocol(results).items():
        sub = {**results, "methods": methods}
        lines += [
            f"## Methods, same users, same queries: scoring `{protocol}`",
            "",
            f"Scoring `{protocol}`: {PROTOCOLS.get(protocol, protocol)}.",
            "",
            table(sub),
            "",
            "Relative gains:",
            "",
            *gains(sub),
            "",
            f"{metric} by history length (device users in quartiles of history size):",
            "",
            cohort_table(sub, metric),
            "",
        ]
    return lines


def _stages_1_2(results: dict) -> str:
    """Who trained stages 1-2: the server's users, or the consenting devices (server-data = federated)."""
    if results.get("server_data") == "federated":
        return "stages 1-2 federated on the consenting devices (SecAgg+, FedAvg)"
    return f"{results['users']['server']} server users (stages 1-2)"


def _missing(results: dict) -> list[str]:
    """Which devices the tables lack, and why (the device's fixed error code and message)."""
    failed = results.get("failed") or {}
    users = results.get("failed_users") or {}
    if not failed:
        return []
    return [
        "## Missing devices",
        "",
        f"{results['answered']}: every table above covers only the devices that answered.",
        "",
        *(f"- node {k}{f' (user {users[k]})' if k in users else ''}: {v}" for k, v in failed.items()),
        "",
    ]


def write_report(out: Path, results: dict, plots: dict[str, Path]) -> Path:
    metric, _ = PRIMARY[results.get("task_type", "classification")]
    users = results["users"]
    answered = (
        results.get("answered") or f"{users['devices_answered']} of {users['devices']} devices answered"
    )
    lines = [
        f"# proper-fed simulation: {results['task']}",
        "",
        f"**{answered}.** {_stages_1_2(results)}, {users['devices']} device users "
        f"(stage 3 on their own history, scored on their own held-out queries).",
        "",
        *(f"- `{k}`: {m.describe}" for k, m in METHODS.items() if m.describe and k in results["methods"]),
        "",
        *_missing(results),
        *_protocol_sections(results, metric),
        *(["## Answer spread", "", spread, ""] if (spread := answer_spread(out, results)) else []),
        *cost_section(results),
        *privacy_section(results),
    ]
    if plots:
        lines += ["## Plots", "", *(f"![{name}]({p.name})" for name, p in plots.items()), ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


PHASE_WORDS = {
    "federated_stages": "federated stages 1-2 (SecAgg+ rounds)",
    "query_base": "base probe",
    "train_user": "bundle and user stage",
    "secure_sum": "secure sum of the metrics (keys, shares, one masked vector)",
}


def bytes_lines(results: dict) -> list[str]:
    """Bytes per device (mean over the devices), by phase; with federated stages also per round and stage."""
    per_dev = results["bytes"]["per_device"]
    n = max(1, len(per_dev))
    phases: dict[str, dict[str, float]] = {}
    for device in per_dev.values():
        for phase, moved in device.items():
            total = phases.setdefault(phase, {"sent": 0.0, "received": 0.0})
            total["sent"] += moved["sent"] / n
            total["received"] += moved["received"] / n
    sent, recv = (sum(p[k] for p in phases.values()) for k in ("sent", "received"))
    lines = [f"- bytes per device: {_mb(sent)} sent to it, {_mb(recv)} received from it; by phase:"]
    lines += [
        f"  - {PHASE_WORDS.get(phase, phase)}: {_mb(p['sent'])} to it, {_mb(p['received'])} from it"
        for phase, p in phases.items()
    ]
    server = (results.get("server") or {}).get(PROPER, {})  # federated runs train PROPER's model only
    for stage in ("population", "group"):
        if f"{stage}.bytes_to_device_per_round" in server:
            lines.append(
                f"  - per device and round of federated {stage} ({_rounds(server[f'{stage}.rounds'])}): "
                f"{_mb(server[f'{stage}.bytes_to_device_per_round'])} to it, "
                f"{_mb(server[f'{stage}.bytes_from_device_per_round'])} from it"
            )
    return lines


def _rounds(n: float) -> str:
    return f"{n:.0f} round" + ("" if n == 1 else "s")


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cost_section(results: dict) -> list[str]:
    """Time, bytes and precision of the run, and each method's training budget."""
    t = results["timings"]
    prec = results.get("precision") or {}
    lines = [
        "## Cost",
        "",
        f"- server stages: {t['server_stages_s']:.0f} s; device phase: {t['device_phase_s']:.0f} s "
        f"({t['device_users_per_hour']:.0f} device users per hour on this machine); whole simulation: "
        f"{t.get('simulation_wall_s', t['total_s']):.0f} s",
        *bytes_lines(results),
    ]
    if prec:
        lines.append(
            f"- precision: {prec.get('dtype')} (requested {prec.get('requested')!r}) on {prec.get('hardware')}, "
            f"CPU/GPU flags: {', '.join(prec.get('flags') or []) or 'none'}"
        )
    lines.append("")
    if results.get("costs"):
        head = "Per method (the matched baselines hold server rank and budget equal to PROPER's):"
        lines += [head, "", cost_table(results), ""]
    return lines


def privacy_section(results: dict) -> list[str]:
    """What the server learned: sums under SecAgg+ (or each device's statistics), and the DP accounting."""
    secure = results.get("secure_aggregation")
    if secure is None:
        return [
            "## Privacy",
            "",
            "- secure aggregation off: each device's statistics reached the server.",
            "",
        ]
    if not secure.get("released"):
        return ["## Privacy", "", f"- secure aggregation: nothing released ({secure.get('reason')}).", ""]
    layout = secure["layout"]
    lines = [
        "## Privacy",
        "",
        f"- secure aggregation (SecAgg+): the server learned only the sums over {secure['devices_summed']} "
        f"devices (at least min-devices = {secure['min_devices']}), one vector of {layout['integers_per_device']} "
        f"integers per device; counts summed at resolution {layout['resolution']['counts']:g}, score sums "
        f"{layout['resolution']['score_sums']:g}, seconds {layout['resolution']['seconds']:g}.",
        f"- per-user and per-cohort tables: {secure['tables']}.",
    ]
    dp = secure.get("dp")
    if dp is None:
        return [*lines, "- differential privacy: off (dp-epsilon = 0): the sums are exact.", ""]
    noise = ", ".join(f"{k} {v:.3g}" for k, v in dp["noise_std"].items())
    return [
        *lines,
        f"- differential privacy: ({dp['epsilon']:g}, {dp['delta']:g})-DP for {dp['adjacency']}; "
        f"{dp['mechanism']}; L2 sensitivity {dp['l2_sensitivity_units']:.3g} units, sigma "
        f"{dp['sigma_units']:.3g} units, each device adds sigma / sqrt({dp['devices_assumed']}); "
        f"one release per run; bounds {dp['bounds']}.",
        f"- noise standard deviation in the sums over {dp['devices_summed']} devices: {noise}.",
        f"- not covered: {dp['not_covered']}; caveats: {dp['caveats']}.",
        "",
    ]
