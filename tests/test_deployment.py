"""Deployment on Flower's own engine, on 127.0.0.1: a real SuperLink with TLS and SuperNode authentication
(certificates from `proper-fed certs create`, keys from `proper-fed client enroll --no-start`, admitted with
`proper-fed server register-client`), three real SuperNodes, the tiny model, the full three-phase flow.

One device is SIGKILLed while its user stage runs: the others finish, their statistics are summed through
SecAgg+ and results.json names the lost one; restarted on the same store, it resumes from its encrypted
checkpoint in the next run. A third run follows with one user's data changed. Every reply that reached the
server is recorded (PROPER_FED_RECORD_REPLIES) and audited without exemptions: apart from the SecAgg+
protocol's random material (keys, encrypted shares, masked vectors: checked for their size, and the vectors
for not being in the clear), everything the server received is the same for every device and the same
whether or not that user's data changed; only the sums moved.
The fast tests at the end cover the same guarantees at the library level (tampered bundle, resume, config).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

EXE = Path(sys.executable).with_name("proper-fed")
SERVER_FRACTION = 0.75
RUN_ARGS = [
    "--model", "tiny", "--min-nodes", "3", "--node-wait-s", "120", "--reply-timeout-s", "150",
    "--set", f"server-fraction={SERVER_FRACTION}", "--set", "methods=zero_shot,oppu,proper",
    "--set", "adapters.num-experts=2", "--set", "adapters.user-embedding-dim=8",
    "--set", "population.epochs=1", "--set", "group.epochs=1", "--set", "user.epochs=2",
    "--set", "population.max-length=48", "--set", "group.max-length=48", "--set", "user.max-length=48",
    "--set", "population.lr=0.005", "--set", "group.lr=0.005", "--set", "user.lr=0.005",
    "--set", "user.batch-size=2", "--set", "device-quantization=nf4",
    "--set", "min-devices=2",  # the first run sums the two devices that survive the kill
]  # fmt: skip
# What SecAgg+ makes fresh in every run (random keys, their encryptions, the masked vector): the audit compares
# their sizes only. Node-id lists are the protocol's public bookkeeping: compared as sets.
RANDOM_KEYS = {"pk1", "pk2", "ctxts", "masked_params", "shares"}
NODE_LISTS = {"dsts", "nids"}


def cli(args: list[str], env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=env["PF_ROOT"]
    )
    if check:
        assert proc.returncode == 0, (
            f"proper-fed {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def write_user_folder(all_dir: Path, user_id: str, out: Path) -> Path:
    """A device's own data: the LaMP-layout files restricted to its one user."""
    questions = [q for q in json.loads((all_dir / "questions.json").read_text()) if q["user_id"] == user_id]
    outputs = json.loads((all_dir / "outputs.json").read_text())
    ids = {q["id"] for q in questions}
    out.mkdir(parents=True)
    (out / "questions.json").write_text(json.dumps(questions))
    (out / "outputs.json").write_text(
        json.dumps({**outputs, "golds": [g for g in outputs["golds"] if g["id"] in ids]})
    )
    shutil.copy(all_dir / "task.toml", out / "task.toml")
    return out


