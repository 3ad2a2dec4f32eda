"""`proper-fed simulate`: the whole federated pipeline in Flower's simulation runtime, through `flwr run`,
one virtual SuperNode per device user; results come back through the files the ServerApp writes."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proper_fed.atomic import atomic_write_text
from proper_fed.data import FederationSplit
from proper_fed.errors import ConfigError, ProperFedError
from proper_fed.federation.processes import executable, flwr_env
from proper_fed.federation.run_config import load_run_config, resolve, rotate_results, write_run_config
from proper_fed.federation.run_settings import DEVICE_NODES_DIR, RunSettings, load_split
from proper_fed.model.backbone import cache_dir

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
APP_DIR = Path(__file__).resolve().parents[1]  # the repository: a Flower app like any other


class SimulationError(ProperFedError):
    """The Flower simulation did not produce a results file."""


@dataclass(frozen=True)
class SimulationPlan:
    """What `plan` read and checked, kept for every later step (estimate, failed users, plots): the data is
    loaded and split once per simulate."""

    run_config: dict[str, Any]
    federation: dict[str, Any]
    out: Path
    settings: RunSettings
    split: FederationSplit
    seeds: tuple[int, ...] = ()  # the config's `seeds` (simulations/seeds.py); not a Flower run key


def config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    builtin = CONFIGS / f"{name_or_path}.toml"
    if builtin.exists():
        return builtin
    names = sorted(f.stem for f in CONFIGS.glob("*.toml"))
    raise ConfigError(f"no simulation config {name_or_path!r}: pass a TOML file or one of {names}")


def plan(config: str = "default", overrides: dict[str, Any] | None = None) -> SimulationPlan:
    """Read a simulation config, apply CLI overrides, and size the federation from the data split."""
    loaded = load_run_config(config_path(config))
    # Relative input paths: against the working folder, else the repository (where the shipped configs'
    # paths, like ../shared/data, are meant from), else the config file's folder.
    flat, settings = resolve(loaded.flat, overrides, search=(APP_DIR, loaded.path.parent))
    split = load_split(settings)
    out = Path(flat["out"])
    flat.update({"min-nodes": len(split.device_users), "device-outputs": str(out / "device_outputs")})
    federation = {
        "num-supernodes": len(split.device_users),
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.0,
        **loaded.federation,
    }
    return SimulationPlan(flat, federation, out, RunSettings.from_run_config(flat), split, loaded.seeds)


def _federation_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)


def _env(base: Mapping[str, str]) -> dict[str, str]:
    """The `flwr run` environment: ours on top of the caller's (the CLI passes its own)."""
    extra = {
        "FLWR_HOME": base.get("FLWR_HOME", str(cache_dir() / "flwr-home")),
        "RAY_DEDUP_LOGS": "0",
        "TQDM_DISABLE": "1",
        "PROPER_FED_THREADS": base.get("PROPER_FED_THREADS", "1"),  # read by the ClientApp at import
    }
    return flwr_env(base, extra)


def _start_fresh(out: Path) -> Path:
    """Rotate the last run's results and drop its device outputs and progress."""
    results = rotate_results(out)
    shutil.rmtree(out / "device_outputs", ignore_errors=True)
    (out / "progress.jsonl").unlink(missing_ok=True)
    return results


