"""Text from outside made safe to show, log and store: the one place that decides what
a character a server sent may do.

A receiver's answer (Slack's ``error``, an SMTP reply, an HTML page), an Atlas error's
``detail`` or a name in a listing can hold anything JSON or the wire allows:

- a lone surrogate (``"\\ud800"`` in JSON, or an invalid UTF-8 byte that aiosmtplib
  decodes with ``surrogateescape``): SQLite, a log file and a terminal cannot encode it,
  so a row holding it cannot be written (a message whose "failed" mark cannot be stored
  is sent again forever, A12-14);
- control characters: ``ESC [2J`` clears the operator's terminal, ``ESC ]0;…BEL`` sets
  its title, a NUL cuts a line in some tools, a CR overwrites it;
- Unicode bidirectional controls (U+202E RIGHT-TO-LEFT OVERRIDE and the like), which
  make a line read other than it is (CVE-2021-42574, "Trojan Source").

:func:`printable` writes each of those as a visible escape (``\\x1b``, ``\\u202e``,
``\\ud800``) and keeps everything else as it is; :func:`server_text` also removes
secrets (:func:`~invoice_watch.redact.redact`), puts the text on one line and bounds
its length, for text that goes into a log line, an error message or the state file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from invoice_watch.redact import redact

# C0 controls but tab, LF and CR (whitespace, handled by the caller), DEL and the C1
# controls; the bidirectional formatting characters (Unicode TR9: LRM, RLM, ALM, the
# embeddings and overrides, the isolates); every surrogate (a Python str holds one
# only when it is lone: UTF-8 cannot encode it).
_UNPRINTABLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_LINE_BREAKS = re.compile("[\t\n\r]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every control character (tab, LF and CR aside), bidirectional
    control and lone surrogate written as a visible escape (``\\x1b``, ``\\u202e``,
    ``\\ud800``): encodable as UTF-8, and harmless on a terminal. ``one_line``: tabs, LFs
    and CRs become spaces too (a text meant for one line: a name, a log line)."""
    text = _UNPRINTABLE.sub(_escape, text)
    return _LINE_BREAKS.sub(" ", text) if one_line else text


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def server_text(value: object, limit: int = 300, *, secrets: Iterable[str] = ()) -> str:
    """Text taken from a server (or a receiver), fit for a log line, an error message or
    a column of the state file: secrets and HTTP credentials removed (``secrets``: more
    values to remove than the configuration's), :func:`printable`, whitespace runs
    collapsed to one space, at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * limit:  # bounded work whatever the server sent
        text = text[: 4 * limit]
    text = " ".join(printable(redact(text, secrets), one_line=True).split())
    return clip(text, limit)


def storable(text: str, limit: int) -> str:
    """``text`` as a column of the state file may hold it: :func:`printable` (so that
    SQLite can encode it: no write fails for a character a server sent) and at most
    ``limit`` characters. Redaction is the writer's business (:func:`server_text`);
    this is the last guard before SQLite."""
    return clip(printable(text[: 4 * limit]), limit)
