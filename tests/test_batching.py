"""The loss from the LM head at target-predicting positions only equals the loss from the full logits, value
and gradients: the trainer computes the head only where a target token is predicted."""

import torch
from model_helpers import fresh_model

from proper_fed.data.example import Example
from proper_fed.train.batching import (
    IGNORE,
    collate,
    encode_all,
    predicting_positions,
    target_loss,
    target_loss_at,
)


def test_positions_are_those_that_predict_a_target_in_any_row():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    assert predicting_positions(labels).tolist() == [0, 1, 2]


def test_loss_and_gradients_from_kept_positions_equal_the_full_head(tiny_backbone):
    model = fresh_model(tiny_backbone)
    try:
        model.set_mode(population=True)
        params = model.set_trainable(["population"])
        torch.manual_seed(0)
        for p in params:  # B starts at zero: give every adapter weight a value so gradients are not trivial
            p.data.normal_(0, 0.05)
        examples = [
            Example("a", "a short prompt", "yes"),
            Example("b", "a much longer prompt with many more words in it", "no way"),
            Example("c", "mid prompt here", "maybe so"),
        ]
        batch = collate(encode_all(tiny_backbone, examples, 64), tiny_backbone.tokenizer.pad_token_id, "cpu")

        def grads(loss: torch.Tensor) -> list[torch.Tensor]:
            return torch.autograd.grad(loss, params)

        full = target_loss(model(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
        keep = predicting_positions(batch["labels"])
        assert len(keep) < batch["input_ids"].shape[1] - 1  # something is actually skipped
        out = model(batch["input_ids"], batch["attention_mask"], logits_to_keep=keep)
        assert out.logits.shape[1] == len(keep)
        kept = target_loss_at(out.logits, batch["labels"], keep)
        assert torch.allclose(full, kept, atol=1e-6)
        for g_full, g_kept in zip(grads(full), grads(kept), strict=True):
            assert torch.allclose(g_full, g_kept, atol=1e-6)
    finally:
        model.remove()
