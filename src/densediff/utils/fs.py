"""Output folders and run-folder locks, checked before any expensive work starts.

Every command that writes (``train``, ``eval --out/--plot``, ``predict --out``, ``bench --out``,
``demo``) asks here first whether it can write where it was told to, so that a read-only or
mistyped output path fails in one line at the start, not with a traceback after the work.
A training run holds an exclusive lock on its run folder (:class:`RunLock`), so two trainings
cannot write into one folder at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from densediff.errors import UserError, one_line

LOCK_NAME = ".densediff.lock"
"""Lock file in a run folder; it holds the process id of the training that owns the folder."""


def _probe(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``; UserError when that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".densediff-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or one_line(e)})"
                        ) from None


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Make the folder ``path`` (and its parents) and check that files can be written in it.

    Args:
        path: the output folder.
        what: how the user named it (``--out``, ``work_dir``), for the error message.

    Raises:
        UserError: ``path`` (or a parent) is a file, or the folder cannot be made or written.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"{what}: {p} is a file, not a folder"
                            + ("" if p == path else f" (needed for {path})"))
        if p.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}: cannot create the folder {path} ({e.strerror or one_line(e)})"
                        ) from None
    _probe(path, what)
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check that the file ``path`` can be written (its folder is made if needed).

    Raises:
        UserError: ``path`` is a folder, its folder cannot be made or written, or the file
            exists and cannot be replaced.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder; expected a file path")
    check_writable_dir(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what}: {path} exists and is not writable")
    return path


class RunLock:
    """An exclusive, non-blocking lock on a run folder (``fcntl.flock`` on
    ``<folder>/.densediff.lock``), held while the object lives.

    The kernel releases it when the process ends, also on ``kill -9``, so a crashed run never
    leaves a stale lock. On systems without ``fcntl`` (Windows) it is a no-op.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "work_dir"):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{what}: cannot create {self.path} ({e.strerror or one_line(e)})"
                            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{what}: {folder} is in use by another training (process {owner}); "
                            "wait for it to finish or choose another work_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (also done by the kernel when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
