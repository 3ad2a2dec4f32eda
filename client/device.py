"""Everything a device does for the user stage: find its user's data, check the bundle, get the base, load
it 4-bit, personalize, keep the adapter encrypted on disk, and reduce the outcome to numbers."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.store import AdapterStore
from proper_fed.artifacts import crypto
from proper_fed.artifacts.base_store import find_base, store_base
from proper_fed.artifacts.bundle import Bundle, bundle_from_records, save_bundle, verify_bundle
from proper_fed.config import AdapterConfig, BackboneConfig
from proper_fed.data import device_eval_examples, device_training_examples, load_dataset
from proper_fed.data.baselines import has_label_baselines, user_majority_label
from proper_fed.data.example import Example
from proper_fed.data.metric_stats import query_stats
from proper_fed.data.scoring import check_protocols, scored_answer, scored_name
from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.types import User
from proper_fed.errors import BundleError, ConfigError
from proper_fed.federation.run_settings import DEVICE_NODES_DIR, RunSettings, load_split
from proper_fed.federation.wire import decode_tensors, read_variant_entry, tensor_group
from proper_fed.methods import METHODS, PROPER
from proper_fed.model.backbone import Backbone, cache_dir, load_backbone
from proper_fed.model.proper_model import ProperModel
from proper_fed.train.personalize import MethodResult, Scored, personalize_user
from proper_fed.train.trainer import Checkpointer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_BACKBONES: dict[tuple[str, str], Backbone] = {}  # one loaded base per process, reused across users
BUNDLE_DIR = "bundle"  # <store>/bundle: the verified bundle the stored adapters were trained on


@dataclass(frozen=True)
class DeviceUser:
    task: TaskSpec
    user: User


def device_user(settings: RunSettings, node_config: Mapping[str, Any]) -> DeviceUser:
    """This device's user: its own data file in deployment, or its partition of the run's devices in simulation."""
    if "data-path" in node_config:
        task = str(node_config.get("task", "")) or settings.task
        spec = task if task.endswith(".toml") else None
        dataset = load_dataset(
            str(node_config["data-path"]), task=None if spec else (task or None), spec=spec
        )
        wanted = str(node_config.get("user-id", ""))
        users = [u for u in dataset.users if not wanted or u.user_id == wanted]
        if len(users) != 1:
            raise ConfigError(
                f"{node_config['data-path']} holds {len(users)} matching users; a device serves "
                "one: set node-config user-id=<id>"
            )
        return DeviceUser(dataset.task, users[0])
    if "partition-id" not in node_config:
        raise ConfigError(
            "this SuperNode has neither data-path nor partition-id in its node config; enroll it "
            "with `proper-fed client enroll --data FILE`"
        )
    split = load_split(settings)
    pid = int(node_config["partition-id"])
    if pid >= len(split.device_users):
        raise ConfigError(
            f"partition-id {pid} but the run has {len(split.device_users)} device users; run as "
            "many SuperNodes as device users"
        )
    return DeviceUser(split.task, split.device_users[pid])


def device_task(settings: RunSettings, node_config: Mapping[str, Any]) -> TaskSpec:
    """The task `device_user` finds, without reading any user when the task is named (node config, run
    config, the data folder's task.toml, the built-in data); only an unnamed task is read from the data."""
    from proper_fed.data.loader import FOLDER_SPEC
    from proper_fed.data.synthetic import synthetic_spec
    from proper_fed.data.tasks import resolve_task
    from proper_fed.federation.run_settings import BUILTIN_DATA

    if "data-path" in node_config:
        named, path = str(node_config.get("task", "")) or settings.task, Path(str(node_config["data-path"]))
    elif settings.data == BUILTIN_DATA:
        return synthetic_spec(settings.synthetic.labels)
    else:
        named, path = settings.task, Path(settings.data)
    if named:
        found = resolve_task(None, named) if named.endswith(".toml") else resolve_task(named)
    else:
        spec = (path if path.is_dir() else path.parent) / FOLDER_SPEC
        found = resolve_task(None, str(spec)) if spec.is_file() else None
    return found if found is not None else device_user(settings, node_config).task


def server_public_key(settings: RunSettings, node_config: Mapping[str, Any]):
    """The key the device trusts: pinned in its node config at enrollment (never taken from the server)."""
    path = Path(str(node_config.get("server-public-key", "")) or settings.public_key_path)
    if not path.exists():
        raise BundleError(
            f"no server public key at {path}: the device cannot check the bundle; pass the "
            "server's signing.pub with --server-key when enrolling"
        )
    return crypto.load_public_key(path)


def receive_bundle(
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, str],
    settings: RunSettings,
    node_config: Mapping[str, Any],
) -> Bundle:
    bundle = bundle_from_records(arrays, config)
    verify_bundle(bundle, server_public_key(settings, node_config))
    return bundle


