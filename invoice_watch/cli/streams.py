"""Standard output and error while a command runs: a closed or full output is an
:class:`OutputError` (a reader that left, ``| head``, ends the command quietly), what
stderr cannot show is dropped, and what a terminal would act on is written escaped."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from typing import TextIO

from invoice_watch import format as fmt


class OutputError(OSError):
    """Standard output could not be written (``errno`` says why: EPIPE when the reader
    went away)."""


class Output(io.TextIOBase):
    """``sys.stdout`` while a command runs: a failed write raises :class:`OutputError`,
    so that :func:`~invoice_watch.cli.main` tells a closed or full output from any other
    OS error. (Python sets ``sys.stdout`` to None when the process starts with it closed:
    ``>&-``.) What a terminal would act on (ESC, BEL, bidi controls: text from Atlas or a
    receiver) is written escaped (:func:`~invoice_watch.format.terminal_safe`)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def _open(self) -> TextIO:
        if self._stream is None:
            raise OutputError(errno.EBADF, "standard output is closed")
        return self._stream

    def write(self, text: str) -> int:
        try:
            self._open().write(fmt.terminal_safe(text))
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from exc
        return len(text)

    def flush(self) -> None:
        if self._stream is None:  # nothing was written: nothing to flush
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from exc

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self) -> int:
        return self._open().fileno()


class Diagnostics(io.TextIOBase):
    """``sys.stderr`` while a command runs, control characters escaped as on stdout
    (error lines and logs quote servers): what cannot be written there (closed, ``2>&-``,
    or full) is dropped. An error line that cannot be shown must not fail the command or
    change its exit status (``print(file=None)`` would write it to stdout instead)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.write(fmt.terminal_safe(text))
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return self._stream is not None and self._stream.isatty()
        return False

    def fileno(self) -> int:
        if self._stream is None:
            raise io.UnsupportedOperation("standard error is closed")
        return self._stream.fileno()


def tolerant(stream: TextIO | None) -> None:
    """Write what the output's encoding cannot hold as ``\\u2013`` escapes rather than
    fail (``PYTHONIOENCODING=latin-1``, an old Python under ``LANG=C``): every line the
    commands print, the console notifier's messages included."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            reconfigure(errors="backslashreplace")


def discard_output(stream: TextIO | None) -> None:
    """Point standard output at /dev/null, so that what is still buffered (and
    Python's flush at exit) goes nowhere instead of failing again."""
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def print_error(text: str) -> None:
    """One line on stderr (which may itself be closed: then nothing)."""
    if sys.stderr is None:
        return
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)
