"""The `rank` scoring protocol: the answer is the candidate label the model finds most likely after the prompt.

Prompt and candidate are tokenized exactly as training encodes prompt + target (`batching.prompt_ids`,
`batching.target_ids`: chat template, target tokens, then eos), so a model trained to emit "comedy<eos>"
is asked how likely exactly that continuation is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proper_fed.batching import IGNORE, Encoded, collate, prompt_ids, target_ids
from proper_fed.proper_model import ProperModel


def candidate_batch(
    model: ProperModel, prompt: str, user_id: str, labels: Sequence[str], max_prompt_tokens: int
):
    """One right-padded batch (L, T): the prompt followed by each label, loss labels on the label tokens only.

    The prompt is cut from the left to `max_prompt_tokens` (as `generate` does), the same cut for every label,
    so candidates differ only in their continuation."""
    prompt = prompt_ids(model.backbone, prompt)[-max_prompt_tokens:]
    items = [
        Encoded(user_id, prompt + target, [IGNORE] * len(prompt) + target)
        for target in (target_ids(model.backbone, label) for label in labels)
    ]
    return collate(items, model.backbone.tokenizer.pad_token_id, model.backbone.device)


def continuation_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the target tokens of log p(token | everything before it). logits (L, T, V), labels (L, T) -> (L,)."""
    logp = logits[:, :-1].float().log_softmax(-1)  # (L, T-1, V): position t predicts token t+1
    targets = labels[:, 1:]  # (L, T-1)
    scored = targets != IGNORE  # (L, T-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (L, T-1)
    return (picked * scored).sum(-1)  # (L,)


@torch.no_grad()
def label_log_likelihoods(
    model: ProperModel, prompt: str, user_id: str, labels: Sequence[str], max_prompt_tokens: int = 512
) -> torch.Tensor:
    """log p(label tokens + eos | prompt) of each label, summed over its tokens (not length-normalised: a
    sum is the probability of the whole answer, which is what greedy decoding approximates). One batched
    forward over the label set, under the model's current serving mode (the user's row picks its embedding
    when the user-aware router is on). Returns (L,) on the CPU."""
    batch = candidate_batch(model, prompt, user_id, labels, max_prompt_tokens)
    rows = model.user_rows([user_id] * len(labels))  # (L,)
    try:
        # ProperModel.forward runs under backbone.autocast(), as training and generate do
        out = model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False)
        return continuation_log_likelihoods(out.logits, batch["labels"]).cpu()
    finally:
        model.ctx.user_emb = None


def rank_answers(
    model: ProperModel,
    prompts: Sequence[str],
    user_ids: Sequence[str],
    labels: Sequence[str],
    max_prompt_tokens: int = 512,
) -> list[str]:
    """Per prompt, the label with the highest summed log-likelihood (ties: the first in the label set)."""
    if len(prompts) != len(user_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(user_ids)} user ids")
    answers = []
    for prompt, user_id in zip(prompts, user_ids, strict=True):
        scores = label_log_likelihoods(model, prompt, user_id, labels, max_prompt_tokens)  # (L,)
        answers.append(labels[int(scores.argmax())])
    return answers
