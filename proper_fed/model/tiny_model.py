"""A tiny random Llama and a small byte-level BPE trained in-process, for tests and `--quick` runs.

A small vocabulary matters: SmolLM2's 49k-token embedding alone costs 0.7 s a step on our CPUs.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 512
SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>")

# Enough English, digits and punctuation that the BPE learns common merges; every byte stays encodable.
_CORPUS = (
    "the a an of to in and is for on with as by at from this that which tag label answer user item commit "
    "review rating score title tweet paper citation movie news product question text description "
    "Which tag does this relate to among the following tags? Just answer with the tag name. "
    "MAINT DOC BUG ENH TST TYP BLD STY CI DEP API NEP BENCH REL DEV SIMD "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu "
    "red green blue yellow black white orange purple cat dog bird fish tree river stone cloud "
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 2025 . , : ; ! ? ( ) [ ] { } - _ / = + * # @ \" ' "
)


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL[0], bos_token=SPECIAL[1], eos_token=SPECIAL[2]
    )


def build_tiny(seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    """A random LlamaForCausalLM (hidden 64, 2 layers) and its tokenizer, deterministic in `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # With hidden 64, tied embeddings at the default std 0.02 cap every logit near +-1.3, so no adapter
    # could make a confident prediction; std 0.25 gives the output layer a usable range.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.25)
    return model, tok
