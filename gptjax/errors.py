"""The one exception type that command-line entry points turn into a clean message."""

import sys


class UserError(Exception):
    """Bad input from the user: the message names the input and the fix.

    Command-line `main`s catch it and print `error: <message>` with no traceback.
    """


def exit_with(err: UserError, code: int = 2) -> None:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(code)
