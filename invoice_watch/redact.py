"""Secrets never leave the process in text: the one redaction of the product.

Text taken from a server (an API error's ``detail``, a receiver's error body) may echo
what was sent to it, ``Authorization`` header included. :func:`redact` removes, before
such text is logged, stored (the outbox's ``last_error``, an organization's last error)
or printed: every secret value the configuration holds (each :class:`~invoice_watch.
config.Secret` registers its value here when it is made), and any credential of the
``Bearer``, ``Basic`` and ``Digest`` HTTP authentication schemes (RFC 6750, RFC 7617,
RFC 7616), whoever's it is.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

REDACTED = "<secret>"

# Shorter values would redact common words by accident; no real key is that short.
_MIN_LENGTH = 6
_known: set[str] = set()
_known_lock = threading.Lock()
_known_pattern: re.Pattern[str] | None = None

# `Bearer <token68>`, `Basic <token68>` (RFC 9110 §11.2), and `Digest` followed by its
# auth-params (`name=value` or `name="quoted"`, comma-separated, RFC 7616 §3.4).
_TOKEN68 = r"[A-Za-z0-9\-._~+/]+=*"
_AUTH_PARAM = r'[A-Za-z0-9_\-]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^\s,"]+)'
_CREDENTIAL = re.compile(
    rf"\b(?P<scheme>Bearer|Basic)\s+{_TOKEN68}"
    rf"|\b(?P<digest>Digest)\s+{_AUTH_PARAM}(?:\s*,\s*{_AUTH_PARAM})*",
    re.IGNORECASE,
)


def register(value: str) -> None:
    """Remember a secret value so that :func:`redact` removes it from any text."""
    global _known_pattern
    if len(value) < _MIN_LENGTH:
        return
    with _known_lock:
        if value not in _known:
            _known.add(value)
            _known_pattern = None


def _pattern() -> re.Pattern[str] | None:
    global _known_pattern
    with _known_lock:
        if _known_pattern is None and _known:
            # Longest first, so that a secret containing another is removed whole.
            values = sorted(_known, key=len, reverse=True)
            _known_pattern = re.compile("|".join(re.escape(v) for v in values))
        return _known_pattern


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every registered secret, every one of ``secrets``, and every HTTP
    credential (``Bearer``/``Basic``/``Digest``) replaced by ``<secret>``, in one pass
    (a replacement is never scanned again)."""
    extra = sorted((v for v in secrets if v), key=len, reverse=True)
    known = _pattern()
    parts = [_CREDENTIAL.pattern]
    if extra:
        parts.append("|".join(re.escape(v) for v in extra))
    if known is not None:
        parts.append(known.pattern)
    pattern = _CREDENTIAL if len(parts) == 1 else re.compile("|".join(parts), re.IGNORECASE)

    def scrub(m: re.Match[str]) -> str:
        scheme = m["scheme"] or m["digest"]
        return f"{scheme} {REDACTED}" if scheme else REDACTED

    return pattern.sub(scrub, text)
