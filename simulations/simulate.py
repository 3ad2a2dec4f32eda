"""One call for the whole simulation: plan, run through Flower, gather predictions, plots and the report."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proper_fed.data.tasks import lamp_task_id
from simulations import plots
from simulations.estimate import Estimate, estimate_run
from simulations.report import PRIMARY, write_report
from simulations.run import SimulationPlan, merge_predictions, name_failed_users, plan, run
from simulations.seeds import SeedsOutcome, check_seeds, finished_seed, run_seeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    out: Path
    results: dict
    report: Path
    predictions: dict[str, Path]
    plots: dict[str, Path]


def make_plots(p: SimulationPlan, results: dict) -> dict[str, Path]:
    """Routing plots from the server's saved stages (on server users), and the cohort plot."""
    from proper_fed.data import server_training_examples
    from proper_fed.data.synthetic import generate_synthetic
    from proper_fed.federation.run_settings import BUILTIN_DATA
    from proper_fed.model.backbone import load_backbone

    metric, _ = PRIMARY[results.get("task_type", "classification")]
    made = {"metric by history length": plots.cohort_plot(results, metric, p.out / "cohorts.png")}
    settings = p.settings
    state = settings.state_path
    variants = {
        name: state / name
        for name in ("proper", "proper_no_constraint")
        if (state / name / "group.json").exists()
    }
    if not variants:
        return made
    examples = server_training_examples(p.split)[:256]
    backbone = load_backbone(settings.proper.backbone)
    runs = {
        ("with constraint loss" if n == "proper" else "without constraint loss"): plots.routing(
            backbone, f, examples
        )
        for n, f in variants.items()
    }
    made["expert routing"] = plots.routing_density(runs, p.out / "routing_density.png")
    groups = generate_synthetic(settings.synthetic).groups if settings.data == BUILTIN_DATA else None
    made["user embeddings"] = plots.user_embeddings(
        next(iter(runs.values())), p.out / "user_embeddings.png", groups
    )
    return made


def estimate(p: SimulationPlan, with_plots: bool) -> Estimate:
    """The run's time on this machine, from a short measurement (see simulations/estimate.py)."""
    cpus = float(p.federation.get("client-resources-num-cpus", 1)) or 1.0
    parallel = int(max(1, (os.cpu_count() or 1) // cpus))
    return estimate_run(p.settings, p.split, parallel, with_plots)


def simulate(
    env: Mapping[str, str],
    config: str = "default",
    overrides: dict[str, Any] | None = None,
    on_line: Callable[[str], None] | None = None,
    with_plots: bool = True,
    seeds: Sequence[int] = (),
    fresh: bool = False,
) -> Outcome | SeedsOutcome:
    """The whole simulation; `env` is the caller's environment, passed on to Flower with ours on top. With
    `seeds` (or the config's `seeds`): once per training seed into `<out>/seed-<s>/`, then the comparison over
    seeds (simulations/seeds.py); a seed already finished with the same run config is reused unless `fresh`."""
    p = plan(config, overrides)
    seeds = check_seeds(seeds) if seeds else p.seeds
    if on_line:
        users = f"{len(p.split.server_users)} server users, {len(p.split.device_users)} device users"
        on_line(f"{users} (one virtual SuperNode each)")
        on_line(estimate(p, with_plots).describe())
        if seeds:
            on_line(
                f"{len(seeds)} runs, one per training seed ({', '.join(map(str, seeds))}): that time each"
            )
    if not seeds:
        return simulate_plan(p, env, on_line, with_plots)

    def one_seed(sp: SimulationPlan, s: int) -> Outcome:
        said = _prefixed(on_line, f"seed {s}: ")
        done = None if fresh else finished_seed(sp)
        if done is None:
            return simulate_plan(sp, env, said, with_plots)
        if said:
            said(f"reusing {sp.out} (finished with the same run config; --fresh runs it again)")
        return Outcome(sp.out, done, sp.out / "report.md", _predictions(sp.out), {})

    return run_seeds(p, seeds, one_seed)


def _predictions(out: Path) -> dict[str, Path]:
    return {f.stem: f for f in sorted((out / "predictions").glob("*.json"))}


def _prefixed(on_line: Callable[[str], None] | None, prefix: str) -> Callable[[str], None] | None:
    return (lambda line: on_line(prefix + line)) if on_line else None


def simulate_plan(
    p: SimulationPlan, env: Mapping[str, str], on_line: Callable[[str], None] | None, with_plots: bool
) -> Outcome:
    """One whole run of a plan: Flower, the failed users named, predictions, plots and report.md."""
    results = run(p, env, on_line)
    if results.get("failed"):
        results["failed_users"] = name_failed_users(p.out, [u.user_id for u in p.split.device_users])
    predictions = merge_predictions(p.out, lamp_task_id(results["task"]))
    made = make_plots(p, results) if with_plots else {}
    report = write_report(p.out, results, made)
    return Outcome(p.out, results, report, predictions, made)