def base_folder(
    bundle: Bundle,
    node_config: Mapping[str, Any],
    base_arrays: Mapping[str, np.ndarray] | None,
    base_files: Mapping[str, bytes] | None,
    dtypes: str = "",
) -> Path:
    """A local folder holding exactly the base the bundle was built on (received now, or found locally).
    `dtypes`: the tensor codec's dtype table of `base_arrays` (`wire.decode_tensors`)."""
    digest = bundle.base_content_hash
    if base_arrays is not None:
        return store_base(digest, decode_tensors(base_arrays, dtypes), dict(base_files or {}))
    extra = tuple(str(node_config[k]) for k in ("base-folder",) if k in node_config)
    folder = find_base(digest, extra, bundle.base_model_id)
    if folder is None:
        raise BundleError(f"this device holds no base with hash {digest[:16]}... and none was sent")
    return folder


def load_device_backbone(folder: Path, settings: RunSettings) -> Backbone:
    quant = settings.device_quantization
    key = (str(folder), quant)
    if key not in _BACKBONES:
        cfg = settings.proper.backbone
        _BACKBONES.clear()  # one base in memory at a time
        _BACKBONES[key] = load_backbone(
            BackboneConfig(model=str(folder), device=cfg.device, dtype=cfg.dtype, load_in_4bit=quant == "nf4")
        )
    return _BACKBONES[key]


def server_model(backbone: Backbone, bundle: Bundle, variant: str) -> ProperModel:
    """The frozen population + group stages of one server model on this device's base (a population-only
    model has no group stage). The user table ships with only its unknown-user row: the server's users never
    ship; this device's user starts there and may fit its own row (`stages.fit_user_embedding`)."""
    adapters, user_rows = read_variant_entry(bundle.manifest, variant)
    model = ProperModel(backbone, AdapterConfig.from_dict(adapters))
    model.load_scope_state_dict("population", bundle.tensors[tensor_group(variant, "population")])
    group = bundle.tensors.get(tensor_group(variant, "group"))
    if group is not None:
        model.resize_user_table(user_rows)
        model.load_scope_state_dict("group", group)
    return model


def keep_bundle(bundle: Bundle, store: AdapterStore) -> Path:
    """Keep the verified bundle beside the adapters it served, to answer prompts later (`client generate`)."""
    return save_bundle(bundle, store.root / BUNDLE_DIR)


def store_for(node_config: Mapping[str, Any], node_id: int, store_dir: str = "") -> AdapterStore:
    """The device's encrypted store: the node config's `store-dir`, else `store_dir` (the ClientApp's edge
    passes $PROPER_FED_STORE), else `<cache>/device-store/<node id>`."""
    root = node_config.get("store-dir") or store_dir or cache_dir() / "device-store" / str(node_id)
    return AdapterStore.open(Path(str(root)))


def _stage_key(method: str, bundle_tag: str) -> str:
    """Checkpoint name of one method's user stage under one bundle: a new bundle never resumes an old run."""
    return hashlib.sha256(f"{method}:{bundle_tag}".encode()).hexdigest()[:24]


