"""Ed25519 key files and signatures, AES-256-GCM blobs: round trips and every refusal."""

from __future__ import annotations

import stat

import pytest

from proper_fed.artifacts import crypto
from proper_fed.errors import CryptoError


def test_private_key_file_is_0600_and_round_trips(tmp_path):
    key = crypto.generate_signing_key()
    path = crypto.save_private_key(key, tmp_path / "server.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = crypto.load_private_key(path)
    pub = crypto.save_public_key(key.public_key(), tmp_path / "server.pub")
    assert crypto.verify(crypto.load_public_key(pub), b"msg", crypto.sign(loaded, b"msg"))
    assert crypto.public_key_id(loaded.public_key()) == crypto.public_key_id(key.public_key())


def test_private_key_is_not_overwritten_by_default(tmp_path):
    path = crypto.save_private_key(crypto.generate_signing_key(), tmp_path / "k")
    before = path.read_bytes()
    with pytest.raises(CryptoError, match="refusing to overwrite"):
        crypto.save_private_key(crypto.generate_signing_key(), path)
    assert path.read_bytes() == before
    crypto.save_private_key(crypto.generate_signing_key(), path, overwrite=True)
    assert path.read_bytes() != before


def test_loading_garbage_or_wrong_key_type_is_a_clear_error(tmp_path):
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(CryptoError, match="not an unencrypted PEM private key"):
        crypto.load_private_key(tmp_path / "junk")
    with pytest.raises(CryptoError, match="cannot read"):
        crypto.load_public_key(tmp_path / "missing.pub")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.key").write_bytes(ec_pem)
    with pytest.raises(CryptoError, match="expected an Ed25519 private key"):
        crypto.load_private_key(tmp_path / "ec.key")


def test_signature_fails_on_other_data_or_other_key():
    key = crypto.generate_signing_key()
    sig = crypto.sign(key, b"manifest")
    assert crypto.verify(key.public_key(), b"manifest", sig)
    assert not crypto.verify(key.public_key(), b"manifesT", sig)
    assert not crypto.verify(crypto.generate_signing_key().public_key(), b"manifest", sig)


def test_aead_round_trip_with_random_nonce():
    key = crypto.generate_aead_key()
    assert len(key) == 32
    a = crypto.encrypt(key, b"secret adapter", b"user-1")
    b = crypto.encrypt(key, b"secret adapter", b"user-1")
    assert a != b  # fresh nonce each time
    assert a.startswith(crypto.AEAD_MAGIC) and b"secret adapter" not in a
    assert crypto.decrypt(key, a, b"user-1") == b"secret adapter"


def test_aead_refuses_wrong_key_tamper_and_wrong_associated_data():
    key = crypto.generate_aead_key()
    blob = crypto.encrypt(key, b"payload", b"user-1")
    with pytest.raises(CryptoError, match="different key"):
        crypto.decrypt(crypto.generate_aead_key(), blob, b"user-1")
    with pytest.raises(CryptoError, match="authentication failed"):
        crypto.decrypt(key, blob, b"user-2")
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(CryptoError, match="authentication failed"):
        crypto.decrypt(key, bytes(flipped), b"user-1")
    with pytest.raises(CryptoError, match="bad magic or truncated"):
        crypto.decrypt(key, blob[:20], b"user-1")
    future = bytearray(blob)
    future[len(crypto.AEAD_MAGIC)] = 2
    with pytest.raises(CryptoError, match="format version 2"):
        crypto.decrypt(key, bytes(future), b"user-1")
