"""Environment variables are read only at the edges (the CLI, the Flower apps' entry points) and passed down:
the library and the server/client/simulation code read none, and what an edge reads reaches where it is used,
across the spawned server-stage process and its data-parallel ranks too."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

import client.store as store_mod
import proper_fed.model.backbone as backbone
from client.store import DEVICE_KEY_ENV, DEVICE_KEY_FILE
from proper_fed.errors import ModelLoadError
from proper_fed.model.backbone import CACHE_ENV, cache_dir, cache_root, model_folder, use_cache_dir

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("proper_fed", "server", "client", "simulations")
# The app entry points: Flower imports them first in their own processes. They may read the environment, at
# module level only (on import), never inside a function.
EDGES = {"server/server_app.py", "client/client_app.py"}
_ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


@pytest.fixture(autouse=True)
def _process_settings(monkeypatch):
    """Tests set the process's cache folder and device key; put them back afterwards."""
    monkeypatch.setattr(backbone, "_cache", backbone._cache)
    monkeypatch.setattr(store_mod, "_given_key", store_mod._given_key)


def _env_reads(tree: ast.AST) -> list[ast.AST]:
    """Every `os.environ` / `os.getenv` / ... and every `from os import environ` in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES:
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [node] * any(a.name in _ENV_NAMES for a in node.names)
    return found


def _inside_functions(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lines |= set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def test_only_the_app_entry_points_read_the_environment_and_only_on_import():
    offenders = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text())
            reads = _env_reads(tree)
            if name not in EDGES:
                offenders += [f"{name}:{n.lineno}" for n in reads]
            else:
                in_functions = _inside_functions(tree)
                offenders += [
                    f"{name}:{n.lineno} (inside a function)" for n in reads if n.lineno in in_functions
                ]
    assert not offenders, f"environment read below the edges: {offenders}"


def test_the_scan_sees_every_way_of_reading_the_environment():
    code = (
        "import os\nfrom os import getenv\na = os.environ['X']\nb = os.getenv('X')\nc = os.environ.get('X')\n"
    )
    assert len(_env_reads(ast.parse(code))) == 4


# ---- the cache folder ----


def test_cache_root_is_what_the_environment_given_says(tmp_path):
    assert cache_root({CACHE_ENV: str(tmp_path)}) == tmp_path
    assert cache_root({}) == Path.home() / ".cache" / "proper-fed"


def test_the_cache_folder_set_at_the_edge_is_the_default_and_an_explicit_one_wins(tmp_path):
    for name in ("tiny-llama-v2-0", "smollm2-135m-instruct"):  # already converted: found, not built
        for root in (tmp_path / "edge", tmp_path / "explicit"):
            (root / name).mkdir(parents=True)
            (root / name / "config.json").write_text("{}")
    use_cache_dir(tmp_path / "edge")
    assert cache_dir() == tmp_path / "edge"
    assert model_folder("tiny") == tmp_path / "edge" / "tiny-llama-v2-0"
    assert model_folder("smollm2-135m") == tmp_path / "edge" / "smollm2-135m-instruct"
    assert model_folder("tiny", tmp_path / "explicit") == tmp_path / "explicit" / "tiny-llama-v2-0"


def test_load_backbone_takes_the_cache_folder_as_an_argument(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(backbone, "model_folder", lambda model, cache=None: asked.append(cache) or tmp_path)
    with pytest.raises(ModelLoadError):  # an empty folder holds no model; what matters is where it looked
        backbone.load_backbone(
            backbone.BackboneConfig(model="tiny", device="cpu", dtype="fp32"), tmp_path / "c"
        )
    assert asked == [tmp_path / "c"]


# ---- the server stages: the ServerApp's cache folder reaches the spawned process and its ranks ----


class _InlinePool:
    """A ProcessPoolExecutor stand-in that runs the job here (what crosses into the child are the arguments)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done


@pytest.fixture
def stage_process(monkeypatch):
    """server.stage_process with the training and the data stubbed out: returns (module, caches load_backbone saw)."""
    import torch

    import proper_fed.data
    import proper_fed.federation.run_settings as run_settings
    import server.stage_process as sp

    seen = []
    monkeypatch.setattr(backbone, "load_backbone", lambda cfg, cache=None: seen.append(cache) or "backbone")
    monkeypatch.setattr(run_settings, "load_split", lambda settings: None)
    monkeypatch.setattr(proper_fed.data, "server_training_examples", lambda split: [])
    monkeypatch.setattr(sp, "train_all", lambda backbone, *args: {"proper": backbone})
    monkeypatch.setattr(sp, "_report_epochs", lambda settings, t0: None)
    monkeypatch.setattr(sp.os, "dup2", lambda fd, fd2: None)  # the child points its stdout at its log file
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # nor this process's threads
    return sp, seen