def bundle_tag(bundle: Bundle) -> str:
    """A short name of the bundle's tensors, for its checkpoints."""
    digests = json.dumps(bundle.manifest["tensor_sha256"], sort_keys=True)
    return hashlib.sha256(digests.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DeviceJob:
    """One device user's inputs to every method: its history, its scored queries, where to keep state."""

    me: DeviceUser
    bundle: Bundle
    backbone: Backbone
    settings: RunSettings
    store: AdapterStore
    history: list[Example]
    queries: list[Example]
    own_row: torch.Tensor | None = None  # the user's row from federated stage 2 (never left the device)

    @property
    def user_id(self) -> str:
        return self.me.user.user_id

    def checkpointer(self, method: str) -> Checkpointer:
        """The method's user-stage checkpoint under this bundle, in the encrypted store."""
        ck = self.store.checkpointer(self.user_id, _stage_key(method, bundle_tag(self.bundle)))
        if ck.path.is_file():
            log.warning("%s: resuming from its encrypted checkpoint in the store", method)
        return ck


@dataclass
class DeviceOutcome:
    """What the device reports (numbers, each `<name>.<stat>`) and keeps (answers by reported name)."""

    protocols: tuple[str, ...]
    numbers: dict[str, float]
    predictions: dict[str, Scored] = field(default_factory=dict)

    def keep(self, method: str, result: MethodResult) -> None:
        """One training, evaluated under each protocol: `<method>` or `<method>@<protocol>`."""
        for protocol, scored in result.scored.items():
            name = scored_name(method, protocol, self.protocols)
            self.numbers.update({f"{name}.{k}": float(v) for k, v in scored.stats.items()})
            self.numbers.update(
                {
                    f"{name}.train_s": result.train_seconds,
                    f"{name}.eval_s": scored.seconds,
                    f"{name}.trainable_params": float(result.trainable_parameters),
                    f"{name}.train_tokens": float(result.train_tokens),
                }
            )
            self.predictions[name] = scored

    def keep_baseline(self, name: str, scored: Scored) -> None:
        """A label baseline: no model, no protocol suffix, no cost."""
        self.numbers.update({f"{name}.{k}": float(v) for k, v in scored.stats.items()})
        self.predictions[name] = scored


def personalize_device(
    me: DeviceUser,
    bundle: Bundle,
    backbone: Backbone,
    settings: RunSettings,
    store: AdapterStore,
    ranking: Sequence[str] | None,
    own_row: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, Scored]]:
    """All methods for this device's user under every scoring protocol: numbers to send, and the answers to
    keep, by the name they are reported under (`proper`, `proper@rank`, ...). `ranking`: the server users'
    label ranking (`data.baselines.label_ranking`) for the label baselines, None when the task has none.
    `own_row`: the user's embedding row this device trained in federated stage 2, where its fit starts."""
    job = _device_job(me, bundle, backbone, settings, store, own_row)
    history_len, n_queries = float(len(me.user.profile)), float(len(job.queries))
    out = DeviceOutcome(settings.scoring, {"history_len": history_len, "queries": n_queries})
    results = {}
    for name, methods in methods_by_server_model(settings).items():
        results.update(_on_server_model(job, name, methods))
    for method in (*settings.methods, *settings.variants):  # report order
        out.keep(method, results[method])
    _drop_checkpoints(job, (*settings.methods, *settings.variants))
    if has_label_baselines(me.task):  # not LaMP-1: labels, but no labelled history
        for name, scored in label_baselines(me.task, me.user, job.queries, ranking or ()).items():
            out.keep_baseline(name, scored)
    return out.numbers, out.predictions


