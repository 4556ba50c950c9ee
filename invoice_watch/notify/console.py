"""The console notifier: prints each message's plain text to stdout (demo, dry runs).

A terminal has no size limit; a message is as bounded as every other (:mod:`.render`).

Standard output is whatever the process was given, and a message must get through it
or stay in the outbox:

- an encoding that lacks some characters (``PYTHONIOENCODING=latin-1``, a C locale's
  ASCII): they are written as ``\\u2013``-style escapes (and the separator rule in ASCII),
  never a ``UnicodeEncodeError``;
- a closed output (``EPIPE`` when the reader went away, as ``run --once | head -1`` does;
  ``EBADF`` or None when the process started with it closed, ``>&-``), a full disk: the
  message was shown to no one, so it is not lost but retried: it stays pending in the
  outbox (``status`` says why) and goes out at the next run, or when the output can be
  written again, until ``delivery.max_age``.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from typing import TextIO

from invoice_watch.errors import RetryableNotifyError
from invoice_watch.notify.base import BaseNotifier, Recipients
from invoice_watch.notify.render import plain
from invoice_watch.report.outbox import ReportMessage
from invoice_watch.types import AlertEvent, Part

SEPARATOR = "─" * 72
_ASCII_SEPARATOR = "-" * 72

_CLOSED = (errno.EPIPE, errno.EBADF)
_CLOSED_RETRY = 24 * 3600.0  # seconds; capped at delivery.max_backoff by the outbox


def _fit(text: str, encoding: str) -> str:
    """``text`` with each character ``encoding`` lacks written as an escape; the
    separator rule in ASCII if it lacks that."""
    try:
        SEPARATOR.encode(encoding)
    except UnicodeEncodeError:
        text = text.replace(SEPARATOR, _ASCII_SEPARATOR)
    except LookupError:  # not a codec Python knows: plain ASCII goes anywhere
        encoding = "ascii"
        text = text.replace(SEPARATOR, _ASCII_SEPARATOR)
    return text.encode(encoding, "backslashreplace").decode(encoding)


class ConsoleNotifier(BaseNotifier):
    """Writes every message to ``stream`` (stdout when not given), each after a rule."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self._stream = stream

    def __repr__(self) -> str:
        return f"ConsoleNotifier(name={self.name!r})"

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        """Print the message (one destination: ``recipients`` does not apply)."""
        self._write(plain.text(events, part))

    async def send_report(
        self, msg: ReportMessage, *, recipients: Sequence[str] | None = None
    ) -> None:
        """Print a report's text summary (:mod:`invoice_watch.report.outbox`)."""
        self._write(msg.text)

    def _write(self, message: str) -> None:
        """Write ``message`` after the rule; an error the outbox retries when it cannot."""
        # Looked up at each send, so a redirected sys.stdout (tests, --dry-run) is honoured.
        stream = self._stream or sys.stdout
        if stream is None:  # Python's sys.stdout when the process started with it closed
            raise self._closed("it was closed when invoice-watch started")
        text = f"{SEPARATOR}\n{message}"
        encoding = getattr(stream, "encoding", None)
        if encoding is None and self._stream is None:
            # sys.stdout may be a wrapper that does not say (the CLI's): the process's
            # standard output is sys.__stdout__.
            encoding = getattr(sys.__stdout__, "encoding", None)
        if isinstance(encoding, str):
            text = _fit(text, encoding)
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError as exc:  # a wrapper that does not say its encoding
                stream.write(_fit(text, exc.encoding))
            stream.flush()
        except OSError as exc:
            if exc.errno in _CLOSED:
                raise self._closed(exc.strerror or str(exc)) from exc
            raise RetryableNotifyError(
                f"cannot write to standard output: {exc.strerror or exc}; the message "
                "stays in the outbox and is retried"
            ) from exc
        except ValueError as exc:  # "I/O operation on closed file"
            raise self._closed(str(exc)) from exc

    def _closed(self, why: str) -> RetryableNotifyError:
        # A closed output stays closed for this process: the longest wait (the outbox
        # caps it at delivery.max_backoff), so `run --once` stops trying at once.
        return RetryableNotifyError(
            f"standard output is closed ({why}: its reader went away, as with `| head`); "
            "the message stays in the outbox and goes out at the next run, or when "
            "standard output can be written again",
            retry_after=_CLOSED_RETRY,
        )
