"""The ``cnf`` command's entry point: every failure is one line on stderr and a non-zero exit.

This module imports nothing heavy at the top, so that a Ctrl-C while torch is still loading is
the same one line as a Ctrl-C later (``cnf: interrupted``, exit 130), not a traceback. The
commands themselves are in :mod:`cnf.commands`. Set ``CNF_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cnf ARGS`` and return the exit status."""
    try:
        from cnf import commands

        return commands.run(argv)
    except KeyboardInterrupt:
        if os.environ.get("CNF_DEBUG"):
            raise
        print("cnf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
