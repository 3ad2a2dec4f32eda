"""The signed bundle the server ships to clients: manifest + tensor groups + Ed25519 signature.

What is signed: the canonical JSON of the manifest (sorted keys, no spaces, ASCII). The manifest carries the
SHA-256 of every tensor group's canonical safetensors serialization (keys sorted, no metadata), so one
signature covers the tensors too. The manifest also records the base model's id and content hash, so a client
refuses experts trained for another base.

Two serializations:
- a directory (`save_bundle` / `load_bundle`): `manifest.json` (the signed bytes), `manifest.sig` (base64),
  one `<group>.safetensors` per tensor group (the hashed bytes, so `sha256sum` matches the manifest);
- Flower records (`bundle_to_records` / `bundle_from_records`): numpy arrays keyed `<group>/<tensor name>`
  plus string config, through the one tensor codec of `wire.py` (dtypes numpy lacks travel as same-width
  integer views, their torch dtype in a JSON table in the config, and come back bit-exact).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proper_fed.artifacts import crypto
from proper_fed.atomic import staged_dir
from proper_fed.errors import BundleError
from proper_fed.federation.wire import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
TENSOR_SUFFIX = ".safetensors"

# Keys of the flat record form (Flower ConfigRecord values are strings here).
RECORD_MANIFEST = "bundle.manifest"
RECORD_SIGNATURE = "bundle.signature"
RECORD_DTYPES = "bundle.dtypes"
_RECORD_SEP = "/"

_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "base_model_id": str,
    "base_content_hash": str,
    "adapter_config": dict,
    "stage_metrics": dict,
    "created_at": str,
    "tensor_sha256": dict,
    "signer_key_id": str,
}
# Group names become file names and record-key prefixes: keep them boring.
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Bundle:
    """A manifest, its tensor groups and the manifest's signature (None until signed).

    `tensors` maps a group name ("population", "group", ...) to a state dict of CPU tensors.
    """

    manifest: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    signature: bytes | None = None

    @property
    def format_version(self) -> Any:
        return self.manifest.get("format_version")

    @property
    def base_model_id(self) -> str:
        return self.manifest["base_model_id"]

    @property
    def base_content_hash(self) -> str:
        return self.manifest["base_content_hash"]


# ---- hashing ----


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    # A uint8 view of the tensor's memory (no copy for CPU contiguous tensors); hashlib reads it as a buffer.
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def content_hash_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over sorted names, dtypes, shapes and raw bytes: the content address of a set of weights.

    Independent of dict order, device and file format; every field is length-prefixed so no two different
    state dicts share a byte stream.
    """
    h = hashlib.sha256(b"proper-fed state dict v1\x00")
    for name in sorted(state_dict):
        t = state_dict[name]
        if t.is_meta:
            raise BundleError(f"tensor {name!r} is on the meta device; load real weights before hashing")
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        raw = _raw_bytes(t)
        h.update(struct.pack("<Q", len(header)) + header + struct.pack("<Q", raw.nbytes))
        h.update(raw)
    return h.hexdigest()


def _canonical_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs CPU, contiguous, non-aliasing tensors; detaching also drops autograd state.
    return {name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)}


def serialize_group(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The canonical safetensors bytes of one tensor group (sorted keys, no metadata): what gets hashed."""
    return safetensors.torch.save(_canonical_tensors(tensors))


def group_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    return hashlib.sha256(serialize_group(tensors)).hexdigest()


def canonical_json(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed. `BundleError` if the manifest is not plain, finite JSON."""
    try:
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BundleError(
            f"manifest is not canonical JSON ({err}); use str/int/float/bool/None, lists and dicts with "
            "string keys, and finite numbers (record a diverged metric as null)"
        ) from err
    return text.encode("ascii")


# ---- build and verify ----


def _check_group_names(names: Any) -> None:
    for name in names:
        if not isinstance(name, str) or not _GROUP_NAME.match(name):
            raise BundleError(
                f"tensor group name {name!r} is invalid: use letters, digits, '_', '.', '-' (max 64 chars)"
            )


def _utc_iso(moment: datetime | None) -> str:
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        raise BundleError("created_at must be timezone-aware (UTC); got a naive datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_bundle(
    *,
    base_model_id: str,
    base_content_hash: str,
    adapter_config: Mapping[str, Any],
    stage_metrics: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    private_key: Ed25519PrivateKey,
    created_at: datetime | None = None,
) -> Bundle:
    """Hash every tensor group into the manifest and sign the manifest's canonical JSON."""
    _check_group_names(tensors)
    if not _SHA256_HEX.match(base_content_hash):
        raise BundleError(
            f"base_content_hash {base_content_hash!r} is not a SHA-256 hex digest; "
            "compute it with content_hash_state_dict(base_state_dict)"
        )
    groups = {g: _canonical_tensors(sd) for g, sd in tensors.items()}
    manifest: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "base_model_id": base_model_id,
        "base_content_hash": base_content_hash,
        "adapter_config": dict(adapter_config),
        "stage_metrics": dict(stage_metrics),
        "created_at": _utc_iso(created_at),
        "tensor_sha256": {g: group_sha256(sd) for g, sd in groups.items()},
        "signer_key_id": crypto.public_key_id(private_key.public_key()),
    }
    # Round-trip through the canonical form so the in-memory manifest equals what a receiver parses.
    manifest = json.loads(canonical_json(manifest))
    signature = crypto.sign(private_key, canonical_json(manifest))
    logger.info(
        "built bundle for base %s: groups %s, signed by key %s",
        base_model_id,
        sorted(groups),
        manifest["signer_key_id"],
    )
    return Bundle(manifest=manifest, tensors=groups, signature=signature)


