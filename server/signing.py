"""The server's Ed25519 signing key: created once, kept beside the server state; devices pin its public key."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proper_fed.artifacts import crypto

log = logging.getLogger(__name__)


def load_or_create_signing_key(key_path: Path, public_path: Path) -> Ed25519PrivateKey:
    if key_path.exists():
        key = crypto.load_private_key(key_path)
    else:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key = crypto.generate_signing_key()
        crypto.save_private_key(key, key_path)
        log.warning("created the server signing key %s", key_path)
    if not public_path.exists():
        public_path.parent.mkdir(parents=True, exist_ok=True)
        crypto.save_public_key(key.public_key(), public_path)
    return key
