"""TLS certificates for the SuperLink and SuperNode auth keys, checked with the loaders that will use them."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from proper_fed.artifacts.certs import create_node_auth_keypair, write_certs
from proper_fed.errors import ConfigError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return write_certs(tmp_path_factory.mktemp("certs"), hosts=["fed.example.org", "10.1.2.3"])


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_key_modes(certs):
    for path in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in (certs.ca_cert, certs.server_cert):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key)] == [
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
    ]


def test_server_cert_is_issued_by_ca_with_all_sans(certs):
    ca, server = _load(certs.ca_cert), _load(certs.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fed.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(h) for h in ("127.0.0.1", "::1", "10.1.2.3")
    }


@pytest.mark.parametrize("host", ["localhost", "fed.example.org", "127.0.0.1", "::1"])
def test_chain_passes_strict_webpki_server_verification(certs, host):
    # cryptography's RFC 5280 verifier is stricter than gRPC's: if it accepts the chain, clients will.
    ca, server = _load(certs.ca_cert), _load(certs.server_cert)
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    chain = verifier.verify(server, [])
    assert chain[-1] == ca


def test_tls_handshake_on_loopback_checks_hostname(certs):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(2) == b"ok"
        thread.join(timeout=10)


def test_existing_files_are_not_overwritten_without_force(certs):
    before = certs.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite.*--force"):
        write_certs(certs.ca_cert.parent)
    assert certs.ca_cert.read_bytes() == before


def test_force_replaces_all_files(tmp_path):
    first = write_certs(tmp_path)
    old = first.server_cert.read_bytes()
    second = write_certs(tmp_path, force=True)
    assert second.server_cert.read_bytes() != old
    _load(second.server_cert).verify_directly_issued_by(_load(second.ca_cert))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]


def test_node_auth_keys_load_with_flwr_own_loaders(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = create_node_auth_keypair(tmp_path)
    assert paths.public_key.name == paths.private_key.name + ".pub"
    assert stat.S_IMODE(paths.private_key.stat().st_mode) == 0o600
    # What `flwr supernode register KEY.pub` does with the file.
    registered = bytes_to_public_key(try_load_public_key(paths.public_key))
    # What `flower-supernode --auth-supernode-private-key KEY` does with the file.
    args = argparse.Namespace(
        auth_supernode_private_key=str(paths.private_key), auth_supernode_public_key=None
    )
    private, public = _try_setup_client_authentication(args)
    assert isinstance(private.curve, ec.SECP384R1)
    assert public.public_numbers() == registered.public_numbers()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_node_auth_keypair(tmp_path)


def test_cli_creates_certs_and_refuses_overwrite(tmp_path):
    from typer.testing import CliRunner

    import proper_fed_cli.certs_cmd  # noqa: F401  (registers the `certs` group)
    from proper_fed_cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["certs", "create", "--out", str(tmp_path), "--host", "node.lan"])
    assert result.exit_code == 0, result.output
    assert "--ssl-certfile" in result.output and (tmp_path / "server.pem").exists()
    san = _load(tmp_path / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "node.lan" in san.value.get_values_for_type(x509.DNSName)
    again = runner.invoke(app, ["certs", "create", "--out", str(tmp_path)])
    assert isinstance(again.exception, ConfigError)
    result = runner.invoke(app, ["certs", "node-key", "--out", str(tmp_path / "node")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "node" / "node_auth_key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
