"""The one exception type users see, and the wrapper that turns it into a one-line message."""

import sys


class UserError(Exception):
    """Something the user can fix (a bad flag, file or path); printed without a traceback."""


def need(ok, message):
    """Raise UserError(message) unless ok: a check in one line."""
    if not ok:
        raise UserError(message)


class Stopped(Exception):
    """A run that stopped on request (SIGINT, SIGTERM) after saving; exits 128 + the signal number."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def first_line(e):
    """The first line of an exception's message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def run_cli(main, argv=None):
    """Run a command-line entry point: UserError -> 'error: ...' + exit 2, Ctrl-C -> exit 130."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint (if any) is intact", file=sys.stderr)
        sys.exit(130)
