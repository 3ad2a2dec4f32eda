"""Small pure functions over `cryptography` primitives: Ed25519 signatures and AES-256-GCM encryption.

Nothing here is hand-rolled and nothing here logs key material (only public key ids and file paths).

Encrypted blob layout (all lengths in bytes):

    magic "PFAE" (4) | version 0x01 (1) | key id (8) | nonce (12) | ciphertext + GCM tag (16)

The whole header (magic, version, key id) is authenticated together with the caller's associated data, so
flipping any header byte fails decryption. The key id (a truncated SHA-256 of the key, which reveals nothing
usable about a 256-bit random key) only lets `decrypt` tell "wrong key" apart from "tampered data".
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proper_fed.atomic import atomic_write_bytes
from proper_fed.errors import CryptoError

logger = logging.getLogger(__name__)

AEAD_MAGIC = b"PFAE"
AEAD_VERSION = 1
AEAD_KEY_SIZE = 32  # AES-256
AEAD_NONCE_SIZE = 12  # 96-bit nonce, the size GCM is specified for; random per message
AEAD_KEY_ID_SIZE = 8
AEAD_TAG_SIZE = 16
_AEAD_HEADER_SIZE = len(AEAD_MAGIC) + 1 + AEAD_KEY_ID_SIZE
_KEY_ID_DOMAIN = b"proper-fed aead key id v1\x00"


# ---- Ed25519 signatures ----


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def save_private_key(
    key: Ed25519PrivateKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600, atomically; refuses to replace a key by default."""
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    try:
        return atomic_write_bytes(path, pem, mode=0o600, overwrite=overwrite)
    except FileExistsError as err:
        raise CryptoError(f"{path} already exists; refusing to overwrite a private key") from err


def save_public_key(key: Ed25519PublicKey, path: str | os.PathLike[str]) -> Path:
    """Write `key` as SubjectPublicKeyInfo PEM (mode 0644), atomically."""
    pem = key.public_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return atomic_write_bytes(path, pem, mode=0o644)


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise CryptoError(f"cannot read {what} {path}: {err.strerror}") from err


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted PEM Ed25519 private key; `CryptoError` if it is unreadable or not Ed25519."""
    data = _read_key_file(path, "private key")
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "private key %s is accessible by group/others (mode %o); chmod 600 it", path, mode & 0o777
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        # The library's message never contains the key bytes, but we do not forward it anyway.
        raise CryptoError(f"{path} is not an unencrypted PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key; `CryptoError` if it is unreadable or not Ed25519."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise CryptoError(f"{path} is not a PEM public key") from err
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError(f"{path} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def public_key_id(key: Ed25519PublicKey) -> str:
    """A short, stable fingerprint of a public key (first 16 hex digits of SHA-256 of its raw bytes)."""
    raw = key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `data`."""
    return key.sign(data)


def verify(key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `data` under `key`."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


# ---- AES-256-GCM ----


def generate_aead_key() -> bytes:
    """32 random bytes from the OS CSPRNG, an AES-256-GCM key."""
    return AESGCM.generate_key(bit_length=AEAD_KEY_SIZE * 8)


def aead_key_id(key: bytes) -> bytes:
    """The 8-byte key id stored in each blob's header (domain-separated, truncated SHA-256 of the key)."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key).digest()[:AEAD_KEY_ID_SIZE]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != AEAD_KEY_SIZE:
        raise CryptoError(f"an AES-256-GCM key must be {AEAD_KEY_SIZE} bytes")


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes = b"") -> bytes:
    """Encrypt and authenticate `plaintext`; `associated_data` is authenticated but not stored.

    The same `associated_data` must be passed to `decrypt`: binding, e.g., a user id there makes a blob moved
    to another user's slot fail to decrypt.
    """
    _check_key(key)
    header = AEAD_MAGIC + bytes([AEAD_VERSION]) + aead_key_id(bytes(key))
    nonce = os.urandom(AEAD_NONCE_SIZE)
    ciphertext = AESGCM(bytes(key)).encrypt(nonce, plaintext, header + associated_data)
    return header + nonce + ciphertext


def decrypt(key: bytes, blob: bytes, associated_data: bytes = b"") -> bytes:
    """Inverse of `encrypt`; `CryptoError` naming the cause: not our format, wrong key, or tampered data."""
    _check_key(key)
    if len(blob) < _AEAD_HEADER_SIZE + AEAD_NONCE_SIZE + AEAD_TAG_SIZE or not blob.startswith(AEAD_MAGIC):
        raise CryptoError("not a proper-fed encrypted blob (bad magic or truncated)")
    version = blob[len(AEAD_MAGIC)]
    if version != AEAD_VERSION:
        raise CryptoError(
            f"encrypted blob has format version {version}; this proper-fed reads {AEAD_VERSION}"
        )
    header = blob[:_AEAD_HEADER_SIZE]
    if header[-AEAD_KEY_ID_SIZE:] != aead_key_id(bytes(key)):
        raise CryptoError(
            f"encrypted with a different key (key id {header[-AEAD_KEY_ID_SIZE:].hex()}, "
            f"this key's id is {aead_key_id(bytes(key)).hex()})"
        )
    nonce = blob[_AEAD_HEADER_SIZE : _AEAD_HEADER_SIZE + AEAD_NONCE_SIZE]
    try:
        return AESGCM(bytes(key)).decrypt(
            nonce, blob[_AEAD_HEADER_SIZE + AEAD_NONCE_SIZE :], header + associated_data
        )
    except InvalidTag as err:
        raise CryptoError(
            "authentication failed: the data was modified, truncated, or bound to different associated data"
        ) from err
