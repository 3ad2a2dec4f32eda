"""`load_dataset`: one entry point for every layout, picking the loader and the task from what is on disk."""

from __future__ import annotations

from pathlib import Path

from proper_fed.data.lamp import load_lamp
from proper_fed.data.oppu import OPPU_FILES, is_oppu_folder, load_oppu
from proper_fed.data.task_spec import TaskSpec, load_task_spec
from proper_fed.data.tasks import resolve_task
from proper_fed.data.types import Dataset
from proper_fed.errors import DataError

# A dataset folder may carry its own spec (the synthetic generator writes one); --task/--spec override it.
FOLDER_SPEC = "task.toml"


def _folder_spec(folder: Path) -> TaskSpec | None:
    path = folder / FOLDER_SPEC
    return load_task_spec(path) if path.is_file() else None


def load_dataset(
    path: str | Path, task: str | TaskSpec | None = None, spec: str | Path | TaskSpec | None = None
) -> Dataset:
    """Load a dataset in LaMP or OPPU layout into the normalized form.

    path: a LaMP questions file (its `*outputs*` sibling is picked up), a folder holding one
        `*questions*.json` (+ outputs), or an OPPU task folder (or one of its files).
    task: a task name or alias ("LaMP-2", "LaMP_2M", "movie_tagging", "commit_tagging").
    spec: a custom task (TOML path or TaskSpec); give task or spec, not both.
    Without either, the task comes from the folder's `task.toml`, the outputs' "task" field, OPPU's label
    file or folder name, or the wording of the questions, in that order.
    """
    path = Path(path)
    requested = resolve_task(task, spec if not isinstance(spec, Path) else str(spec))
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if is_oppu_folder(path) or (path.is_file() and path.name in OPPU_FILES):
        folder = path if path.is_dir() else path.parent
        return load_oppu(path, requested or _folder_spec(folder))
    if path.is_dir():
        found = sorted(path.glob("*questions*.json"))
        if not found:
            raise DataError(
                f"{path}: no *questions*.json (LaMP) and no {' / '.join(OPPU_FILES)} (OPPU) in this folder"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several questions files ({names}); pass the one you want")
        path = found[0]
    return load_lamp(path, task=requested or _folder_spec(path.parent))
