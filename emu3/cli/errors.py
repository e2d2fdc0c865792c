"""How every command line ends: expected failures as one line, bugs as a traceback.

Expected failures are the ones a user can fix: bad options, weights or configs (ValueError, which
WeightsError and every input check raise), unreadable or unwritable files, a full disk (OSError).
They print `error: <message>` and exit with status 2. Anything else is a bug and keeps its traceback.
Ctrl-C exits with 130 without a traceback. EMU3_TRACEBACK=1 shows the traceback of an expected
failure too (for a bug report).
"""

import functools
import os
import sys

EXPECTED = (ValueError, OSError)


def command(main):
    """Decorate a command's `main(argv=None)`: the entry point of `python -m` and of a console script."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except EXPECTED as err:
            if os.environ.get("EMU3_TRACEBACK"):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return run
