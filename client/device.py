"""Everything a device does for the user stage: find its user's data, check the bundle, get the base, load
it 4-bit, personalize, keep the adapter encrypted on disk, and reduce the outcome to numbers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.store import AdapterStore
from proper_fed import crypto
from proper_fed.backbone import Backbone, cache_dir, load_backbone
from proper_fed.base_store import find_base, store_base
from proper_fed.bundle import Bundle, bundle_from_records, save_bundle, tensor_from_numpy, verify_bundle
from proper_fed.config import AdapterConfig, BackboneConfig
from proper_fed.data import device_eval_examples, device_training_examples, load_dataset
from proper_fed.data.baselines import has_label_baselines
from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.types import User
from proper_fed.errors import BundleError, ConfigError
from proper_fed.metric_stats import query_stats
from proper_fed.personalize import DEVICE_METHODS, MethodResult, Scored, personalize_user, run_method
from proper_fed.proper_model import ProperModel
from proper_fed.run_settings import DEVICE_NODES_DIR, RunSettings, load_split
from proper_fed.scoring import check_protocols, scored_answer, scored_name

log = logging.getLogger(__name__)

_BACKBONES: dict[tuple[str, str], Backbone] = {}  # one loaded base per process, reused across users
BUNDLE_DIR = "bundle"
NODES_DIR = "_nodes"  # <device-outputs>/_nodes/<node id>.json: a virtual device's partition (simulation only)  # <store>/bundle: the verified bundle the stored adapters were trained on


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
    from proper_fed.run_settings import BUILTIN_DATA

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
    """A local folder holding exactly the base the bundle was built on (received now, or found locally)."""
    digest = bundle.base_content_hash
    if base_arrays is not None:
        types = dict(kv.split("=", 1) for kv in dtypes.split(",") if kv)
        state = {
            k: tensor_from_numpy(v, getattr(torch, types.get(k, str(v.dtype))))
            for k, v in base_arrays.items()
        }
        return store_base(digest, state, dict(base_files or {}))
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
    """The frozen population + group stages of one server variant on this device's base."""
    info = bundle.manifest["adapter_config"][variant]
    model = ProperModel(backbone, AdapterConfig.from_dict(info["adapters"]))
    # The server's user ids never ship: the device only needs the table's size; its own user is unknown to it.
    meta = {"user_index": {f"#{i}": i for i in range(1, int(info["user_rows"]))}}
    model.load_scope_state_dict("population", bundle.tensors[f"{variant}.population"])
    model.load_scope_state_dict("group", bundle.tensors[f"{variant}.group"], meta)
    return model


def keep_bundle(bundle: Bundle, store: AdapterStore) -> Path:
    """Keep the verified bundle beside the adapters it served, to answer prompts later (`client generate`)."""
    return save_bundle(bundle, store.root / BUNDLE_DIR)


def store_for(node_config: Mapping[str, Any], node_id: int) -> AdapterStore:
    root = (
        node_config.get("store-dir")
        or os.environ.get("PROPER_FED_STORE")
        or cache_dir() / "device-store" / str(node_id)
    )
    return AdapterStore.open(Path(str(root)))


def _stage_key(method: str, bundle_tag: str) -> str:
    """Checkpoint name of one method's user stage under one bundle: a new bundle never resumes an old run."""
    return hashlib.sha256(f"{method}:{bundle_tag}".encode()).hexdigest()[:24]


def _resumable(store: AdapterStore, user_id: str, method: str, tag: str):
    ck = store.checkpointer(user_id, _stage_key(method, tag))
    if ck.path.is_file():
        log.warning("%s: resuming from its encrypted checkpoint in the store", method)
    return ck


def personalize_device(
    me: DeviceUser,
    bundle: Bundle,
    backbone: Backbone,
    settings: RunSettings,
    store: AdapterStore,
    majority: str | None,
) -> tuple[dict[str, float], dict[str, Scored]]:
    """All methods for this device's user under every scoring protocol: numbers to send, and the answers to
    keep, by the name they are reported under (`proper`, `proper@rank`, ...)."""
    task, user = me.task, me.user
    protocols = settings.scoring
    check_protocols(task, protocols)
    history = device_training_examples(task, user)
    queries = device_eval_examples(task, user)
    if not queries:
        raise ConfigError(
            f"user has no query with a gold answer to evaluate on ({len(user.queries)} queries)"
        )
    bundle_id = bundle.manifest["tensor_sha256"]
    tag = hashlib.sha256(json.dumps(bundle_id, sort_keys=True).encode()).hexdigest()[:12]
    cfg = settings.proper.user
    numbers: dict[str, float] = {"history_len": float(len(user.profile)), "queries": float(len(queries))}
    predictions: dict[str, Scored] = {}

    def keep(method: str, result: MethodResult) -> None:
        for protocol, scored in result.scored.items():  # one training, evaluated under each protocol
            name = scored_name(method, protocol, protocols)
            numbers.update({f"{name}.{k}": float(v) for k, v in scored.stats.items()})
            numbers.update(
                {
                    f"{name}.train_s": result.train_seconds,
                    f"{name}.eval_s": scored.seconds,
                    f"{name}.trainable_params": float(result.trainable_parameters),
                }
            )
            predictions[name] = scored

    def save_adapter(method: str, model: ProperModel) -> None:
        if method == "proper":
            store.save_adapter(
                user.user_id,
                model.scope_state_dict("user"),
                {"bundle": bundle_id, "variant": "proper", "base": bundle.base_content_hash},
            )

    model = server_model(backbone, bundle, "proper")
    try:
        results = personalize_user(
            model,
            settings.methods,
            task,
            history,
            queries,
            cfg,
            checkpointer_for=lambda m: _resumable(store, user.user_id, m, tag),
            on_trained=save_adapter,
            protocols=protocols,
        )
    finally:
        model.remove()
    for method, result in results.items():
        keep(method, result)
    for variant in settings.variants:
        model = server_model(backbone, bundle, variant)
        try:
            keep(
                variant,
                run_method(
                    model,
                    variant,
                    task,
                    history,
                    queries,
                    cfg,
                    store.checkpointer(user.user_id, _stage_key(variant, tag)),
                    protocols,
                ),
            )
        finally:
            model.remove()
    for method in (*settings.methods, *settings.variants):
        if DEVICE_METHODS.get(method, ("", "x"))[1] is not None:
            store.checkpointer(user.user_id, _stage_key(method, tag)).path.unlink(missing_ok=True)
    if has_label_baselines(task):  # not LaMP-1: labels, but no labelled history
        golds = [q.target for q in queries]
        own = [it.fields.get(task.output_field) for it in user.profile]
        own = [str(x) for x in own if x is not None]
        mine = max(sorted(set(own)), key=own.count) if own else (majority or "")
        for method, label in (("majority", majority or ""), ("user_majority", mine)):
            stats = query_stats(task, [label] * len(golds), golds)
            numbers.update({f"{method}.{k}": float(v) for k, v in stats.items()})
            predictions[method] = Scored(
                stats, [scored_answer(task, label)] * len(golds), [label] * len(golds)
            )
    return numbers, predictions


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
