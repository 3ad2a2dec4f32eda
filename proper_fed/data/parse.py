"""Turn a model's free text into a prediction the metrics can score.

A small model rarely answers with the bare label ("The tag is comedy."), so classification takes the first
label that appears as a whole word; an answer naming no label is kept as is so it counts as wrong (as the
official scorer counts any string outside the label set).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# An integer that is not part of a decimal number ("4.5" must not read as 4).
_INT = re.compile(r"(?<![\d.])\d+(?![\d]|\.\d)")


@lru_cache(maxsize=64)
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so at one position "dark comedy" wins over "comedy"; re.search gives the leftmost match.
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def parse_label(text: str, labels: Sequence[str]) -> str:
    """The label (canonical spelling) appearing first in `text`, case-insensitive; else `text` stripped."""
    if not labels:
        return text.strip()
    match = _label_pattern(tuple(labels)).search(text)
    if match is None:
        return text.strip()
    found = match.group(0).lower()
    return next(label for label in labels if label.lower() == found)


def parse_rating(text: str, low: int, high: int) -> int | None:
    """The first integer in `text` within [low, high]; None if there is none (scored as the worst guess)."""
    for match in _INT.finditer(text):
        value = int(match.group(0))
        if low <= value <= high:
            return value
    return None


def canonical_label(value: str, labels: Sequence[str]) -> str | None:
    """`value` spelled as in the label set (exact after stripping, else case-insensitive); None if absent."""
    stripped = value.strip()
    if stripped in labels:
        return stripped
    lowered = stripped.lower()
    return next((label for label in labels if label.lower() == lowered), None)


def canonical_rating(value: str, low: int, high: int) -> int | None:
    """A gold or history rating ("4", "4.0", 4) as an int in [low, high]; None if it is not one."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    if not number.is_integer() or not low <= number <= high:
        return None
    return int(number)
