"""SIGTERM handled like SIGINT, and saves that a signal cannot cut in half.

``kill``, ``timeout``, SLURM and ``docker stop`` send SIGTERM, whose default action ends the
process on the spot: temporary files stay behind and a checkpoint waiting in ``.pending/`` is
lost. Inside :func:`graceful` both SIGINT and SIGTERM raise :class:`Interrupted` (a
``KeyboardInterrupt``), so every ``except KeyboardInterrupt`` / ``finally`` cleans up as for
Ctrl-C; inside :func:`critical` (a checkpoint save and its commit) the signal waits until the
section is done, so a stop always happens at a safe point.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Raised by SIGINT or SIGTERM inside :func:`graceful`; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


_depth = 0  # nesting of critical sections
_deferred: int | None = None  # a signal that arrived inside one


def _handler(signum, frame) -> None:
    global _deferred
    if _depth > 0:
        _deferred = signum
        return
    raise Interrupted(signum)


@contextmanager
def graceful() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` while inside (main thread only; elsewhere
    a no-op); the earlier handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextmanager
def critical() -> Iterator[None]:
    """A section a signal must not cut (a save and its commit): a SIGINT/SIGTERM that arrives
    inside is raised when the section ends (only while :func:`graceful` is active)."""
    global _depth, _deferred
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _deferred is not None:
        signum, _deferred = _deferred, None
        raise Interrupted(signum)
