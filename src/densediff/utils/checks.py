"""Validators for untrusted input, shared by every reader and parser.

Every file densediff reads and every number a user, a config or a file gives is untrusted:
these helpers turn whatever is wrong with it into one :class:`~densediff.errors.UserError` line
naming the file, key or option, before any work or allocation. They import nothing of densediff
but :mod:`densediff.errors`, so every layer can use them.

- bounds: :data:`MAX_SIDE`, :data:`MAX_INPUT_PIXELS`, :data:`MAX_NESTING`, ...; :func:`check_int`,
  :func:`check_size`, :func:`finite_float`;
- environment variables: :func:`env_int`, :func:`env_float`;
- nested data: :func:`json_loads` (depth checked before parsing), :func:`check_nesting`;
- paths: :func:`path_kind`, :func:`require_file`, :func:`read_text` (UTF-8, BOM dropped);
- writes: :func:`open_exclusive` (``O_CREAT | O_EXCL | O_NOFOLLOW``), :func:`write_error`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from densediff.errors import UserError, one_line
from densediff.limits import (
    MAX_INPUT_PIXELS,
    MAX_NESTING,
    MAX_NODES,
    MAX_SIDE,
    MAX_TEXT_BYTES,
    MIN_SIDE,
)

TEXT_ENCODINGS = "UTF-8 (with or without a byte-order mark; ASCII is UTF-8)"
"""The encodings text files are read in, for messages and the README."""


# --------------------------------------------------------------------------------------------
# numbers


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; UserError naming ``what`` otherwise (bools and
    floats with a fraction are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"{what}: expected a whole number between {low} and {high}, got "
                            f"{short_repr(value)}")
    if not low <= value <= high:
        raise UserError(f"{what}: must be between {low} and {high}, got {value}")
    return value


def check_size(size: Any, what: str) -> tuple[int, int]:
    """An (H, W) input size: two whole numbers, each in [:data:`MIN_SIDE`, :data:`MAX_SIDE`],
    H x W at most :data:`MAX_INPUT_PIXELS`; UserError naming ``what`` otherwise."""
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise UserError(f"{what} must be [H, W], got {short_repr(size)}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in size):
        raise UserError(f"{what} must be [H, W] of two whole numbers, got {short_repr(size)}")
    h, w = size
    if min(h, w) < MIN_SIDE:
        raise UserError(f"{what}: height and width must be at least {MIN_SIDE} pixels, got "
                        f"{h} {w}")
    if max(h, w) > MAX_SIDE or h * w > MAX_INPUT_PIXELS:
        raise UserError(f"{what}: {h} x {w} is above the limit (each side at most {MAX_SIDE}, "
                        f"H x W at most {MAX_INPUT_PIXELS} = 4096 x 4096 pixels)")
    return int(h), int(w)


def finite_float(raw: Any, what: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``raw`` (a number or its text) as a finite float inside the given bounds; UserError
    naming ``what`` otherwise (``nan``, ``inf``, ``1e999``, words, bools)."""
    if isinstance(raw, bool):
        value = math.nan
    else:
        try:
            value = float(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError, OverflowError):
            value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{what}: expected a finite number, got {short_repr(raw)}")
    bad = ((low is not None and (value < low or (low_open and value == low)))
           or (high is not None and (value > high or (high_open and value == high))))
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise UserError(f"{what}: must be {lo}x{hi}, got {short_repr(raw)}")
    return value


def env_int(name: str, default: int, low: int, high: int,
            env: os._Environ | dict | None = None) -> int:
    """The environment variable ``name`` as a whole number in ``[low, high]`` (``default``
    when unset or empty); one UserError line naming the variable otherwise. A float spelling
    of a whole number (``5e7``) is accepted."""
    raw = (os.environ if env is None else env).get(name, "")
    if not raw.strip():
        return default
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            f = float(text)
        except (ValueError, OverflowError):
            f = math.nan
        if not math.isfinite(f) or not f.is_integer():
            raise UserError(f"{name}={short_repr(raw)}: expected a whole number between {low} and "
                            f"{high}") from None
        value = int(f)
    if not low <= value <= high:
        raise UserError(f"{name}={short_repr(raw)}: expected a whole number between {low} and "
                        f"{high}")
    return value


def env_float(name: str, default: float, low: float | None = None, high: float | None = None,
              env: os._Environ | dict | None = None) -> float:
    """The environment variable ``name`` as a finite float in ``[low, high]`` (``default``
    when unset); UserError naming the variable otherwise."""
    raw = (os.environ if env is None else env).get(name, "")
    if not raw.strip():
        return default
    return finite_float(raw, name, low, high)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters, for messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# nested data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (strings skipped), without parsing it."""
    depth = top = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        top = max(top, depth)
    return top


