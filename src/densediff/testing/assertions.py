"""Assertions shared by the tests."""

from __future__ import annotations

__all__ = ["one_line_error"]


def one_line_error(capsys, code, *needles):
    """Assert a CLI call failed as a user error: exit code 2 and one line on stderr starting
    ``error: `` with no traceback, naming each of ``needles``. Returns that line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err
