"""The ``cnf`` command's entry point: every failure is one line on stderr and a non-zero exit.

This module imports nothing heavy at the top, so that a Ctrl-C while torch is still loading is
the same one line as a Ctrl-C later (``cnf: interrupted``, exit 130), not a traceback. The
commands themselves are in :mod:`cnf.commands`. Set ``CNF_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import types
from collections.abc import Sequence


def _load_commands() -> types.ModuleType:
    """Import :mod:`cnf.commands` (and torch with it) with Ctrl-C held until the import is done.

    A KeyboardInterrupt raised while torch's C++ extension is calling back into Python escapes
    through pybind11: the process aborts (``terminate called after throwing ...``, SIGABRT), or
    CPython marks the interrupt unhandled and kills itself with SIGINT after printing our line.
    So the import runs under a handler that only notes the signal, and the interrupt is raised
    once it is over (about a second at most)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):  # only the main thread may set handlers; a caller's own handler (or SIG_IGN) stays
        from cnf import commands

        return commands
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        from cnf import commands
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cnf ARGS`` and return the exit status."""
    try:
        return _load_commands().run(argv)
    except KeyboardInterrupt:
        if os.environ.get("CNF_DEBUG"):
            raise
        print("cnf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