def json_loads(text: str | bytes, what: str, max_depth: int = MAX_NESTING) -> Any:
    """Parse JSON ``text``; UserError naming ``what`` when it is not JSON or nests deeper than
    ``max_depth`` (checked before parsing: no RecursionError). ``NaN``/``Infinity`` are
    refused (not JSON)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{what}: not UTF-8 text") from None
    if json_depth(text) > max_depth:
        raise UserError(f"{what}: nested more than {max_depth} levels deep")

    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")
    try:
        value = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{what}: not readable JSON ({one_line(e, 120)})") from None
    return value


def check_nesting(value: Any, what: str, max_depth: int = MAX_NESTING,
                  max_nodes: int = MAX_NODES) -> Any:
    """``value`` unchanged when its lists/mappings nest at most ``max_depth`` deep and hold at
    most ``max_nodes`` values in all (YAML aliases counted at every use, so an alias bomb is
    refused before anything expands it); UserError naming ``what`` otherwise. Iterative: no
    RecursionError however deep the value is."""
    stack = [(value, 0)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise UserError(f"{what}: more than {max_nodes} values (an alias bomb?)")
        if isinstance(v, dict):
            children = [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if depth >= max_depth and children:
            raise UserError(f"{what}: nested more than {max_depth} levels deep")
        stack.extend((c, depth + 1) for c in children)
    return value


# --------------------------------------------------------------------------------------------
# paths


def path_kind(path: str | os.PathLike) -> str:
    """What is at ``path``, in words: ``a file``, ``a folder``, ``a FIFO (named pipe)``, ``a
    character device``, ``a block device``, ``a socket``, ``a broken or looping symbolic
    link``, ``missing`` or ``unreadable (...)``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken or looping link" if os.path.islink(path) else "missing"
    except OSError as e:
        if os.path.islink(path):
            return "a broken or looping link"
        return f"unreadable ({e.strerror or one_line(e)})"
    mode = st.st_mode
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_file(path: str | os.PathLike, what: str = "", error: type[UserError] = UserError,
                 hint: str = "") -> Path:
    """``path`` when it is a regular file (links followed); else ``error`` saying what it is
    (missing, a folder, a FIFO, a device ...), so that reading never blocks on a pipe."""
    kind = path_kind(path)
    if kind != "a file":
        prefix = f"{what}: " if what else ""
        words = "not found" if kind == "missing" else f"is {kind}, not a regular file"
        raise error(f"{prefix}{path}: {words}{hint}")
    return Path(path)


def read_text(path: str | os.PathLike, what: str = "", error: type[UserError] = UserError,
              max_bytes: int = MAX_TEXT_BYTES, kind: str = "text file") -> str:
    """A text file's contents, decoded as UTF-8 with an optional byte-order mark dropped
    (:data:`TEXT_ENCODINGS`); ``error`` naming the file when it is not a regular file, larger
    than ``max_bytes``, unreadable or not UTF-8."""
    path = require_file(path, what, error)
    prefix = f"{what}: " if what else ""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{prefix}{path}: {size} bytes is above the limit of {max_bytes} for a "
                        "text file")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{prefix}{path}: cannot read ({e.strerror or one_line(e)})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{prefix}{path}: cannot read as a UTF-8 {kind} (byte {e.start} is not "
                    f"UTF-8; accepted: {TEXT_ENCODINGS})") from None


# --------------------------------------------------------------------------------------------
# writes


def open_exclusive(path: str | os.PathLike, mode: int = 0o666) -> int:
    """A new file at ``path`` for writing (``O_CREAT | O_EXCL | O_NOFOLLOW``): never follows
    a link and never truncates a file that is already there (``FileExistsError``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, mode)


def write_error(path: str | os.PathLike, err: BaseException, what: str = "",
                error: type[UserError] = UserError) -> UserError:
    """The one-line UserError for a failed write of ``path`` (full disk, file-size limit,
    ``EIO`` ...); raise it ``from None``."""
    reason = (err.strerror or one_line(err)) if isinstance(err, OSError) else one_line(err)
    if "File too large" in reason or getattr(err, "errno", None) == 27:  # EFBIG
        reason += " (the file-size limit, ulimit -f)"
    prefix = f"{what}: " if what else ""
    return error(f"{prefix}cannot write {path}: {reason}; earlier files are intact")
