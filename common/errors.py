"""The one family of errors a user can fix.

`lvd` prints a `UserError` as one line and exits with status 2: a bad value, a missing input, a
stage run before the one it needs, a damaged file. Every other exception is a bug in lvd and keeps
its traceback. Code that checks what a user gave raises a subclass of `UserError` (or `UserError`
itself) with a message that says what is wrong and how to fix it; it never relies on a built-in
exception type being read as the user's fault.
"""

from __future__ import annotations

#: Exit status for a user error (argparse uses the same for a bad command line).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix; its message is the whole story (one line, no traceback)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named, or a previous stage's output, is not there."""


class InputFormatError(UserError, ValueError):
    """A file or value the user gave is not in a form lvd reads."""
