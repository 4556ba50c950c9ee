"""A SIGHUP that comes while a command starts: kept for the command, not fatal.

SIGHUP's default action ends a process. ``invoice-watch run`` takes the signal itself
(a reload: SPEC §7) only once its imports and config are done, a second or more into a
start (more on a loaded machine); a SIGHUP before that (a reload sent right after a
restart) ended the daemon silently, exit 129. :mod:`invoice_watch.__main__` calls
:func:`keep` first thing (the interpreter's own start, about 30 ms, stays uncovered:
no Python runs yet), so that such a SIGHUP is kept; the command then takes it
(:func:`take`: ``run`` reloads once it runs, ``run --once`` stops), or, when it does not
reload, gives the signal its default action back (:func:`restore`: a SIGHUP kept
meanwhile ends it then, as the terminal closing would have). A SIGHUP the process
started with ignored (``nohup``) stays ignored.

This module imports nothing heavy (it runs before the command line is imported).
"""

from __future__ import annotations

import signal
from types import FrameType

_kept = False  # a SIGHUP came since keep() and no one took it


def _keep(signum: int, frame: FrameType | None) -> None:
    global _kept
    _kept = True


def keep() -> None:
    """From now on a SIGHUP is kept (see :func:`take`) instead of ending the process
    (nothing where the platform has no SIGHUP, or where it is ignored: ``nohup``)."""
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _keep)


def take() -> bool:
    """Whether a SIGHUP was kept since :func:`keep` (forgotten once told)."""
    global _kept
    came, _kept = _kept, False
    return came


def restore() -> None:
    """SIGHUP's action as the process started (its default, unless ignored) again, for a
    command that does not reload; a SIGHUP kept meanwhile ends the process now, as it
    would have when it came."""
    if not hasattr(signal, "SIGHUP") or signal.getsignal(signal.SIGHUP) is not _keep:
        return
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if take():
        signal.raise_signal(signal.SIGHUP)
