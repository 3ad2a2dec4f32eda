"""Federated stages 1-2 (server-data = federated): devices train the population and group stages on their own
history, the server learns only the SecAgg+ sum of their weighted updates and applies FedAvg; the user's own
embedding row never leaves the device. In process: the real ServerApp phase and ClientApp handlers, Flower's
real SecAgg+ (`LoopbackGrid` from test_secure_sum), the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from model_helpers import batch_for, fresh_model, planted_groups
from test_secure_sum import LoopbackGrid, _task_identity  # noqa: F401 (the fixture)

from proper_fed.errors import ConfigError
from proper_fed.federation.run_settings import RunSettings
from proper_fed.federation.shared_vector import RESOLUTION, SharedLayout, fedavg_direct
from proper_fed.methods import PROPER
from proper_fed.model.proper_model import ProperModel
from proper_fed.train import stages
from proper_fed.train.batching import target_loss
from proper_fed.train.federated import (
    FEDERATED_STAGES,
    USER_TABLE,
    initial_own_row,
    load_shared,
    local_config,
    shared_tensors,
    train_local_stage,
)

RUN = {
    "server-data": "federated",
    "methods": "zero_shot,proper",
    "min-nodes": 3,
    "min-devices": 3,
    "federated-population-rounds": 1,
    "federated-group-rounds": 1,
    "federated-local-epochs": 1,
    "device-quantization": "none",
    "backbone.model": "tiny",
    "backbone.device": "cpu",
    "backbone.dtype": "fp32",
    "adapters.population-rank": 4,
    "adapters.group-rank": 2,
    "adapters.num-experts": 3,
    "adapters.user-embedding-dim": 8,
    "population.lr": 1e-2,
    "population.progress": False,
    "group.lr": 1e-2,
    "group.progress": False,
    "group.unknown-user-prob": 0.0,
}


def _examples_of(users: int, per_user: int):
    by_user: dict[str, list] = {}
    for ex in planted_groups(users, per_user):
        by_user.setdefault(ex.user_id, []).append(ex)
    return list(by_user.values())


def _federation(monkeypatch, n: int, run: dict | None = None, per_user: int = 6, opt_out=()):
    """`n` devices whose histories are planted-group users (partition i = user i), and the server's side."""
    from client import federated_stages as device_side
    from proper_fed.artifacts.base_store import base_hash
    from proper_fed.model.backbone import model_folder

    run = {**RUN, **(run or {})}
    histories = _examples_of(n, per_user)
    monkeypatch.setattr(
        device_side,
        "device_examples",
        lambda settings, node: (
            histories[int(node["partition-id"])][0].user_id,
            histories[int(node["partition-id"])],
        ),
    )
    contexts = {}
    for i in range(n):
        node_config = {"partition-id": i, **({"federated-training": "false"} if i in opt_out else {})}
        contexts[101 + i] = Context(
            run_id=1, node_id=101 + i, node_config=node_config, state=RecordDict(), run_config=run
        )
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run)
    settings = RunSettings.from_run_config(run)
    return settings, contexts, server, histories, (base_hash(model_folder("tiny")), "tiny")


def _run(settings, contexts, server, base, backbone, grid=None):
    from server.federated_stages import train_federated_stages

    grid = grid or LoopbackGrid(contexts)
    models = train_federated_stages(grid, server, settings, sorted(contexts), backbone, base)
    return models[PROPER], grid


def _device_backbone(settings):
    from client.device import load_device_backbone
    from proper_fed.model.backbone import model_folder

    return load_device_backbone(model_folder("tiny"), settings)


def test_one_round_equals_fedavg_of_the_local_updates_computed_directly(monkeypatch, tiny_backbone):
    settings, contexts, server, histories, base = _federation(monkeypatch, 3, per_user=5)
    histories[2] = histories[2][:2]  # unequal histories: FedAvg weights 5, 5, 2
    got, _ = _run(settings, contexts, server, base, tiny_backbone)

    init = ProperModel(tiny_backbone, settings.proper.adapters, seed=settings.proper.population.seed)
    start = {s: shared_tensors(init, s) for s in FEDERATED_STAGES}
    init.remove()
    device = _device_backbone(settings)
    want = {}
    for stage in FEDERATED_STAGES:
        updates = []
        for user in histories:
            model = ProperModel(device, settings.proper.adapters, seed=settings.proper.population.seed)
            cfg = local_config(getattr(settings.proper, stage), stage, 1, 0)
            # stage 2 starts from the population the federation released (FedAvg's within RESOLUTION / 2)
            pop = got.population if stage == "group" else None
            up = train_local_stage(model, stage, user[0].user_id, user, cfg, start[stage], pop)
            model.remove()
            updates.append((up.shared, up.examples))
        want[stage] = fedavg_direct(start[stage], updates)
        moved = max((want[stage][k] - start[stage][k]).abs().max().item() for k in start[stage])
        assert moved > 1e-3, f"{stage}: the round must move the shared tensors"
    for stage, tensors in (("population", got.population), ("group", got.group)):
        assert set(tensors) == set(want[stage])
        for k in tensors:
            assert (tensors[k].double() - want[stage][k].double()).abs().max() <= RESOLUTION / 2 + 1e-7, k
    assert got.group[USER_TABLE].shape == (1, settings.proper.adapters.user_embedding_dim)
    assert got.metrics["group.devices_last_round"] == 3 and got.metrics["group.examples_last_round"] == 12