def run(p: SimulationPlan, env: Mapping[str, str], on_line: Callable[[str], None] | None = None) -> dict:
    """Run `flwr run` on the plan, in the caller's environment `env` with ours on top, and return the results
    the ServerApp wrote."""
    results = _start_fresh(p.out)
    cfg_file = write_run_config(p.run_config, p.out / "run_config.toml")
    fed = " ".join(f"{k}={_federation_value(v)}" for k, v in p.federation.items())
    cmd = [executable("flwr"), "run", str(APP_DIR), "--stream", "--run-config", str(cfg_file)]
    cmd += ["--federation-config", fed]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    progress = p.out / "progress.jsonl"
    with open(p.out / "flower.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_env(env), cwd=APP_DIR)
        seen = 0
        while True:
            code = proc.poll()
            seen = _follow(progress, seen, on_line)
            if code is not None:
                break
            time.sleep(1.0)
    if not results.exists():
        errors = [ln.strip() for ln in (p.out / "flower.log").read_text().splitlines() if "Error: " in ln]
        why = f": {errors[-1]}" if errors else ""
        raise SimulationError(f"the Flower run wrote no results{why} (full log: {p.out / 'flower.log'})")
    data = json.loads(results.read_text())
    data["timings"]["simulation_wall_s"] = time.perf_counter() - t0
    atomic_write_text(results, json.dumps(data, indent=2))
    return data


def _follow(path: Path, seen: int, on_line: Callable[[str], None] | None) -> int:
    """Report the progress lines the ServerApp appended since the last call; returns how many were seen."""
    if not path.exists():
        return seen
    rows = path.read_text().splitlines()
    for row in rows[seen:]:
        if on_line is not None and row.strip():
            on_line(json.loads(row)["message"])
    return max(seen, len(rows))


def _answered_rows(folder: Path, answered: set[str]) -> list[dict]:
    """The rows of the devices results.json counts for this name; files of other devices are left out."""
    rows, skipped = [], []
    for f in sorted(folder.glob("*.json")):
        if f.stem in answered:
            rows.extend(json.loads(f.read_text()))
        else:
            skipped.append(f.stem)
    if skipped:
        log.warning(
            "%s: left out the answers of %d device(s) the results do not count", folder.name, len(skipped)
        )
    return sorted(rows, key=lambda r: r["id"])


def merge_predictions(out: Path, task: str) -> dict[str, Path]:
    """Per reported name (`proper`, `proper@rank`, ...), the answers of exactly the devices results.json
    counts (its per-user tables, keyed by node id), in LaMP's outputs layout: `predictions/<name>.json`
    holds what was scored (LaMP's scorer reproduces results.json from it), `raw/<name>.json` the raw answers."""
    methods = json.loads((out / "results.json").read_text()).get("methods", {})
    written = {}
    for kind in ("predictions", "raw"):
        shutil.rmtree(out / kind, ignore_errors=True)  # never mix in an earlier run's methods
        (out / kind).mkdir(parents=True)
    for folder in sorted(
        p for p in (out / "device_outputs").glob("*") if p.is_dir() and p.name != DEVICE_NODES_DIR
    ):
        rows = _answered_rows(folder, set(methods.get(folder.name, {}).get("per_user", {})))
        for kind, field in (("predictions", "output"), ("raw", "raw")):
            golds = [{"id": r["id"], "output": r[field]} for r in rows]
            path = out / kind / f"{folder.name}.json"
            atomic_write_text(path, json.dumps({"task": task, "golds": golds}, indent=1))
        written[folder.name] = out / "predictions" / f"{folder.name}.json"
    return written


def users_by_node(out: Path, device_user_ids: Sequence[str]) -> dict[str, str]:
    """Simulation only: the device user behind each Flower node id of the run in `out`. Each virtual device
    notes its partition on the simulation's disk when it starts (client.device.note_partition,
    `device_outputs/_nodes/<node id>.json`); partition N is the N-th device user of the split. Node ids change
    from run to run, users do not: this is how runs are matched user by user. A node that noted nothing (or
    a partition outside the split) is left out."""
    named = {}
    for note in sorted((out / "device_outputs" / DEVICE_NODES_DIR).glob("*.json")):
        pid = int(json.loads(note.read_text())["partition-id"])
        if 0 <= pid < len(device_user_ids):
            named[note.stem] = device_user_ids[pid]
    return named


def name_failed_users(out: Path, device_user_ids: list[str]) -> dict[str, str]:
    """Simulation only: the user behind each failed node (`users_by_node`). Written into results.json as
    `failed_users` for the report; a device that failed before noting its partition stays unnamed."""
    path = out / "results.json"
    results = json.loads(path.read_text())
    users = users_by_node(out, device_user_ids)
    named = {node: users[node] for node in results.get("failed", {}) if node in users}
    results["failed_users"] = named
    atomic_write_text(path, json.dumps(results, indent=2))
    return named
