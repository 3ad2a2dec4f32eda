"""The Flower ServerApp: phase 1 trains the population and group stages on the server's users, phase 2
builds and signs the bundle, phase 3 sends it to the devices (with the base only where it is missing),
collects metrics only, and writes the results file."""

from __future__ import annotations

import base64
import json
import logging
import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from proper_fed.backbone import model_folder
from proper_fed.base_store import base_hash, load_base_state_dict, side_files
from proper_fed.bundle import build_bundle
from proper_fed.data.baselines import has_label_baselines, majority_label
from proper_fed.run_settings import RunSettings, load_split
from server.progress import Progress
from server.results import DeviceReply, write_results
from server.signing import load_or_create_signing_key
from server.stage_process import train_server_stages_in_child
from server.wire import base_content, bundle_content, make_message, payload_bytes

log = logging.getLogger(__name__)
app = ServerApp()
# The environment is read here, at the app's entry point, and nowhere below it.
RECORD_REPLIES = os.environ.get("PROPER_FED_RECORD_REPLIES", "")


def record_reply(msg: Message, path: str = RECORD_REPLIES) -> None:
    """Audit hook (used by the deployment tests): with $PROPER_FED_RECORD_REPLIES=<file>, append every reply
    that reached the server as one JSON line: sender, type, error text, record types, exact content bytes."""
    if not path:
        return
    content = msg.content if msg.has_content() else None
    entry = {
        "node": msg.metadata.src_node_id,
        "type": msg.metadata.message_type,
        "error": msg.error.reason if msg.has_error() else None,
        "records": {k: type(v).__name__ for k, v in content.items()} if content else {},
        "content": base64.b64encode(recorddict_to_proto(content).SerializeToString()).decode()
        if content
        else "",
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def device_of(reply: Message, sent: list[Message]) -> int:
    """The device a reply is about. For a device that went offline the SuperLink itself answers (its own node
    id as the sender, error "Node Unavailable"), so match the reply to the message it answers."""
    for m in sent:
        if m.metadata.message_id == reply.metadata.reply_to_message_id:
            return m.metadata.dst_node_id
    return reply.metadata.src_node_id


def wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> list[int]:
    start, nodes = time.monotonic(), []
    while time.monotonic() - start < timeout_s:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        time.sleep(1.0)
    log.warning(
        "only %d of %d devices connected within %.0f s; continuing with them", len(nodes), wanted, timeout_s
    )
    return nodes


def collect(grid: Grid, messages: list, timeout_s: float, progress: Progress):
    """Push, then pull replies as they come, logging progress and the time left (send_and_receive is silent).
    Gives up on the devices still silent once `timeout_s` passes without any reply: a deadline for the whole
    phase would fail the last devices of a large simulation, whose virtual devices take turns on few cores."""
    ids = set(grid.push_messages(messages))
    start, total, done = time.monotonic(), len(ids), 0
    last = start
    while ids and time.monotonic() - last < timeout_s:
        for msg in grid.pull_messages(ids):
            ids.discard(msg.metadata.reply_to_message_id)
            last = time.monotonic()
            done += 1
            elapsed = time.monotonic() - start
            left = elapsed / done * (total - done)
            node = device_of(msg, messages)
            status = "failed" if msg.has_error() else "done"
            progress(
                f"devices done {done}/{total} (node {node} {status}), {elapsed:.0f} s elapsed, "
                f"about {left:.0f} s left",
                done=done,
                total=total,
                node=str(node),
            )
            yield msg
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    t0 = time.perf_counter()
    progress = Progress(settings.out)
    progress(
        "phase 1/3: server stages (population, group" + "".join(f", {v}" for v in settings.variants) + ")"
    )
    models = train_server_stages_in_child(dict(context.run_config), progress.t0)
    split = load_split(settings)
    t_server = time.perf_counter() - t0

    progress("phase 2/3: signing the bundle")
    folder = model_folder(settings.proper.backbone.model)
    digest = base_hash(folder)
    key = load_or_create_signing_key(settings.key_path, settings.public_key_path)
    tensors = {
        f"{name}.{scope}": getattr(m, scope)
        for name, m in models.items()
        for scope in ("population", "group")
    }
    bundle = build_bundle(
        base_model_id=settings.proper.backbone.model,
        base_content_hash=digest,
        adapter_config={
            name: {"adapters": m.adapters, "user_rows": len(m.group_meta["user_index"]) + 1}
            for name, m in models.items()
        },
        stage_metrics={name: m.metrics for name, m in models.items()},
        tensors=tensors,
        private_key=key,
    )
    run_info: dict = {"task": split.task.name}
    if has_label_baselines(split.task):  # LaMP-1: labels, but no labelled history
        run_info["majority-label"] = majority_label(split.task, split.server_users)

    nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_s)
    replies: dict[int, DeviceReply] = {n: DeviceReply(n) for n in nodes}
    probe = RecordDict({"base": ConfigRecord({"hash": digest, "model": settings.proper.backbone.model})})
    probes = [make_message(probe, n, "query.base", "base") for n in nodes]
    for msg in grid.send_and_receive(probes, timeout=settings.node_wait_s):
        record_reply(msg)
        r = replies[device_of(msg, probes)]
        r.account("query_base", payload_bytes(probe), payload_bytes(msg.content) if msg.has_content() else 0)
        r.has_base = msg.has_content() and bool(msg.content["base"]["has-base"])

    t1 = time.perf_counter()
    shared = bundle_content(bundle, run_info)
    base = None
    messages = []
    for n in nodes:
        content = RecordDict(dict(shared.items()))
        if not replies[n].has_base:
            base = base or base_content(load_base_state_dict(folder), side_files(folder), digest)
            for k, v in base.items():
                content[k] = v
        replies[n].sent_train = payload_bytes(content)
        messages.append(make_message(content, n, "train.user", "user"))
    progress(f"phase 3/3: personalizing on {len(messages)} devices")
    for msg in collect(grid, messages, settings.reply_timeout_s, progress):
        record_reply(msg)
        replies[device_of(msg, messages)].take_reply(msg)
    timings = {
        "server_stages_s": t_server,
        "device_phase_s": time.perf_counter() - t1,
        "total_s": time.perf_counter() - t0,
    }
    path = write_results(settings, split, models, replies, timings, digest)
    progress(f"results written to {path}")
