"""Reading JSON input files with errors that name the file, the place and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proper_fed.errors import DataError


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such file") from err
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
            "fix or re-export the file"
        ) from err


def field_text(value: Any) -> str | None:
    """A profile-item value as text: strings as is, numbers as written, nested as JSON, null dropped."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def record_id(value: Any) -> str | None:
    """An id as a string (LaMP ids are strings, some releases use ints); None if it is not an id."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str):
        text = str(value).strip()
        return text or None
    return None
