"""The device's adapter store (encrypted at rest, atomic) and the atomic write helpers under it."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import client.store
from client.store import DEVICE_KEY_FILE, AdapterStore, load_or_create_device_key, use_device_key
from proper_fed.atomic import atomic_write_bytes, staged_dir
from proper_fed.errors import StoreError


@pytest.fixture(autouse=True)
def _no_given_key(monkeypatch):
    """No device key handed over by an edge ($PROPER_FED_DEVICE_KEY); restored after each test."""
    monkeypatch.setattr(client.store, "_given_key", "")


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "lora_A": torch.randn(4, 64, generator=g),
        "lora_B": torch.randn(64, 4, generator=g).to(torch.bfloat16),
    }


def _raise(*args, **kwargs):
    raise OSError("simulated crash during rename")


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


# ---- atomic writes ----


def test_atomic_write_sets_mode_and_replaces(tmp_path):
    path = atomic_write_bytes(tmp_path / "f", b"one", mode=0o600)
    assert path.read_bytes() == b"one" and stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"


def test_failed_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "f", b"old")
    monkeypatch.setattr(os, "replace", _raise)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_exclusive_atomic_write_never_overwrites(tmp_path):
    path = atomic_write_bytes(tmp_path / "f", b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(path, b"second", overwrite=False)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_staged_dir_replaces_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("failed halfway")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with staged_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- device key ----


def test_device_key_is_created_once_with_mode_0600(tmp_path):
    key = load_or_create_device_key(tmp_path)
    assert len(key) == 32
    assert stat.S_IMODE((tmp_path / DEVICE_KEY_FILE).stat().st_mode) == 0o600
    assert load_or_create_device_key(tmp_path) == key


def test_a_device_key_given_by_the_edge_wins_and_a_bad_one_is_refused_without_echo(tmp_path):
    use_device_key("11" * 32)  # what the CLI or the ClientApp read from $PROPER_FED_DEVICE_KEY
    assert load_or_create_device_key(tmp_path) == bytes([0x11]) * 32
    assert AdapterStore.open(tmp_path).key == bytes([0x11]) * 32
    assert load_or_create_device_key(tmp_path, given="22" * 32) == bytes([0x22]) * 32  # explicit wins
    assert not (tmp_path / DEVICE_KEY_FILE).exists()
    use_device_key("zz-not-hex-secret")
    with pytest.raises(StoreError, match="64 hex digits") as err:
        load_or_create_device_key(tmp_path)
    assert "zz-not-hex-secret" not in str(err.value)


def test_the_store_ignores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(client.store.DEVICE_KEY_ENV, "11" * 32)  # read by the edges, not here
    assert load_or_create_device_key(tmp_path) != bytes([0x11]) * 32
    assert (tmp_path / DEVICE_KEY_FILE).exists()


# ---- adapters ----


def test_adapter_round_trip_is_exact(tmp_path):
    store = AdapterStore.open(tmp_path / "store")
    assert not store.has_adapter("alice")
    store.save_adapter("alice", _adapter(), {"epochs": 2, "metrics": {"acc": 0.5}})
    assert store.has_adapter("alice") and not store.has_adapter("bob")
    loaded = store.load_adapter("alice")
    assert loaded.meta == {"epochs": 2, "metrics": {"acc": 0.5}}
    for name, t in _adapter().items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t)
    assert store.key.hex() not in repr(store) and repr(store.key) not in repr(store)


def test_ciphertext_on_disk_holds_no_plaintext(tmp_path):
    store = AdapterStore.open(tmp_path / "store")
    tensors = _adapter()
    path = store.save_adapter("alice", tensors, {"note": "visible-marker"})
    blob = path.read_bytes()
    for t in tensors.values():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        assert raw[:32] not in blob and raw[-32:] not in blob
    assert b"visible-marker" not in blob and b"lora_A" not in blob and b"alice" not in path.name.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_wrong_device_key_is_refused_clearly(tmp_path):
    AdapterStore.open(tmp_path / "store").save_adapter("alice", _adapter(), {})
    other = AdapterStore.open(tmp_path / "store", key=os.urandom(32))
    with pytest.raises(StoreError, match="different key.*device key"):
        other.load_adapter("alice")


def test_tampered_or_swapped_file_is_refused(tmp_path):
    store = AdapterStore.open(tmp_path / "store")
    alice = store.save_adapter("alice", _adapter(), {})
    bob = store.save_adapter("bob", {"w": torch.zeros(2)}, {})
    raw = bytearray(alice.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    alice.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="authentication failed"):
        store.load_adapter("alice")
    bob.write_bytes(store.save_adapter("carol", _adapter(), {}).read_bytes())  # carol's file in bob's slot
    with pytest.raises(StoreError, match="authentication failed"):
        store.load_adapter("bob")


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    store = AdapterStore.open(tmp_path / "store")
    store.save_adapter("alice", _adapter(), {"version": 1})
    monkeypatch.setattr(os, "replace", _raise)
    with pytest.raises(OSError):
        store.save_adapter("alice", {"w": torch.ones(3)}, {"version": 2})
    monkeypatch.undo()
    assert store.load_adapter("alice").meta == {"version": 1}
    assert _leftovers(tmp_path) == []


def test_missing_adapter_and_bad_meta_are_store_errors(tmp_path):
    store = AdapterStore.open(tmp_path / "store")
    with pytest.raises(StoreError, match="no adapter stored for user 'nobody'"):
        store.load_adapter("nobody")
    with pytest.raises(StoreError, match="plain JSON"):
        store.save_adapter("alice", _adapter(), {"bad": object()})
    assert not store.has_adapter("alice")


# ---- checkpoints ----


def test_trainer_checkpointer_encrypts_opaque_bytes(tmp_path):
    store = AdapterStore.open(tmp_path / "store")
    ckpt = store.checkpointer("alice", stage="user")
    assert ckpt.load() is None
    ckpt.save(b"torch-saved-optimizer-state")
    assert ckpt.load() == b"torch-saved-optimizer-state"
    assert b"torch-saved" not in ckpt.path.read_bytes()
    # An adapter, or another stage's checkpoint, cannot be passed off as this one (the kind is authenticated).
    other = store.checkpointer("alice", stage="oppu")
    other.save(b"other stage")
    ckpt.path.write_bytes(other.path.read_bytes())
    with pytest.raises(StoreError, match="of user 'alice'"):
        ckpt.load()
    ckpt.path.write_bytes(store.save_adapter("alice", {"p": torch.ones(3)}, {}).read_bytes())
    with pytest.raises(StoreError, match="of user 'alice'"):
        ckpt.load()
    ckpt.clear()
    assert ckpt.load() is None and other.load() == b"other stage"
