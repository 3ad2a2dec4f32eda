"""`proper-fed compare A B`: two multi-seed runs on the same device users (for example federated against central
stages 1-2, or the server on nf4 against full precision), method by method: each side's mean and the paired
per-user difference A - B with its interval, Wilcoxon p and wins / losses / ties (the statistics of seeds.md).

Both folders hold a seeds.json (`simulate --seeds ...`); users are matched by device user, so the two runs
must share the data and its split (the same device users, scored on the same queries). A method compared is one
both runs report; a user counts when both runs have the method's metric for it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from proper_fed.atomic import atomic_write_text
from proper_fed.errors import ConfigError
from simulations.seeds import paired_per_user
from simulations.seeds_report import comparison_rows, fmt, markdown_table

SEEDS_FILE = "seeds.json"


def load_seeds_summary(folder: Path) -> dict:
    path = Path(folder) / SEEDS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder} holds no {SEEDS_FILE}: compare takes the folders of multi-seed runs "
            "(`proper-fed simulate --seeds 0 1 2 --out FOLDER`; one seed is `--seeds 0`)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}); rerun `simulate --seeds` to write it again"
        ) from err


def compare_runs(a: Path, b: Path) -> dict:
    """The paired comparison of run `a` against run `b` (see module docstring)."""
    sa, sb = load_seeds_summary(a), load_seeds_summary(b)
    for key in ("task", "metric"):
        if sa[key] != sb[key]:
            raise ConfigError(
                f"{a} and {b} differ in {key} ({sa[key]!r} against {sb[key]!r}): nothing to pair"
            )
    users_a = set().union(*(m["per_user"] for m in sa["methods"].values()))
    users_b = set().union(*(m["per_user"] for m in sb["methods"].values()))
    if not users_a & users_b:
        raise ConfigError(
            f"{a} and {b} share no device user: compare runs on the same data and split (same data, "
            "max-users, server-fraction, split seed)"
        )
    rows = []
    for name in (n for n in sa["methods"] if n in sb["methods"]):
        pa, pb = sa["methods"][name]["per_user"], sb["methods"][name]["per_user"]
        users = [u for u in pa if u in pb]
        if not users:  # a method neither run scored on a shared user: nothing to pair
            continue
        means = {side: statistics.fmean(p[u] for u in users) for side, p in (("a", pa), ("b", pb))}
        paired = paired_per_user(pa, pb, sa["higher_is_better"])
        rows.append({"method": name, "against": name, "mean_a": means["a"], "mean_b": means["b"], **paired})
    return {
        "a": str(a),
        "b": str(b),
        "task": sa["task"],
        "metric": sa["metric"],
        "higher_is_better": sa["higher_is_better"],
        "seeds": {"a": sa["seeds"], "b": sb["seeds"]},
        "users": {"a": len(users_a), "b": len(users_b), "both": len(users_a & users_b)},
        "statistics": sa.get("statistics", {}),
        "comparisons": rows,
    }


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per method: the two means over the users both have, then the paired difference A - B."""
    head, paired = comparison_rows(summary)
    metric = summary["metric"]
    head = ["method", f"A {metric}", f"B {metric}", *head[2:]]
    rows = [
        [c["method"], fmt(c["mean_a"]), fmt(c["mean_b"]), *p[2:]]
        for c, p in zip(summary["comparisons"], paired, strict=True)
    ]
    return head, rows


def write_compare_report(summary: dict, out: Path) -> tuple[Path, Path]:
    """`out`.md and `out`.json."""
    s = summary
    head, rows = table_rows(s)
    lines = [
        f"# proper-fed compare: {s['task']}, {s['metric']}",
        "",
        f"- A: `{s['a']}` (seeds {', '.join(map(str, s['seeds']['a']))})",
        f"- B: `{s['b']}` (seeds {', '.join(map(str, s['seeds']['b']))})",
        f"- device users: {s['users']['both']} in both ({s['users']['a']} in A, {s['users']['b']} in B); a user's "
        "metric is its mean over the seeds of its run",
        "",
        "Per method: the mean over the users both runs scored, and A minus B paired per user "
        f"({'higher' if s['higher_is_better'] else 'lower'} is better; wins = users on which A is better). "
        + " ".join(f"{k}: {v}." for k, v in s["statistics"].items()),
        "",
        *markdown_table(head, rows, bold=len(head) - 1),
        "",
    ]
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    atomic_write_text(js, json.dumps(s, indent=2))
    return atomic_write_text(md, "\n".join(lines)), js
