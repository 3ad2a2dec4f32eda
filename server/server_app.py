"""The Flower ServerApp: phase 1 trains the population and group stages on the server's users, phase 2
builds and signs the bundle, phase 3 sends it to the devices (with the base only where it is missing) and
collects their answers: "done", or an error with a fixed text. With secure aggregation (the default) a SecAgg+
round then sums the devices' statistics, and the server learns only those sums (without, each device's
statistics come back in the clear). It writes the results file."""

from __future__ import annotations

import logging
import os
import time

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from proper_fed.artifacts.base_store import base_hash, load_base_state_dict, side_files
from proper_fed.artifacts.bundle import Bundle, build_bundle
from proper_fed.data import FederationSplit
from proper_fed.data.baselines import has_label_baselines, label_ranking
from proper_fed.federation.reply_schema import run_reply_schema
from proper_fed.federation.run_settings import FEDERATED, RunSettings, load_split
from proper_fed.federation.secure_sum import sum_plan
from proper_fed.federation.wire import (
    QUERY_BASE,
    RUN_LABEL_RANKING,
    RUN_TASK,
    SECURE_SUM_TYPE,
    SHIPPED_SCOPES,
    TRAIN_USER,
    tensor_group,
    variant_entry,
)
from proper_fed.model.backbone import cache_root, load_backbone, model_folder, use_cache_dir
from server.audit import AuditedGrid
from server.federated_stages import train_federated_stages
from server.progress import Progress
from server.results import DeviceReply, write_results
from server.secure_metrics import SecureRelease, check_enough_devices, secure_sums
from server.server_stages import ServerModel
from server.signing import load_or_create_signing_key
from server.stage_process import train_server_stages_in_child
from server.wire import (
    base_content,
    base_probe,
    bundle_content,
    has_base,
    make_message,
    payload_bytes,
    with_base,
)

log = logging.getLogger(__name__)
app = ServerApp()
# The environment is read here, at the app's entry point, and nowhere below it.
RECORD_REPLIES = os.environ.get("PROPER_FED_RECORD_REPLIES", "")
use_cache_dir(cache_root(os.environ))


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


def collect(grid: AuditedGrid, messages: list, timeout_s: float, progress: Progress):
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
            node = grid.device_of(msg)
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
def main(flower_grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    # Every reply of every phase passes this grid: the audit file and the secure sum's bytes per device.
    grid = AuditedGrid(flower_grid, RECORD_REPLIES, accounted=(SECURE_SUM_TYPE,))
    t0 = time.perf_counter()
    progress = Progress(settings.out)
    models, nodes, federated_bytes = server_stages(grid, context, settings, progress)
    split = load_split(settings)
    t_server = time.perf_counter() - t0

    progress("phase 2/3: signing the bundle")
    bundle = sign_bundle(settings, models)
    nodes = nodes or connected_devices(grid, settings)
    replies = probe_bases(grid, nodes, bundle, settings.node_wait_s)
    for node, counted in federated_bytes.items():
        if node in replies:
            replies[node].account("federated_stages", counted["sent"], counted["received"])

    t1 = time.perf_counter()
    messages = train_messages(replies, bundle, run_info(split))
    progress(f"phase 3/3: personalizing on {len(messages)} devices")
    for msg in collect(grid, messages, settings.reply_timeout_s, progress):
        replies[grid.device_of(msg)].take_reply(msg)
    sums = secure_sum_phase(grid, context, settings, split, replies, progress)
    timings = {
        "server_stages_s": t_server,
        "device_phase_s": time.perf_counter() - t1,
        "total_s": time.perf_counter() - t0,
    }
    path = write_results(settings, split, models, replies, timings, bundle.base_content_hash, sums)
    progress(f"results written to {path}")


def connected_devices(grid: Grid, settings: RunSettings) -> list[int]:
    """The devices of the run, once min-nodes connected or node-wait-s passed; with secure aggregation,
    refused (ConfigError) below min-devices."""
    nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_s)
    if settings.secure_aggregation:
        check_enough_devices(nodes, settings.min_devices)
    return nodes


