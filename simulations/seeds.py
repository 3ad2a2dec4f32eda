"""`simulate --seeds 0 1 2`: the whole simulation once per training seed into `<out>/seed-<s>/`, then every
method compared over the same device users, with intervals and paired tests (`<out>/seeds.json`, `seeds.md`).

A seed sets the training seeds only (`population.seed`, `group.seed`, `user.seed`: adapter init, example
order, unknown-user dropout, the user stage). The data, its split and the device users are the plan's in every
seed, so each user is scored on the same queries in every seed; runs are matched by device user (Flower node
ids change from run to run), and a user's metric averaged over the seeds is one paired observation per method.
A user missing from any seed is left out of every mean, interval and test, and seeds.md says so.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from proper_fed.atomic import atomic_write_text
from proper_fed.data import significance
from proper_fed.errors import ConfigError
from proper_fed.federation.run_config import run_config_text
from proper_fed.federation.run_settings import RunSettings
from simulations.report import NO_LLM, PRIMARY, ordered_methods, protocols
from simulations.run import SimulationPlan, users_by_node
from simulations.seeds_report import write_seeds_report

if TYPE_CHECKING:
    from simulations.simulate import Outcome

TRAINING_SEED_KEYS = ("population.seed", "group.seed", "user.seed")
REFERENCE = "proper"  # the method every other one is tested against, per scoring protocol
# Pairs that isolate one part of PROPER (tested too, when both ran): groups and routing against a LoRA of the
# same server rank and budget, the device's own embedding against the unknown-user row, and what the matched
# server budget alone gives OPPU.
PART_PAIRS = (
    ("proper_group", "population_matched"),
    ("proper_group", "proper_group_unknown"),
    ("oppu_matched", "oppu"),
)


@dataclass(frozen=True)
class SeedRun:
    """One seed's results.json with its per-user tables keyed by device user instead of node id."""

    seed: int
    results: dict
    per_user: dict[str, dict[str, dict[str, float]]]  # method -> device user -> metrics
    unnamed: tuple[str, ...]  # nodes that answered but noted no partition: their user is unknown

    @property
    def answered(self) -> set[str]:
        return {u for users in self.per_user.values() for u in users}


@dataclass(frozen=True)
class SeedsOutcome:
    out: Path
    runs: dict[int, Outcome]
    summary: dict
    report: Path


def seed_plan(p: SimulationPlan, seed: int) -> SimulationPlan:
    """The plan with the training seeds set to `seed`, writing into `<out>/seed-<seed>/`; data and split kept."""
    out = p.out / f"seed-{seed}"
    flat = {**p.run_config, **dict.fromkeys(TRAINING_SEED_KEYS, seed)}
    flat.update({"out": str(out), "device-outputs": str(out / "device_outputs")})
    if p.run_config.get("state-dir"):  # an explicit server state folder: one per seed, never shared
        flat["state-dir"] = str(Path(p.run_config["state-dir"]) / f"seed-{seed}")
    return replace(p, run_config=flat, out=out, settings=RunSettings.from_run_config(flat), seeds=())


def finished_seed(p: SimulationPlan) -> dict | None:
    """The results of a seed already run to the end with exactly this plan's run config, or None.

    A seed is reused when its folder holds results.json, every device answered, and its run_config.toml equals
    the one this plan would write (same data, users, methods, settings and training seed). Anything else
    (another setting, a lost device, no results) runs again. The code is not compared: after changing the
    method, pass `--fresh` to run every seed again."""
    results, written = p.out / "results.json", p.out / "run_config.toml"
    if not (results.is_file() and written.is_file()):
        return None
    try:
        data = json.loads(results.read_text())
        same = tomllib.loads(written.read_text()) == tomllib.loads(run_config_text(p.run_config))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    users = data.get("users", {})
    complete = users.get("devices") and users.get("devices") == users.get("devices_answered")
    return data if same and complete and not data.get("failed") else None


def check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give one or more distinct seeds")
    return tuple(seeds)


def run_seeds(
    p: SimulationPlan, seeds: Sequence[int], run_one: Callable[[SimulationPlan, int], Outcome]
) -> SeedsOutcome:
    """Run the plan once per seed (`run_one`: one whole simulation), then write seeds.json and seeds.md."""
    check_seeds(seeds)
    outcomes = {s: run_one(seed_plan(p, s), s) for s in seeds}
    summary = aggregate({s: o.out for s, o in outcomes.items()}, [u.user_id for u in p.split.device_users])
    atomic_write_text(p.out / "seeds.json", json.dumps(summary, indent=2))
    return SeedsOutcome(p.out, outcomes, summary, write_seeds_report(p.out, summary))


def load_seed_run(seed: int, run_dir: Path, device_user_ids: Sequence[str]) -> SeedRun:
    """A seed's results with each per-user table re-keyed from node id to device user."""
    results = json.loads((run_dir / "results.json").read_text())
    users = users_by_node(run_dir, device_user_ids)
    per_user, unnamed = {}, set()
    for method, m in results.get("methods", {}).items():
        per_user[method] = {users[n]: v for n, v in m.get("per_user", {}).items() if n in users}
        unnamed |= {n for n in m.get("per_user", {}) if n not in users}
    return SeedRun(seed, results, per_user, tuple(sorted(unnamed)))


def complete_users(runs: Iterable[SeedRun], method: str, metric: str, order: Sequence[str]) -> list[str]:
    """The device users (in split order) with the method's metric in every seed."""
    runs = list(runs)
    return [u for u in order if all(metric in r.per_user.get(method, {}).get(u, {}) for r in runs)]


