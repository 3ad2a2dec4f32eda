"""The `rank` scoring protocol picks the label the model finds most likely, scored as training scores targets;
the scoring config is validated and reported under the agreed names."""

import dataclasses

import pytest
import torch
from model_helpers import fresh_model, planted_groups

from proper_fed.config import TrainConfig
from proper_fed.data.example import Example
from proper_fed.data.scoring import check_protocols, scored_name
from proper_fed.data.task_spec import TaskSpec
from proper_fed.errors import ConfigError
from proper_fed.federation.run_settings import RunSettings
from proper_fed.train import stages
from proper_fed.train.batching import encode, target_loss
from proper_fed.train.personalize import evaluate, max_new_tokens_for
from proper_fed.train.rank import label_log_likelihoods, rank_answers

LABELS = ["alpha", "beta", "dark comedy twist", "x"]  # different token lengths: the batch is padded


def _brute_force(model, prompt: str, user_id: str, label: str) -> float:
    """log p(label + eos | prompt) from one unpadded forward of exactly what training encodes."""
    enc = encode(model.backbone, Example(user_id, prompt, label), max_length=10_000)
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([enc.labels])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), user_rows=model.user_rows([user_id]), use_cache=False)
    n_target = int((labels[:, 1:] != -100).sum())
    return -float(target_loss(out.logits, labels)) * n_target  # mean CE over targets -> summed log-prob


@pytest.fixture(scope="module")
def group_model(tiny_backbone):
    """Population + experts + user-aware router, trained briefly so the user embedding changes the answer."""
    model = fresh_model(tiny_backbone)
    examples = planted_groups(n_users=4, per_user=4)
    cfg = TrainConfig(epochs=1, lr=5e-2, batch_size=8, max_length=32, unknown_user_prob=0.0)
    stages.train_population(model, examples, cfg)
    stages.train_group(model, examples, dataclasses.replace(cfg, constraint_weight=0.0))
    stages.serving_mode(model, "group")
    return model


def test_rank_scores_each_label_as_a_separate_training_forward_would(group_model):
    for user in ("user0", "user1"):
        batched = label_log_likelihoods(group_model, "item about cat", user, LABELS)
        brute = torch.tensor([_brute_force(group_model, "item about cat", user, lab) for lab in LABELS])
        assert torch.allclose(batched, brute, atol=1e-4), (batched, brute)
        assert rank_answers(group_model, ["item about cat"], [user], LABELS) == [LABELS[int(brute.argmax())]]


def test_rank_goes_through_the_users_router_row(group_model):
    a = label_log_likelihoods(group_model, "item about dog", "user0", LABELS)
    b = label_log_likelihoods(group_model, "item about dog", "user1", LABELS)
    assert not torch.allclose(a, b), "the user-aware router did not see the user's embedding"


def test_rank_answers_are_labels_and_scored_as_such(group_model):
    task = TaskSpec("toy", "classification", "text", "label", labels=("alpha", "beta"))
    queries = [Example("user0", "item about cat", "alpha"), Example("user1", "item about cat", "beta")]
    scored = evaluate(group_model, task, queries, "rank")
    assert set(scored.answers) <= {"alpha", "beta"} and scored.answers == scored.raw
    assert scored.stats["n"] == 2
    assert scored.stats["correct"] == sum(a == q.target for a, q in zip(scored.answers, queries, strict=True))


def test_generate_budget_fits_the_longest_label(tiny_backbone):
    tok = tiny_backbone.tokenizer
    task = TaskSpec("toy", "classification", "text", "label", labels=("a", "social commentary and more"))
    longest = len(tok("social commentary and more", add_special_tokens=False).input_ids)
    assert max_new_tokens_for(task, tok) >= longest + 8


def test_scoring_names_and_validation():
    assert RunSettings.from_run_config({"scoring": "generate,rank"}).scoring == ("generate", "rank")
    assert scored_name("proper", "generate", ("generate", "rank")) == "proper"
    assert scored_name("proper", "rank", ("generate", "rank")) == "proper@rank"
    assert scored_name("proper", "rank", ("rank", "generate")) == "proper"
    for bad in ("beam", "rank,rank", ""):
        with pytest.raises(ConfigError, match="scoring"):
            RunSettings.from_run_config({"scoring": bad})
    gen = TaskSpec("toy-gen", "generation", "text", "title")
    with pytest.raises(ConfigError, match="rank.*generation"):
        check_protocols(gen, ("generate", "rank"))
    check_protocols(gen, ("generate",))


def test_the_shared_prompt_cache_equals_full_forwards_with_the_lora_aware_router(tiny_backbone):
    """Stage 3's router mixes experts per token from the user LoRA's hidden state: a prompt scored once and
    shared by every label must route exactly as inside each full prompt + label sequence."""
    model = fresh_model(tiny_backbone)
    try:
        examples = planted_groups(n_users=2, per_user=4)
        cfg = TrainConfig(epochs=1, lr=5e-2, batch_size=8, max_length=32, unknown_user_prob=0.0)
        stages.train_population(model, examples, cfg)
        stages.train_group(model, examples, cfg)
        stages.train_user(model, examples[:4], cfg, expert_mix="lora_router")
        stages.serving_mode(model, "user", expert_mix="lora_router")
        batched = label_log_likelihoods(model, "item about cat", "me", LABELS)
        brute = torch.tensor([_brute_force(model, "item about cat", "me", lab) for lab in LABELS])
        assert torch.allclose(batched, brute, atol=1e-4), (batched, brute)
    finally:
        model.remove()


def test_queries_of_different_lengths_ranked_together_equal_each_alone(group_model):
    """Left-padded prompts in one batch (positions continue each prompt's own length) score every label as
    a separate full forward of that prompt + label would, for each query's own user row."""
    from proper_fed.train.rank import batch_log_likelihoods

    prompts = ["item about cat", "a much longer item about a dog and a cat and a bird", "dog"]
    users = ["user0", "user1", "user0"]
    batched = batch_log_likelihoods(group_model, prompts, users, LABELS)  # (Q, L)
    assert batched.shape == (3, len(LABELS))
    for i, (prompt, user) in enumerate(zip(prompts, users, strict=True)):
        brute = torch.tensor([_brute_force(group_model, prompt, user, lab) for lab in LABELS])
        assert torch.allclose(batched[i], brute, atol=1e-4), (i, batched[i], brute)