def test_a_device_that_drops_out_of_a_round_is_left_out_of_fedavg(monkeypatch, tiny_backbone):
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from server.federated_stages import federated_round

    settings, contexts, server, histories, base = _federation(monkeypatch, 4, per_user=3)
    gone = 103
    grid = LoopbackGrid(
        contexts, drop=lambda node, stage: node == gone and stage == Stage.COLLECT_MASKED_VECTORS
    )
    init = ProperModel(tiny_backbone, settings.proper.adapters, seed=settings.proper.population.seed)
    start = {s: shared_tensors(init, s) for s in FEDERATED_STAGES}
    init.remove()
    layouts = {s: SharedLayout.of(t) for s, t in start.items()}
    got, avg = federated_round(
        grid, server, sorted(contexts), "population", 0, start, layouts, base, settings
    )
    assert avg.devices == 3 and avg.weight == 9
    device, updates = _device_backbone(settings), []
    for node in sorted(contexts):
        if node == gone:
            continue
        user = histories[node - 101]
        model = ProperModel(device, settings.proper.adapters, seed=settings.proper.population.seed)
        cfg = local_config(settings.proper.population, "population", 1, 0)
        updates.append(
            (
                train_local_stage(
                    model, "population", user[0].user_id, user, cfg, start["population"]
                ).shared,
                3,
            )
        )
        model.remove()
    want = fedavg_direct(start["population"], updates)
    for k in want:
        assert (got[k].double() - want[k].double()).abs().max() <= RESOLUTION / 2 + 1e-7, k


def test_user_embedding_rows_never_leave_the_device(monkeypatch, tiny_backbone):
    from client import federated_stages as device_side

    # two local steps: the experts' B start at zero, so routing (and the own row) get no gradient in the first
    settings, contexts, server, _, base = _federation(
        monkeypatch, 3, {"federated-local-epochs": 2}, per_user=4
    )
    sent = []  # every update a device encoded, before masking
    real = device_side.encode_update

    def spy(delta, examples, layout):
        sent.append((dict(delta), layout))
        return real(delta, examples, layout)

    monkeypatch.setattr(device_side, "encode_update", spy)
    _, grid = _run(settings, contexts, server, base, tiny_backbone)
    dim = settings.proper.adapters.user_embedding_dim
    own_rows = {n: c.state["proper-fed.own-row"]["row"].numpy() for n, c in contexts.items()}
    assert len(sent) == 6 and all(r.shape == (dim,) for r in own_rows.values())
    for delta, layout in sent:
        assert all(
            USER_TABLE not in k or t.shape == (1, dim) for k, t in delta.items()
        )  # the unknown row only
        assert layout.values == sum(t.numel() for t in delta.values())
    # What reached the server: protocol records and masked vectors of exactly the layout's length.
    group_layout = sent[-1][1]
    secagg = [r for r in grid.replies if RECORD_KEY_CONFIGS in r.content]
    assert len(secagg) == len(grid.replies) - 3  # the rest: the three consent answers
    masked = [r for r in secagg if Key.MASKED_PARAMETERS in r.content[RECORD_KEY_CONFIGS]]
    assert len(masked) == 6 and not [r for r in grid.replies if r.has_error()]
    for reply in masked[3:]:  # the group round
        vector = bytes_to_ndarray(reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1])
        assert vector.shape == (group_layout.length,)
        assert len(reply.content["fitres.parameters"]) == 0 and len(reply.content["fitres.metrics"]) == 0
        assert dict(reply.content["fitres.num_examples"]) == {"num_examples": 1}
    # The rows did train on the device, away from where they started; stage 3's embedding fit starts there.
    for node in contexts:
        user = f"user{node - 101}"
        start = initial_own_row(user, dim, settings.proper.group.seed).numpy()
        assert abs(own_rows[node] - start).max() > 1e-4
        assert (device_side.federated_own_row(contexts[node]).numpy() == own_rows[node]).all()


def _loss(model, examples, mode, rows=None):
    stages.serving_mode(model, mode)
    batch = batch_for(model, examples)
    user_rows = model.user_rows([e.user_id for e in examples]) if rows else None
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], user_rows=user_rows, use_cache=False)
    return target_loss(out.logits, batch["labels"]).item()


