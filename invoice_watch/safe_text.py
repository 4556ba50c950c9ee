"""Text from a server or a receiver, made fit to log, store and show: what the notifiers,
the outbox and the messages they render use, built on :mod:`invoice_watch.redact` (the
one redaction, and the one rule for the characters a terminal, a log or SQLite cannot
take: :func:`~invoice_watch.redact.printable`).

A receiver's answer (Slack's ``error``, an SMTP reply, an HTML page), an Atlas error's
detail carried by a ``poll_failure`` alert, or a name in a listing can hold anything the
wire allows: a secret echoed back, a lone surrogate (``"\\ud800"`` in JSON, or an
invalid UTF-8 byte that aiosmtplib decodes with ``surrogateescape``: a row holding one
cannot be written, and a message whose "failed" mark cannot be stored is sent again for
ever), terminal control sequences, bidirectional overrides.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

from invoice_watch.redact import printable, redact

__all__ = ["clip", "one_line", "printable", "server_text", "storable", "traceback_text"]

# A traceback line longer than this (a message quoting a whole answer) is cut.
_TRACEBACK_LINE = 2000


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (line breaks, CR, form feeds included) collapsed
    to one space, then :func:`printable`: a name, a summary, a log line."""
    return printable(" ".join(text.split()))


def server_text(value: object, limit: int = 300, *, secrets: Iterable[str] = ()) -> str:
    """Text taken from a server (or a receiver), fit for a log line, an error message or
    a column of the state file: secrets, their base64 forms and HTTP credentials removed
    (``secrets``: values to remove beyond the registered ones), :func:`one_line`, at
    most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * limit:  # bounded work whatever the server sent
        text = text[: 4 * limit]
    return clip(redact(" ".join(text.split()), secrets), limit)


def storable(text: str, limit: int) -> str:
    """``text`` as a column of the state file may hold it: :func:`printable` (SQLite
    can encode it: no write fails for a character a server sent) and at most ``limit``
    characters. Redaction is the writer's business (:func:`server_text`); this is the
    last guard before SQLite."""
    return clip(printable(text[: 4 * limit]), limit)


def traceback_text(exc: BaseException, limit: int = 20_000) -> str:
    """An unforeseen exception's traceback, fit for the log: each line at most 2,000
    characters, redacted (no secret, nothing a terminal acts on: :func:`redact`), at
    most ``limit`` characters (its head and its tail), without a trailing newline."""
    text = redact(
        "".join(
            line if len(line) <= _TRACEBACK_LINE else line[:_TRACEBACK_LINE] + "…\n"
            for line in traceback.format_exception(exc)
        )
    )
    if len(text) > limit:
        text = text[: limit // 2] + "\n[…]\n" + text[-limit // 2 :]
    return text.rstrip()


def exception_line(exc: BaseException) -> str:
    """An unforeseen exception in one line, for a message or a stored error: its type
    and message, redacted (:func:`redact`), at most 300 characters."""
    return redact(f"{type(exc).__name__}: {exc}")[:300]
