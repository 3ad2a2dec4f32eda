"""What a device may send in the user stage: an exact set of metric keys, each with a type and a range.

The schema is derived before the run from public facts only: the run's method names, the task type and the
size of its public label set, and the scoring protocols. It is the same for every device of the run, so
nothing about a user can be encoded in which keys are sent, and a value can only be a bounded number.

Keys (`<i>` = a label's index in `task.labels`, never its name):

    <method>.n, <method>.parsed                     counts, every task type
    <method>.correct, <method>.tp|fp|fn.<i>         counts, classification
    <method>.abs_err, <method>.sq_err               sums, rating
    <method>.rouge1, <method>.rougeL                sums, generation
    <method>.train_s, <method>.eval_s               seconds
    <method>.trainable_params                       a count
    <method>.train_tokens                           a count (tokens of the device's training for it)
    history_len, queries, device_total_s            the device's own

Scoring protocols (run config `scoring`, a comma list; names from `scoring.py`): the first protocol's statistics are sent as
`<method>.<stat>`, every further protocol's as `<method>@<protocol>.<stat>` (`proper@rank.correct`). The
label baselines `majority` and `user_majority` need no model, so they are sent once, without a suffix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from proper_fed.data.metric_stats import PER_LABEL, label_key
from proper_fed.data.scoring import PROTOCOLS, RANKABLE_TYPES, scored_name
from proper_fed.errors import ConfigError
from proper_fed.methods import LABEL_BASELINES

if TYPE_CHECKING:
    from proper_fed.data.task_spec import TaskSpec

LABELLED_TYPES = ("classification", "rating")
COST_KEYS = ("train_s", "eval_s", "trainable_params", "train_tokens")

MAX_COUNT = 10**6  # queries or history items of one device
MAX_SECONDS = 30 * 24 * 3600.0
MAX_PARAMS = 10**11
MAX_TOKENS = 10**12
_SUM_SLACK = 1e-9  # floating-point rounding of sums of per-query scores


@dataclass(frozen=True)
class KeyRule:
    """One key's type and range. A statistic of a method names its query count (`n_key`): it must come with
    it and stay within it, a count at most n and a sum at most n * `per_query`."""

    integer: bool
    upper: float
    per_query: float = 0.0
    n_key: str = ""


@dataclass(frozen=True)
class ReplySchema:
    """The exact keys a device may send, with their rules."""

    rules: Mapping[str, KeyRule]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.rules)

    def violation(self, metrics: Mapping[Any, Any]) -> str | None:
        """Why `metrics` may not leave the device, or None. The reason is fixed text: it names a key only if
        the key is in the schema, and never a value."""
        for key, value in metrics.items():
            rule = self.rules.get(key) if isinstance(key, str) else None
            if rule is None:
                return "a metric key outside the run's reply schema"
            why = _value_violation(rule, value) or _bound_violation(rule, value, metrics)
            if why is not None:
                return f"metric {key}: {why}"
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _value_violation(rule: KeyRule, value: Any) -> str | None:
    number = _number(value)
    if number is None:
        return "not a single number"
    if not math.isfinite(number):
        return "not a finite number"
    if number < 0:
        return "negative"
    if rule.integer and not number.is_integer():
        return "not a whole count"
    if number > rule.upper:
        return "above its bound"
    return None


def _bound_violation(rule: KeyRule, value: Any, metrics: Mapping[Any, Any]) -> str | None:
    if not rule.n_key:
        return None
    n = _number(metrics.get(rule.n_key))
    if n is None or not math.isfinite(n) or n < 0:
        return f"sent without a valid {rule.n_key}"
    per = rule.per_query if rule.per_query else 1.0
    if float(value) > n * per * (1 + _SUM_SLACK) + _SUM_SLACK:
        return f"above what {rule.n_key} allows"
    return None


def _count(n_key: str = "") -> KeyRule:
    return KeyRule(integer=True, upper=MAX_COUNT, n_key=n_key)


def _sum(n_key: str, per_query: float) -> KeyRule:
    return KeyRule(integer=False, upper=MAX_COUNT * per_query, per_query=per_query, n_key=n_key)


def _task_stats(prefix: str, task_type: str, label_count: int) -> dict[str, KeyRule]:
    n_key = f"{prefix}.n"
    rules = {n_key: _count("queries"), f"{prefix}.parsed": _count(n_key)}
    if task_type == "classification":
        rules[f"{prefix}.correct"] = _count(n_key)
        for i in range(label_count):
            rules.update({f"{prefix}.{label_key(kind, i)}": _count(n_key) for kind in PER_LABEL})
    elif task_type == "rating":
        worst = float(label_count - 1)  # labels are the scale's integers: the farthest answer is off by this
        rules[f"{prefix}.abs_err"] = _sum(n_key, worst)
        rules[f"{prefix}.sq_err"] = _sum(n_key, worst * worst)
    else:
        rules[f"{prefix}.rouge1"] = _sum(n_key, 1.0)
        rules[f"{prefix}.rougeL"] = _sum(n_key, 1.0)
    return rules


def _cost_rules(prefix: str) -> dict[str, KeyRule]:
    return {
        f"{prefix}.train_s": KeyRule(integer=False, upper=MAX_SECONDS),
        f"{prefix}.eval_s": KeyRule(integer=False, upper=MAX_SECONDS),
        f"{prefix}.trainable_params": KeyRule(integer=True, upper=MAX_PARAMS),
        f"{prefix}.train_tokens": KeyRule(integer=True, upper=MAX_TOKENS),
    }


def _check(methods: Sequence[str], task_type: str, label_count: int, protocols: Sequence[str]) -> None:
    bad = [m for m in methods if not m or "." in m or "@" in m or m in LABEL_BASELINES]
    if bad or len(set(methods)) != len(methods):
        raise ConfigError(
            f"methods = {list(methods)}: method names must be unique, non-empty, without '.' or '@', and "
            f"not {list(LABEL_BASELINES)}"
        )
    if task_type not in ("classification", "rating", "generation"):
        raise ConfigError(f"task type {task_type!r}; use classification, rating or generation")
    if task_type in LABELLED_TYPES and label_count < 2:
        raise ConfigError(f"a {task_type} task with {label_count} labels; it needs at least 2")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or unknown or len(set(protocols)) != len(protocols):
        raise ConfigError(
            f"scoring = {','.join(protocols)!r}; use one or more of {list(PROTOCOLS)}, once each"
        )
    if "rank" in protocols and task_type not in RANKABLE_TYPES:
        raise ConfigError(
            f"scoring 'rank' needs a label set (classification or rating); this is a {task_type} task: "
            "use scoring = 'generate'"
        )


def reply_schema(
    methods: Sequence[str],
    task_type: str,
    label_count: int,
    protocols: Sequence[str] = ("generate",),
    label_baselines: bool | None = None,
) -> ReplySchema:
    """The schema of a run: `methods` are the device methods and server variants every device runs;
    `label_count` the size of the task's public label set (0 for generation); `protocols` the run's scoring
    protocols in order; `label_baselines` whether devices report majority / user_majority (tasks with
    labelled history; None: every classification or rating task). ConfigError for names that would make keys
    ambiguous or an unknown protocol."""
    methods, protocols = tuple(methods), tuple(protocols)
    _check(methods, task_type, label_count, protocols)
    rules: dict[str, KeyRule] = {
        "history_len": _count(),
        "queries": _count(),
        "device_total_s": KeyRule(integer=False, upper=MAX_SECONDS),
    }
    for method in methods:
        for protocol in protocols:
            prefix = scored_name(method, protocol, protocols)
            rules.update(_task_stats(prefix, task_type, label_count))
            rules.update(_cost_rules(prefix))
    if task_type in LABELLED_TYPES if label_baselines is None else label_baselines:
        for baseline in LABEL_BASELINES:
            rules.update(_task_stats(baseline, task_type, label_count))
    return ReplySchema(MappingProxyType(rules))


def run_reply_schema(settings: Any, task: TaskSpec) -> ReplySchema:
    """The schema of a run from its settings (`RunSettings`) and its task's public label set."""
    from proper_fed.data.baselines import has_label_baselines

    return reply_schema(
        (*settings.methods, *settings.variants),
        task.type,
        len(task.labels),
        tuple(settings.scoring),
        label_baselines=has_label_baselines(task),
    )
