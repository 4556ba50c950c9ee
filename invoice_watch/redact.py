"""Secrets never leave the process in text, and no server writes to a terminal: the one
redaction of the product.

Text taken from a server (an API error's ``detail``, a receiver's error body) may echo
what was sent to it, ``Authorization`` header included. :func:`redact` removes, before
such text is logged, stored (the outbox's ``last_error``, an organization's last error)
or printed:

- every secret value the process holds: each :class:`~invoice_watch.config.Secret`
  registers its value here when it is made, a proxy URL its user name and password,
  the Atlas client each OAuth access token it receives (:func:`register`; a token
  replaced by the next one is let go again with :func:`forget`);
- the base64 forms of those values (RFC 4648, standard and URL-safe alphabets), alone
  or inside a longer base64 text: so ``user:password`` sent as HTTP Basic (RFC 7617),
  ``\\0user\\0password`` sent as SASL PLAIN (RFC 4616) and a password sent alone by SMTP
  ``AUTH LOGIN`` are all removed when a server echoes them without their prefix;
- any credential of the ``Bearer``, ``Basic`` and ``Digest`` HTTP authentication
  schemes (RFC 6750, RFC 7617, RFC 7616), whoever's it is.

It also escapes what a terminal or a log reader would act on: control characters
(C0 but newline and tab, DEL, C1: ``ESC [2J`` clears a screen, ``ESC ]0;`` sets a
terminal's title, BEL rings, NUL truncates), bidirectional overrides (U+202E turns the
rest of a line around) and lone surrogates (which no UTF-8 log, SQLite text or terminal
can take): each becomes its Python escape, ``\\x1b``, ``\\u202e``, ``\\ud800``.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

REDACTED = "<secret>"

# Shorter values would redact common words by accident; no real key is that short.
_MIN_LENGTH = 6
_known: set[str] = set()
_known_lock = threading.Lock()
_known_pattern: _Patterns | None = None

# `Bearer <token68>`, `Basic <token68>` (RFC 9110 §11.2), and `Digest` followed by its
# auth-params (`name=value` or `name="quoted"`, comma-separated, RFC 7616 §3.4).
_TOKEN68 = r"[A-Za-z0-9\-._~+/]+=*"
_AUTH_PARAM = r'[A-Za-z0-9_\-]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^\s,"]+)'
_CREDENTIAL = re.compile(
    rf"\b(?P<scheme>Bearer|Basic)\s+{_TOKEN68}"
    rf"|\b(?P<digest>Digest)\s+{_AUTH_PARAM}(?:\s*,\s*{_AUTH_PARAM})*",
    re.IGNORECASE,
)
# A run of base64 text (either alphabet), with its padding: what is removed whole when
# it holds the base64 form of a secret.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{6,}=*")
# The base64 of a secret is looked for from this many characters on (a 6-character
# secret gives at least 7).
_MIN_BASE64 = 6

# What a terminal or a log reader acts on: C0 controls but tab and newline, DEL and C1
# controls, the bidirectional marks, embeddings, overrides and isolates (Unicode
# TR9), the line and paragraph separators, and lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff]"
)


@dataclass(frozen=True, slots=True)
class _Patterns:
    plain: re.Pattern[str]  # the registered values themselves
    base64: re.Pattern[str] | None  # the base64 forms of them


def register(value: str) -> None:
    """Remember a secret value so that :func:`redact` removes it (and its base64 forms)
    from any text."""
    global _known_pattern
    if len(value) < _MIN_LENGTH:
        return
    with _known_lock:
        if value not in _known:
            _known.add(value)
            _known_pattern = None


def forget(value: str) -> None:
    """Stop redacting ``value`` (a short-lived credential that was replaced: an OAuth
    access token past its refresh), so that the set of secrets stays bounded."""
    global _known_pattern
    with _known_lock:
        if value in _known:
            _known.discard(value)
            _known_pattern = None


def base64_forms(value: str) -> list[str]:
    """What every base64 encoding of a text holding ``value`` contains, whatever comes
    before and after it: for each of the three alignments of its first byte in a 3-byte
    group, the characters whose 6 bits all come from ``value``'s UTF-8 bytes; in the
    standard and the URL-safe alphabet. Forms shorter than 6 characters are left out."""
    data = value.encode("utf-8", "surrogatepass")
    forms: list[str] = []
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + data + bytes(2)).decode("ascii")
        first = -(-8 * offset // 6)  # the first character without a bit of the prefix
        end = 8 * (offset + len(data)) // 6  # past the last one without a bit after it
        core = encoded[first:end]
        if len(core) >= _MIN_BASE64:
            forms.append(core)
            forms.append(core.translate(_URLSAFE))
    return list(dict.fromkeys(forms))


_URLSAFE = str.maketrans("+/", "-_")


def _compile(values: Iterable[str]) -> _Patterns | None:
    # Longest first, so that a secret containing another is removed whole.
    ordered = sorted(set(values), key=len, reverse=True)
    if not ordered:
        return None
    forms = sorted({f for v in ordered for f in base64_forms(v)}, key=len, reverse=True)
    return _Patterns(
        re.compile("|".join(re.escape(v) for v in ordered)),
        re.compile("|".join(re.escape(f) for f in forms)) if forms else None,
    )


def _patterns() -> _Patterns | None:
    global _known_pattern
    with _known_lock:
        if _known_pattern is None and _known:
            _known_pattern = _compile(_known)
        return _known_pattern


def printable(text: str) -> str:
    """``text`` with every character a terminal or a log reader would act on (see the
    module docstring) written as its Python escape (``\\x1b``); newline and tab kept."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every registered secret, every one of ``secrets``, their base64
    forms, and every HTTP credential (``Bearer``/``Basic``/``Digest``) replaced by
    ``<secret>`` (a replacement is never scanned again), then made :func:`printable`."""
    extra = _compile(v for v in secrets if v)
    known = _patterns()
    parts = [_CREDENTIAL.pattern]
    for patterns in (extra, known):
        if patterns is not None:
            parts.append(patterns.plain.pattern)
    pattern = _CREDENTIAL if len(parts) == 1 else re.compile("|".join(parts), re.IGNORECASE)

    def scrub(m: re.Match[str]) -> str:
        scheme = m["scheme"] or m["digest"]
        return f"{scheme} {REDACTED}" if scheme else REDACTED

    text = pattern.sub(scrub, text)
    encoded = [p.base64 for p in (extra, known) if p is not None and p.base64 is not None]
    if encoded:

        def scrub_run(m: re.Match[str]) -> str:
            run = m[0]
            return REDACTED if any(p.search(run) for p in encoded) else run

        text = _BASE64_RUN.sub(scrub_run, text)
    return printable(text)
