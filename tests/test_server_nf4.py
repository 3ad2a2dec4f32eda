"""`backbone.load-in-4bit = true`: the server stages train on the same nf4 base the devices use, so every method
is trained and evaluated on one quantized base (the quantization-held-equal comparison)."""

import dataclasses

import torch
from model_helpers import planted_groups

from proper_fed.config import AdapterConfig, BackboneConfig, ProperConfig, TrainConfig
from proper_fed.model.backbone import load_backbone
from server.server_stages import train_all

FAST = TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False)


def test_server_stages_train_on_the_nf4_base(tmp_path):
    import bitsandbytes as bnb

    backbone = load_backbone(BackboneConfig(model="tiny", device="cpu", dtype="fp32", load_in_4bit=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in backbone.model.modules())
    adapters = AdapterConfig(
        population_rank=4, group_rank=2, user_rank=2, num_experts=3, user_embedding_dim=8
    )
    cfg = dataclasses.replace(ProperConfig(), adapters=adapters, population=FAST, group=FAST)
    models = train_all(backbone, planted_groups(4, 8), cfg, tmp_path, ("matched",))
    proper, matched = models["proper"], models["matched"]
    assert all(t.abs().sum() > 0 for k, t in proper.population.items() if k.endswith("lora_pop_B"))
    assert all(t.abs().sum() > 0 for k, t in proper.group.items() if k.endswith("lora_expert_B"))
    assert all(torch.isfinite(t).all() for t in (*proper.population.values(), *proper.group.values()))
    assert matched.group == {}  # population only: rank 4 + 3 * 2
    assert next(t for k, t in matched.population.items() if k.endswith("lora_pop_A")).shape[0] == 10
