"""The reply schema: the exact metric keys a device may send, derived from public run facts, with ranges.

Uses the real LaMP label sets (LaMP-1 "[1]"/"[2]", LaMP-2's 15 movie tags, LaMP-2N's 15 news categories with
"&"), the LaMP-3 rating scale and LaMP-4 generation.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from proper_fed.data import get_task
from proper_fed.data.baselines import has_label_baselines
from proper_fed.data.metric_stats import query_stats
from proper_fed.errors import ConfigError
from proper_fed.federation.reply_schema import reply_schema, run_reply_schema
from proper_fed.federation.run_settings import RunSettings

METHODS = ("zero_shot", "population", "proper_group", "oppu", "proper")
LAMP = ("LaMP-1", "LaMP-2", "LaMP-2N", "LaMP-3", "LaMP-4")


def _schema(name: str, protocols=("generate",), methods=METHODS):
    task = get_task(name)
    return task, reply_schema(methods, task.type, len(task.labels), protocols)


def device_reply(task, methods=METHODS, protocols=("generate",), seed=0) -> dict[str, float]:
    """What a device sends, built the way the device builds it: query statistics of random answers."""
    rng = random.Random(seed)
    answers = list(task.labels) or ["a short headline", "another one"]
    golds = [rng.choice(answers) for _ in range(6)]
    out: dict[str, float] = {"history_len": 40.0, "queries": 6.0, "device_total_s": 12.5}
    for method in methods:
        for i, protocol in enumerate(protocols):
            prefix = method if i == 0 else f"{method}@{protocol}"
            raws = [rng.choice([*answers, "no idea", ""]) for _ in golds]
            out.update({f"{prefix}.{k}": float(v) for k, v in query_stats(task, raws, golds).items()})
            out.update(
                {
                    f"{prefix}.train_s": 3.5,
                    f"{prefix}.eval_s": 0.25,
                    f"{prefix}.trainable_params": 4096.0,
                    f"{prefix}.train_tokens": 1200.0,
                }
            )
    if has_label_baselines(task):  # as the device: not LaMP-1 (labels, but no labelled history)
        for baseline in ("majority", "user_majority"):
            stats = query_stats(task, [answers[0]] * len(golds), golds)
            out.update({f"{baseline}.{k}": float(v) for k, v in stats.items()})
    return out


@pytest.mark.parametrize("name", LAMP)
def test_a_real_lamp_reply_passes(name):
    task, schema = _schema(name)
    for seed in range(5):
        assert schema.violation(device_reply(task, seed=seed)) is None


@pytest.mark.parametrize("name", ["LaMP-1", "LaMP-2", "LaMP-2N", "LaMP-3"])
def test_a_second_protocol_is_sent_under_method_at_protocol(name):
    task, schema = _schema(name, ("generate", "rank"))
    reply = device_reply(task, protocols=("generate", "rank"))
    assert "proper@rank.n" in reply and schema.violation(reply) is None
    assert "majority@rank.n" not in schema.keys and "majority.n" in schema.keys
    _, one = _schema(name)
    assert one.violation(reply) is not None  # a run with one protocol refuses the second one's keys


def test_keys_are_exactly_the_methods_stats_costs_and_device_numbers():
    task, schema = _schema("LaMP-1", methods=("proper",))
    per_label = {f"proper.{k}.{i}" for k in ("tp", "fp", "fn") for i in range(2)}
    costs = {"proper.train_s", "proper.eval_s", "proper.trainable_params", "proper.train_tokens"}
    stats = {"proper.n", "proper.parsed", "proper.correct"}
    baselines = {f"{b}.{s}" for b in ("majority", "user_majority") for s in ("n", "parsed", "correct")}
    baselines |= {
        f"{b}.{k}.{i}" for b in ("majority", "user_majority") for k in ("tp", "fp", "fn") for i in range(2)
    }
    device = {"history_len", "queries", "device_total_s"}
    assert schema.keys == per_label | costs | stats | baselines | device
    assert not any("[" in key for key in schema.keys)
    _, generation = _schema("LaMP-4", methods=("proper",))
    assert {"proper.rouge1", "proper.rougeL", "proper.parsed"} <= generation.keys
    assert not any(k.startswith("majority") for k in generation.keys)


SECRET = "secretcanary"


def _refusals(task, reply):
    """Replies that must be refused, each with the part of it that must not appear in the reason."""
    n = reply["proper.n"]
    last = len(task.labels)
    yield {**reply, f"proper.tp.{SECRET}": 1.0}, SECRET
    yield {**reply, f"proper.{SECRET}": 1.0}, SECRET
    yield {**reply, SECRET: 1.0}, SECRET
    yield {**reply, f"proper.fp.{last + 7}": 1.0}, f"fp.{last + 7}"
    yield {**reply, "proper.n": SECRET}, SECRET
    yield {**reply, "proper.eval_s": [1.0, 2.0]}, "[1.0"
    yield {**reply, "proper.n": math.nan}, "nan"
    yield {**reply, "proper.train_s": math.inf}, "inf"
    yield {**reply, "proper.parsed": -3.0}, "-3"
    yield {**reply, "history_len": 123456789.0}, "123456789"
    yield {**reply, "queries": 2.5}, "2.5"
    yield {**reply, "proper.parsed": n + 1}, str(int(n + 1))
    yield {**reply, "proper.trainable_params": True}, "True"


@pytest.mark.parametrize("name", LAMP)
def test_anything_outside_the_schema_is_refused_without_repeating_it(name):
    task, schema = _schema(name)
    reply = device_reply(task)
    for bad, secret in _refusals(task, reply):
        why = schema.violation(bad)
        assert why is not None, secret
        assert secret.lower() not in why.lower(), why


def test_sums_stay_within_n_times_the_most_one_query_adds():
    task, schema = _schema("LaMP-3")
    reply = device_reply(task)
    assert schema.violation({**reply, "proper.abs_err": reply["proper.n"] * 4}) is None
    assert schema.violation({**reply, "proper.abs_err": reply["proper.n"] * 4 + 0.5}) is not None
    assert schema.violation({**reply, "proper.sq_err": reply["proper.n"] * 16 + 1}) is not None
    task, schema = _schema("LaMP-4")
    reply = device_reply(task)
    assert schema.violation({**reply, "proper.rougeL": reply["proper.n"] + 0.01}) is not None
    without_n = {k: v for k, v in reply.items() if k != "proper.n"}
    assert "sent without a valid proper.n" in schema.violation(without_n)


def test_rank_needs_a_label_set_and_names_must_not_make_keys_ambiguous():
    with pytest.raises(ConfigError, match="rank"):
        _schema("LaMP-4", ("generate", "rank"))
    with pytest.raises(ConfigError, match="scoring"):
        _schema("LaMP-2", ("beam",))
    with pytest.raises(ConfigError, match="method names"):
        _schema("LaMP-2", methods=("proper", "proper.x"))
    with pytest.raises(ConfigError, match="method names"):
        _schema("LaMP-2", methods=("majority",))


def test_the_run_schema_reads_methods_variants_and_scoring_from_the_settings():
    task = get_task("LaMP-2N")
    settings = SimpleNamespace(methods=("proper",), variants=("proper_k2",), scoring=("generate", "rank"))
    schema = run_reply_schema(settings, task)
    assert {"proper_k2.n", "proper@rank.tp.14", "proper_k2@rank.fn.0"} <= schema.keys
    assert "proper@rank.tp.15" not in schema.keys
    # RunSettings parses the run config's protocols; none given means LaMP's "generate" alone
    default = run_reply_schema(RunSettings(methods=("proper",)), task)
    assert "proper.n" in default.keys and not any("@" in k for k in default.keys)
    parsed = RunSettings.from_run_config({"methods": "proper", "scoring": "generate, rank"})
    assert parsed.scoring == ("generate", "rank")
    assert "proper@rank.n" in run_reply_schema(parsed, task).keys


def test_the_server_tables_each_protocol_as_a_method_with_its_parse_rate(tmp_path):
    """What passes the schema is what the server reads: '<m>@rank' is a method of its own, 'tp.<i>' a stat."""
    import dataclasses
    import json

    from proper_fed.data import split_federation
    from proper_fed.data.synthetic import SyntheticConfig, generate_synthetic
    from proper_fed.federation.run_settings import RunSettings
    from server.results import DeviceReply, write_results

    split = split_federation(generate_synthetic(SyntheticConfig(users=8, groups=2)).dataset, 0.5, 0)
    task = split.task
    replies = {
        node: DeviceReply(node, metrics=device_reply(task, METHODS, ("generate", "rank"), seed=node))
        for node in (11, 12)
    }
    replies[13] = DeviceReply(13, error="device error 422: the device's data does not fit the run's task")
    settings = dataclasses.replace(RunSettings(), out=str(tmp_path))
    res = json.loads(write_results(settings, split, {}, replies, {}, "h").read_text())
    assert next(iter(res)) == "answered"
    assert res["answered"] == f"2 of {len(split.device_users)} devices answered"
    assert res["failed"] == {"13": replies[13].error}
    methods = res["methods"]
    assert {"proper", "proper@rank", "majority"} <= set(methods) and "majority@rank" not in methods
    for name in ("proper", "proper@rank"):
        stats = [device_reply(task, METHODS, ("generate", "rank"), seed=n) for n in (11, 12)]
        parsed = sum(s[f"{name}.parsed"] for s in stats) / sum(s[f"{name}.n"] for s in stats)
        assert methods[name]["parse_rate"] == pytest.approx(parsed)
        assert set(methods[name]["metrics"]) == {"accuracy", "f1"} and methods[name]["users"] == 2
