"""Progress of a run as JSON lines in `<out>/progress.jsonl`: what phase, which devices are done, time left.
A file rather than the log stream, so any watcher (the simulate command, `tail -f`) sees it as it happens."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Progress:
    """`t0` (wall-clock start) and `append` let a second process (the server stages' own) add to the file."""

    def __init__(self, out: str | Path, t0: float | None = None, append: bool = False):
        self.path = Path(out) / "progress.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")
        self.t0 = time.time() if t0 is None else t0

    def __call__(self, message: str, **fields: float | int | str) -> None:
        log.warning(message)
        row = {"t": round(time.time() - self.t0, 1), "message": message, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
