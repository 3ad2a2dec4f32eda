"""Backbone loading: local folders only, clear errors otherwise."""

import pytest

from proper_fed.backbone import load_backbone, model_folder
from proper_fed.config import BackboneConfig
from proper_fed.errors import ModelLoadError


def test_hub_id_fails_with_a_message_to_pass_a_local_folder():
    with pytest.raises(ModelLoadError, match="not a local folder.*pass its path"):
        model_folder("meta-llama/Llama-3.2-1B")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        model_folder(str(tmp_path))


def test_local_folder_loads_and_base_is_frozen(tiny_backbone):
    b = load_backbone(BackboneConfig(model=str(tiny_backbone.folder), device="cpu", dtype="fp32"))
    assert not any(p.requires_grad for p in b.model.parameters())
    assert b.tokenizer.pad_token_id is not None


def test_cuda_request_without_gpu_is_clear():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_backbone(BackboneConfig(model="tiny", device="cuda"))


def test_bf16_weights_load_in_bf16():
    import torch

    b = load_backbone(BackboneConfig(model="tiny", device="cpu", dtype="bf16"))
    assert next(b.model.parameters()).dtype == torch.bfloat16
