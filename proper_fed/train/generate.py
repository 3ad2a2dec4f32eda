"""Greedy, deterministic generation through whatever adapters the model's mode has switched on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from proper_fed.model.proper_model import ProperModel


@torch.no_grad()
def generate(
    model: ProperModel,
    prompts: Sequence[str],
    user_ids: Sequence[str] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    max_prompt_tokens: int = 512,
    progress: bool = False,
) -> list[str]:
    """Answer each prompt greedily; `user_ids` pick the user embeddings when the user-aware router is on."""
    backbone, tok = model.backbone, model.backbone.tokenizer
    user_ids = list(user_ids) if user_ids is not None else [""] * len(prompts)
    if len(user_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(user_ids)} user ids")
    outputs: list[str] = []
    old_sides = tok.padding_side, tok.truncation_side
    tok.padding_side = tok.truncation_side = "left"  # keep the end of long prompts, where the question is
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            texts = [backbone.format_prompt(p) for p in prompts[start : start + batch_size]]
            enc = tok(
                texts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=max_prompt_tokens,
            ).to(backbone.device)
            model.prepare(model.user_rows(user_ids[start : start + batch_size]))
            with backbone.autocast():
                out = backbone.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
            outputs.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side, tok.truncation_side = old_sides
        model.ctx.user_emb = None
    return outputs