def test_two_federated_rounds_of_stages_1_and_2_lower_the_loss_on_planted_groups(monkeypatch, tiny_backbone):
    run = {"federated-population-rounds": 2, "federated-group-rounds": 2, "federated-local-epochs": 3}
    settings, contexts, server, histories, base = _federation(monkeypatch, 4, run, per_user=8)
    model = fresh_model(tiny_backbone, settings.proper.adapters, seed=settings.proper.population.seed)
    everyone = [ex for h in histories for ex in h]
    try:
        base_loss = _loss(model, everyone, "base")
        got, _ = _run(settings, contexts, server, base, tiny_backbone)
        load_shared(model, "population", got.population)
        pop_loss = _loss(model, everyone, "population")
        # the group model as each device serves it: the shared experts and router, the device's own row
        group_losses = []
        for node, ctx in contexts.items():
            row = torch.from_numpy(ctx.state["proper-fed.own-row"]["row"].numpy().copy())
            user = histories[node - 101]
            load_shared(model, "group", got.group, user[0].user_id, row)
            group_losses.append(_loss(model, user, "group", rows=True))
        group_loss = sum(group_losses) / len(group_losses)
        load_shared(model, "group", got.group)  # every user through the unknown-user row instead
        unknown_loss = _loss(model, everyone, "group", rows=True)
    finally:
        model.remove()
    assert base_loss > pop_loss > group_loss, (base_loss, pop_loss, group_loss)
    assert group_loss < unknown_loss, (group_loss, unknown_loss)  # the devices' own rows route them better


def test_fewer_consenting_devices_than_min_devices_refuse_to_start(monkeypatch, tiny_backbone):
    settings, contexts, server, _, base = _federation(monkeypatch, 3, opt_out={1})
    grid = LoopbackGrid(contexts)
    with pytest.raises(ConfigError, match=r"only 2 of 3 connected device\(s\) consent.*min-devices=3"):
        _run(settings, contexts, server, base, tiny_backbone, grid)
    assert grid.stages == ["", "", ""]  # the consent queries; no SecAgg+ message: nothing trained or sent
    assert all("proper-fed.own-row" not in c.state for c in contexts.values())


def test_an_enrolled_device_can_opt_out_of_federated_stages():
    from client.enroll import Enrollment
    from client.federated_stages import consents

    keys = dict(store="/s", data="/d", user_id="u", superlink="h:1", private_key="k", public_key="k.pub")
    yes = Enrollment(**keys, server_key="/p", insecure=True)
    no = dataclasses.replace(yes, federated_training=False)
    assert "federated-training" not in yes.node_config()
    assert "federated-training='false'" in no.node_config()
    assert (
        consents({}) and consents({"federated-training": "true"}) and consents({"federated-training": True})
    )
    assert not consents({"federated-training": "false"}) and not consents({"federated-training": False})


def test_the_report_says_who_trained_stages_1_and_2():
    from simulations.report import _stages_1_2

    users = {"server": 20, "devices": 20}
    assert _stages_1_2({"users": users, "server_data": "central"}) == "20 server users (stages 1-2)"
    assert "federated on the consenting devices" in _stages_1_2({"users": users, "server_data": "federated"})
    assert _stages_1_2({"users": users}) == "20 server users (stages 1-2)"  # results written before the key


def test_federated_settings_are_validated():
    with pytest.raises(ConfigError, match="server-data"):
        RunSettings.from_run_config({"server-data": "elsewhere"})
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunSettings.from_run_config({"server-data": "federated", "secure-aggregation": False, "min-nodes": 1})
    with pytest.raises(ConfigError, match="population_matched"):
        RunSettings.from_run_config({"server-data": "federated", "methods": "population_matched"})
    with pytest.raises(ConfigError, match="federated-group-rounds"):
        RunSettings.from_run_config({"federated-group-rounds": 0})
    assert dataclasses.replace(RunSettings(), server_data="federated").server_data == "federated"


def test_the_server_phase_trains_federated_and_ships_the_result_in_a_signed_bundle(
    monkeypatch, tiny_backbone, tmp_path
):
    """The ServerApp's phase 1 with server-data = federated: the devices' rounds, each device's bytes of
    them counted apart from the later secure sum, and a bundle a device loads as from central stages."""
    from client.device import server_model
    from server.audit import AuditedGrid
    from server.progress import Progress
    from server.server_app import server_stages, sign_bundle

    settings, contexts, server, _, _ = _federation(monkeypatch, 3, {"out": str(tmp_path / "run")}, per_user=3)
    grid = AuditedGrid(LoopbackGrid(contexts), "", accounted=("train",))
    models, nodes, moved = server_stages(grid, server, settings, Progress(settings.out))
    assert list(models) == [PROPER] and nodes == sorted(contexts)
    assert set(moved) == set(contexts) and all(c["sent"] > 0 and c["received"] > 0 for c in moved.values())
    assert dict(grid.bytes) == {}  # the statistics' secure sum starts its own count
    bundle = sign_bundle(settings, models)
    device = server_model(_device_backbone(settings), bundle, PROPER)
    try:
        for scope, shipped in (("population", models[PROPER].population), ("group", models[PROPER].group)):
            for name, t in shipped.items():
                assert torch.equal(device.scope_parameters(scope)[name].detach().cpu(), t), name
    finally:
        device.remove()