def start_device(store: Path, env: dict, log: Path, *extra: str) -> subprocess.Popen:
    """`proper-fed client start` in its own process group (CLI, SuperNode, SuperExec, ClientApp)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(EXE), "client", "start", "--store", str(store), "--threads", "1", *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def user_texts(user) -> list[str]:
    """Everything of a user that must never reach the server: profile texts, query texts, golds, its id."""
    texts = [str(v) for item in user.profile for v in item.fields.values() if len(str(v)) > 8]
    texts += [q.input for q in user.queries] + [user.user_id]
    return texts


def drop_one_history_item(folder: Path) -> None:
    """Change a device user's data: the last item of its history is gone from every question's profile."""
    questions = json.loads((folder / "questions.json").read_text())
    last = questions[0]["profile"][-1]["id"]
    for q in questions:
        q["profile"] = [p for p in q["profile"] if p["id"] != last]
    (folder / "questions.json").write_text(json.dumps(questions))


def recorded(root: Path) -> list[dict]:
    path = root / "replies.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def watch_and_kill(store: Path, proc: subprocess.Popen, done: dict) -> None:
    """SIGKILL the device as soon as its first encrypted epoch checkpoint lands: mid user stage."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if list((store / "checkpoints").glob("*.pfb")):
            kill_group(proc)
            done["killed_at"] = time.monotonic()
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    from proper_fed.data import load_dataset, split_federation
    from proper_fed.data.synthetic import SyntheticConfig, generate_synthetic, write_synthetic
    from proper_fed.federation.processes import free_port

    root = tmp_path_factory.mktemp("deployment")
    env = {
        **os.environ,
        "PF_ROOT": str(root),
        "FLWR_HOME": str(root / "flwr-home"),
        "PROPER_FED_RECORD_REPLIES": str(root / "replies.jsonl"),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    t0 = time.monotonic()
    all_dir = write_synthetic(generate_synthetic(SyntheticConfig(users=12, groups=2)), root / "data" / "all")
    split = split_federation(load_dataset(all_dir), server_fraction=SERVER_FRACTION, seed=0)
    users = sorted(split.device_users, key=lambda u: len(u.profile))[-3:]  # C, the longest history, is killed
    names = ["A", "B", "C"]
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    cli(["certs", "create", "--out", "certs"], env)
    cli(["certs", "create", "--out", "other-ca"], env)
    started = cli(
        ["server", "start", "--certs", "certs", "--port", str(port), "--out", "run", "--data", str(all_dir),
         "--model", "tiny", "--no-run"], env,
    )  # fmt: skip
    ns = SimpleNamespace(root=root, env=env, superlink=superlink, users=dict(zip(names, users, strict=True)))
    ns.start_output = started.stdout
    ns.stores, ns.nodes, ns.procs, ns.logs = {}, {}, {}, {}
    try:
        for name, user in ns.users.items():
            data = write_user_folder(all_dir, user.user_id, root / "data" / name)
            store = root / f"device-{name}"
            out = cli(
                ["client", "enroll", "--data", str(data), "--server-key", "run/server/signing.pub",
                 "--superlink", superlink, "--root-cert", "certs/ca.crt", "--store", str(store), "--no-start"], env,
            ).stdout  # fmt: skip
            ns.stores[name] = store
            ns.enroll_output = out
            reg = cli(
                ["server", "register-client", str(store / "node-auth" / "node_auth_key.pub")], env
            ).stdout
            ns.nodes[name] = int(re.search(r"as node (\d+)", reg).group(1))
            ns.logs[name] = root / f"device-{name}.log"
            ns.procs[name] = start_device(store, env, ns.logs[name])
        killer: dict = {}
        watcher = threading.Thread(
            target=watch_and_kill, args=(ns.stores["C"], ns.procs["C"], killer), daemon=True
        )
        watcher.start()
        t1 = time.monotonic()
        ns.run1 = cli(["server", "run", "--out", "run", "--data", str(all_dir), *RUN_ARGS], env, timeout=600)
        ns.run1_wall_s = time.monotonic() - t1
        watcher.join(timeout=5)
        ns.killed = "killed_at" in killer
        ns.results1 = json.loads((root / "run" / "results.json").read_text())
        ns.replies1 = recorded(root)
        ns.pfb_after_kill = sorted(p.name for p in (ns.stores["C"] / "checkpoints").glob("*.pfb"))
        ns.checkpoint_epoch = checkpoint_epoch(ns.stores["C"], ns.stores["A"], ns.users["C"].user_id)

        # The killed device comes back on the same store; the next run resumes its user stage.
        ns.logs["C2"] = root / "device-C-restarted.log"
        ns.procs["C"] = start_device(ns.stores["C"], env, ns.logs["C2"])
        ns.run2 = cli(["server", "run", "--out", "run2", "--state-dir", "run/server", "--data", str(all_dir),
                       *RUN_ARGS], env, timeout=600)  # fmt: skip
        ns.results2 = json.loads((root / "run2" / "results.json").read_text())
        ns.replies2 = recorded(root)[len(ns.replies1) :]

        # The same federation again, with one user's history one item shorter.
        ns.history_before = len(load_dataset(root / "data" / "A").users[0].profile)
        drop_one_history_item(root / "data" / "A")
        ns.history_after = len(load_dataset(root / "data" / "A").users[0].profile)
        cli(["server", "run", "--out", "run3", "--state-dir", "run/server", "--data", str(all_dir), *RUN_ARGS],
            env, timeout=600)  # fmt: skip
        ns.results3 = json.loads((root / "run3" / "results.json").read_text())
        ns.replies3 = recorded(root)[len(ns.replies1) + len(ns.replies2) :]
        ns.total_s = time.monotonic() - t0
        yield ns
    finally:
        for proc in ns.procs.values():
            kill_group(proc, signal.SIGTERM)
        cli(["server", "stop", "--out", "run"], env, check=False)


def checkpoint_epoch(store: Path, kept_bundle_store: Path, user_id: str) -> int | None:
    """The epoch recorded in the device's encrypted `oppu` checkpoint for the run's bundle (None if absent)."""
    import hashlib

    from client.device import _stage_key
    from client.store import AdapterStore

    manifest = json.loads((kept_bundle_store / "bundle" / "manifest.json").read_text())
    tag = hashlib.sha256(json.dumps(manifest["tensor_sha256"], sort_keys=True).encode()).hexdigest()[:12]
    data = AdapterStore.open(store).checkpointer(user_id, _stage_key("oppu", tag)).load()
    return None if data is None else int(torch.load(io.BytesIO(data), weights_only=True)["epoch"])


# ---- the deployment (slow) ----


@pytest.mark.slow
def test_tls_node_auth_run_sums_the_statistics_of_every_live_device(fed):
    assert "TLS, node authentication" in fed.start_output
    res = fed.results1
    assert res["users"]["devices_connected"] == 3 and res["users"]["devices_answered"] == 2
    secure, live = res["secure_aggregation"], ("A", "B")
    assert secure["released"] and secure["devices_summed"] == 2
    assert sorted(secure["nodes"], key=int) == sorted((str(fed.nodes[n]) for n in live), key=int)
    # Exact sums through real SecAgg+ over TLS; the test knows these totals from the users' data.
    queries = sum(len([q for q in fed.users[n].queries if q.gold is not None]) for n in live)
    assert secure["sums"]["history_len"] == sum(len(fed.users[n].profile) for n in live)
    assert secure["sums"]["queries"] == queries and secure["sums"]["devices"] == 2
    for method in ("zero_shot", "oppu", "proper"):
        m = res["methods"][method]
        assert secure["sums"][f"{method}.n"] == queries and 0 <= m["metrics"]["accuracy"] <= 1
        assert m["users"] == 2 and m["per_user"] == {} and m["cohorts"] == {}  # the server learns sums only
    assert res["history_len"] == {} and "only sums" in secure["tables"]


@pytest.mark.slow
def test_bytes_are_accounted_per_device(fed):
    per = fed.results1["bytes"]["per_device"]
    received: dict = {}
    for r in fed.replies1:
        key = (r["node"], r["type"])
        received[key] = received.get(key, 0) + len(base64.b64decode(r["content"]))
    for name in ("A", "B"):
        node = fed.nodes[name]
        phases = per[str(node)]
        assert phases["query_base"]["sent"] > 0 and phases["query_base"]["received"] > 0
        assert phases["query_base"]["received"] == received[(node, "query.base")]
        assert phases["train_user"]["sent"] > 10_000  # the signed bundle
        assert phases["train_user"]["received"] == received[(node, "train.user")] == 0  # "done"
        assert 0 < phases["secure_sum"]["received"] < 50_000  # keys, shares, one masked vector
        assert phases["secure_sum"]["received"] == received[(node, "train")]


def _decoded(reply: dict):
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    raw = base64.b64decode(reply["content"])
    return raw, recorddict_from_proto(ProtoRecordDict.FromString(raw))


def _protocol_violation(reply: dict, content) -> str | None:
    """What the server may receive, by message type: the base probe's answer, "done" from the user stage,
    and SecAgg+'s own records; None if the reply is one of those."""
    from flwr.app import ConfigRecord, MetricRecord
    from flwr.common import bytes_to_ndarray

    kind = reply["type"]
    if kind == "query.base":
        ok = set(content) == {"base"} and isinstance(content["base"], MetricRecord)
        return None if ok and dict(content["base"]) in ({"has-base": 0}, {"has-base": 1}) else "base probe"
    if kind == "train.user":
        return None if len(content) == 0 else "the user stage sent records"
    if kind != "train":
        return f"a reply of type {kind}"
    fitres = {"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}
    config = content.get("secaggplus_configs")
    if not isinstance(config, ConfigRecord) or not set(content) - {"secaggplus_configs"} <= fitres:
        return "SecAgg+ reply records"
    if not set(config) <= RANDOM_KEYS | NODE_LISTS:
        return f"SecAgg+ keys {sorted(config)}"
    if "masked_params" in config:
        if set(content) != {"secaggplus_configs", *fitres} or dict(content["fitres.num_examples"]) != {
            "num_examples": 1
        }:
            return "a masked-vector reply with more than the vector"
        if len(content["fitres.metrics"]) or len(content["fitres.parameters"]):
            return "metrics or arrays beside the masked vector"
        vector = bytes_to_ndarray(config["masked_params"][1])
        if (vector >= 2**16).mean() < 0.99:  # in the clear every integer is a 16-bit limb
            return "a vector that is not masked"
    return None


def _skeleton(reply: dict, content, names: dict[int, str], by_name: bool) -> tuple:
    """A reply with SecAgg+'s fresh random material reduced to its size, node ids to device names (or, to
    compare devices with one another, node-id lists to their length)."""
    records = []
    for rname, record in sorted(content.items()):
        items = []
        for key, value in sorted(record.items()):
            if key in RANDOM_KEYS:
                value = ("random", [len(v) for v in value] if isinstance(value, list) else len(value))
            elif key in NODE_LISTS:
                value = sorted(names.get(v, "?") for v in value) if by_name else len(value)
            items.append((key, repr(value)))
        records.append((rname, type(record).__name__, tuple(items)))
    return (reply["type"], reply["error"], tuple(records))


@pytest.mark.slow
def test_audit_nothing_but_the_sums_depends_on_a_users_data(fed):
    """No exemptions: every reply of the three runs is a base-probe answer, an empty "done", a fixed error,
    or SecAgg+'s own records (the vector masked); no text of any user appears; within a run every device sent
    the same (apart from SecAgg+'s random material); and run 3, where A's history lost an item, sent exactly
    what run 2 sent: only the sums the server decoded changed, by exactly that item."""
    from proper_fed.errors import ERROR_TABLE

    names = {node: name for name, node in fed.nodes.items()}
    secrets = [t for u in fed.users.values() for t in user_texts(u)]
    runs = {1: fed.replies1, 2: fed.replies2, 3: fed.replies3}
    per_device: dict = {}
    for run, replies in runs.items():
        assert replies, run
        for reply in replies:
            raw, content = _decoded(reply)
            for text in secrets:
                assert text.encode() not in raw, f"a device user's text reached the server: {text[:40]!r}"
                assert text not in (reply["error"] or "")
            if reply["error"] is not None:  # the killed device: its SuperLink answers for it, or a fixed text
                assert reply["sender"] != reply["node"] or reply["error"] in ERROR_TABLE.values(), reply
                assert run == 1 and names[reply["node"]] == "C", reply
                continue
            assert _protocol_violation(reply, content) is None, (_protocol_violation(reply, content), reply)
            key = (run, names[reply["node"]])
            per_device.setdefault(key, []).append(
                (_skeleton(reply, content, names, False), _skeleton(reply, content, names, True))
            )
    for run, devices in ((1, "AB"), (2, "ABC"), (3, "ABC")):
        shapes = {d: sorted(s for s, _ in per_device[(run, d)]) for d in devices}
        assert all(v == shapes[devices[0]] for v in shapes.values()), f"devices differ in run {run}"
    for name in "ABC":
        assert sorted(s for _, s in per_device[(2, name)]) == sorted(s for _, s in per_device[(3, name)]), (
            name
        )
    # What did change: the sums, by exactly the item A's history lost.
    assert fed.history_after == fed.history_before - 1
    before, after = fed.results2["secure_aggregation"], fed.results3["secure_aggregation"]
    assert before["nodes"] == after["nodes"] and len(after["nodes"]) == 3
    assert after["sums"]["history_len"] == before["sums"]["history_len"] - 1


@pytest.mark.slow
def test_killed_device_is_named_in_results_and_the_others_finish(fed):
    assert fed.killed, "the device finished its user stage before it could be killed"
    failed = fed.results1["failed"]
    assert set(failed) == {str(fed.nodes["C"])}
    assert "Node Unavailable" in failed[str(fed.nodes["C"])] or "no reply" in failed[str(fed.nodes["C"])]


@pytest.mark.slow
def test_restarted_device_resumes_from_its_encrypted_checkpoint(fed):
    # At the kill, the store held an encrypted epoch-1 checkpoint of the user stage for this bundle.
    assert fed.pfb_after_kill and fed.checkpoint_epoch == 1
    log = fed.logs["C2"].read_text(errors="replace")
    assert "oppu: resuming from its encrypted checkpoint in the store" in log
    res = fed.results2
    assert not res["failed"] and str(fed.nodes["C"]) in res["secure_aggregation"]["nodes"]
    assert not list((fed.stores["C"] / "checkpoints").glob("*.pfb"))  # cleared once the stage finished
    assert (fed.stores["C"] / "bundle" / "manifest.json").is_file()


@pytest.mark.slow
def test_device_answers_a_prompt_with_its_stored_adapter(fed):
    out = cli(["client", "generate", "--store", str(fed.stores["A"]), "--prompt", "hello", "--max-new-tokens",
               "4"], fed.env)  # fmt: skip
    assert out.stdout.strip()


@pytest.mark.slow
def test_unregistered_key_is_refused(fed):
    data = fed.root / "data" / "A"
    store = fed.root / "device-unregistered"
    cli(["client", "enroll", "--data", str(data), "--server-key", "run/server/signing.pub", "--superlink",
         fed.superlink, "--root-cert", "certs/ca.crt", "--store", str(store), "--no-start"], fed.env)  # fmt: skip
    proc = cli(
        ["client", "start", "--store", str(store), "--max-retries", "1"], fed.env, timeout=90, check=False
    )
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_unknown_ca_is_refused(fed):
    data = fed.root / "data" / "A"
    store = fed.root / "device-other-ca"
    cli(["client", "enroll", "--data", str(data), "--server-key", "run/server/signing.pub", "--superlink",
         fed.superlink, "--root-cert", "other-ca/ca.crt", "--store", str(store), "--no-start"], fed.env)  # fmt: skip
    cli(["server", "register-client", str(store / "node-auth" / "node_auth_key.pub")], fed.env)
    proc = cli(
        ["client", "start", "--store", str(store), "--max-retries", "1"], fed.env, timeout=90, check=False
    )
    assert proc.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stdout + proc.stderr


# ---- the same guarantees at the library level (fast) ----


def _tiny_bundle(key, scale: float = 1.0):
    from proper_fed.artifacts.bundle import build_bundle

    tensors = {
        "proper.population": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) * scale},
        "proper.group": {"e": torch.ones(4, dtype=torch.bfloat16) * scale},
    }
    return build_bundle(
        base_model_id="tiny", base_content_hash="a" * 64, adapter_config={}, stage_metrics={},
        tensors=tensors, private_key=key,
    )  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def device(tmp_path):
    from client.device import keep_bundle
    from client.store import AdapterStore
    from proper_fed.artifacts import crypto
    from proper_fed.federation.run_settings import RunSettings

    key = crypto.generate_signing_key()
    crypto.save_public_key(key.public_key(), tmp_path / "signing.pub")
    store = AdapterStore.open(tmp_path / "store", key=b"k" * 32)
    store.save_adapter("u1", {"lora_a": torch.ones(2, 2)}, {"bundle": "old"})
    keep_bundle(_tiny_bundle(key), store)
    node = {"server-public-key": str(tmp_path / "signing.pub"), "store-dir": str(store.root)}
    return SimpleNamespace(key=key, store=store, node=node, settings=RunSettings())


