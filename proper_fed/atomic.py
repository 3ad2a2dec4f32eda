"""Atomic file and directory writes: a reader sees the old content or the new one, never a mix.

Every write goes to a temporary sibling (same directory, so same filesystem and `os.replace` is atomic),
is fsynced, then renamed over the target; the directory is fsynced so the rename itself survives a crash.
A failure at any point removes the temporary and leaves the target untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (a rename, a new file) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened, and NTFS journals renames anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    # mkstemp creates the file 0600, so secret content is never readable by others, even for a moment.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=directory)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, mode)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = True
) -> Path:
    """Write `data` to `path` atomically with permission bits `mode`.

    With `overwrite=False` the write fails with `FileExistsError` if `path` exists, also when another process
    creates it concurrently (the final step is a hard link, which never replaces).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(target.parent, target.name, data, mode)
    try:
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, mode: int = 0o644, overwrite: bool = True
) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode, overwrite=overwrite)


def replace_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the finished directory `staging` to `target`, replacing any existing `target`.

    POSIX cannot rename a directory over a non-empty one, so an existing target is first renamed aside to a
    sibling, then `staging` takes its place, then the old copy is deleted. If the second rename fails the old
    target is put back. Between the two renames (a crash window of one syscall) the old copy survives under
    `.<name>.old-*`, so nothing is ever lost.
    """
    src, dst = Path(staging), Path(target)
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError(f"staging dir {src} must be a sibling of {dst} so the rename stays atomic")
    if not dst.exists():
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return dst
    backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rmdir(backup)  # we only wanted a unique, unused name
    os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    fsync_dir(dst.parent)
    shutil.rmtree(backup, ignore_errors=True)
    return dst


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike[str], *, mode: int = 0o755) -> Iterator[Path]:
    """Yield an empty sibling directory of `target`; on success it replaces `target`, on error it is removed.

    The finished directory gets permission bits `mode` (mkdtemp creates it 0700).

    Usage: `with staged_dir(out) as tmp: write files into tmp` -- readers of `out` never see a half-written
    directory.
    """
    dst = Path(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=_TMP_SUFFIX, dir=dst.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                _fsync_file(child)
        os.chmod(tmp, mode)
        fsync_dir(tmp)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
