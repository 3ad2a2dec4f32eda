"""A task: how profile items and queries become prompts, how answers are parsed, and how they are scored.

Built-in LaMP tasks (see `tasks.py`) and custom tasks from a TOML file are the same `TaskSpec`, so the
loaders, the training stages and the metrics have one code path. A custom spec (all keys but the first four
optional):

    name = "commit_tagging"
    type = "classification"            # or "rating" (with scale = [1, 5]) or "generation"
    input_field = "description"        # profile-item key holding the input text
    output_field = "tag"               # profile-item key holding the answer
    labels = ["MAINT", "DOC", ...]     # classification only
    profile_template = "Which tag ... tags: [{labels}] commit: {description}"
    query_template = "{input}"         # default: the question's `input` as is
    metrics = ["accuracy", "f1"]       # default: all metrics of the type
    aliases = ["numpy-commit-tags"]    # other names the outputs' "task" field may use
    profile_labelled = true            # false when profile items do not carry the task's answer (LaMP-1)
    description = "..."

Placeholders: `{<item key>}` and `{labels}` (the label set, comma-separated) in profile_template; `{input}`
and `{labels}` in query_template. Write `{{` / `}}` for literal braces.
"""

from __future__ import annotations

import logging
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from proper_fed.data import metrics as _metrics
from proper_fed.data.example import Example
from proper_fed.data.parse import canonical_label, canonical_rating, parse_label, parse_rating
from proper_fed.data.types import ProfileItem, Query, User
from proper_fed.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "rating", "generation")
METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "rating": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}
_SPEC_KEYS = {
    "name",
    "type",
    "input_field",
    "output_field",
    "labels",
    "scale",
    "profile_template",
    "query_template",
    "metrics",
    "aliases",
    "profile_labelled",
    "description",
    "detect_prefix",
}


