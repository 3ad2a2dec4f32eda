"""The task registry: LaMP-1..7 (LaMP-2 is movie tagging, LaMP-2N the older news variant), the custom specs
shipped under `specs/`, the synthetic task, and any spec registered at run time.

Profile prompts follow OPPU's per-user training data (`prompt/prompt.json`, "OPPU_input"/"OPPU_full"), but
are worded exactly like the LaMP query of the same task, so the model learns one mapping for history and
queries. Where LaMP's profile items do not carry the task's answer we pick a self-supervised pair:
- LaMP-1 (citation choice "[1]"/"[2]"): items are the author's papers (title, abstract); we train
  abstract -> title, which teaches the author's topics and vocabulary without needing negative papers.
- LaMP-7 (tweet paraphrase): items have only `text`; we train "paraphrase this tweet" -> the tweet itself,
  i.e. the model learns to write in the user's style.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

from proper_fed.data.task_spec import TaskSpec, load_task_spec, normalize_task_name, task_spec_from_mapping
from proper_fed.errors import ConfigError

logger = logging.getLogger(__name__)

MOVIE_TAGS = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)
# In the order LaMP's news questions list them, so the profile prompt reads like the query.
NEWS_CATEGORIES = (
    "travel",
    "education",
    "parents",
    "style & beauty",
    "entertainment",
    "food & drink",
    "science & technology",
    "business",
    "sports",
    "healthy living",
    "women",
    "politics",
    "crime",
    "culture & arts",
    "religion",
)

_LAMP: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="LaMP-1",
        type="classification",
        labels=("[1]", "[2]"),
        input_field="abstract",
        output_field="title",
        profile_labelled=False,
        profile_template="Generate a title for the following abstract of a paper: {abstract}",
        aliases=("LaMP_1", "citation"),
        detect_prefix="For an author who has written the paper with the title",
        description="Personalized citation identification: which of two papers the author cites.",
    ),
    TaskSpec(
        name="LaMP-2",
        type="classification",
        labels=MOVIE_TAGS,
        input_field="description",
        output_field="tag",
        profile_template=(
            "Which tag does this movie relate to among the following tags? Just answer with the tag name "
            "without further explanation. tags: [{labels}] description: {description}"
        ),
        aliases=("LaMP_2", "LaMP_2M", "LaMP-2M", "movie_tagging"),
        detect_prefix="Which tag does this movie relate to",
        description="Personalized movie tagging (15 tags).",
    ),
    TaskSpec(
        name="LaMP-2N",
        type="classification",
        labels=NEWS_CATEGORIES,
        input_field="text",
        output_field="category",
        profile_template=(
            "Which category does this article relate to among the following categories? Just answer with "
            "the category name without further explanation. categories: [{labels}] article: {text}"
        ),
        aliases=("LaMP_2N", "LaMP-2-old", "news_categorize"),
        detect_prefix="Which category does this article relate to",
        description="Personalized news categorization (the original LaMP-2, 15 categories).",
    ),
    TaskSpec(
        name="LaMP-3",
        type="rating",
        scale=(1, 5),
        input_field="text",
        output_field="score",
        profile_template=(
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
            "or 5 without further explanation. review: {text}"
        ),
        aliases=("LaMP_3", "product_rating"),
        detect_prefix="What is the score of the following review",
        description="Personalized product rating (1-5).",
    ),
    TaskSpec(
        name="LaMP-4",
        type="generation",
        input_field="text",
        output_field="title",
        profile_template="Generate a headline for the following article: {text}",
        aliases=("LaMP_4", "news_headline"),
        detect_prefix="Generate a headline for the following article",
        description="Personalized news headline generation.",
    ),
    TaskSpec(
        name="LaMP-5",
        type="generation",
        input_field="abstract",
        output_field="title",
        profile_template="Generate a title for the following abstract of a paper: {abstract}",
        aliases=("LaMP_5", "scholarly_title"),
        detect_prefix="Generate a title for the following abstract of a paper",
        description="Personalized scholarly title generation.",
    ),
    TaskSpec(
        name="LaMP-6",
        type="generation",
        input_field="text",
        output_field="title",
        profile_template="Generate a subject for the following email: {text}",
        aliases=("LaMP_6", "email_subject"),
        detect_prefix="Generate a subject for the following email",
        description="Personalized email subject generation (Avocado; not public, bring your own copy).",
    ),
    TaskSpec(
        name="LaMP-7",
        type="generation",
        input_field="text",
        output_field="text",
        profile_template="Paraphrase the following tweet without any explanation before or after it: {text}",
        aliases=("LaMP_7", "tweet_paraphrase"),
        detect_prefix="Paraphrase the following tweet",
        description="Personalized tweet paraphrasing.",
    ),
)

_registered: dict[str, TaskSpec] = {}


def _packaged_specs() -> list[TaskSpec]:
    specs = []
    for entry in sorted(resources.files("proper_fed.data").joinpath("specs").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            specs.append(
                task_spec_from_mapping(tomllib.loads(entry.read_text("utf-8")), f"specs/{entry.name}")
            )
    return specs


@lru_cache(maxsize=1)
def builtin_tasks() -> tuple[TaskSpec, ...]:
    """LaMP tasks, packaged custom specs and the synthetic task, in that order."""
    from proper_fed.data.synthetic import synthetic_spec  # synthetic builds on tasks' machinery

    return (*_LAMP, *_packaged_specs(), synthetic_spec())


def all_tasks() -> tuple[TaskSpec, ...]:
    return (*builtin_tasks(), *_registered.values())


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make a custom spec findable by name (e.g. from an outputs file's "task" field)."""
    clash = find_task(spec.name)
    if clash is not None and not replace:
        raise ConfigError(f"a task named {spec.name!r} is already registered; pass replace=True or rename it")
    _registered[normalize_task_name(spec.name)] = spec
    return spec


