"""A device joining a deployment: its SuperNode auth key pair, the server keys it pins, the SuperNode command
line, and answering prompts afterwards with the adapter it keeps. The CLI (`proper-fed client ...`) parses
options and calls these; nothing here prints or exits.

A device's store directory holds everything it owns:

    device.key, adapters/, checkpoints/   the encrypted adapter store (client/store.py)
    bundle/                              the last verified bundle it personalized on (client/device.py)
    node-auth/node_auth_key(.pub)        the SuperNode authentication key pair (OpenSSH, ECDSA P-384)
    trusted/server_signing.pub           the server's bundle-signing key, pinned at enrollment
    trusted/ca.crt                       the CA that signed the SuperLink's TLS certificate, pinned at enrollment
    enrollment.json                      where to connect and which user/data this device serves
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proper_fed.artifacts import crypto
from proper_fed.artifacts.certs import (
    NODE_KEY_NAME,
    NodeAuthKeyPaths,
    check_ca_certificate,
    create_node_auth_keypair,
)
from proper_fed.atomic import atomic_write_bytes, atomic_write_text
from proper_fed.errors import ConfigError, CryptoError
from proper_fed.federation.processes import executable

if TYPE_CHECKING:
    from proper_fed.artifacts.bundle import Bundle

log = logging.getLogger(__name__)

ENROLLMENT_FILE = "enrollment.json"
AUTH_DIR = "node-auth"
TRUST_DIR = "trusted"
PINNED_SERVER_KEY = "server_signing.pub"
PINNED_CA = "ca.crt"


@dataclass(frozen=True)
class Enrollment:
    """What a device needs to (re)start its SuperNode; saved as `<store>/enrollment.json`."""

    store: str
    data: str
    user_id: str
    superlink: str
    private_key: str
    public_key: str
    server_key: str  # the pinned copy in <store>/trusted
    root_cert: str = ""  # the pinned copy in <store>/trusted; "" with insecure
    insecure: bool = False
    task: str = ""
    base_folder: str = ""
    federated_training: bool = True  # False: this device does not train stages 1-2 of a federated run

    def node_config(self) -> str:
        """`--node-config` for flower-supernode: the keys client/device.py (and, for the opt-out of federated
        stages 1-2, client/federated_stages.py) reads."""
        pairs = {
            "data-path": self.data,
            "user-id": self.user_id,
            "server-public-key": self.server_key,
            "store-dir": self.store,
            "task": self.task,
            "base-folder": self.base_folder,
            "federated-training": "" if self.federated_training else "false",
        }
        for key, value in pairs.items():
            if "'" in value or '"' in value:
                raise ConfigError(f"node config {key}={value!r}: quotes cannot pass through --node-config")
        return " ".join(f"{k}='{v}'" for k, v in pairs.items() if v)

    def supernode_command(
        self,
        port: int,
        host: str = "127.0.0.1",
        max_retries: int | None = None,
        max_wait_s: float | None = None,
    ) -> list[str]:
        cmd = [executable("flower-supernode"), "--superlink", self.superlink]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", self.root_cert, "--auth-supernode-private-key", self.private_key]
        cmd += ["--node-config", self.node_config(), "--host", host, "--port", str(port)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if max_wait_s is not None:
            cmd += ["--max-wait-time", str(max_wait_s)]
        return cmd


def check_server_key(path: str | os.PathLike[str]) -> Path:
    """The server's bundle-signing public key (signing.pub): a malformed or private key fails here, in one
    line, not at the first bundle."""
    key_file = Path(path).expanduser()
    if not key_file.is_file():
        raise ConfigError(
            f"--server-key {key_file}: no such file; ask the operator for the server's signing.pub"
        )
    if b"PRIVATE KEY" in key_file.read_bytes():
        raise ConfigError(
            f"--server-key {key_file} is a private key; pass the server's public signing key (signing.pub)"
        )
    try:
        crypto.load_public_key(key_file)
    except CryptoError as err:
        raise ConfigError(f"--server-key {err}; pass the server's signing.pub") from None
    return key_file


def _check_root_cert(root_cert: str | os.PathLike[str] | None) -> Path:
    if root_cert is None:
        raise ConfigError(
            "no CA certificate: pass --root-cert with the CA certificate (ca.crt) the operator gave you, or "
            "--insecure for a plaintext test setup"
        )
    return check_ca_certificate(root_cert)  # a file that is not a CA certificate is refused, never pinned


def register_hint(public_key: str | os.PathLike[str]) -> str:
    """The exact command the operator runs on the server to admit this device."""
    return f"proper-fed server register-client {Path(public_key).resolve()}"


def _pin(source: Path, target: Path, what: str, repin: bool) -> Path:
    """Copy `source` to `target` once; a later enrollment with different content is refused unless repin."""
    data = source.read_bytes()
    if target.exists() and target.read_bytes() != data and not repin:
        raise ConfigError(
            f"this device already trusts another {what} ({target}); {source} differs. If the server really "
            "changed it, enroll again with --repin"
        )
    atomic_write_bytes(target, data, mode=0o644)
    return target


def node_keypair(store: Path) -> tuple[NodeAuthKeyPaths, bool]:
    """The device's SuperNode auth key pair, created on first use; (paths, created now)."""
    folder = store / AUTH_DIR
    paths = NodeAuthKeyPaths(folder / NODE_KEY_NAME, folder / f"{NODE_KEY_NAME}.pub")
    have = [p.exists() for p in (paths.private_key, paths.public_key)]
    if all(have):
        return paths, False
    if any(have):
        raise ConfigError(
            f"{folder} holds only half of the node key pair; remove it and enroll again (the operator must then "
            "register the new public key)"
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return create_node_auth_keypair(folder), True


def enroll(
    store: str | os.PathLike[str],
    data: str | os.PathLike[str],
    server_key: str | os.PathLike[str],
    superlink: str,
    root_cert: str | os.PathLike[str] | None,
    user_id: str = "",
    task: str = "",
    insecure: bool = False,
    base_folder: str = "",
    repin: bool = False,
    federated_training: bool = True,
) -> tuple[Enrollment, bool]:
    """Prepare a device: check its data and the server key, make its node key pair (if missing), pin the
    server's signing key and CA, and save the enrollment. Returns (enrollment, key pair created now)."""
    from client.device import device_user
    from client.store import AdapterStore
    from proper_fed.federation.run_settings import RunSettings

    root = Path(store).expanduser().resolve()
    data_path = Path(data).expanduser().resolve()
    node = {"data-path": str(data_path), "user-id": user_id, "task": task}
    # Exactly one user of the file, or a clear error, before anything is created.
    me = device_user(RunSettings(), {k: v for k, v in node.items() if v})
    key_file = check_server_key(server_key)
    ca_file = None if insecure else _check_root_cert(root_cert)
    AdapterStore.open(root)  # creates the store (0700) and the device key
    trust = root / TRUST_DIR
    trust.mkdir(mode=0o700, exist_ok=True)
    pinned_key = _pin(key_file, trust / PINNED_SERVER_KEY, "server signing key", repin)
    pinned_ca = "" if ca_file is None else str(_pin(ca_file, trust / PINNED_CA, "CA", repin))
    keys, created = node_keypair(root)
    enrollment = Enrollment(
        store=str(root),
        data=str(data_path),
        user_id=me.user.user_id,
        superlink=superlink,
        private_key=str(keys.private_key),
        public_key=str(keys.public_key),
        server_key=str(pinned_key),
        root_cert=pinned_ca,
        insecure=insecure,
        task=task,
        base_folder=str(Path(base_folder).expanduser().resolve()) if base_folder else "",
        federated_training=federated_training,
    )
    atomic_write_text(root / ENROLLMENT_FILE, json.dumps(asdict(enrollment), indent=2) + "\n")
    return enrollment, created


def load_enrollment(store: str | os.PathLike[str]) -> Enrollment:
    path = Path(store).expanduser().resolve() / ENROLLMENT_FILE
    try:
        return Enrollment(**json.loads(path.read_text()))
    except FileNotFoundError as err:
        raise ConfigError(
            f"{path.parent} is not an enrolled device store; run `proper-fed client enroll`"
        ) from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path} is not a proper-fed enrollment file: {err}") from err


