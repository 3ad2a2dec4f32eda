"""Backbone loading: local folders only, clear errors otherwise."""

import pytest

from proper_fed.config import BackboneConfig
from proper_fed.errors import ModelLoadError
from proper_fed.model.backbone import load_backbone, model_folder


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


def test_system_prompt_none_leaves_out_the_system_turn_a_template_would_insert(tiny_backbone):
    """SmolLM2's template inserts a default system message when none is given; "none" must drop the turn
    entirely, "" keeps an empty one, "default" lets the template insert its own."""
    import copy
    import dataclasses

    chatml = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a default assistant<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    b = copy.copy(tiny_backbone)
    b.tokenizer = copy.deepcopy(tiny_backbone.tokenizer)
    b.tokenizer.chat_template = chatml

    def render(system: str) -> str:
        b.config = dataclasses.replace(tiny_backbone.config, system_prompt=system)
        return b.format_prompt("hi")

    assert render("none") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render("") == "<|im_start|>system\n<|im_end|>\n" + render("none")
    assert render("default").startswith("<|im_start|>system\nYou are a default assistant")