def normalize_task_name(name: str) -> str:
    """Case, "_", "-" and spaces do not matter: "LaMP_2M" and "lamp-2m" are one name."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def template_fields(template: str, where: str) -> tuple[str, ...]:
    """The placeholder names of a str.format template; ConfigError for positional or indexed ones."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"{where}: {err} in {template!r}; write {{{{ and }}}} for literal braces") from err
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or "." in name or "[" in name:
            raise ConfigError(
                f"{where}: placeholder {{{name}}} in {template!r} is not a plain key; use {{field_name}}"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class TaskSpec:
    """One task. See the module docstring for the TOML form of every field.

    name: canonical name ("LaMP-2", "commit_tagging").
    type: "classification", "rating" or "generation"; decides parsing and metrics.
    input_field / output_field: profile-item keys holding the input text and the answer.
    profile_template: prompt of a profile item; default: the input field alone.
    query_template: prompt of a query; "" keeps the question's `input` (LaMP inputs are full prompts).
    labels: the label set (classification); for rating, filled from `scale` as "1".."5".
    scale: (low, high) for rating.
    metric_names: which metrics `metrics()` reports; default: all of the type.
    aliases: other names for lookup (the outputs' "task" field, OPPU folder names).
    profile_labelled: profile items carry the task's answer in output_field (false for LaMP-1, whose
        profile is the author's papers while the answer is "[1]" or "[2]").
    detect_prefix: a question input starting with this identifies the task when nothing else does.
    """

    name: str
    type: str
    input_field: str
    output_field: str
    profile_template: str = ""
    query_template: str = ""
    labels: tuple[str, ...] = ()
    scale: tuple[int, int] | None = None
    metric_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    profile_labelled: bool = True
    detect_prefix: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("task spec: 'name' must be a non-empty string")
        if self.type not in TASK_TYPES:
            raise ConfigError(f"{where}: type = {self.type!r}; use one of {', '.join(TASK_TYPES)}")
        for key in ("input_field", "output_field"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip() or value == "labels":
                raise ConfigError(f"{where}: {key} = {value!r}; name the profile-item key, e.g. 'text'")
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        self._check_type_fields(where)
        if not self.profile_template:
            object.__setattr__(self, "profile_template", "{" + self.input_field + "}")
        names = template_fields(self.profile_template, f"{where}: profile_template")
        leaks = self.type != "generation" and self.profile_labelled and self.output_field in names
        if leaks:
            raise ConfigError(
                f"{where}: profile_template uses {{{self.output_field}}}, the answer itself; "
                "remove it from the prompt"
            )
        extra = set(template_fields(self.query_template, f"{where}: query_template")) - {"input", "labels"}
        if extra:
            raise ConfigError(
                f"{where}: query_template may only use {{input}} and {{labels}}, not {sorted(extra)}"
            )
        metric_names = tuple(self.metric_names) or METRICS_BY_TYPE[self.type]
        unknown = set(metric_names) - set(METRICS_BY_TYPE[self.type])
        if unknown:
            raise ConfigError(
                f"{where}: metrics {sorted(unknown)} do not apply to a {self.type} task; "
                f"choose from {list(METRICS_BY_TYPE[self.type])}"
            )
        object.__setattr__(self, "metric_names", metric_names)

    def _check_type_fields(self, where: str) -> None:
        if self.type == "classification":
            if len(self.labels) < 2 or not all(isinstance(x, str) and x.strip() for x in self.labels):
                raise ConfigError(f"{where}: a classification task needs labels = [...] with >= 2 names")
            if len({x.lower() for x in self.labels}) != len(self.labels):
                raise ConfigError(f"{where}: labels repeat (case-insensitively): {list(self.labels)}")
        elif self.type == "rating":
            scale = self.scale
            ok = (
                scale is not None
                and len(scale) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in scale)
                and scale[0] < scale[1]
            )
            if not ok:
                raise ConfigError(f"{where}: scale = {scale!r}; a rating task needs scale = [low, high] ints")
            object.__setattr__(self, "scale", (int(scale[0]), int(scale[1])))
            object.__setattr__(self, "labels", tuple(str(i) for i in range(scale[0], scale[1] + 1)))
        elif self.labels or self.scale:
            raise ConfigError(f"{where}: a generation task takes no labels or scale")

    # --- names ------------------------------------------------------------------------------------------

    def matches(self, name: str) -> bool:
        wanted = normalize_task_name(name)
        return wanted in {normalize_task_name(n) for n in (self.name, *self.aliases)}

    @property
    def labels_text(self) -> str:
        return ", ".join(self.labels)

    @cached_property  # checked for every profile item while loading; the template never changes
    def item_fields(self) -> tuple[str, ...]:
        """Profile-item keys every item must have for this task."""
        names = [n for n in template_fields(self.profile_template, self.name) if n != "labels"]
        return tuple(dict.fromkeys([*names, self.output_field]))

    # --- prompts ----------------------------------------------------------------------------------------

    def query_prompt(self, query: Query) -> str:
        if not self.query_template:
            return query.input
        return self.query_template.format_map({"input": query.input, "labels": self.labels_text})

    def profile_prompt(self, item: ProfileItem, user_id: str = "?") -> str:
        self._require_fields(item, user_id)
        return self.profile_template.format_map({**item.fields, "labels": self.labels_text})

    def profile_target(self, item: ProfileItem, user_id: str = "?") -> str:
        self._require_fields(item, user_id)
        label = self.profile_label(item, user_id)
        return label if label is not None else item.fields[self.output_field].strip()

    def profile_to_example(self, user: User, item: ProfileItem) -> Example:
        """A training example from one history item (OPPU's per-user training data)."""
        return Example(
            user.user_id, self.profile_prompt(item, user.user_id), self.profile_target(item, user.user_id)
        )

    def query_to_example(self, user: User, query: Query) -> Example:
        """An evaluation (or server-validation) example; target is the gold or "" when there is none."""
        return Example(user.user_id, self.query_prompt(query), query.gold or "")

    def _require_fields(self, item: ProfileItem, user_id: str) -> None:
        missing = [f for f in self.item_fields if f not in item.fields]
        if missing:
            raise DataError(
                f"profile item {item.id!r} of user {user_id!r} lacks {missing}; task {self.name} needs "
                f"keys {list(self.item_fields)} in every profile item"
            )

    # --- labels -----------------------------------------------------------------------------------------

    def canonical(self, value: str) -> str | None:
        """A gold or history answer in the label set's spelling ("4" for ratings); None if outside it."""
        if self.type == "classification":
            return canonical_label(value, self.labels)
        if self.type == "rating":
            assert self.scale is not None
            number = canonical_rating(value, *self.scale)
            return None if number is None else str(number)
        return value

    def profile_label(self, item: ProfileItem, user_id: str = "?") -> str | None:
        """The item's answer as a label, for label statistics and baselines; None for generation/LaMP-1."""
        if self.type == "generation" or not self.profile_labelled:
            return None
        raw = item.fields.get(self.output_field)
        label = None if raw is None else self.canonical(raw)
        if label is None:
            raise DataError(
                f"profile item {item.id!r} of user {user_id!r}: {self.output_field} = {raw!r} is not in "
                f"the label set of {self.name} ({self.labels_text}); fix the item or the spec's labels"
            )
        return label

    # --- predictions ------------------------------------------------------------------------------------

    def parse_output(self, text: str | int | float | None) -> str | int | None:
        """Model text -> a label (classification; the raw text when it names none), an int (rating; None
        when there is no number in range) or the stripped text (generation)."""
        text = "" if text is None else str(text)
        if self.type == "classification":
            return parse_label(text, self.labels)
        if self.type == "rating":
            assert self.scale is not None
            return parse_rating(text, *self.scale)
        return text.strip()

    def metrics(self, preds: Sequence[Any], golds: Sequence[str]) -> dict[str, float]:
        """Official-scorer metrics of parsed predictions against golds (see `metrics.py`)."""
        if self.type == "classification":
            result = _metrics.classification_metrics(preds, golds, self.labels)
        elif self.type == "rating":
            assert self.scale is not None
            result = _metrics.rating_metrics(preds, golds, self.scale)
        else:
            result = _metrics.rouge_metrics(preds, golds)
        return {k: result[k] for k in self.metric_names}


def task_spec_from_mapping(data: Mapping[str, Any], source: str = "<spec>") -> TaskSpec:
    """Build a TaskSpec from parsed TOML; every problem is a ConfigError naming `source` and the key."""
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    missing = [k for k in ("name", "type", "input_field", "output_field") if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {missing}; see docs/data.md for a complete example")

    def typed(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = data.get(key, default)
        if not isinstance(value, kind):
            raise ConfigError(f"{source}: {key} = {value!r} has the wrong type")
        return value

    def str_list(key: str) -> tuple[str, ...]:
        value = typed(key, list, [])
        if not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{source}: {key} must be a list of strings, got {value!r}")
        return tuple(value)

    scale = data.get("scale")
    if scale is not None:
        if not isinstance(scale, list) or len(scale) != 2:
            raise ConfigError(f"{source}: scale = {scale!r}; write scale = [1, 5]")
        scale = tuple(scale)
    try:
        return TaskSpec(
            name=typed("name", str, ""),
            type=typed("type", str, ""),
            input_field=typed("input_field", str, ""),
            output_field=typed("output_field", str, ""),
            profile_template=typed("profile_template", str, ""),
            query_template=typed("query_template", str, ""),
            labels=str_list("labels"),
            scale=scale,
            metric_names=str_list("metrics"),
            aliases=str_list("aliases"),
            profile_labelled=typed("profile_labelled", bool, True),
            detect_prefix=typed("detect_prefix", str, ""),
            description=typed("description", str, ""),
        )
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def load_task_spec(path: str | Path) -> TaskSpec:
    """Read a custom task spec from a TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the task spec ({err.strerror or err})") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); fix the file") from err
    spec = task_spec_from_mapping(data, str(path))
    logger.debug("loaded task spec %s from %s", spec.name, path)
    return spec
