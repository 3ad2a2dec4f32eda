"""The device's local adapter store: user adapters and training checkpoints, encrypted at rest.

Layout of a store directory (created 0700):

    device.key                   the 32-byte AES-256-GCM key as hex, mode 0600 (unless the edge was given one)
    adapters/<h(user)>.pfa       the user's adapter: encrypted safetensors (tensors + JSON meta)
    checkpoints/<h(user)>.<stage>.pfb   the trainer's per-epoch checkpoint of one user stage (`checkpointer`)

h(user) is a truncated SHA-256 of the user id, so the directory listing reveals no user ids and no id
can escape the folder.
Every file is `proper_fed.artifacts.crypto.encrypt(device key, payload, associated data = kind + user id)`: a file
copied to another user's slot, or an adapter swapped for a checkpoint, fails authentication. Writes are
atomic: a failed write leaves the previous file intact.

The device key may instead come from `$PROPER_FED_DEVICE_KEY`: the edges (the CLI, the ClientApp's entry point)
read it and hand it over with `use_device_key`; nothing here reads the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from proper_fed.artifacts import crypto
from proper_fed.atomic import atomic_write_bytes
from proper_fed.errors import CryptoError, StoreError

logger = logging.getLogger(__name__)

DEVICE_KEY_ENV = "PROPER_FED_DEVICE_KEY"  # read by the edges only, passed to `use_device_key`
DEVICE_KEY_FILE = "device.key"
STORE_FORMAT = "proper-fed-store/1"

_ADAPTER = "adapter"
_CHECKPOINT = "checkpoint"
_BLOB = "blob"
_META_KEY = "proper_fed.meta"
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class StoredAdapter:
    """A user's adapter tensors and the JSON metadata saved with them."""

    tensors: dict[str, torch.Tensor] = field(repr=False)
    meta: dict[str, Any]


# ---- device key ----


def _parse_hex_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != crypto.AEAD_KEY_SIZE:
        # Never echo the value: it is (or was meant to be) key material.
        raise StoreError(f"{source} must hold {crypto.AEAD_KEY_SIZE * 2} hex digits (a 256-bit key)")
    return key


_given_key = ""  # hex; the device key this process's edge was given (`use_device_key`), "" for none


def use_device_key(hex_key: str) -> None:
    """Make `hex_key` (what the edge read from $PROPER_FED_DEVICE_KEY; "" for none) the device key of every
    store this process opens without an explicit key. Checked when a store opens, so a bad value fails there,
    with the store's error, as it always did."""
    global _given_key
    _given_key = hex_key


def load_or_create_device_key(root: str | os.PathLike[str], given: str | None = None) -> bytes:
    """The device key: `given` (hex; default: the key set with `use_device_key`) if non-empty, else
    `root/device.key`, created on first use.

    Creation is race-free: two processes opening a fresh store agree on one key (the file is linked into place
    only if absent).
    """
    given = _given_key if given is None else given
    if given:
        return _parse_hex_key(given, f"${DEVICE_KEY_ENV}")
    path = Path(root) / DEVICE_KEY_FILE
    if not path.exists():
        try:
            atomic_write_bytes(
                path, crypto.generate_aead_key().hex().encode() + b"\n", mode=0o600, overwrite=False
            )
            logger.info("created a new device key in %s", path)
        except FileExistsError:
            pass  # another process won the race; use its key
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "device key %s is accessible by group/others (mode %o); chmod 600 it", path, mode & 0o777
        )
    return _parse_hex_key(path.read_text(), str(path))


# ---- payload encoding ----


def _pack(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], extra: Mapping[str, str]) -> bytes:
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"adapter metadata must be plain JSON with finite numbers: {err}") from err
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(cpu, metadata={_META_KEY: meta_json, **extra})


def _unpack(payload: bytes, where: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    try:
        tensors = safetensors.torch.load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_len]).get("__metadata__", {})
        meta = json.loads(metadata[_META_KEY])
    except Exception as err:  # authenticated but unreadable: written by an incompatible version
        raise StoreError(f"{where} decrypted but its content is not a {STORE_FORMAT} payload: {err}") from err
    return tensors, meta, metadata


# ---- the store ----


