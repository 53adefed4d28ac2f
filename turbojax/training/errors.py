"""User errors and the command-line wrapper that reports them.

    class UserError(Exception)        a mistake in the user's input (flag, config key/value, file, workdir ...)
    run_cli(main, argv=None) -> int   calls main(argv or sys.argv[1:]); a UserError becomes one line
                                      `error: <message>` on stderr and exit status 1; main's int return is the
                                      status otherwise (None -> 0)

House rule: every user mistake gets ONE line starting `error: ` naming the flag/file/key/shape; tracebacks are only
for our bugs. Raise a UserError (or a subclass) with the message only (no "error:" prefix) anywhere below main.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A mistake in the user's input, reported as one `error:` line without a traceback."""


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and turn a UserError into `error: ...` on stderr with exit status 1."""
    try:
        status = main(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0 if status is None else int(status)