def method_summary(runs: Sequence[SeedRun], method: str, metric: str, users: Sequence[str]) -> dict:
    """Per user the metric averaged over seeds; their mean and bootstrap interval; each seed's mean."""
    per_user = {u: statistics.fmean(r.per_user[method][u][metric] for r in runs) for u in users}
    ci = significance.bootstrap_mean(list(per_user.values()))
    return {
        "users": len(users),
        "mean": _num(statistics.fmean(per_user.values())) if users else None,
        "ci": [_num(ci.low), _num(ci.high)],
        "per_seed": {
            str(r.seed): _num(statistics.fmean(r.per_user[method][u][metric] for u in users))
            if users
            else None
            for r in runs
        },
        "per_user": per_user,
    }


def protocol_groups(results: dict, names: Iterable[str]) -> dict[str, list[str]]:
    """Each scoring protocol's methods as results.json names them (report.by_protocol's grouping): the
    first protocol's '<method>', every other's '<method>@<protocol>', the baselines without an LLM in each."""
    first, *others = protocols(results)
    names = list(names)
    groups = {first: [n for n in names if "@" not in n]}
    for p in others:
        groups[p] = [n for n in names if n in NO_LLM or n.endswith(f"@{p}")]
    return groups


def comparisons(methods: dict[str, dict], groups: dict[str, list[str]], higher: bool) -> list[dict]:
    """`proper` (per protocol) against every other method of its protocol, then `PART_PAIRS`, on the users
    both have."""
    rows = []
    for i, (protocol, names) in enumerate(groups.items()):
        suffix = "" if i == 0 else f"@{protocol}"
        ref = REFERENCE + suffix
        pairs = [(ref, other) for other in names if other != ref] if ref in names else []
        pairs += [(a + suffix, b + suffix) for a, b in PART_PAIRS if {a + suffix, b + suffix} <= set(names)]
        for one, other in pairs:
            paired = paired_per_user(methods[one]["per_user"], methods[other]["per_user"], higher)
            rows.append({"protocol": protocol, "method": one, "against": other, **paired})
    return rows


def paired_per_user(a: Mapping[str, float], b: Mapping[str, float], higher: bool) -> dict:
    """`a` against `b` (user -> metric) on the users both have: the paired test's summary (paired_summary)."""
    users = [u for u in a if u in b]
    return paired_summary(
        significance.paired_comparison([a[u] for u in users], [b[u] for u in users], higher)
    )


def devices(runs: Sequence[SeedRun], device_user_ids: Sequence[str]) -> dict[str, dict]:
    """Per seed: how many devices answered, and which device users are missing (by name)."""
    return {
        str(r.seed): {
            "devices": r.results["users"]["devices"],
            "answered": r.results["users"]["devices_answered"],
            "missing_users": [u for u in device_user_ids if u not in r.answered],
            "unnamed_nodes": list(r.unnamed),
        }
        for r in runs
    }


def aggregate(run_dirs: Mapping[int, Path], device_user_ids: Sequence[str]) -> dict:
    """seeds.json: every reported method over the seeds in `run_dirs` (seed -> run folder)."""
    runs = [load_seed_run(s, d, device_user_ids) for s, d in sorted(run_dirs.items())]
    first = runs[0].results
    metric, higher = PRIMARY[first.get("task_type", "classification")]
    names = ordered_methods({"methods": dict.fromkeys(n for r in runs for n in r.per_user)})
    methods = {
        m: method_summary(runs, m, metric, complete_users(runs, m, metric, device_user_ids)) for m in names
    }
    everywhere = set.intersection(*(r.answered for r in runs))
    return {
        "task": first["task"],
        "task_type": first.get("task_type", "classification"),
        "metric": metric,
        "higher_is_better": higher,
        "seeds": [r.seed for r in runs],
        "runs": {str(s): str(d) for s, d in sorted(run_dirs.items())},
        "training_seed_keys": list(TRAINING_SEED_KEYS),
        "statistics": _statistics(),
        "devices": devices(runs, device_user_ids),
        "users": {
            "device_users": len(device_user_ids),
            "in_every_seed": sum(u in everywhere for u in device_user_ids),
            "left_out": [u for u in device_user_ids if u not in everywhere],
        },
        "methods": methods,
        "comparisons": comparisons(methods, protocol_groups(first, names), higher),
    }


def _statistics() -> dict:
    return {
        "confidence": significance.CONFIDENCE,
        "bootstrap": f"percentile bootstrap, {significance.RESAMPLES} resamples of the users, rng seed "
        f"{significance.RNG_SEED}",
        "test": f"two-sided Wilcoxon signed-rank, zero_method={significance.ZERO_METHOD!r}",
        "significant": f"p < {significance.ALPHA} and the {significance.CONFIDENCE:.0%} interval excludes 0",
    }


def paired_summary(c: significance.PairedComparison) -> dict:
    return {
        "users": c.users,
        "mean_difference": _num(c.mean_difference),
        "ci": [_num(c.interval.low), _num(c.interval.high)],
        "p_value": _num(c.p_value),
        "wins": c.wins,
        "losses": c.losses,
        "ties": c.ties,
        "significant": c.significant,
    }


def _num(x: float) -> float | None:
    """JSON has no nan: a missing number is null."""
    return None if x != x else float(x)
