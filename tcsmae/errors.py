"""The one exception type for user mistakes.

Raise `UserError` for anything the user can fix (a bad file, a wrong flag, an incomplete
store). Its message names the file, the value and the fix; the CLI prints it without a
traceback and exits with `exit_code`. `assert` is only for internal invariants.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input or the command line; message says what and how to fix it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