def methods_by_server_model(settings: RunSettings) -> dict[str, list[str]]:
    """The run's device methods and variants, grouped by the server model each runs on (loaded once each)."""
    grouped: dict[str, list[str]] = {}
    for name in (*settings.methods, *settings.variants):
        grouped.setdefault(METHODS[name].server_model, []).append(name)
    return grouped


def _device_job(
    me: DeviceUser,
    bundle: Bundle,
    backbone: Backbone,
    settings: RunSettings,
    store: AdapterStore,
    own_row: torch.Tensor | None,
) -> DeviceJob:
    check_protocols(me.task, settings.scoring)
    history = device_training_examples(me.task, me.user)
    queries = device_eval_examples(me.task, me.user)
    if not queries:
        raise ConfigError(
            f"user has no query with a gold answer to evaluate on ({len(me.user.queries)} queries)"
        )
    return DeviceJob(me, bundle, backbone, settings, store, list(history), list(queries), own_row)


def _on_server_model(job: DeviceJob, name: str, methods: list[str]) -> dict[str, MethodResult]:
    """`methods` on server model `name`; PROPER's user adapter (with the user's embedding row) is kept."""

    def save_adapter(method: str, model: ProperModel) -> None:
        if method == PROPER:
            bundle = job.bundle
            meta = {
                "bundle": bundle.manifest["tensor_sha256"],
                "variant": PROPER,
                "base": bundle.base_content_hash,
            }
            job.store.save_adapter(job.user_id, model.user_state(job.user_id), meta)

    model = server_model(job.backbone, job.bundle, name)
    try:
        return personalize_user(
            model,
            methods,
            job.me.task,
            job.history,
            job.queries,
            job.settings.proper.user,
            checkpointer_for=job.checkpointer,
            on_trained=save_adapter,
            protocols=job.settings.scoring,
            own_row=job.own_row,
        )
    finally:
        model.remove()


def _drop_checkpoints(job: DeviceJob, methods: Sequence[str]) -> None:
    """Every user stage finished: its checkpoints are no longer needed."""
    for name in methods:
        if METHODS[name].trains_user_stage:
            job.store.checkpointer(job.user_id, _stage_key(name, bundle_tag(job.bundle))).clear()


def label_baselines(
    task: TaskSpec, user: User, queries: Sequence[Example], ranking: Sequence[str]
) -> dict[str, Scored]:
    """majority and user_majority on this user's queries, by the one rule of `data.baselines`."""
    golds = [q.target for q in queries]
    labels = {
        "majority": ranking[0] if ranking else "",
        "user_majority": user_majority_label(task, user, ranking),
    }
    out = {}
    for name, label in labels.items():
        stats = query_stats(task, [label] * len(golds), golds)
        out[name] = Scored(stats, [scored_answer(task, label)] * len(golds), [label] * len(golds))
    return out


def note_partition(folder: str, node_config: Mapping[str, Any], node_id: int) -> None:
    """Simulation only, first thing a virtual device does: which partition (device user) this node serves,
    on the simulation's own disk, so its report can name the user of a device that fails later."""
    from proper_fed.atomic import atomic_write_text

    if "partition-id" in node_config:
        path = Path(folder) / DEVICE_NODES_DIR / f"{node_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"partition-id": int(node_config["partition-id"])}))


def write_local_predictions(
    folder: str, me: DeviceUser, predictions: Mapping[str, Scored], node_id: int
) -> None:
    """Simulation only: each device keeps, on its own disk, per reported name, each query's scored answer
    (`output`, exactly what the statistics scored) and its raw answer (`raw`), in `<name>/<node id>.json`;
    the node id is what results.json's per-user tables are keyed by."""
    from proper_fed.atomic import atomic_write_text

    queries = [q for q in me.user.queries if q.gold is not None]
    for name, scored in predictions.items():
        rows = [
            {"id": q.id, "output": out, "raw": raw}
            for q, out, raw in zip(queries, scored.answers, scored.raw, strict=True)
        ]
        path = Path(folder) / name / f"{node_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rows))
