"""Scoring protocols: how a model's answer to a query is obtained before it is scored.

- `generate`: LaMP's protocol. Greedy generation, then the task parses the text (first label named, first
  integer in range, or the stripped text).
- `rank`: for classification and rating tasks only. The answer is the label (for ratings each integer of the
  scale as text) whose tokens the model gives the highest log-likelihood after the prompt.

The names a device reports under are fixed here, once, for the device and the privacy schema: the first
protocol of a run keeps the plain `<method>.<stat>`; every further one is `<method>@<protocol>.<stat>`.
"""

from __future__ import annotations

from collections.abc import Sequence

from proper_fed.data.task_spec import TaskSpec
from proper_fed.errors import ConfigError

PROTOCOLS = ("generate", "rank")
RANKABLE_TYPES = ("classification", "rating")


def scored_name(method: str, protocol: str, protocols: Sequence[str]) -> str:
    """The name a method's statistics are sent and tabled under for one protocol of the run."""
    return method if protocol == protocols[0] else f"{method}@{protocol}"


def check_protocols(task: TaskSpec, protocols: Sequence[str]) -> None:
    """ConfigError when a protocol does not apply to the task (`rank` needs a label set to rank)."""
    if "rank" in protocols and task.type not in RANKABLE_TYPES:
        raise ConfigError(
            f"scoring = {','.join(protocols)!r}: 'rank' needs a label set to rank, and task {task.name} is a "
            f"{task.type} task; use scoring = 'generate' for it (rank applies to "
            f"{' and '.join(RANKABLE_TYPES)} tasks)"
        )


def scored_answer(task: TaskSpec, raw: str) -> str:
    """What the metrics score for a raw answer, as text for a LaMP outputs file: the parsed label (or the
    stripped text when it names none), the parsed integer (or "" when there is none: LaMP's scorer maps a
    non-number to the far end of the scale, as our statistics do), or the stripped text."""
    parsed = task.parse_output(raw)
    return "" if parsed is None else str(parsed).strip()
