"""Small builders shared by the model-core tests."""

import copy

import torch

from proper_fed.config import AdapterConfig
from proper_fed.data.example import Example
from proper_fed.model.proper_model import ProperModel

SMALL = AdapterConfig(population_rank=4, group_rank=2, user_rank=2, num_experts=3, user_embedding_dim=8)


def fresh_model(backbone, cfg: AdapterConfig = SMALL, seed: int = 0) -> ProperModel:
    """A ProperModel on a private copy of the backbone, so tests never share mutated weights."""
    b = copy.copy(backbone)
    b.model = copy.deepcopy(backbone.model)
    return ProperModel(b, cfg, seed=seed)


def planted_groups(n_users: int = 8, per_user: int = 12) -> list[Example]:
    """Two latent groups that answer the same prompts differently (group 0 "alpha", group 1 "beta"): the
    prompt carries no signal, so only knowing the user's group helps. (A rule that also depends on the word
    would test the tiny random model's frozen attention, not our adapters.)"""
    words = ["cat", "dog", "tree", "river"]
    return [
        Example(f"user{u}", f"item about {words[i % len(words)]}", "beta" if u % 2 else "alpha")
        for u in range(n_users)
        for i in range(per_user)
    ]


def batch_for(model: ProperModel, examples: list[Example]):
    from proper_fed.train.batching import collate, encode_all

    enc = encode_all(model.backbone, examples, 64)
    return collate(enc, model.backbone.tokenizer.pad_token_id, model.backbone.device)


def logits(model: ProperModel, batch, user_ids=None) -> torch.Tensor:
    rows = model.user_rows(user_ids) if user_ids is not None else None
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False).logits
