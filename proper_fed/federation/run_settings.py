"""The settings of one federated run, parsed from Flower's flat run config (`[tool.flwr.app.config]` of
pyproject.toml, overridden by `flwr run --run-config` or by `proper-fed simulate`).

Flat keys: top-level run keys (`data`, `task`, `model`, ...) and `<section>.<field>` for the ProperConfig
sections (`population.epochs`, `adapters.num-experts`, ...); dashes and underscores are interchangeable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proper_fed.config import ProperConfig, _need
from proper_fed.data import FederationSplit, load_dataset, split_federation
from proper_fed.data.scoring import PROTOCOLS, check_protocols
from proper_fed.data.splits import validation_split
from proper_fed.data.synthetic import SyntheticConfig, generate_synthetic
from proper_fed.errors import ConfigError
from proper_fed.methods import DEVICE_METHODS, VARIANTS, Kind, unknown_names

SECTIONS = ("backbone", "adapters", "population", "group", "user")
BUILTIN_DATA = "synthetic"
FEDERATED = "federated"
SERVER_DATA = ("central", FEDERATED)  # what trains stages 1-2 (`RunSettings.server_data`)
# Under `device_outputs` (simulation only): `<name>/<node id>.json` per reported method, and this folder of
# `<node id>.json` files in which each virtual device notes its partition when it starts.
DEVICE_NODES_DIR = "_nodes"


def device_stats_path(device_outputs: str | os.PathLike[str], node_id: int | str) -> Path:
    """Simulation only: where a virtual device keeps its own statistics (`_nodes/stats/<node id>.json`), from
    which the simulation's per-user and per-cohort tables are computed (the server receives only sums). In a
    folder of its own under `_nodes`, where nothing that reads the partition notes looks."""
    return Path(device_outputs) / DEVICE_NODES_DIR / "stats" / f"{node_id}.json"


def _csv(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


@dataclass(frozen=True)
class RunSettings:
    """One run. `data` = "synthetic" (built-in grouped users) or a LaMP/OPPU path; `task` a task name or a
    custom task spec (.toml), "" = detect. `methods` run on every device, `variants` are server ablations.
    `device_outputs`: simulation only, a folder where each virtual device keeps its raw predictions.
    `server_threads`: CPU threads of the server stages, 0 = every core of the machine.
    `server_devices`: processes that train the server stages data-parallel (DDP), one GPU each on CUDA; on
    CPU they share `threads` out.
    `validation`: choose settings without the device users: they are left out of the run entirely, and
    the server's users are split again (by `server_fraction`), one part training stages 1-2, the other
    playing the devices.
    `scoring`: scoring protocols, each applied to every method ("generate": greedy answer, parsed, as LaMP;
    "rank": the label with the highest log-likelihood, classification and rating tasks only); the first is
    reported as `<method>`, the others as `<method>@<protocol>`.
    `secure_aggregation`: devices send their statistics through SecAgg+ and the server learns only their sums
    over at least `min_devices` devices (`federation/secure_sum.py`); off, each device's statistics reach the
    server in the clear. `dp_epsilon` > 0 adds Gaussian noise to those sums, (`dp_epsilon`, `dp_delta`)-DP for
    devices with at most `dp_max_queries` queries and `dp_max_history` history items (`federation/dp.py`).
    `server_data`: what trains stages 1-2: "central" (the server's own users' data) or "federated" (the
    consenting devices train them on their own history, `federated_population_rounds` then
    `federated_group_rounds` rounds of `federated_local_epochs` local epochs each, and the server learns only
    the SecAgg+ sums of their updates, FedAvg-weighted by examples: `federation/shared_vector.py`,
    `train/federated.py`). Federated needs secure aggregation and runs PROPER's server model only (no variants,
    no *_matched methods)."""

    data: str = BUILTIN_DATA
    task: str = ""
    server_fraction: float = 0.5
    max_users: int = 0
    max_profile: int = 0
    seed: int = 0
    methods: tuple[str, ...] = ("zero_shot", "population", "proper_group", "oppu", "proper")
    variants: tuple[str, ...] = ()
    scoring: tuple[str, ...] = ("generate",)
    out: str = "runs/latest"
    state_dir: str = ""
    server_key: str = ""
    server_public_key: str = ""
    min_nodes: int = 3
    node_wait_s: float = 120.0
    device_quantization: str = "nf4"
    reply_timeout_s: float = 3600.0
    device_outputs: str = ""
    server_threads: int = 0
    server_devices: int = 1
    secure_aggregation: bool = True
    min_devices: int = 3
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_queries: int = 20
    dp_max_history: int = 200
    validation: bool = False
    server_data: str = "central"
    federated_population_rounds: int = 3
    federated_group_rounds: int = 3
    federated_local_epochs: int = 1
    proper: ProperConfig = field(default_factory=ProperConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        bad = unknown_names(self.methods, Kind.DEVICE)
        _need(not bad, "methods", ",".join(self.methods), f"use names from {sorted(DEVICE_METHODS)}")
        bad = unknown_names(self.variants, Kind.VARIANT)
        _need(not bad, "variants", ",".join(self.variants), f"use names from {list(VARIANTS)}")
        bad = [p for p in self.scoring if p not in PROTOCOLS]
        ok = self.scoring and not bad and len(set(self.scoring)) == len(self.scoring)
        _need(
            ok,
            "scoring",
            ",".join(self.scoring),
            f"list each of {list(PROTOCOLS)} at most once, at least one",
        )
        _need(
            0 < self.server_fraction < 1, "server-fraction", self.server_fraction, "use a fraction in (0, 1)"
        )
        _need(self.server_threads >= 0, "server-threads", self.server_threads, "use 0 (all cores) or a count")
        _need(
            isinstance(self.server_devices, int) and self.server_devices >= 1,
            "server-devices",
            self.server_devices,
            "use 1 (one process) or the number of local GPUs (or CPU processes) for DDP",
        )
        _need(
            self.device_quantization in ("nf4", "none"),
            "device-quantization",
            self.device_quantization,
            "use 'nf4' (4-bit bitsandbytes, the on-device default) or 'none'",
        )
        self._check_secure_aggregation()
        self._check_server_data()

    def _check_server_data(self) -> None:
        from proper_fed.methods import METHODS, PROPER

        _need(
            self.server_data in SERVER_DATA,
            "server-data",
            self.server_data,
            f"use one of {list(SERVER_DATA)}",
        )
        for name in ("federated_population_rounds", "federated_group_rounds", "federated_local_epochs"):
            value = getattr(self, name)
            _need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                name.replace("_", "-"),
                value,
                "use an integer >= 1",
            )
        if self.server_data != FEDERATED:
            return
        _need(
            self.secure_aggregation,
            "server-data",
            self.server_data,
            "federated stages send the devices' updates only through SecAgg+: set secure-aggregation = true",
        )
        others = [m for m in (*self.methods, *self.variants) if METHODS[m].server_model != PROPER]
        _need(
            not others,
            "server-data",
            self.server_data,
            f"federated stages train PROPER's server model only; drop {others} from methods / variants",
        )
        _need(
            not self.validation, "validation", self.validation, "validation runs need server-data = central"
        )

    def _check_secure_aggregation(self) -> None:
        from proper_fed.federation.dp import MAX_EPSILON
        from proper_fed.federation.secure_sum import MAX_DEVICES

        _need(
            isinstance(self.secure_aggregation, bool),
            "secure-aggregation",
            self.secure_aggregation,
            "use true or false",
        )
        _need(
            0 <= self.dp_epsilon <= MAX_EPSILON and (self.dp_epsilon == 0 or self.secure_aggregation),
            "dp-epsilon",
            self.dp_epsilon,
            f"use 0 (no noise) or an epsilon in (0, {MAX_EPSILON:g}]; DP needs secure-aggregation = true",
        )
        _need(0 < self.dp_delta < 1, "dp-delta", self.dp_delta, "use a delta in (0, 1), e.g. 1e-5")
        for name in ("dp_max_queries", "dp_max_history"):
            value = getattr(self, name)
            _need(isinstance(value, int) and value >= 1, name.replace("_", "-"), value, "use a count >= 1")
        if not self.secure_aggregation:
            return
        _need(
            isinstance(self.min_devices, int) and 2 <= self.min_devices <= MAX_DEVICES,
            "min-devices",
            self.min_devices,
            f"a secure sum covers at least 2 devices and at most {MAX_DEVICES}",
        )
        _need(
            self.min_nodes >= self.min_devices,
            "min-nodes",
            self.min_nodes,
            f"secure aggregation sums over at least min-devices={self.min_devices} devices, so the run needs "
            "that many (in a simulation, min-nodes is the number of device users); use more devices, a lower "
            "min-devices, or secure-aggregation = false",
        )

    @property
    def threads(self) -> int:
        """Threads for the server stages: `server_threads`, or every core this process may use."""
        if self.server_threads:
            return self.server_threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path(self.out) / "server"

    @property
    def key_path(self) -> Path:
        return Path(self.server_key) if self.server_key else self.state_path / "signing.key"

    @property
    def public_key_path(self) -> Path:
        return Path(self.server_public_key) if self.server_public_key else self.key_path.with_suffix(".pub")

    @classmethod
    def from_run_config(cls, flat: dict[str, Any]) -> RunSettings:
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {s: {} for s in (*SECTIONS, "synthetic")}
        names = {f for f in cls.__dataclass_fields__ if f not in ("proper", "synthetic")}
        for key, value in flat.items():
            section, _, name = key.replace("-", "_").rpartition(".")
            if section:
                if section not in nested:
                    raise ConfigError(
                        f"run config key {key!r}: unknown section {section!r}; use one of {sorted(nested)}"
                    )
                nested[section][name] = value
            elif name in names:
                top[name] = value
            else:
                raise ConfigError(
                    f"run config key {key!r} is unknown; valid keys: {sorted(names)} and "
                    f"<section>.<field> for sections {sorted(nested)}"
                )
        for key in ("methods", "variants", "scoring"):
            if key in top:
                top[key] = _csv(top[key])
        if "target_modules" in nested["adapters"]:
            nested["adapters"]["target_modules"] = _csv(nested["adapters"]["target_modules"])
        proper = ProperConfig.from_dict({s: v for s, v in nested.items() if s in SECTIONS and v})
        synthetic = SyntheticConfig(**nested["synthetic"]) if nested["synthetic"] else SyntheticConfig()
        return cls(**top, proper=proper, synthetic=synthetic)


def load_split(settings: RunSettings) -> FederationSplit:
    """The run's users split between server and devices; the same on every process for the same settings."""
    if settings.data == BUILTIN_DATA:
        dataset = generate_synthetic(settings.synthetic).dataset
    else:
        task, spec = (
            (None, settings.task) if settings.task.endswith(".toml") else (settings.task or None, None)
        )
        dataset = load_dataset(settings.data, task=task, spec=spec)
    check_protocols(dataset.task, settings.scoring)  # the first point the task is known
    split = split_federation(
        dataset,
        # a source with its own server users (OPPU's user_others) keeps them, as the README says
        None if dataset.server_user_ids else settings.server_fraction,
        settings.seed,
        max_users=settings.max_users or None,
        max_profile=settings.max_profile or None,
    )
    return validation_split(split, settings.server_fraction) if settings.validation else split
