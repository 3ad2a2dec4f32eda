"""The wire contract (proper_fed/federation/wire.py) is one codec and one set of names, used by the server and
the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from proper_fed.errors import BundleError
from proper_fed.federation import wire


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "w.fp32": torch.randn(5, generator=gen),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_the_codec_is_bit_exact_and_bf16_travels_as_int16():
    state = _state()
    arrays, dtypes = wire.encode_tensors(state)
    assert arrays["w.bf16"].dtype == np.int16
    assert json.loads(dtypes) == {"ids": "int64", "w.bf16": "bfloat16", "w.fp32": "float32"}
    back = wire.decode_tensors(arrays, dtypes)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k].view(torch.uint8), t.view(torch.uint8))


def test_the_base_transfer_uses_the_same_codec_as_the_bundle(tmp_path):
    """The server's base records decode with the device's decoder (the one codec), bit-exact."""
    from server.wire import base_content

    state = _state()
    content = base_content(state, {"config.json": b"{}"}, "ab" * 32)
    arrays = {k: v.numpy() for k, v in content[wire.BASE_ARRAYS].items()}
    dtypes = str(content[wire.BASE_META][wire.META_DTYPES])
    back = wire.decode_tensors(arrays, dtypes)
    assert all(torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)) for k, t in state.items())


def test_a_dtype_table_that_does_not_fit_the_arrays_is_refused():
    arrays, dtypes = wire.encode_tensors(_state())
    with pytest.raises(BundleError, match="disagree"):
        wire.decode_tensors({**arrays, "extra": np.zeros(1)}, dtypes)
    with pytest.raises(BundleError, match="unknown torch dtype"):
        wire.decode_tensors(arrays, json.dumps({**json.loads(dtypes), "ids": "os.system"}))
    with pytest.raises(BundleError, match="int16 but the bundle says int64"):
        wire.decode_tensors({**arrays, "ids": arrays["ids"].astype(np.int16)}, dtypes)


def test_tensor_groups_and_variant_entries():
    assert wire.tensor_group("proper_k2", "group") == "proper_k2.group"
    with pytest.raises(BundleError, match="does not ship"):
        wire.tensor_group("proper", "user")
    manifest = {"adapter_config": {"proper": wire.variant_entry({"num_experts": 3}, 7)}}
    assert wire.read_variant_entry(manifest, "proper") == ({"num_experts": 3}, 7)
    with pytest.raises(BundleError, match="no server model 'proper_k8'"):
        wire.read_variant_entry(manifest, "proper_k8")


def test_the_device_builds_the_user_table_from_the_shipped_row_count(tiny_backbone):
    """No invented user ids: the table has the server's row count and every user is unknown (row 0)."""
    from model_helpers import fresh_model

    from client.device import server_model
    from proper_fed.artifacts import crypto
    from proper_fed.artifacts.bundle import build_bundle

    server = fresh_model(tiny_backbone)
    server.set_users(["alice", "bob", "carol"])
    tensors = {wire.tensor_group("proper", s): server.scope_state_dict(s) for s in wire.SHIPPED_SCOPES}
    entry = wire.variant_entry(server.scope_meta("group")["adapters"], len(server.user_index) + 1)
    server.remove()
    bundle = build_bundle(
        base_model_id="tiny",
        base_content_hash="ab" * 32,
        adapter_config={"proper": entry},
        stage_metrics={},
        tensors=tensors,
        private_key=crypto.generate_signing_key(),
    )
    model = server_model(tiny_backbone, bundle, "proper")
    try:
        assert model.lora_user_embedding.weight.shape[0] == 4
        assert model.user_index == {}
        assert model.user_rows(["alice", "#1"]).tolist() == [0, 0]
        got = model.scope_state_dict("group")["lora_user_embedding.weight"]
        assert torch.equal(got, tensors["proper.group"]["lora_user_embedding.weight"])
    finally:
        model.remove()
