"""Output folders and run-folder locks, checked before any expensive work starts.

Every command that writes (``train``, ``eval --out/--plot``, ``predict --out``, ``bench --out``,
``demo``) asks here first whether it can write where it was told to, so that a read-only or
mistyped output path fails in one line at the start, not with a traceback after the work.
A training run holds an exclusive lock on its run folder (:class:`RunLock`), so two trainings
cannot write into one folder at once.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from densediff.errors import UserError, one_line
from densediff.utils.checks import open_exclusive, path_kind, write_error

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
            raise UserError(f"{what}: {p} is {path_kind(p)}, not a folder"
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
    kind = path_kind(path)
    if kind not in ("a file", "missing", "a broken or looping link") and not kind.startswith(
            "unreadable"):  # unreadable: check_writable_dir says why
        raise UserError(f"{what}: {path} is {kind}; expected a regular file path")
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
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:  # never through a link: the lock file is ours or refused
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            kind = ("a symbolic link" if os.path.islink(self.path) else path_kind(self.path))
            raise UserError(f"{what}: cannot open the lock file {self.path} "
                            f"({kind if kind != 'a file' else e.strerror or one_line(e)}); "
                            "remove it if it is not yours") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)  # a FIFO, a device or a hard link to another file: not ours to write
            raise UserError(f"{what}: the lock file {self.path} is not a plain file of its own "
                            "(a FIFO, device or hard link); remove it if it is not yours")
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


TEMP_PATTERN = re.compile(r"^\..+\.tmp(\d+)(\.[A-Za-z0-9]+)?$")
"""Names of the temporary files :func:`atomic_write` writes: ``.<name>.tmp<pid><suffix>``."""


def temp_path(path: Path) -> Path:
    """The temporary file :func:`atomic_write` writes ``path`` through: hidden, with the
    process id, and ending in ``path``'s suffix (writers pick the format from it)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 error: type[UserError] = UserError, what: str = "") -> None:
    """Call ``write(tmp_path)`` then move the finished file onto ``path`` in one step.

    The temporary file (:func:`temp_path`, next to ``path``: same file system, so
    ``os.replace`` is atomic) is created exclusively (never through a link, never over a file
    that is there); it is removed if ``write`` fails or is interrupted, and ``path`` is
    untouched unless everything succeeded. A failed write (full disk, file-size limit, ``EIO``)
    is one ``error`` line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e, what, error) from None
    tmp = temp_path(path)
    umask = os.umask(0)
    os.umask(umask)
    created = False
    try:
        try:
            fd = open_exclusive(tmp, 0o666 & ~umask)
        except FileExistsError:  # left by an earlier process with our pid: ours to replace
            if not stat.S_ISREG(os.lstat(tmp).st_mode):
                raise
            os.unlink(tmp)
            fd = open_exclusive(tmp, 0o666 & ~umask)
        os.close(fd)
        created = True
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create owner-only files
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:
        if created:
            tmp.unlink(missing_ok=True)
        if isinstance(e, UserError):
            raise
        raise write_error(path, e, what, error) from None
    except BaseException:  # KeyboardInterrupt, SystemExit: leave no temporary file
        if created:
            tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort: not every file system allows this)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``folder`` (and
    its subfolders one level down): regular files named ``.<name>.tmp<pid>`` whose process is
    gone. Nothing else is touched (links, other names, a live process's files). Call it while
    holding the folder's :class:`RunLock`. Returns what was removed."""
    removed = []
    folder = Path(folder)
    dirs = [folder] + ([d for d in folder.iterdir() if d.is_dir() and not d.is_symlink()]
                       if folder.is_dir() else [])
    for d in dirs:
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for p in entries:
            m = TEMP_PATTERN.match(p.name)
            if m is None or _alive(int(m.group(1))):
                continue
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier, interrupted save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def injective_names(choices: list[list[str]]) -> list[str]:
    """One name per item, no two alike: item ``i`` takes ``choices[i][0]`` unless another item
    takes the same name, then its next choice, and so on. The last choices must differ
    pairwise (e.g. full file names in one folder); the result is then injective.

    ``predict`` names its outputs so: ``a.png`` -> ``a``, but with ``a.jpg`` beside it
    ``a_png`` and ``a_jpg``, and with ``a_png.png`` too, the full names.
    """
    last = [c[-1] for c in choices]
    if len(set(last)) != len(last):
        raise ValueError("the last choices must differ pairwise")
    level = [0] * len(choices)
    while True:
        names = [c[min(lv, len(c) - 1)] for c, lv in zip(choices, level)]
        seen: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            seen.setdefault(n, []).append(i)
        clash = [i for group in seen.values() if len(group) > 1 for i in group
                 if level[i] < len(choices[i]) - 1]
        if not clash:
            return names
        for i in clash:
            level[i] += 1
