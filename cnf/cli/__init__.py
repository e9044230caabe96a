"""The ``cnf`` command's entry point: every failure is one line on stderr and a non-zero exit.

This module imports nothing heavy at the top, so that a Ctrl-C while torch is still loading is
the same one line as a Ctrl-C later (``cnf: interrupted``, exit 130), not a traceback; SIGTERM
is the same with ``cnf: terminated`` (exit 143), and both remove a half-written output. The
commands themselves are in :mod:`cnf.cli.app` (one module per command beside it). Set
``CNF_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import types
from collections.abc import Sequence


class Terminated(BaseException):
    """SIGTERM (a scheduler, ``timeout``, ``kill``): raised like Ctrl-C's KeyboardInterrupt, so
    that a half-written output is removed on the way out instead of left behind."""


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise Terminated


def _load_commands() -> types.ModuleType:
    """Import :mod:`cnf.cli.app` (and torch with it) with Ctrl-C and SIGTERM held until the
    import is done.

    A KeyboardInterrupt raised while torch's C++ extension is calling back into Python escapes
    through pybind11: the process aborts (``terminate called after throwing ...``, SIGABRT), or
    CPython marks the interrupt unhandled and kills itself with SIGINT after printing our line.
    So the import runs under handlers that only note the signal, which is raised once it is
    over (about a second at most)."""
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate}
    if threading.current_thread() is not threading.main_thread():
        from cnf.cli import app  # only the main thread may set handlers

        return app
    # a caller's own handler (or SIG_IGN) stays
    holding = [s for s, handler in ours.items() if signal.getsignal(s) is handler]
    held: list[int] = []
    for s in holding:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        from cnf.cli import app
    finally:
        for s in holding:
            signal.signal(s, ours[s])
    if held:
        ours[held[0]](held[0], None)  # raises KeyboardInterrupt or Terminated
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cnf ARGS`` and return the exit status."""
    previous = None
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):  # a caller's own handler stays; training installs its own for a clean stop
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _load_commands().run(argv)
    except (KeyboardInterrupt, Terminated) as err:
        if os.environ.get("CNF_DEBUG"):
            raise
        name = "interrupted" if isinstance(err, KeyboardInterrupt) else "terminated"
        print(f"cnf: {name}", file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
