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
    sum is the probability of the whole answer, which is what greedy decoding approximates). (L,) on the CPU.
    One query of `batch_log_likelihoods`."""
    return batch_log_likelihoods(model, [prompt], [user_id], labels, max_prompt_tokens)[0]


@torch.no_grad()
def batch_log_likelihoods(
    model: ProperModel,
    prompts: Sequence[str],
    user_ids: Sequence[str],
    labels: Sequence[str],
    max_prompt_tokens: int = 512,
) -> torch.Tensor:
    """Summed log-likelihood of every label after every prompt: (Q, L) on the CPU.

    Two forwards for the whole batch: the prompts, left-padded so they all end at the same position (as
    `generate` pads them), with use_cache; then every label's tokens after its prompt's cached keys/values,
    all Q x L continuations as one batch, with position ids that continue each prompt's own length. Logits
    are computed only where a label token is predicted. Equal to one forward of each prompt + label
    (tested); the routers act per token, so a cached prefix routes as it would inside the full sequence.
    Runs under the model's current serving mode (each query's user row picks its embedding when the
    user-aware router is on)."""
    backbone = model.backbone
    dev, pad = backbone.device, backbone.tokenizer.pad_token_id
    prefixes = [prompt_ids(backbone, p)[-max_prompt_tokens:] for p in prompts]
    targets = [target_ids(backbone, label) for label in labels]
    q = len(prefixes)
    width, longest = max(len(t) for t in targets), max(len(p) for p in prefixes)
    ids = torch.full((q, longest), pad, dtype=torch.long)  # (Q, P) left-padded
    mask = torch.zeros((q, longest), dtype=torch.long)  # (Q, P)
    for i, p in enumerate(prefixes):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    lengths = mask.sum(-1)  # (Q,)
    try:
        out = model(
            ids.to(dev),
            mask.to(dev),
            user_rows=model.user_rows(user_ids),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(dev),  # (Q, P): pads do not shift positions
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[:, -1].float().log_softmax(-1)  # (Q, V): predicts each label's first token
        heads = torch.tensor([t[0] for t in targets], device=dev)  # (L,)
        scores = first[:, heads]  # (Q, L)
        if width > 1:
            scores = scores + _continuations(model, out.past_key_values, mask, lengths, targets, user_ids)
        return scores.cpu()
    finally:
        model.ctx.user_emb = None


def _continuations(model, cache, mask, lengths, targets, user_ids) -> torch.Tensor:
    """Summed log-probs of every label's tokens after the first, all Q x L continuations in one forward."""
    dev, pad = model.backbone.device, model.backbone.tokenizer.pad_token_id
    q, n, width = mask.shape[0], len(targets), max(len(t) for t in targets)
    cache.batch_repeat_interleave(n)  # (Q, ...) -> (Q*L, ...): query i's prompt for each of its labels
    cont = torch.full((n, width), pad, dtype=torch.long)  # (L, W)
    cont_mask = torch.zeros((n, width), dtype=torch.long)  # (L, W)
    for i, t in enumerate(targets):
        cont[i, : len(t)] = torch.tensor(t)
        cont_mask[i, : len(t)] = 1
    cont, cont_mask = cont.repeat(q, 1), cont_mask.repeat(q, 1)  # (Q*L, W), row = query * L + label
    full_mask = torch.cat([mask.repeat_interleave(n, 0), cont_mask], dim=1)  # (Q*L, P + W)
    positions = lengths.repeat_interleave(n)[:, None] + torch.arange(width)  # (Q*L, W)
    out = model(
        cont[:, :-1].to(dev),  # the last label token predicts nothing that is scored
        full_mask[:, :-1].to(dev),
        user_rows=model.user_rows([u for u in user_ids for _ in range(n)]),
        position_ids=positions[:, :-1].to(dev),
        past_key_values=cache,
        use_cache=False,
    )
    logp = out.logits.float().log_softmax(-1)  # (Q*L, W-1, V): position j predicts token j+1
    nxt = cont[:, 1:].to(dev)  # (Q*L, W-1)
    scored = cont_mask[:, 1:].to(dev).bool()  # (Q*L, W-1): real label tokens after the first
    picked = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (Q*L, W-1)
    return (picked * scored).sum(-1).view(q, n)  # (Q, L)


def rank_answers(
    model: ProperModel,
    prompts: Sequence[str],
    user_ids: Sequence[str],
    labels: Sequence[str],
    max_prompt_tokens: int = 512,
    batch_size: int = 8,
) -> list[str]:
    """Per prompt, the label with the highest summed log-likelihood (ties: the first in the label set);
    `batch_size` queries share the two forwards of `batch_log_likelihoods`."""
    if len(prompts) != len(user_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(user_ids)} user ids")
    answers = []
    for start in range(0, len(prompts), batch_size):
        scores = batch_log_likelihoods(
            model,
            prompts[start : start + batch_size],
            user_ids[start : start + batch_size],
            labels,
            max_prompt_tokens,
        )  # (B, L)
        answers += [labels[int(i)] for i in scores.argmax(-1)]
    return answers
