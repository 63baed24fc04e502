"""Errors the CLI turns into a one-line message (no traceback) and exit code 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: say what to fix."""


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Re-raises the exceptions of ``kinds`` (default ``ValueError``, ``FileNotFoundError``) as a UserError with
    the same message: a library's error about the user's input (a bad preset, a missing file) is the user's to
    fix, and says what to fix."""
    caught = kinds or (ValueError, FileNotFoundError)
    try:
        yield
    except caught as exc:
        raise UserError(str(exc)) from exc