# ---- after the federation: answering prompts on the device ----


def answer(
    store: str | os.PathLike[str],
    prompt: str,
    user_id: str = "",
    max_new_tokens: int = 48,
    quantization: str = "nf4",
    base_folder: str = "",
) -> str:
    """Answer `prompt` with the user's stored adapter on top of the verified bundle and the base it names."""
    from client.device import load_device_backbone, server_model
    from client.store import AdapterStore
    from proper_fed.errors import StoreError
    from proper_fed.federation.run_settings import RunSettings
    from proper_fed.train.generate import generate
    from proper_fed.train.stages import serving_mode

    root = Path(store).expanduser().resolve()
    enrolled = load_enrollment(root) if (root / ENROLLMENT_FILE).is_file() else None
    user_id = user_id or (enrolled.user_id if enrolled else "")
    if not user_id:
        raise ConfigError(f"{root} has no enrollment.json; pass --user-id")
    bundle, folder = _verified_bundle_and_base(root, enrolled, base_folder)
    stored = AdapterStore.open(root).load_adapter(user_id)
    if stored.meta.get("bundle") != bundle.manifest["tensor_sha256"]:
        raise StoreError(
            f"the adapter of user {user_id!r} was trained on another bundle than the one in {root}; take part "
            "in the next federated run to personalize again"
        )
    settings = RunSettings.from_run_config({"device-quantization": quantization})
    model = server_model(load_device_backbone(folder, settings), bundle, "proper")
    try:
        model.load_user_state(user_id, stored.tensors)
        serving_mode(model, "user")
        return generate(model, [prompt], [user_id], max_new_tokens=max_new_tokens)[0]
    finally:
        model.remove()


def _verified_bundle_and_base(
    root: Path, enrolled: Enrollment | None, base_folder: str
) -> tuple[Bundle, Path]:
    """The bundle the device keeps, verified against the pinned server key, and the local base it names."""
    from client.device import BUNDLE_DIR
    from proper_fed.artifacts.base_store import find_base
    from proper_fed.artifacts.bundle import load_bundle, verify_bundle
    from proper_fed.errors import BundleError

    key = Path(enrolled.server_key) if enrolled else root / TRUST_DIR / PINNED_SERVER_KEY
    if not (root / BUNDLE_DIR).is_dir():
        raise BundleError(
            f"{root} holds no bundle yet: the device keeps one once a federated run personalized it"
        )
    bundle = load_bundle(root / BUNDLE_DIR)
    verify_bundle(bundle, crypto.load_public_key(key))  # a file on disk is not trusted either
    base_folder = base_folder or (enrolled.base_folder if enrolled else "")
    folder = find_base(bundle.base_content_hash, (base_folder,) if base_folder else (), bundle.base_model_id)
    if folder is None:
        raise BundleError(
            f"no local base with hash {bundle.base_content_hash[:16]}...; pass --base-folder with the model "
            "folder the server used"
        )
    return bundle, folder
