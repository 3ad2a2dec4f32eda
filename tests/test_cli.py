"""The `proper-fed` command line: fast help, one-line errors for wrong key and certificate files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("proper-fed")


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_HOME": str(cwd / "flwr-home")}
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def test_help_builds_every_command_without_importing_torch_or_flwr():
    code = (
        "import sys; import proper_fed_cli.main as m; from typer.main import get_command; "
        "names = sorted(get_command(m.app).commands); "
        "print(names, 'torch' in sys.modules, 'flwr' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bench', 'certs', 'client', 'compare', 'data', 'server', 'simulate'] False False"


@pytest.fixture(scope="module")
def device_files(tmp_path_factory):
    from proper_fed.artifacts import crypto
    from proper_fed.artifacts.certs import create_node_auth_keypair, write_certs
    from proper_fed.data.synthetic import SyntheticConfig, generate_synthetic, write_synthetic

    root = tmp_path_factory.mktemp("cli")
    write_synthetic(generate_synthetic(SyntheticConfig(users=4, groups=2)), root / "data")
    certs = write_certs(root / "certs")
    key = crypto.generate_signing_key()
    crypto.save_public_key(key.public_key(), root / "signing.pub")
    crypto.save_private_key(key, root / "signing.key")
    create_node_auth_keypair(root / "node")
    (root / "not-a-cert.crt").write_text("hello\n")
    return root, certs


def _enroll(root: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["client", "enroll", "--data", "data", "--user-id", "u001", "--superlink", "127.0.0.1:9"]
    return _run([*args, "--store", "store", "--no-start", *extra], root)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--server-key", "signing.pub", "--root-cert", "not-a-cert.crt"], "not a PEM certificate"),
        (["--server-key", "signing.pub", "--root-cert", "certs/server.key"], "is a private key"),
        (["--server-key", "signing.pub", "--root-cert", "certs/server.pem"], "not a CA"),
        (
            ["--server-key", "signing.key", "--root-cert", "certs/ca.crt"],
            "--server-key signing.key is a private key",
        ),
        (["--server-key", "node/node_auth_key.pub", "--root-cert", "certs/ca.crt"], "signing.pub"),
        (["--server-key", "signing.pub"], "pass --root-cert"),
    ],
    ids=["text-as-ca", "key-as-ca", "leaf-as-ca", "private-server-key", "ssh-server-key", "no-root-cert"],
)
def test_enroll_refuses_wrong_files_in_one_line(device_files, extra, needle):
    root, _ = device_files
    proc = _enroll(root, *extra)
    _one_line_error(proc, needle)
    assert "None" not in proc.stderr
    assert not (root / "store" / "trusted" / "ca.crt").exists()  # nothing was pinned


def test_register_client_with_a_private_key_says_so(device_files):
    root, _ = device_files
    _one_line_error(_run(["server", "register-client", "node/node_auth_key"], root), "is a private key")
    _one_line_error(_run(["server", "register-client", "certs/ca.crt"], root), "not an OpenSSH public key")