def _check_manifest_fields(manifest: Mapping[str, Any]) -> None:
    for name, kind in _REQUIRED_FIELDS.items():
        if name not in manifest:
            raise BundleError(f"bundle manifest lacks the field {name!r}; it was not built by build_bundle")
        if not isinstance(manifest[name], kind) or isinstance(manifest[name], bool):
            raise BundleError(f"bundle manifest field {name!r} has type {type(manifest[name]).__name__}")


def verify_bundle(
    bundle: Bundle, public_key: Ed25519PublicKey, expected_base_hash: str | None = None
) -> None:
    """Raise `BundleError` unless `bundle` is signed by `public_key`, intact, and (if given) for this base.

    Checks, in order: signed at all, format version, signature (telling a foreign key from a tampered
    manifest), manifest fields, tensor groups present and hashing to the signed values, base hash.
    """
    if not bundle.signature:
        raise BundleError("bundle is unsigned; refusing it (the server signs bundles with its Ed25519 key)")
    version = bundle.manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise BundleError(
            f"bundle format version {version!r} is not supported by this proper-fed "
            f"(supported: {sorted(SUPPORTED_FORMAT_VERSIONS)}); upgrade the client or rebuild the bundle"
        )
    trusted_id = crypto.public_key_id(public_key)
    if not crypto.verify(public_key, canonical_json(bundle.manifest), bundle.signature):
        claimed_id = bundle.manifest.get("signer_key_id")
        if claimed_id != trusted_id:
            raise BundleError(
                f"bundle signature does not verify: it claims signer key {claimed_id!r} but this device "
                f"trusts key {trusted_id}; install the server's current public key, or the bundle is forged"
            )
        raise BundleError(
            "bundle signature does not verify under the trusted key: the manifest was modified after signing"
        )
    _check_manifest_fields(bundle.manifest)
    _verify_tensors(bundle)
    if expected_base_hash is not None and bundle.base_content_hash != expected_base_hash:
        raise BundleError(
            f"this bundle was built for base {bundle.base_model_id} with hash {bundle.base_content_hash}; "
            f"this device has {expected_base_hash}; fetch the base with the bundle's hash (the server ships "
            "it to devices that lack it) or point the client at the matching local base folder"
        )
    logger.info("bundle verified: base %s, signer %s", bundle.base_model_id, trusted_id)


def _verify_tensors(bundle: Bundle) -> None:
    expected: dict[str, str] = bundle.manifest["tensor_sha256"]
    missing = sorted(set(expected) - set(bundle.tensors))
    extra = sorted(set(bundle.tensors) - set(expected))
    if missing or extra:
        raise BundleError(
            f"bundle tensor groups do not match the manifest: missing {missing}, unexpected {extra}"
        )
    for group in sorted(expected):
        actual = group_sha256(bundle.tensors[group])
        if actual != expected[group]:
            raise BundleError(
                f"tensor group {group!r} does not match the signed manifest (sha256 {actual}, "
                f"signed {expected[group]}): its tensors were modified or corrupted in transit"
            )


# ---- directory form ----


