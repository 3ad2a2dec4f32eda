"""simulate's time estimate: the run's work is counted exactly from its data and settings, then priced with a
measurement on this machine."""

import math

from proper_fed.data import device_training_examples, server_training_examples
from proper_fed.federation.run_settings import RunSettings, load_split
from simulations.estimate import count_work, estimate_run
from simulations.run import plan

LENGTH = 10  # every example counts as 10 tokens, so the expected work is plain arithmetic


def _settings(**over) -> RunSettings:
    return RunSettings.from_run_config({**plan("quick").run_config, **over})


def test_server_work_is_examples_times_epochs_of_every_server_stage_and_variant():
    over = {"population.epochs": 2, "group.epochs": 3, "variants": "proper_no_constraint"}
    s = _settings(**over, methods="population,proper")
    split = load_split(s)
    work = count_work(s, split, lambda ex, _: [LENGTH] * len(ex))
    n = len(server_training_examples(split))
    batches = math.ceil(n / s.proper.population.batch_size) * s.proper.population.batch_size
    # population 2 epochs + group 3 epochs + the variant's own group stage 3 epochs
    assert work.server_tokens == (2 + 3 + 3) * batches * LENGTH
    # the matched baselines' server model: one LoRA trained for both stages' epochs (2 + 3)
    matched = _settings(**over, methods="population,population_matched,oppu_matched,proper")
    work = count_work(matched, split, lambda ex, _: [LENGTH] * len(ex))
    assert work.server_tokens == (2 + 3 + 3 + (2 + 3)) * batches * LENGTH


def test_device_work_counts_each_method_that_trains_a_user_stage():
    s = _settings(**{"methods": "zero_shot,population,oppu,proper", "variants": "", "user.epochs": 2})
    split = load_split(s)
    work = count_work(s, split, lambda ex, _: [LENGTH] * len(ex))
    assert len(work.device_train_tokens) == len(split.device_users)
    for user, tokens in zip(split.device_users, work.device_train_tokens, strict=True):
        n = len(device_training_examples(split.task, user))
        padded = math.ceil(n / s.proper.user.batch_size) * s.proper.user.batch_size
        # oppu and proper train 2 epochs each, proper also fits the user's embedding (1 epoch by default);
        # zero_shot and population train nothing
        assert tokens == (2 * 2 + s.proper.user.embedding_epochs) * padded * LENGTH


def test_the_estimate_is_measured_and_printable():
    s = _settings()
    est = estimate_run(s, load_split(s), device_parallel=2, with_plots=False)
    assert est.train_s_per_token > 0 and est.device_s_per_token > 0
    assert est.total_s == est.server_s + est.device_s + est.other_s > 0
    assert "estimated time on this machine" in est.describe() and est.precision in est.describe()