def test_the_cache_folder_reaches_the_server_stage_process(stage_process, tmp_path, monkeypatch):
    sp, seen = stage_process
    monkeypatch.setattr(sp, "ProcessPoolExecutor", _InlinePool)
    submitted = []
    real_train = sp._train
    monkeypatch.setattr(sp, "_train", lambda *args: submitted.append(args) or real_train(*args))
    run_config = {"out": str(tmp_path / "run"), "server-threads": 1}
    use_cache_dir(tmp_path / "edge")  # what the ServerApp's entry point set
    assert sp.train_server_stages_in_child(run_config, 0.0) == {"proper": "backbone"}
    assert submitted[-1][-1] == tmp_path / "edge" and seen == [tmp_path / "edge"]
    sp.train_server_stages_in_child(run_config, 0.0, tmp_path / "explicit")
    assert seen[-1] == tmp_path / "explicit"


def test_the_cache_folder_reaches_every_data_parallel_rank(stage_process, tmp_path, monkeypatch):
    import torch

    from proper_fed.train.distributed import Ranks

    sp, seen = stage_process
    launched = []
    monkeypatch.setattr(sp, "launch", lambda n, fn, *args, **kw: launched.append((n, fn, args)) or {})
    sp._train({"out": str(tmp_path / "run"), "server-devices": 2}, 0.0, tmp_path / "c")
    (n, fn, args) = launched[0]
    assert n == 2 and tmp_path / "c" in args
    for rank in range(n):  # what each spawned rank runs
        fn(Ranks(rank, n, torch.device("cpu")), *args)
    assert seen == [tmp_path / "c"] * n


# ---- the device: the ClientApp's entry point and the CLI ----


def test_the_client_app_entry_point_hands_its_environment_down(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PROPER_FED_STORE", str(tmp_path / "store"))
    monkeypatch.setenv(DEVICE_KEY_ENV, "22" * 32)
    monkeypatch.delenv("PROPER_FED_THREADS", raising=False)
    import client.client_app
    from client.device import store_for

    app = importlib.reload(client.client_app)  # what a ClientApp process does first
    assert cache_dir() == tmp_path / "cache"
    chosen = store_for({}, 7, app.STORE_DIR)
    assert chosen.root == tmp_path / "store" and chosen.key == bytes([0x22]) * 32
    assert not (tmp_path / "store" / DEVICE_KEY_FILE).exists()
    assert store_for({}, 7, "").root == tmp_path / "cache" / "device-store" / "7"
    assert store_for({"store-dir": str(tmp_path / "node")}, 7, app.STORE_DIR).root == tmp_path / "node"
    for name in (CACHE_ENV, "PROPER_FED_STORE", DEVICE_KEY_ENV):
        monkeypatch.delenv(name)
    importlib.reload(client.client_app)


def test_the_cli_hands_the_cache_folder_and_device_key_to_the_library(tmp_path):
    from proper_fed.artifacts import crypto
    from proper_fed.data.synthetic import SyntheticConfig, generate_synthetic, write_synthetic

    write_synthetic(generate_synthetic(SyntheticConfig(users=4, groups=2)), tmp_path / "data")
    crypto.save_public_key(crypto.generate_signing_key().public_key(), tmp_path / "signing.pub")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        CACHE_ENV: str(tmp_path / "cache"),
        DEVICE_KEY_ENV: "33" * 32,
    }
    cmd = [str(Path(sys.executable).with_name("proper-fed")), "client", "enroll", "--data", "data"]
    cmd += ["--user-id", "u001", "--server-key", "signing.pub", "--superlink", "127.0.0.1:9"]
    proc = subprocess.run(
        [*cmd, "--insecure", "--no-start"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = tmp_path / "cache" / "device" / "u001"  # the default store, in $PROPER_FED_CACHE
    assert (store / "enrollment.json").is_file()
    assert not (store / DEVICE_KEY_FILE).exists()  # the given key, not a new key file
