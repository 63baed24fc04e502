"""Errors the CLI turns into a one-line message (no traceback) and exit code 2."""


class UserError(Exception):
    """Bad input from the user: say what to fix."""