def test_tampered_bundle_is_refused_and_nothing_on_the_device_is_overwritten(device):
    from client.device import receive_bundle
    from proper_fed.artifacts.bundle import bundle_to_records
    from proper_fed.errors import BundleError

    before = _snapshot(device.store.root)
    arrays, config = bundle_to_records(_tiny_bundle(device.key, scale=2.0))
    arrays = {k: v.copy() for k, v in arrays.items()}
    arrays["proper.population/w"][0, 0] += 1.0  # one number changed in transit
    with pytest.raises(BundleError, match="proper.population.*modified"):
        receive_bundle(arrays, config, device.settings, device.node)
    assert _snapshot(device.store.root) == before


def test_bundle_signed_by_another_key_is_refused(device):
    from client.device import receive_bundle
    from proper_fed.artifacts import crypto
    from proper_fed.artifacts.bundle import bundle_to_records
    from proper_fed.errors import BundleError

    before = _snapshot(device.store.root)
    arrays, config = bundle_to_records(_tiny_bundle(crypto.generate_signing_key()))
    with pytest.raises(BundleError, match="key"):
        receive_bundle(arrays, config, device.settings, device.node)
    assert _snapshot(device.store.root) == before


def test_kept_bundle_verifies_from_disk(device):
    from proper_fed.artifacts import crypto
    from proper_fed.artifacts.bundle import load_bundle, verify_bundle

    verify_bundle(
        load_bundle(device.store.root / "bundle"), crypto.load_public_key(device.node["server-public-key"])
    )


