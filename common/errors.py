"""The one family of errors a user can fix.

`lvd` prints a `UserError` as one line and exits with status 2: a bad value, a missing input, a
stage run before the one it needs, a damaged file. Every other exception is a bug in lvd and keeps
its traceback. Code that checks what a user gave raises a subclass of `UserError` (or `UserError`
itself) with a message that says what is wrong and how to fix it; it never relies on a built-in
exception type being read as the user's fault.
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable

#: Exit status for a user error (argparse uses the same for a bad command line).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix; its message is the whole story (one line, no traceback)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named, or a previous stage's output, is not there."""


class InputFormatError(UserError, ValueError):
    """A file or value the user gave is not in a form lvd reads."""


class MemoryBudgetError(UserError, MemoryError):
    """Work that cannot fit `memory_gb`: raise the budget or use a machine with more memory."""


#: OS errors that come from the machine, not from lvd: a full or read-only disk, a denied path.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

BUG_REPORT = (
    "this is a bug in lvd, not something you did: please report it with the traceback above "
    "(and the command that gave it) to the lvd issue tracker"
)


def one_line(exc: BaseException) -> str:
    """The message of an error on one line (a KeyError's repr quotes are dropped)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(message).split())


def is_user_error(exc: BaseException) -> bool:
    """A `UserError`, or an OS error that the machine caused (disk full, permission denied)."""
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS


def run_command(prog: str, command: Callable[[], int], *, debug: bool = False) -> int:
    """Run one CLI command under lvd's error policy and return its exit status.

    A user error prints `PROG: error: MESSAGE` on one line and returns 2 (`--debug` re-raises it);
    Ctrl-C returns 130; anything else is lvd's bug: its traceback, then one line asking for a report.
    """
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_user_error(exc):
            traceback.print_exc()
            print(f"{prog}: {BUG_REPORT}", file=sys.stderr)
            return 1
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