def save_bundle(bundle: Bundle, directory: str | os.PathLike[str]) -> Path:
    """Write `bundle` to `directory` atomically (a reader sees the old bundle or the new one, never a mix).

    Refuses to replace an existing non-empty directory that is not a bundle, so a typo cannot wipe a folder.
    """
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise BundleError(f"{target} exists and is not a bundle directory; refusing to replace it")
    _check_group_names(bundle.tensors)
    with staged_dir(target) as tmp:
        (tmp / MANIFEST_FILE).write_bytes(canonical_json(bundle.manifest))
        if bundle.signature:
            (tmp / SIGNATURE_FILE).write_text(base64.b64encode(bundle.signature).decode("ascii") + "\n")
        for group, sd in bundle.tensors.items():
            (tmp / f"{group}{TENSOR_SUFFIX}").write_bytes(serialize_group(sd))
    logger.info("saved bundle to %s", target)
    return target


def load_bundle(directory: str | os.PathLike[str]) -> Bundle:
    """Read a bundle written by `save_bundle`. Does NOT verify it: call `verify_bundle` next."""
    src = Path(directory)
    try:
        manifest = json.loads((src / MANIFEST_FILE).read_bytes())
    except FileNotFoundError as err:
        raise BundleError(f"{src} is not a bundle: {MANIFEST_FILE} is missing") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{src / MANIFEST_FILE} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensor_sha256"), dict):
        raise BundleError(f"{src / MANIFEST_FILE} is not a bundle manifest (no tensor_sha256 table)")
    signature = None
    sig_path = src / SIGNATURE_FILE
    if sig_path.is_file():
        signature = _b64decode(sig_path.read_text().strip(), where=str(sig_path))
    groups = manifest["tensor_sha256"]
    _check_group_names(groups)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups:
        path = src / f"{group}{TENSOR_SUFFIX}"
        try:
            tensors[group] = safetensors.torch.load(path.read_bytes())
        except FileNotFoundError as err:
            raise BundleError(f"bundle {src} lacks {path.name} for tensor group {group!r}") from err
        except Exception as err:  # safetensors raises its own error types for a corrupted header
            raise BundleError(f"{path} is not a valid safetensors file: {err}") from err
    return Bundle(manifest=manifest, tensors=tensors, signature=signature)


def _b64decode(text: str, *, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleError(f"bundle signature in {where} is not valid base64") from err


# ---- Flower record form ----


def bundle_to_records(bundle: Bundle) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Flatten `bundle` into arrays for a Flower `ArrayRecord` and strings for a `ConfigRecord`.

    Wrap as `ArrayRecord({k: Array(v) for k, v in arrays.items()})` and `ConfigRecord(config)`.
    """
    _check_group_names(bundle.tensors)
    flat = {
        f"{group}{_RECORD_SEP}{name}": t for group, sd in bundle.tensors.items() for name, t in sd.items()
    }
    arrays, dtypes = encode_tensors(flat)
    config = {
        RECORD_MANIFEST: canonical_json(bundle.manifest).decode("ascii"),
        RECORD_SIGNATURE: base64.b64encode(bundle.signature).decode("ascii") if bundle.signature else "",
        RECORD_DTYPES: dtypes,
    }
    return arrays, config


def bundle_from_records(arrays: Mapping[str, np.ndarray], config: Mapping[str, str]) -> Bundle:
    """Rebuild a `Bundle` from `bundle_to_records` output. Does NOT verify it: call `verify_bundle` next."""
    missing = [k for k in (RECORD_MANIFEST, RECORD_SIGNATURE, RECORD_DTYPES) if k not in config]
    if missing:
        raise BundleError(f"bundle records lack config keys {missing}; the message does not carry a bundle")
    try:
        manifest = json.loads(config[RECORD_MANIFEST])
    except (TypeError, ValueError) as err:
        raise BundleError(f"bundle records carry malformed JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise BundleError("bundle records carry a manifest that is not a JSON object")
    flat = decode_tensors(arrays, config[RECORD_DTYPES])
    signature = (
        _b64decode(config[RECORD_SIGNATURE], where="the records") if config[RECORD_SIGNATURE] else None
    )
    # Groups listed in the manifest exist even when empty (an empty group sends no arrays).
    listed = manifest.get("tensor_sha256")
    tensors: dict[str, dict[str, torch.Tensor]] = {g: {} for g in listed} if isinstance(listed, dict) else {}
    for key, tensor in flat.items():
        group, sep, name = key.partition(_RECORD_SEP)
        if not sep or not name:
            raise BundleError(f"bundle array key {key!r} is not '<group>/<tensor name>'")
        tensors.setdefault(group, {})[name] = tensor
    _check_group_names(tensors)
    return Bundle(manifest=manifest, tensors=tensors, signature=signature)
