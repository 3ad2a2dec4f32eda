"""Devices are isolated from each other inside one process: a user's adapter does not depend on which users a
process personalized before (shared cached 4-bit backbone, global RNG, leftover adapter wrappers)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow

RUN_CONFIG = {
    "backbone.model": "tiny",
    "backbone.dtype": "fp32",
    "device-quantization": "nf4",
    "methods": "proper",
    "server-fraction": 0.75,
    "synthetic.users": 12,
    "synthetic.groups": 2,
    "adapters.num-experts": 2,
    "adapters.user-embedding-dim": 8,
    "user.epochs": 2,
    "user.batch-size": 2,
    "user.max-length": 48,
    "user.lr": 5e-3,
}

# The same code runs here (several users in a row) and in a fresh interpreter (one user alone).
PERSONALIZE = textwrap.dedent(
    """
    import torch
    from client.device import DeviceUser, load_device_backbone, personalize_device
    from client.store import AdapterStore
    from proper_fed.artifacts import crypto
    from proper_fed.model.backbone import model_folder
    from proper_fed.artifacts.base_store import base_hash
    from proper_fed.artifacts.bundle import build_bundle
    from proper_fed.config import AdapterConfig
    from proper_fed.model.proper_model import ProperModel
    from proper_fed.federation.run_settings import RunSettings, load_split
    from proper_fed.federation.wire import SHIPPED_SCOPES, tensor_group, variant_entry


    def personalize(run_config, store_dir, user_ids):
        settings = RunSettings.from_run_config(run_config)
        split = load_split(settings)
        folder = model_folder("tiny")
        backbone = load_device_backbone(folder, settings)
        # A deterministic "server" bundle: the stages at their seeded initialisation.
        torch.manual_seed(0)
        server = ProperModel(backbone, settings.proper.adapters, seed=0)
        server.set_users([u.user_id for u in split.server_users])
        tensors = {tensor_group("proper", s): server.scope_state_dict(s) for s in SHIPPED_SCOPES}
        info = variant_entry(server.scope_meta("group")["adapters"], len(server.user_index) + 1)
        server.remove()
        bundle = build_bundle(base_model_id="tiny", base_content_hash=base_hash(folder),
                              adapter_config={"proper": info}, stage_metrics={}, tensors=tensors,
                              private_key=crypto.generate_signing_key())
        store = AdapterStore.open(store_dir, key=b"k" * 32)
        users = {u.user_id: u for u in split.device_users}
        for uid in user_ids:
            personalize_device(DeviceUser(split.task, users[uid]), bundle, backbone, settings, store, None)
        return store, [u.user_id for u in split.device_users]
    """
)


def test_adapter_is_bit_identical_alone_or_after_other_users(tmp_path):
    namespace: dict = {}
    exec(PERSONALIZE, namespace)  # noqa: S102 - our own code, shared verbatim with the fresh interpreter
    # Which users exist: the device users of the synthetic split.
    _, device_ids = namespace["personalize"](RUN_CONFIG, tmp_path / "probe", [])
    assert len(device_ids) >= 3
    target, others = device_ids[-1], device_ids[:-1]

    shared, _ = namespace["personalize"](RUN_CONFIG, tmp_path / "shared", [*others, target])

    script = PERSONALIZE + textwrap.dedent(
        f"""
        torch.set_num_threads({torch.get_num_threads()})
        personalize({json.dumps(RUN_CONFIG)}, {str(tmp_path / "alone")!r}, [{target!r}])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from client.store import AdapterStore

    alone = AdapterStore.open(tmp_path / "alone", key=b"k" * 32).load_adapter(target)
    after = shared.load_adapter(target)
    assert alone.meta == after.meta
    assert set(alone.tensors) == set(after.tensors) and alone.tensors
    for name, tensor in alone.tensors.items():
        assert torch.equal(tensor, after.tensors[name]), f"{name} differs after training other users first"
    # and the other users' adapters are really different (the comparison is not vacuous)
    first = shared.load_adapter(others[0])
    assert any(not torch.equal(first.tensors[n], after.tensors[n]) for n in after.tensors)