def server_stages(
    grid: AuditedGrid, context: Context, settings: RunSettings, progress: Progress
) -> tuple[dict[str, ServerModel], list[int], dict[int, dict[str, int]]]:
    """Phase 1: the server models; the devices already connected (federated: [] for central) and the bytes
    each device's federated rounds moved ({} for central: the server trains on its own users' data)."""
    if settings.server_data != FEDERATED:
        variants = "".join(f", {v}" for v in settings.variants)
        progress(f"phase 1/3: server stages (population, group{variants})")
        return train_server_stages_in_child(dict(context.run_config), progress.t0), [], {}
    nodes = connected_devices(grid, settings)
    progress("phase 1/3: federated stages (population, group) on the consenting devices, under SecAgg+")
    model_id = settings.proper.backbone.model
    backbone = load_backbone(settings.proper.backbone)  # only to initialise the shared tensors
    base = (base_hash(model_folder(model_id)), model_id)
    models = train_federated_stages(grid, context, settings, nodes, backbone, base, progress)
    moved = {n: dict(c) for n, c in grid.bytes.items()}
    grid.bytes.clear()  # the secure sum of the statistics counts its own
    return models, nodes, moved


def secure_sum_phase(
    grid: AuditedGrid,
    context: Context,
    settings: RunSettings,
    split: FederationSplit,
    replies: dict[int, DeviceReply],
    progress: Progress,
) -> SecureRelease | None:
    """With secure aggregation: SecAgg+ over the devices that finished the user stage; what the server
    learned (the sums, or why nothing was released). None without secure aggregation."""
    if not settings.secure_aggregation:
        return None
    ready = [n for n, r in replies.items() if r.ready]
    progress(
        f"secure sum of the statistics of {len(ready)} devices (SecAgg+, at least {settings.min_devices})"
    )
    plan = sum_plan(run_reply_schema(settings, split.task), settings)
    sums = secure_sums(grid, context, ready, plan, settings.node_wait_s)
    for node, counted in grid.bytes.items():
        if node in replies:
            replies[node].account("secure_sum", counted["sent"], counted["received"])
    return SecureRelease(plan, sums, ready)


def sign_bundle(settings: RunSettings, models: dict[str, ServerModel]) -> Bundle:
    """Every server model's population and group stages in one bundle, signed with the server's key."""
    model_id = settings.proper.backbone.model
    return build_bundle(
        base_model_id=model_id,
        base_content_hash=base_hash(model_folder(model_id)),
        adapter_config={name: variant_entry(m.adapters, m.user_rows) for name, m in models.items()},
        stage_metrics={name: m.metrics for name, m in models.items()},
        tensors={
            tensor_group(name, scope): getattr(m, scope)
            for name, m in models.items()
            for scope in SHIPPED_SCOPES
            if getattr(m, scope)  # a population-only model has no group stage
        },
        private_key=load_or_create_signing_key(settings.key_path, settings.public_key_path),
    )


def run_info(split: FederationSplit) -> dict[str, str | list[str]]:
    """The run's public facts every device gets: the task, and for tasks with labelled history (not LaMP-1)
    the server users' label ranking, from which the devices' label baselines are computed."""
    info: dict[str, str | list[str]] = {RUN_TASK: split.task.name}
    if has_label_baselines(split.task):
        info[RUN_LABEL_RANKING] = label_ranking(split.task, split.server_users)
    return info


def probe_bases(
    grid: AuditedGrid, nodes: list[int], bundle: Bundle, timeout_s: float
) -> dict[int, DeviceReply]:
    """Ask every device whether it holds the bundle's base; one DeviceReply per node, with the answer."""
    replies = {n: DeviceReply(n) for n in nodes}
    probe = base_probe(bundle.base_content_hash, bundle.base_model_id)
    probes = [make_message(probe, n, QUERY_BASE) for n in nodes]
    for msg in grid.send_and_receive(probes, timeout=timeout_s):
        r = replies[grid.device_of(msg)]
        r.account("query_base", payload_bytes(probe), payload_bytes(msg.content) if msg.has_content() else 0)
        r.has_base = has_base(msg)
    return replies


def train_messages(
    replies: dict[int, DeviceReply], bundle: Bundle, info: dict[str, str | list[str]]
) -> list[Message]:
    """One train.user message per device: the bundle, plus the base (loaded once) where it is missing."""
    shared, base = bundle_content(bundle, info), None
    folder = model_folder(bundle.base_model_id)
    messages = []
    for n, reply in replies.items():
        if not reply.has_base and base is None:
            base = base_content(load_base_state_dict(folder), side_files(folder), bundle.base_content_hash)
        content = with_base(shared, None if reply.has_base else base)
        reply.sent_train = payload_bytes(content)
        messages.append(make_message(content, n, TRAIN_USER))
    return messages
