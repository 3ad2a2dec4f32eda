"""TLS certificates for the SuperLink and key pairs for Flower SuperNode authentication.

- `write_certs(out)` makes a private CA and a server certificate it signs, as Flower's SuperLink wants them:
  `flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`, and each
  SuperNode trusts `--root-certificates ca.crt`.
- `create_node_auth_keypair(out)` makes an ECDSA P-384 key pair in OpenSSH format, the format flwr 1.41 loads:
  the SuperNode reads its private key with `load_ssh_private_key` (`--auth-supernode-private-key KEY`) and
  `flwr supernode register KEY.pub` reads the public key with `load_ssh_public_key`.

Keys are ECDSA P-384 (accepted by gRPC's BoringSSL and by Flower's NIST-curve check). Private keys are written
0600, every file atomically, and nothing is overwritten unless `force=True`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proper_fed.atomic import atomic_write_bytes
from proper_fed.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_CERT_FILE, CA_KEY_FILE = "ca.crt", "ca.key"
SERVER_CERT_FILE, SERVER_KEY_FILE = "server.pem", "server.key"
NODE_KEY_NAME = "node_auth_key"


@dataclass(frozen=True)
class CertPaths:
    """Where `write_certs` put the CA and server certificate and keys."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeAuthKeyPaths:
    """A SuperNode auth key pair: the private key (OpenSSH PEM, 0600) and `<name>.pub` (OpenSSH one line)."""

    private_key: Path
    public_key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "proper-fed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0:
        raise ConfigError(f"certificate validity must be a positive number of days, got {days}")
    # Backdate a little so a client whose clock is slightly behind does not reject a fresh certificate.
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def create_ca(
    common_name: str = "proper-fed CA", valid_days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (CA:TRUE, path length 0: it signs server certificates only)."""
    key = _new_key()
    not_before, not_after = _validity(valid_days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in (*DEFAULT_HOSTS, *hosts):
        host = raw.strip()
        if not host:
            raise ConfigError(
                "an empty host name was given; pass --host NAME with a DNS name or an IP address"
            )
        if host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def create_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = (),
    valid_days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate signed by the CA for localhost, 127.0.0.1, ::1 and `hosts` (names or IPs)."""
    key = _new_key()
    not_before, not_after = _validity(valid_days)
    sans = _san_entries(hosts)
    common_name = next((h.strip() for h in hosts if h.strip()), DEFAULT_HOSTS[0])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"refusing to overwrite {', '.join(existing)}; pass force=True (--force) to replace them, which "
            "invalidates every certificate or key registration made from the old files"
        )


def write_certs(
    out_dir: str | os.PathLike[str], hosts: Sequence[str] = (), force: bool = False, valid_days: int = 825
) -> CertPaths:
    """Create a CA and a server certificate and write ca.crt, ca.key, server.pem, server.key into `out_dir`.

    All-or-nothing on the existence check: nothing is written if any file exists and `force` is False.
    """
    out = Path(out_dir)
    paths = CertPaths(
        ca_cert=out / CA_CERT_FILE,
        ca_key=out / CA_KEY_FILE,
        server_cert=out / SERVER_CERT_FILE,
        server_key=out / SERVER_KEY_FILE,
    )
    _refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    ca_key, ca_cert = create_ca(valid_days=max(valid_days, 3650))
    server_key, server_cert = create_server_cert(ca_key, ca_cert, hosts, valid_days=valid_days)
    # Keys first: a crash between files leaves at worst keys without certificates, never a certificate
    # whose key is missing.
    atomic_write_bytes(paths.ca_key, _key_pem(ca_key), mode=0o600)
    atomic_write_bytes(paths.server_key, _key_pem(server_key), mode=0o600)
    atomic_write_bytes(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write_bytes(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    logger.info(
        "wrote CA and server certificate to %s (SAN %s)", out, [str(s.value) for s in _san_entries(hosts)]
    )
    return paths


def create_node_auth_keypair(
    out_dir: str | os.PathLike[str], name: str = NODE_KEY_NAME, force: bool = False, comment: str = ""
) -> NodeAuthKeyPaths:
    """Write a SuperNode auth key pair: `<name>` (OpenSSH private key, 0600) and `<name>.pub` (OpenSSH).

    Register the public key with `flwr supernode register <name>.pub <federation>` and start the SuperNode
    with `--auth-supernode-private-key <name>`.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name (no '/', not hidden)")
    out = Path(out_dir)
    paths = NodeAuthKeyPaths(private_key=out / name, public_key=out / f"{name}.pub")
    _refuse_existing([paths.private_key, paths.public_key], force)
    key = _new_key()
    # flwr loads the private key with load_ssh_private_key: it must be OpenSSH format, not PKCS#8.
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    atomic_write_bytes(paths.private_key, private, mode=0o600)
    atomic_write_bytes(paths.public_key, public + b"\n", mode=0o644)
    logger.info("wrote SuperNode auth key pair %s(.pub)", paths.private_key)
    return paths


def _pem_kind(data: bytes) -> str:
    return "a private key" if b"PRIVATE KEY" in data else "not a PEM certificate"


def check_ca_certificate(path: str | os.PathLike[str], flag: str = "--root-cert") -> Path:
    """`path` holds a PEM CA certificate (what `certs create` wrote as ca.crt); else a one-line ConfigError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{flag} {p}: no such file; ask the operator for the CA certificate (ca.crt)")
    data = p.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{flag} {p} is {_pem_kind(data)}; pass the CA certificate (ca.crt)") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = cert.issuer == cert.subject
    if not is_ca:
        raise ConfigError(
            f"{flag} {p} is the certificate of {cert.subject.rfc4514_string()}, not a CA; pass the CA "
            "certificate that signed it (ca.crt)"
        )
    return p


def check_node_public_key(path: str | os.PathLike[str]) -> Path:
    """`path` holds a SuperNode's OpenSSH EC public key (node_auth_key.pub); else a one-line ConfigError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"{p}: no such public key; the device prints its path at `proper-fed client enroll`"
        )
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"{p} is a private key, not a public key: it must never leave the device; register its "
            f"{NODE_KEY_NAME}.pub"
        )
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{p} is not an OpenSSH public key; register the device's {NODE_KEY_NAME}.pub"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"{p} holds a {type(key).__name__}; SuperNode authentication needs an ECDSA key "
            f"({NODE_KEY_NAME}.pub from `proper-fed client enroll`)"
        )
    return p
