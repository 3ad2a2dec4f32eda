"""Run config files, the one way in for both `proper-fed simulate` and a deployment (`proper-fed server ...`).

A run config TOML has top-level run keys (or a `[run]` table) and one table per section (`[user]`,
`[adapters]`, ...); a `[federation]` table sizes a simulation and is kept apart. Flower wants it flat
(`user.epochs = 4`): `load_run_config` reads and flattens, `resolve` merges overrides, makes file paths
absolute (the ServerApp runs in another working folder) and validates through `RunSettings`, and
`write_run_config` writes the flat file `flwr run --run-config` reads. The defaults are the config
dataclasses' (`default_run_config`); a file only overrides them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proper_fed.atomic import atomic_write_text
from proper_fed.errors import ConfigError
from proper_fed.federation.run_settings import BUILTIN_DATA, SECTIONS, RunSettings

# Keys that name files the run reads (searched for) and that it writes (relative to the working folder).
INPUT_PATH_KEYS = ("data", "task", "server-key", "server-public-key")
OUTPUT_PATH_KEYS = ("out", "state-dir", "device-outputs")


@dataclass(frozen=True)
class RunConfigFile:
    """A run config TOML read: its flat run keys, its `[federation]` table and its `seeds` (simulation only:
    `simulate` repeats the run once per training seed, see simulations/seeds.py; not a Flower run key)."""

    path: Path
    flat: dict[str, Any]
    federation: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()


def flatten_config(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested TOML table as Flower's flat run config: `{"group": {"epochs": 2}}` -> `{"group.epochs": 2}`;
    lists become comma-separated strings, since Flower config values are scalars."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, f"{key}."))
        else:
            out[key] = _flat_value(v)
    return out


def read_toml(path: str | os.PathLike[str], what: str = "run config") -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{what} {p}: no such file") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {p}: not valid TOML: {err}") from err


def load_run_config(path: str | os.PathLike[str]) -> RunConfigFile:
    """A run config TOML as flat Flower keys: top-level keys and a `[run]` table as they are, other tables
    as `<table>.<key>`; the `[federation]` table apart."""
    raw = read_toml(path)
    federation = raw.pop("federation", {})
    run = raw.pop("run", {})
    seeds = parse_seeds(run.pop("seeds", raw.pop("seeds", [])))
    return RunConfigFile(Path(path), {**flatten_config(run), **flatten_config(raw)}, federation, seeds)


def parse_seeds(value: Any) -> tuple[int, ...]:
    """A simulation config's `seeds = [0, 1, 2]`; [] = one run, no seeds."""
    items = value if isinstance(value, list) else [None]  # `seeds = 3` could mean seed 3 or three seeds
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    if not integers or len(set(items)) != len(items):
        raise ConfigError(f"seeds = {value!r}: use a list of distinct integers, e.g. seeds = [0, 1, 2]")
    return tuple(items)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` items (`--set`); values are TOML (numbers, true/false, quoted strings) or a bare string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set user.epochs=2")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def _names_a_file(key: str, value: str) -> bool:
    if key == "data":
        return value != BUILTIN_DATA
    if key == "task":  # a task name, or a custom task spec file
        return "/" in value or value.endswith(".toml")
    return True


def _find(value: str, search: Iterable[Path]) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    for base in search:
        if (base / p).exists():
            return str((base / p).resolve())
    return str(p.resolve())


def absolute_paths(flat: Mapping[str, Any], search: Sequence[Path] = ()) -> dict[str, Any]:
    """File paths made absolute: what the run writes against the working folder, what it reads against
    the first of the working folder and `search` where it exists. Names that are not paths pass through."""
    out = dict(flat)
    for key in (*INPUT_PATH_KEYS, *OUTPUT_PATH_KEYS):
        value = out.get(key)
        if not isinstance(value, str) or not value or not _names_a_file(key, value):
            continue
        bases = [Path.cwd(), *search] if key in INPUT_PATH_KEYS else []
        out[key] = _find(value, bases)
    return out


def resolve(
    base: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, search: Sequence[Path] = ()
) -> tuple[dict[str, Any], RunSettings]:
    """Merge overrides (None = unset) into base, make file paths absolute, validate every key. `out` is
    always set (absolute), so the written config says where the results go."""
    flat = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    flat = absolute_paths(flat, search)
    settings = RunSettings.from_run_config(flat)  # validates every key before anything runs
    flat["out"] = str(Path(settings.out).resolve())
    return flat, settings


def run_config_text(flat: Mapping[str, Any]) -> str:
    """The flat run config as the TOML text `flwr run --run-config` reads (`"user.epochs" = 4`)."""
    import tomli_w

    return tomli_w.dumps(dict(flat))


def write_run_config(flat: Mapping[str, Any], path: Path) -> Path:
    """The flat run config as the TOML file `flwr run --run-config` reads."""
    return atomic_write_text(path, run_config_text(flat))


def rotate_results(out: Path) -> Path:
    """Prepare a run folder: the last run's results.json becomes results.previous.json (a run never mixes
    its results with another's). Returns where this run's results.json goes."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    if results.exists():
        results.replace(out / "results.previous.json")
    return results


def _flat_value(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else value


def _flat_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}{f.name.replace('_', '-')}": _flat_value(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
    }


def default_run_config() -> dict[str, Any]:
    """Every run config key with its default, from the config dataclasses (the one source of defaults):
    what pyproject's `[tool.flwr.app.config]` must list."""
    settings = RunSettings()
    top = {k: v for k, v in _flat_fields(settings).items() if k not in ("proper", "synthetic")}
    for section in SECTIONS:
        top.update(_flat_fields(getattr(settings.proper, section), f"{section}."))
    top.update(_flat_fields(settings.synthetic, "synthetic."))
    return top
