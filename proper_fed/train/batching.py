"""Examples -> token batches: prompt masked out of the loss, prompts cut from the left to fit max_length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from proper_fed.data.example import Example
from proper_fed.model.backbone import Backbone

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    user_id: str
    input_ids: list[int]
    labels: list[int]


def prompt_ids(backbone: Backbone, prompt: str) -> list[int]:
    """The prompt's tokens as the model sees them (chat template applied), no special tokens added."""
    return backbone.tokenizer(backbone.format_prompt(prompt), add_special_tokens=False).input_ids


def target_ids(backbone: Backbone, target: str) -> list[int]:
    """The target's tokens and the eos that ends the answer: what training scores and `rank` scores."""
    tok = backbone.tokenizer
    return tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]


def encode(backbone: Backbone, ex: Example, max_length: int) -> Encoded:
    prompt = prompt_ids(backbone, ex.prompt)
    target = target_ids(backbone, ex.target)
    target = target[: max(1, max_length // 2)]  # keep room for at least half a prompt
    prompt = prompt[-(max_length - len(target)) :] if len(prompt) + len(target) > max_length else prompt
    return Encoded(ex.user_id, prompt + target, [IGNORE] * len(prompt) + target)


def encode_all(backbone: Backbone, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    return [encode(backbone, ex, max_length) for ex in examples]


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (B, T)."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits the loss needs: t such that some row has a target at t+1. labels (B, T) ->
    (K,) indices. Targets are a few tokens of each example, so computing the LM head only there saves most of
    its cost (the head is about a fifth of SmolLM2's FLOPs per token)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)  # (K,)


def target_loss_at(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`target_loss` from the logits at `positions` only. logits (B, K, V), labels (B, T), positions (K,).
    Equal to target_loss of the full logits: every target token is predicted from one of these positions."""
    targets = labels[:, positions + 1]  # (B, K): the token each kept position predicts
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on target tokens only. logits (B, T, V), labels (B, T)."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE
    )
