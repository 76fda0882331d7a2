"""User-facing errors.

Anything a user can cause (a bad file, a bad config key, a checkpoint that does not fit) is
raised as :class:`UserError` with a one-line message that names the file or key and says what
is wrong. The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """An error caused by user input; its message is one line naming the file/key."""


class ConfigError(UserError):
    """A config file, key or value is wrong."""


class DataError(UserError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt or does not fit the config."""


class DivergenceError(UserError):
    """Training produced NaN/inf losses or gradients; no checkpoint is written for it."""


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def terminal_line(text: str) -> str:
    """``text`` as one terminal-safe line: terminal colour codes (e.g. from a library's
    message) dropped, other control characters written as ``\\xNN`` (file names may hold any
    byte), whitespace collapsed."""
    text = _ANSI.sub("", text)
    text = "".join(c if c.isprintable() or c.isspace() else f"\\x{ord(c):02x}" for c in text)
    return " ".join(text.split())


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line (:func:`terminal_line`, at most ``limit``
    characters), for wrapping library errors into a one-line :class:`UserError`."""
    text = terminal_line(str(err)) or type(err).__name__
    return text[:limit] + ("..." if len(text) > limit else "")
