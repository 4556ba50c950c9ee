"""The ``invoice-watch`` script and ``python -m invoice_watch``: the command line
(:func:`invoice_watch.cli.main`), quiet under Ctrl-C and SIGTERM from its first instant,
and a SIGHUP then kept for the command (:mod:`invoice_watch.hangup`).

This module imports nothing heavy, so that a signal that comes while the command line is
still being imported ends it as it would a moment later: exit 0, no traceback (SPEC §7:
"0 success (SIGTERM included)"; Ctrl-C alike).
"""

from __future__ import annotations

import gc
import signal
import sys
from types import FrameType

from invoice_watch import hangup


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM, until a command takes it itself (the daemon does): handled as Ctrl-C is
    at that moment (asyncio.run cancels its task, so that ``finally`` blocks run: the
    demo removes its temporary folder), or a KeyboardInterrupt where SIGINT is ignored
    (a background job of a shell without job control) or not handled in Python."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        signal.raise_signal(signal.SIGINT)
    else:
        raise KeyboardInterrupt


def main() -> int:
    """Run the command line; returns its exit status."""
    # No cyclic garbage collection while the command starts: its imports, the config
    # and the state make few cycles, and `run --once` spent about 0.05 s of CPU (5 %)
    # in some 150 collections of them. `run` enables it once the App is open
    # (cli.commands.started), every other command at once (cli._main).
    gc.disable()
    try:
        signal.signal(signal.SIGTERM, _terminate)
        hangup.keep()
        from invoice_watch.cli import main as command_line

        status = command_line()
    except KeyboardInterrupt:  # before cli.main could take it (it says 0 too)
        status = 0
    finally:
        gc.enable()  # (a start that ended early: its caller may go on)
    # The status is known: a signal now (while Python flushes and exits) changes nothing.
    # (SIGHUP too: Python's exit sets a signal its handler took back to its default.)
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
        signal.signal(signum, signal.SIG_IGN)
    return status


if __name__ == "__main__":
    sys.exit(main())
