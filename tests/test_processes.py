"""Deployment processes: `stop` ends the whole tree, a SuperLink `start` waits for its port, a SuperNode
`start` returns only once connected or fails with the SuperNode's own reason (here: an unknown CA)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from proper_fed.errors import DeployError
from proper_fed.federation.processes import executable, flwr_env, free_port, read_pid, spawn, stop_tree

CHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); time.sleep(300)"


def test_stop_ends_the_process_and_its_children_even_in_another_session(tmp_path):
    proc = spawn(
        [sys.executable, "-c", CHILD], tmp_path / "log", os.environ, detach=True, pid_path=tmp_path / "pid"
    )
    deadline = time.monotonic() + 20
    while not proc.children() and time.monotonic() < deadline:
        time.sleep(0.1)
    children = proc.children(recursive=True)
    assert children, "the test process did not start its child"
    assert read_pid(tmp_path / "pid", "time.sleep") is not None
    stopped = stop_tree(proc, timeout_s=5)
    assert proc.pid in stopped and all(c.pid in stopped for c in children)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in [proc, *children])
    assert read_pid(tmp_path / "pid", "time.sleep") is None and not (tmp_path / "pid").exists()


def test_read_pid_refuses_a_process_that_is_not_ours(tmp_path):
    (tmp_path / "pid").write_text(f"{os.getpid()}\n")  # alive, but not a flower-supernode
    assert read_pid(tmp_path / "pid", "flower-supernode") is None


def test_flower_executables_are_found_beside_this_interpreter():
    assert Path(executable("flwr")).parent == Path(sys.executable).parent
    env = flwr_env({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def tls_superlink(tmp_path_factory):
    from proper_fed.artifacts.certs import write_certs
    from server import superlink

    root = tmp_path_factory.mktemp("superlink")
    write_certs(root / "certs")
    write_certs(root / "other-ca")
    spec = superlink.SuperLinkSpec(
        "127.0.0.1", free_port(), superlink.TlsFiles.from_dir(root / "certs"), node_auth=False
    )
    env = flwr_env(os.environ, {"FLWR_HOME": str(root / "flwr-home")})
    proc = superlink.start(spec, root / "runtime", env)
    yield root, spec, env
    assert superlink.stop(root / "runtime") == proc.pid
    assert superlink.status(root / "runtime") is None


def _supernode_cmd(spec, ca: Path, port: int) -> list[str]:
    cmd = [executable("flower-supernode"), "--superlink", spec.address, "--root-certificates", str(ca)]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port), "--max-retries", "1"]


@pytest.mark.slow
def test_supernode_start_with_a_wrong_ca_exits_with_its_reason(tls_superlink, tmp_path):
    from client import supernode

    root, spec, env = tls_superlink
    cmd = _supernode_cmd(spec, root / "other-ca" / "ca.crt", free_port())
    with pytest.raises(DeployError, match="CERTIFICATE_VERIFY_FAILED"):
        supernode.start(cmd, tmp_path, env, detach=True, connect_timeout_s=60)
    assert supernode.status(tmp_path) is None


@pytest.mark.slow
def test_supernode_start_returns_connected_and_stop_ends_it(tls_superlink, tmp_path):
    from client import supernode

    root, spec, env = tls_superlink
    run = supernode.start(
        _supernode_cmd(spec, root / "certs" / "ca.crt", free_port()), tmp_path, env, detach=True
    )
    assert supernode.CONNECTED in (tmp_path / supernode.LOG_FILE).read_text()
    assert supernode.status(tmp_path).pid == run.proc.pid
    with pytest.raises(DeployError, match="already runs"):
        supernode.start(["true"], tmp_path, env, detach=True)
    assert supernode.stop(tmp_path) == run.proc.pid and not run.proc.is_running()