def test_interrupted_user_stage_resumes_bit_identically_from_its_encrypted_checkpoint(
    tiny_backbone, tmp_path
):
    from model_helpers import fresh_model, planted_groups

    from client.store import AdapterStore
    from proper_fed.config import TrainConfig
    from proper_fed.train.stages import train_user

    cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=4, max_length=32, progress=False)
    examples = planted_groups(n_users=1, per_user=8)
    whole = fresh_model(tiny_backbone)
    train_user(whole, examples, cfg)
    expected = whole.scope_state_dict("user")

    ck = AdapterStore.open(tmp_path / "store", key=b"k" * 32).checkpointer("user0", "proper-t")
    first = fresh_model(tiny_backbone)
    train_user(
        first, examples, dataclasses.replace(cfg, epochs=1), checkpointer=ck
    )  # ... then the device dies
    assert ck.path.is_file() and b"lora" not in ck.path.read_bytes()  # encrypted at rest
    again = fresh_model(tiny_backbone)  # a new process: fresh adapters, same store
    result = train_user(again, examples, cfg, checkpointer=ck)
    assert result.resumed_from_epoch == 1 and len(result.epoch_losses) == 2
    resumed = again.scope_state_dict("user")
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


def test_enrollment_pins_the_server_key_and_refuses_another(tmp_path):
    from client.enroll import enroll, load_enrollment
    from proper_fed.artifacts import crypto
    from proper_fed.artifacts.certs import write_certs
    from proper_fed.data.synthetic import SyntheticConfig, generate_synthetic, write_synthetic
    from proper_fed.errors import ConfigError

    data = write_synthetic(generate_synthetic(SyntheticConfig(users=4, groups=2)), tmp_path / "data")
    certs = write_certs(tmp_path / "certs")
    for name in ("one", "two"):
        crypto.save_public_key(crypto.generate_signing_key().public_key(), tmp_path / f"{name}.pub")
    args = dict(superlink="127.0.0.1:9093", root_cert=certs.ca_cert, user_id="u001")
    enrollment, created = enroll(tmp_path / "store", data, tmp_path / "one.pub", **args)
    assert created and load_enrollment(tmp_path / "store") == enrollment
    assert Path(enrollment.server_key).read_bytes() == (tmp_path / "one.pub").read_bytes()
    assert "user-id='u001'" in enrollment.node_config()
    again, created = enroll(tmp_path / "store", data, tmp_path / "one.pub", **args)
    assert not created and again.public_key == enrollment.public_key  # the registered key is kept
    with pytest.raises(ConfigError, match="repin"):
        enroll(tmp_path / "store", data, tmp_path / "two.pub", **args)
    with pytest.raises(ConfigError, match="matching users"):
        enroll(tmp_path / "s2", data, tmp_path / "one.pub", superlink="x:1", root_cert=certs.ca_cert)


def test_superlink_command_and_flwr_connection(tmp_path):
    import tomllib

    from proper_fed.artifacts.certs import write_certs
    from proper_fed.errors import ConfigError
    from server.connection import write_connection
    from server.superlink import SuperLinkSpec, TlsFiles

    write_certs(tmp_path / "certs")
    spec = SuperLinkSpec("127.0.0.1", 9200, TlsFiles.from_dir(tmp_path / "certs"), True, tmp_path / "db")
    cmd = spec.command()
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1].endswith("ca.crt")
    with pytest.raises(ConfigError, match="needs TLS"):
        SuperLinkSpec(tls=None, node_auth=True)
    with pytest.raises(ConfigError, match="certs create"):
        TlsFiles.from_dir(tmp_path / "nothing")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n[superlink.mine]\naddress = "x:1"\n'
    )
    write_connection("proper-fed", spec.address, spec.tls.ca_cert, home=tmp_path / "home")
    conf = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"]
    assert conf["default"] == "mine" and conf["mine"]["address"] == "x:1"  # nothing else changed
    assert conf["proper-fed"] == {"address": "127.0.0.1:9200", "root-certificates": str(spec.tls.ca_cert)}