def find_task(name: str) -> TaskSpec | None:
    """The task with this name or alias (case, '_' and '-' ignored), or None. Later registrations win."""
    for spec in reversed(all_tasks()):
        if spec.matches(name):
            return spec
    return None


def get_task(name: str) -> TaskSpec:
    """Like find_task, but an unknown name is a ConfigError listing the known ones."""
    spec = find_task(name)
    if spec is None:
        known = ", ".join(s.name for s in all_tasks())
        raise ConfigError(f"unknown task {name!r}; known tasks: {known}; or pass a spec TOML (--spec)")
    return spec


def resolve_task(task: str | TaskSpec | None = None, spec: str | TaskSpec | None = None) -> TaskSpec | None:
    """The task the caller asked for: a spec (TaskSpec or TOML path) wins over a task name."""
    if spec is not None:
        if task is not None:
            raise ConfigError("give either a task name or a spec file, not both")
        return spec if isinstance(spec, TaskSpec) else load_task_spec(spec)
    if task is None or isinstance(task, TaskSpec):
        return task
    return get_task(task)


def detect_task(inputs: Iterable[str]) -> TaskSpec | None:
    """The LaMP task whose fixed question wording starts the first question; None if none does."""
    first = next(iter(inputs), None)
    if first is None:
        return None
    for spec in all_tasks():
        if spec.detect_prefix and first.lstrip().startswith(spec.detect_prefix):
            return spec
    return None


def refine_by_fields(spec: TaskSpec, item_keys: set[str]) -> TaskSpec:
    """Old LaMP releases call the news task "LaMP_2" too; its items have `category`, not `tag`."""
    if spec.name == "LaMP-2" and "tag" not in item_keys and "category" in item_keys:
        logger.info("task LaMP_2 with news items (category field): using LaMP-2N")
        return get_task("LaMP-2N")
    return spec


def lamp_task_id(name: str) -> str:
    """The id LaMP's own scorer (eval/eval_task.py) expects in an outputs file: "LaMP-2" -> "LaMP_2". Tasks
    outside LaMP keep their name; LaMP-2N has no official id (its scorer would use the movie tags)."""
    return name.replace("-", "_") if name.startswith("LaMP-") else name
