"""A synthetic personalization task with planted latent groups, small enough for a 135M model on a CPU.

Each item is a short text "<kind> about <topic> <filler>"; its label is how the user reacts to it. The
label depends on the topic through a rule of the user's latent group (each group maps half of the topics to
its own favourite label and the rest at random), a user changes that rule on a few topics of their own, and
a fraction `noise` of labels are drawn uniformly. So:
- a population model can only learn, per topic, the label most groups agree on;
- a group-aware model can learn its group's rule (all but the user's deviations);
- a user-aware model can learn the user's exact rule, up to the noise: the oracle ceiling is
  1 - noise + noise / labels.
History lengths are Pareto distributed (most users have few items), as in real personalization data.
Everything is seeded; the same config always gives the same data.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proper_fed.data.task_spec import TaskSpec
from proper_fed.data.types import Dataset, ProfileItem, Query, User
from proper_fed.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

LABEL_WORDS = ("like", "skip", "save", "share", "mute", "pin", "hide", "flag")
TOPIC_WORDS = (
    "chess",
    "pasta",
    "jazz",
    "stocks",
    "soccer",
    "cats",
    "rain",
    "code",
    "yoga",
    "cars",
    "bread",
    "space",
)
KINDS = ("post", "video", "note", "photo")
FILLERS = (
    "today",
    "again",
    "tips",
    "news",
    "story",
    "update",
    "list",
    "clip",
    "guide",
    "recap",
    "ideas",
    "notes",
    "review",
    "thread",
    "facts",
    "basics",
    "trends",
    "questions",
    "moments",
    "picks",
)
# A second word makes texts rarely repeat, so the leak guard (which drops history items identical to any
# query) leaves the histories almost whole.
MOODS = (
    "quick",
    "long",
    "funny",
    "calm",
    "old",
    "new",
    "odd",
    "weekly",
    "short",
    "local",
    "big",
    "daily",
    "simple",
    "rare",
    "fresh",
    "late",
)
TASK_NAME = "synthetic_groups"
DEFAULT_LABELS = 5


def synthetic_spec(labels: int = DEFAULT_LABELS) -> TaskSpec:
    """The classification task of the generator; the prompt stays around 20 tokens."""
    if not 2 <= labels <= len(LABEL_WORDS):
        raise ConfigError(f"labels = {labels}; the synthetic task supports 2..{len(LABEL_WORDS)} labels")
    return TaskSpec(
        name=TASK_NAME,
        type="classification",
        labels=LABEL_WORDS[:labels],
        input_field="text",
        output_field="label",
        profile_template="React with one of {labels}: {text}",
        aliases=("synthetic",),
        description="Synthetic reactions to short items, with latent user groups.",
    )


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings; defaults fit the embedded default run (about 40 users, seconds to train).

    users / groups: users and latent groups (users are assigned round-robin, so groups are balanced).
    labels / topics: label-set and topic-vocabulary sizes.
    min_history / max_history / pareto_alpha: history length = min_history * Pareto(alpha), capped.
    min_queries / max_queries: held-out queries per user (uniform in the range).
    favourite_share: share of topics a group maps to its favourite label (makes user-majority informative).
    user_deviations: topics on which a user departs from the group rule.
    noise: probability that an item's label is drawn uniformly instead of from the user's rule.
    """

    users: int = 40
    groups: int = 4
    labels: int = DEFAULT_LABELS
    topics: int = 8
    min_history: int = 4
    max_history: int = 40
    pareto_alpha: float = 1.16
    min_queries: int = 2
    max_queries: int = 3
    favourite_share: float = 0.5
    user_deviations: int = 1
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.users >= 2, "users", "at least 2"),
            (1 <= self.groups <= self.users, "groups", f"between 1 and users ({self.users})"),
            (2 <= self.labels <= len(LABEL_WORDS), "labels", f"between 2 and {len(LABEL_WORDS)}"),
            (2 <= self.topics <= len(TOPIC_WORDS), "topics", f"between 2 and {len(TOPIC_WORDS)}"),
            (1 <= self.min_history <= self.max_history, "min_history", "between 1 and max_history"),
            (self.pareto_alpha > 0, "pareto_alpha", "positive"),
            (1 <= self.min_queries <= self.max_queries, "min_queries", "between 1 and max_queries"),
            (0.0 <= self.favourite_share <= 1.0, "favourite_share", "in [0, 1]"),
            (
                0 <= self.user_deviations <= self.topics,
                "user_deviations",
                f"between 0 and topics ({self.topics})",
            ),
            (0.0 <= self.noise <= 1.0, "noise", "in [0, 1]"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ConfigError(f"SyntheticConfig.{name} = {getattr(self, name)!r}; must be {fix}")


@dataclass(frozen=True)
class SyntheticData:
    """The generated dataset plus the latent truth, for ceilings and analysis.

    groups: user id -> latent group. group_rules / user_rules: topic -> label.
    query_topics: query id -> the topic of that query (the true rule's input).
    """

    config: SyntheticConfig
    dataset: Dataset
    groups: dict[str, int]
    group_rules: tuple[dict[str, str], ...]
    user_rules: dict[str, dict[str, str]]
    query_topics: dict[str, str] = field(repr=False)

    @property
    def expected_oracle_accuracy(self) -> float:
        """Accuracy of the true user rule in expectation: right unless noise picks another label."""
        return 1.0 - self.config.noise + self.config.noise / self.config.labels

    def rule_predictions(self, level: str) -> dict[str, str]:
        """Query id -> label by the true rule at `level`: "user", "group" or "population".

        population: per topic, the label most users' rules give (what a model without user identity can
        learn at best, in expectation).
        """
        if level not in ("user", "group", "population"):
            raise ConfigError(f"level = {level!r}; use 'user', 'group' or 'population'")
        population = self._population_rule()
        out = {}
        for user in self.dataset.users:
            rule = {
                "user": self.user_rules[user.user_id],
                "group": self.group_rules[self.groups[user.user_id]],
                "population": population,
            }[level]
            out.update({q.id: rule[self.query_topics[q.id]] for q in user.queries})
        return out

    def _population_rule(self) -> dict[str, str]:
        labels = self.dataset.task.labels
        rule = {}
        for topic in TOPIC_WORDS[: self.config.topics]:
            votes = Counter(r[topic] for r in self.user_rules.values())
            rule[topic] = min(votes, key=lambda lab: (-votes[lab], labels.index(lab)))
        return rule

    def ceilings(self) -> dict[str, float]:
        """Measured query accuracy of each true rule and of the label baselines (the planted structure)."""
        from proper_fed.data.baselines import majority_predictions, user_majority_predictions

        golds = {q.id: q.gold for q in self.dataset.queries}

        def accuracy(preds: dict[str, str]) -> float:
            return sum(preds[qid] == gold for qid, gold in golds.items()) / len(golds)

        return {
            "oracle_expected": self.expected_oracle_accuracy,
            "oracle_user_rule": accuracy(self.rule_predictions("user")),
            "group_rule": accuracy(self.rule_predictions("group")),
            "population_rule": accuracy(self.rule_predictions("population")),
            "majority": accuracy(majority_predictions(self.dataset)),
            "user_majority": accuracy(user_majority_predictions(self.dataset)),
        }


def _group_rules(cfg: SyntheticConfig, rng: random.Random) -> list[dict[str, str]]:
    labels, topics = LABEL_WORDS[: cfg.labels], TOPIC_WORDS[: cfg.topics]
    rules = []
    for g in range(cfg.groups):
        favourite = labels[g % len(labels)]
        favoured = set(rng.sample(topics, round(cfg.favourite_share * len(topics))))
        others = [lab for lab in labels if lab != favourite]
        rules.append({t: favourite if t in favoured else rng.choice(others) for t in topics})
    return rules


def _user_rule(group_rule: dict[str, str], cfg: SyntheticConfig, rng: random.Random) -> dict[str, str]:
    rule = dict(group_rule)
    labels = LABEL_WORDS[: cfg.labels]
    for topic in rng.sample(sorted(rule), cfg.user_deviations):
        rule[topic] = rng.choice([lab for lab in labels if lab != group_rule[topic]])
    return rule


def _draw(rule: dict[str, str], cfg: SyntheticConfig, rng: random.Random) -> tuple[str, str, str]:
    """One item: (text, topic, label)."""
    topic = rng.choice(TOPIC_WORDS[: cfg.topics])
    text = f"{rng.choice(MOODS)} {rng.choice(KINDS)} about {topic} {rng.choice(FILLERS)}"
    label = rule[topic] if rng.random() >= cfg.noise else rng.choice(LABEL_WORDS[: cfg.labels])
    return text, topic, label


def generate_synthetic(config: SyntheticConfig | None = None) -> SyntheticData:
    """Generate the dataset in memory (see the module docstring for the planted structure)."""
    cfg = config or SyntheticConfig()
    rng = random.Random(cfg.seed)
    spec = synthetic_spec(cfg.labels)
    group_rules = _group_rules(cfg, rng)
    users, groups, user_rules, query_topics = [], {}, {}, {}
    for i in range(cfg.users):
        uid = f"u{i:03d}"
        group = i % cfg.groups
        rule = _user_rule(group_rules[group], cfg, rng)
        n_items = min(cfg.max_history, int(cfg.min_history * rng.paretovariate(cfg.pareto_alpha)))
        profile = []
        for k in range(n_items):
            text, _, label = _draw(rule, cfg, rng)
            profile.append(ProfileItem(f"{uid}-h{k}", {"text": text, "label": label}))
        queries = []
        for j in range(rng.randint(cfg.min_queries, cfg.max_queries)):
            text, topic, label = _draw(rule, cfg, rng)
            qid = f"{uid}-q{j}"
            prompt = spec.profile_template.format_map({"text": text, "labels": spec.labels_text})
            queries.append(Query(qid, prompt, label))
            query_topics[qid] = topic
        users.append(User(uid, tuple(profile), tuple(queries)))
        groups[uid], user_rules[uid] = group, rule
    dataset = Dataset(task=spec, users=tuple(users), source=f"synthetic(seed={cfg.seed})")
    return SyntheticData(cfg, dataset, groups, tuple(group_rules), user_rules, query_topics)


# --- writing in LaMP layout --------------------------------------------------------------------------------


def _spec_toml(spec: TaskSpec) -> str:
    # JSON string and array syntax is valid TOML for the plain values a spec holds.
    lines = ["# Written by proper-fed data synth; load_dataset picks it up from this folder."]
    values: dict[str, Any] = {
        "name": spec.name,
        "type": spec.type,
        "description": spec.description,
        "labels": list(spec.labels),
        "input_field": spec.input_field,
        "output_field": spec.output_field,
        "profile_template": spec.profile_template,
        "metrics": list(spec.metric_names),
        "aliases": list(spec.aliases),
    }
    lines += [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def lamp_documents(data: SyntheticData) -> dict[str, Any]:
    """LaMP-layout documents: questions (with `user_id`, as LaMP's time-based release), outputs, latent."""
    questions, golds = [], []
    for user in data.dataset.users:
        profile = [{"id": it.id, **it.fields} for it in user.profile]
        for q in user.queries:
            questions.append({"id": q.id, "user_id": user.user_id, "input": q.input, "profile": profile})
            golds.append({"id": q.id, "output": q.gold})
    latent = {
        "config": asdict(data.config),
        "groups": data.groups,
        "group_rules": list(data.group_rules),
        "user_rules": data.user_rules,
        "query_topics": data.query_topics,
        "ceilings": data.ceilings(),
    }
    return {
        "questions.json": questions,
        "outputs.json": {"task": TASK_NAME, "golds": golds},
        "latent.json": latent,
    }


def write_synthetic(data: SyntheticData, out: str | Path, *, force: bool = False) -> Path:
    """Write questions.json, outputs.json, task.toml and latent.json to `out`, atomically.

    The files are written to a temporary sibling folder that replaces `out` only when complete, so a
    failure leaves nothing behind. A non-empty `out` is refused unless `force`.
    """
    from proper_fed.atomic import staged_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"{out}: folder is not empty; choose an empty folder or pass --force to replace it")
    documents = lamp_documents(data)
    with staged_dir(out) as tmp:
        for name, doc in documents.items():
            (tmp / name).write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / "task.toml").write_text(_spec_toml(data.dataset.task), encoding="utf-8")
    logger.info("wrote synthetic dataset (%d users) to %s", len(data.dataset.users), out)
    return out
