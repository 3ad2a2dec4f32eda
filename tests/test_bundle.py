"""The signed bundle: a client accepts only an intact bundle signed by the trusted key for its own base."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from proper_fed.artifacts import crypto
from proper_fed.artifacts.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Bundle,
    build_bundle,
    bundle_from_records,
    bundle_to_records,
    canonical_json,
    content_hash_state_dict,
    load_bundle,
    save_bundle,
    verify_bundle,
)
from proper_fed.errors import BundleError

BASE_HASH = "ab" * 32


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "population": {
            "layers.0.mlp.up_proj.lora_A": torch.randn(4, 8, generator=g),
            "layers.0.mlp.up_proj.lora_B": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        },
        "group": {
            "layers.0.mlp.up_proj.experts.lora_A": torch.randn(3, 2, 8, generator=g).to(torch.bfloat16),
            "router.weight": torch.randn(3, 16, generator=g).half(),
            "user_embedding.count": torch.tensor(7, dtype=torch.int64),
        },
    }


@pytest.fixture(scope="module")
def key():
    return crypto.generate_signing_key()


@pytest.fixture()
def bundle(key) -> Bundle:
    return build_bundle(
        base_model_id="tiny-llama",
        base_content_hash=BASE_HASH,
        adapter_config={"population_rank": 8, "num_experts": 3, "targets": ["up_proj"]},
        stage_metrics={"population": {"loss": 1.25}, "group": {"loss": 1.0, "accuracy": 0.5}},
        tensors=_tensors(),
        private_key=key,
        created_at=datetime(2026, 11, 1, 12, 0, tzinfo=UTC),
    )


def _equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    # Bit-exact, dtype included (torch.equal would accept a float32 copy of a bf16 tensor).
    return a.keys() == b.keys() and all(
        a[g].keys() == b[g].keys()
        and all(a[g][n].dtype == b[g][n].dtype and torch.equal(a[g][n], b[g][n]) for n in a[g])
        for g in a
    )


def test_manifest_fields_and_valid_bundle_verifies(bundle, key):
    m = bundle.manifest
    assert (
        m["format_version"] == 1
        and m["base_model_id"] == "tiny-llama"
        and m["base_content_hash"] == BASE_HASH
    )
    assert m["created_at"] == "2026-11-01T12:00:00Z"
    assert set(m["tensor_sha256"]) == {"population", "group"}
    assert m["signer_key_id"] == crypto.public_key_id(key.public_key())
    assert canonical_json(m) == json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    verify_bundle(bundle, key.public_key(), expected_base_hash=BASE_HASH)


def test_unsigned_bundle_is_refused(bundle, key):
    with pytest.raises(BundleError, match="unsigned"):
        verify_bundle(dataclasses.replace(bundle, signature=None), key.public_key())


def test_tampered_manifest_is_refused(bundle, key):
    manifest = {**bundle.manifest, "stage_metrics": {"group": {"accuracy": 0.99}}}
    with pytest.raises(BundleError, match="manifest was modified after signing"):
        verify_bundle(dataclasses.replace(bundle, manifest=manifest), key.public_key())


def test_tampered_tensor_is_refused_and_named(bundle, key):
    tensors = {g: dict(sd) for g, sd in bundle.tensors.items()}
    bad = tensors["group"]["router.weight"].clone()
    bad[0, 0] += 1
    tensors["group"]["router.weight"] = bad
    with pytest.raises(BundleError, match="tensor group 'group' does not match the signed manifest"):
        verify_bundle(dataclasses.replace(bundle, tensors=tensors), key.public_key())


def test_dropped_or_added_tensor_group_is_refused(bundle, key):
    with pytest.raises(BundleError, match=r"missing \['group'\]"):
        verify_bundle(
            dataclasses.replace(bundle, tensors={"population": bundle.tensors["population"]}),
            key.public_key(),
        )
    extra = {**bundle.tensors, "user": {"x": torch.zeros(1)}}
    with pytest.raises(BundleError, match=r"unexpected \['user'\]"):
        verify_bundle(dataclasses.replace(bundle, tensors=extra), key.public_key())


def test_wrong_key_is_refused_with_both_key_ids(bundle, key):
    other = crypto.generate_signing_key().public_key()
    with pytest.raises(BundleError, match="this device trusts key") as err:
        verify_bundle(bundle, other)
    assert crypto.public_key_id(key.public_key()) in str(err.value)
    assert crypto.public_key_id(other) in str(err.value)


def test_unsupported_format_version_is_refused(bundle, key):
    manifest = {**bundle.manifest, "format_version": 99}
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        verify_bundle(dataclasses.replace(bundle, manifest=manifest), key.public_key())


def test_base_hash_mismatch_names_model_and_both_hashes(bundle, key):
    device_hash = "cd" * 32
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle, key.public_key(), expected_base_hash=device_hash)
    msg = str(err.value)
    assert f"built for base tiny-llama with hash {BASE_HASH}; this device has {device_hash}" in msg


def test_directory_round_trip_is_exact_and_verifies(bundle, key, tmp_path):
    out = save_bundle(bundle, tmp_path / "bundle")
    loaded = load_bundle(out)
    assert loaded.manifest == bundle.manifest and loaded.signature == bundle.signature
    assert _equal(loaded.tensors, bundle.tensors)
    verify_bundle(loaded, key.public_key(), expected_base_hash=BASE_HASH)
    assert (out / MANIFEST_FILE).read_bytes() == canonical_json(bundle.manifest)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left


def test_tampered_file_on_disk_is_refused(bundle, key, tmp_path):
    out = save_bundle(bundle, tmp_path / "bundle")
    path = out / "population.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="'population'"):
        verify_bundle(load_bundle(out), key.public_key())


def test_save_replaces_old_bundle_atomically_and_never_a_foreign_dir(bundle, key, tmp_path, monkeypatch):
    out = save_bundle(bundle, tmp_path / "bundle")
    newer = build_bundle(
        base_model_id="tiny-llama",
        base_content_hash=BASE_HASH,
        adapter_config={},
        stage_metrics={},
        tensors={"population": {"w": torch.ones(2)}},
        private_key=key,
    )
    monkeypatch.setattr("proper_fed.atomic.os.replace", _raise)
    with pytest.raises(OSError):
        save_bundle(newer, out)
    monkeypatch.undo()
    verify_bundle(load_bundle(out), key.public_key())  # the old bundle, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    save_bundle(newer, out)
    assert set(load_bundle(out).tensors) == {"population"}
    assert not (out / "group.safetensors").exists()

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle directory"):
        save_bundle(bundle, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def _raise(*args, **kwargs):
    raise OSError("disk full")


def test_missing_signature_file_loads_as_unsigned(bundle, key, tmp_path):
    out = save_bundle(bundle, tmp_path / "bundle")
    (out / SIGNATURE_FILE).unlink()
    with pytest.raises(BundleError, match="unsigned"):
        verify_bundle(load_bundle(out), key.public_key())


def test_records_round_trip_is_bit_exact_for_bf16(bundle, key):
    arrays, config = bundle_to_records(bundle)
    assert all(isinstance(v, str) for v in config.values())
    assert arrays["population/layers.0.mlp.up_proj.lora_B"].dtype == np.int16  # bf16 travels as int16 bits
    back = bundle_from_records(arrays, config)
    assert _equal(back.tensors, bundle.tensors)
    verify_bundle(back, key.public_key(), expected_base_hash=BASE_HASH)


def test_records_survive_real_flower_records(bundle, key):
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays, config = bundle_to_records(bundle)
    array_record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    config_record = ConfigRecord(config)
    # Deflate/inflate as the wire does, then read back.
    array_record = ArrayRecord.inflate(array_record.deflate(), children=dict(array_record.children))
    back = bundle_from_records({k: a.numpy() for k, a in array_record.items()}, dict(config_record))
    assert _equal(back.tensors, bundle.tensors)
    verify_bundle(back, key.public_key())


def test_records_with_a_forged_dtype_are_refused(bundle, key):
    arrays, config = bundle_to_records(bundle)
    dtypes = json.loads(config["bundle.dtypes"])
    dtypes["group/router.weight"] = "os.system"
    with pytest.raises(BundleError, match="unknown torch dtype"):
        bundle_from_records(arrays, {**config, "bundle.dtypes": json.dumps(dtypes)})


def test_content_hash_depends_on_content_not_order():
    a = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    same = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert content_hash_state_dict(a) == content_hash_state_dict(same)
    for changed in (
        {**a, "x": a["x"].reshape(3, 2)},  # same bytes, other shape
        {**a, "y": a["y"].half()},  # same bits width, other dtype
        {**a, "x": a["x"] + 1},
        {"x2": a["x"], "y": a["y"]},
    ):
        assert content_hash_state_dict(changed) != content_hash_state_dict(a)
    assert content_hash_state_dict({"s": torch.tensor(1.0)}) != content_hash_state_dict(
        {"s": torch.tensor(2.0)}
    )


def test_non_json_manifest_values_are_refused(key):
    with pytest.raises(BundleError, match="finite numbers"):
        build_bundle(
            base_model_id="m",
            base_content_hash=BASE_HASH,
            adapter_config={},
            stage_metrics={"loss": float("nan")},
            tensors={},
            private_key=key,
        )
    with pytest.raises(BundleError, match="tensor group name"):
        build_bundle(
            base_model_id="m",
            base_content_hash=BASE_HASH,
            adapter_config={},
            stage_metrics={},
            tensors={"../evil": {}},
            private_key=key,
        )
