"""The one exception type users see, and the wrapper that turns it into a one-line message."""

import sys


class UserError(Exception):
    """Something the user can fix (a bad flag, file or path); printed without a traceback."""


def run_cli(main, argv=None):
    """Run a command-line entry point: UserError -> 'error: ...' + exit 2, Ctrl-C -> exit 130."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint (if any) is intact", file=sys.stderr)
        sys.exit(130)