@dataclass(frozen=True)
class AdapterStore:
    """An encrypted, atomic store of per-user adapters and checkpoints in one directory.

    Build it with `AdapterStore.open(root)`; `key` is kept out of repr so it never lands in a log.
    """

    root: Path
    key: bytes = field(repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike[str], key: bytes | None = None) -> AdapterStore:
        """Open (creating if needed, mode 0700) the store at `root` with `key` or the device key."""
        path = Path(root)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if key is None:
            key = load_or_create_device_key(path)
        if len(key) != crypto.AEAD_KEY_SIZE:
            raise StoreError(f"a store key must be {crypto.AEAD_KEY_SIZE} bytes")
        return cls(root=path, key=bytes(key))

    # -- paths and envelopes --

    def _path(self, kind: str, user_id: str, suffix: str) -> Path:
        if not isinstance(user_id, str) or not user_id:
            raise StoreError(f"user id must be a non-empty string, got {user_id!r}")
        folder = "adapters" if kind == _ADAPTER else "checkpoints"
        return self.root / folder / f"{hashlib.sha256(user_id.encode()).hexdigest()[:32]}{suffix}"

    @staticmethod
    def _ad(kind: str, user_id: str) -> bytes:
        # Binds a file to its kind and owner; \0 cannot occur in the format tag, so the split is unambiguous.
        return f"{STORE_FORMAT}\0{kind}\0".encode() + user_id.encode()

    def _write(self, path: Path, kind: str, user_id: str, payload: bytes) -> Path:
        blob = crypto.encrypt(self.key, payload, self._ad(kind, user_id))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, blob, mode=0o600)
        return path

    def _read(self, path: Path, kind: str, user_id: str) -> bytes:
        try:
            blob = path.read_bytes()
        except FileNotFoundError as err:
            raise StoreError(f"no {kind} stored for user {user_id!r} (looked for {path})") from err
        try:
            return crypto.decrypt(self.key, blob, self._ad(kind, user_id))
        except CryptoError as err:
            raise StoreError(
                f"cannot decrypt the {kind} of user {user_id!r} at {path}: {err}. The device key "
                f"(${DEVICE_KEY_ENV} or {self.root / DEVICE_KEY_FILE}) must be the one that wrote it; a "
                "tampered or corrupted file cannot be recovered, retrain the user stage"
            ) from err

    # -- adapters --

    def save_adapter(
        self, user_id: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> Path:
        """Encrypt and atomically write the user's adapter; the previous one survives a failed write."""
        path = self._write(self._path(_ADAPTER, user_id, ".pfa"), _ADAPTER, user_id, _pack(tensors, meta, {}))
        logger.info("saved adapter of a user (%d tensors) to %s", len(tensors), path)
        return path

    def load_adapter(self, user_id: str) -> StoredAdapter:
        """The user's adapter; `StoreError` if missing, written under another key, or tampered with."""
        path = self._path(_ADAPTER, user_id, ".pfa")
        tensors, meta, _ = _unpack(self._read(path, _ADAPTER, user_id), path)
        return StoredAdapter(tensors=tensors, meta=meta)

    def has_adapter(self, user_id: str) -> bool:
        return self._path(_ADAPTER, user_id, ".pfa").is_file()

    # -- checkpoints --

    def checkpointer(self, user_id: str, stage: str = "user") -> EncryptedCheckpointer:
        """A `proper_fed.train.trainer.Checkpointer` (opaque bytes save/load) that encrypts into this store."""
        if not _STAGE_NAME.match(stage):
            raise StoreError(f"stage name {stage!r} must be 1-32 letters, digits, '_' or '-'")
        return EncryptedCheckpointer(store=self, user_id=user_id, stage=stage)


@dataclass(frozen=True)
class EncryptedCheckpointer:
    """Opaque trainer checkpoints (optimizer state included) for one user and stage, encrypted at rest."""

    store: AdapterStore
    user_id: str
    stage: str

    @property
    def _kind(self) -> str:
        return f"{_BLOB}:{self.stage}"

    @property
    def path(self) -> Path:
        return self.store._path(_CHECKPOINT, self.user_id, f".{self.stage}.pfb")

    def save(self, data: bytes) -> None:
        self.store._write(self.path, self._kind, self.user_id, data)

    def load(self) -> bytes | None:
        if not self.path.is_file():
            return None
        return self.store._read(self.path, self._kind, self.user_id)

    def clear(self) -> None:
        """Drop the checkpoint once its stage finished (the adapter is what remains)."""
        self.path.unlink(missing_ok=True)
