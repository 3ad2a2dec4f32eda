"""seeds.md from seeds.json (simulations/seeds.py): each method over the seeds with its interval, and the
paired per-user tests of PROPER against every other method; the rows are also what the CLI prints."""

from __future__ import annotations

from pathlib import Path

from proper_fed.atomic import atomic_write_text


def fmt(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def _ci(ci: list[float | None], signed: bool = False) -> str:
    return "-" if None in ci else f"[{fmt(ci[0], signed)}, {fmt(ci[1], signed)}]"


def warnings(summary: dict) -> list[str]:
    """One line per seed in which devices are missing: those users are left out of everything."""
    lines = []
    for seed, d in summary["devices"].items():
        if not (d["missing_users"] or d["unnamed_nodes"] or d["answered"] < d["devices"]):
            continue
        line = f"WARNING: seed {seed}: only {d['answered']} of {d['devices']} devices answered"
        line += f"; missing: {', '.join(d['missing_users']) or 'unknown users'}"
        if d["unnamed_nodes"]:  # answered, but its user is unknown (it noted no partition)
            line += f"; nodes that answered without a partition note: {', '.join(d['unnamed_nodes'])}"
        lines.append(line + ". Users missing in any seed are left out of every mean, interval and test.")
    return lines


def method_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per method: users, the mean over users of the per-user metric averaged over seeds, its interval, and
    each seed's mean over the same users."""
    metric = summary["metric"]
    head = ["method", "users", f"mean {metric}", "95 % CI", *(f"seed {s}" for s in summary["seeds"])]
    rows = [
        [name, str(m["users"]), fmt(m["mean"]), _ci(m["ci"]), *(fmt(v) for v in m["per_seed"].values())]
        for name, m in summary["methods"].items()
    ]
    return head, rows


def comparison_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per paired test: the difference (method - other) with its paired interval, p, wins/losses/ties."""
    head = [
        "method",
        "against",
        "users",
        "mean difference",
        "95 % CI",
        "Wilcoxon p",
        "W / L / T",
        "significant",
    ]
    rows = [
        [
            c["method"],
            c["against"],
            str(c["users"]),
            fmt(c["mean_difference"], signed=True),
            _ci(c["ci"], signed=True),
            "-" if c["p_value"] is None else f"{c['p_value']:.3g}",
            f"{c['wins']} / {c['losses']} / {c['ties']}",
            "yes" if c["significant"] else "no",
        ]
        for c in summary["comparisons"]
    ]
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]], bold: int | None = None) -> list[str]:
    """A markdown table; with `bold`, rows whose column `bold` reads 'yes' are set in bold."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"**{c}**" for c in r] if bold is not None and r[bold] == "yes" else r
        out.append("| " + " | ".join(cells) + " |")
    return out


def _how(summary: dict) -> list[str]:
    s, metric = summary["statistics"], summary["metric"]
    direction = "higher" if summary["higher_is_better"] else "lower"
    keys = ", ".join(f"`{k}`" for k in summary["training_seed_keys"])
    return [
        f"Each seed ran the whole simulation into `seed-<s>/` (its own results.json and report.md). A seed sets "
        f"the training seeds only ({keys}); the data split is the same in every seed, so every seed scores the "
        "same device users on the same queries, and users are matched across seeds by device user.",
        "",
        f"A user's {metric} is averaged over the seeds; a method's mean is the mean over users of that (each "
        "user counts once, so it differs from results.json's tables, which pool queries). "
        f"{s['confidence']:.0%} intervals: {s['bootstrap']}. Paired tests: per user, the method's {metric} minus the "
        f"other's ({direction} is better; wins = users on which `proper` is better), the mean difference with "
        f"a paired bootstrap interval (users resampled) and a {s['test']} (ties: zero differences are ranked, "
        f"then dropped). **Significant** = {s['significant']}.",
    ]


def write_seeds_report(out: Path, summary: dict) -> Path:
    users = summary["users"]
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [
        f"# proper-fed over seeds {seeds}: {summary['task']}",
        "",
        *(f"> **{w}**\n" for w in warnings(summary)),
        *_how(summary),
        "",
        f"{users['in_every_seed']} of {users['device_users']} device users answered in every seed"
        + (f"; left out: {', '.join(users['left_out'])}." if users["left_out"] else "."),
        "",
        f"## {summary['metric']} per method, over users and seeds",
        "",
        *markdown_table(*method_rows(summary)),
        "",
        "## Paired per-user tests: `proper` against each method of its scoring protocol, then the pairs "
        "that isolate one part (groups against the matched LoRA, the device's own embedding against the "
        "unknown-user row, the matched budget under OPPU)",
        "",
        *(
            markdown_table(*comparison_rows(summary), bold=7)
            if summary["comparisons"]
            else ["No `proper` to test."]
        ),
        "",
    ]
    return atomic_write_text(out / "seeds.md", "\n".join(lines))
