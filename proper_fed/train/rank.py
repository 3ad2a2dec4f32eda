"""The `rank` scoring protocol: the answer is the candidate label the model finds most likely after the prompt.

Prompt and candidate are tokenized exactly as training encodes prompt + target (`batching.prompt_ids`,
`batching.target_ids`: chat template, target tokens, then eos), so a model trained to emit "comedy<eos>"
is asked how likely exactly that continuation is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proper_fed.model.proper_model import ProperModel
from proper_fed.train.batching import prompt_ids, target_ids


@torch.no_grad()
def label_log_likelihoods(
    model: ProperModel, prompt: str, user_id: str, labels: Sequence[str], max_prompt_tokens: int = 512
) -> torch.Tensor:
    """log p(label tokens + eos | prompt) of each label, summed over its tokens (not length-normalised: a
    sum is the probability of the whole answer, which is what greedy decoding approximates).

    The prompt runs once and its key/value cache is shared by every label: then all labels' tokens run as
    one batch (L, W) after it, and logits are computed only where a label token is predicted. The result
    equals one forward of each prompt + label (tested against that); the routers act per token, so a
    cached prefix routes as it would inside the full sequence. Runs under the model's current serving mode
    (the user's row picks its embedding when the user-aware router is on). Returns (L,) on the CPU."""
    backbone = model.backbone
    prefix = prompt_ids(backbone, prompt)[-max_prompt_tokens:]
    targets = [target_ids(backbone, label) for label in labels]
    n, width, dev = len(labels), max(len(t) for t in targets), backbone.device
    ids = torch.tensor([prefix], device=dev)  # (1, P)
    try:
        out = model(
            ids, torch.ones_like(ids), user_rows=model.user_rows([user_id]), use_cache=True, logits_to_keep=1
        )
        first = out.logits[0, -1].float().log_softmax(-1)  # (V,): predicts every label's first token
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)  # (1, ...) -> (L, ...): the prompt's keys/values for every label
        cont = torch.full((n, width), backbone.tokenizer.pad_token_id, dtype=torch.long)  # (L, W)
        mask = torch.zeros((n, len(prefix) + width), dtype=torch.long)  # (L, P + W)
        mask[:, : len(prefix)] = 1
        for i, t in enumerate(targets):
            cont[i, : len(t)] = torch.tensor(t)
            mask[i, len(prefix) : len(prefix) + len(t)] = 1
        scores = torch.stack([first[t[0]] for t in targets])  # (L,)
        if width > 1:
            out = model(
                cont[:, :-1].to(dev),  # the last label token predicts nothing that is scored
                mask[:, :-1].to(dev),
                user_rows=model.user_rows([user_id] * n),
                past_key_values=cache,
                use_cache=False,
            )
            logp = out.logits.float().log_softmax(-1)  # (L, W-1, V): position j predicts token j+1
            nxt = cont[:, 1:].to(dev)  # (L, W-1)
            scored = torch.zeros_like(nxt, dtype=torch.bool)
            for i, t in enumerate(targets):
                scored[i, : len(t) - 1] = True
            picked = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (L, W-1)
            scores = scores + (picked * scored).sum(-1)
        return scores.cpu()
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
