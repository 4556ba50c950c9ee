"""How amounts, periods and durations are written for people, everywhere alike; and how
text from elsewhere (an Atlas answer, a receiver's error) is made safe for a terminal."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

# What a terminal would act on rather than show: C0 and C1 controls (ESC starts the
# sequences that clear the screen or set the title, BEL rings, NUL...), DEL, the Unicode
# bidirectional controls that reorder what is shown (Trojan Source: U+202E...), the
# line and paragraph separators, and lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
    "\u2066-\u2069\ud800-\udfff]"
)
_UNSAFE_IN_A_CELL = re.compile(f"[\t\n{_UNSAFE.pattern[1:-1]}]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"  # (valid in a JSON string too: JSON logs)


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape
    (``ESC`` as ``\\u001b``, U+202E as ``\\u202e``); line breaks and tabs are kept."""
    return _UNSAFE.sub(_escape, text)


def cell(text: str) -> str:
    """:func:`terminal_safe`, line breaks and tabs escaped too: one line of a table."""
    return _UNSAFE_IN_A_CELL.sub(_escape, text)


def usd(cents: int | None) -> str:
    """``123456`` -> ``$1,234.56``; negative amounts as ``-$12.00``."""
    if cents is None:
        return "—"
    sign = "-" if cents < 0 else ""
    dollars, rest = divmod(abs(cents), 100)
    return f"{sign}${dollars:,}.{rest:02d}"


def parse_usd(text: str) -> int | None:
    """The cents of an amount :func:`usd` wrote (``$1,234.56`` -> ``123456``); None for
    any other text."""
    negative = text.startswith("-")
    digits = text.removeprefix("-").removeprefix("$").replace(",", "")
    dollars, dot, rest = digits.partition(".")
    if not (dollars.isdigit() and dot and len(rest) == 2 and rest.isdigit()):
        return None
    cents = int(dollars) * 100 + int(rest)
    return -cents if negative else cents


def last_day(end: date | datetime) -> date:
    """The last day of a billing period that ends at ``end`` (Atlas's ``endDate``, which
    is exclusive): the day of the last instant before it. October's invoice ends at
    2026-11-01T00:00Z: its last day is 2026-10-31; one that ends at 2026-10-31T23:59:59Z
    includes October 31 too. A ``date`` end is exclusive as well: the day before it.
    The one rule for every place that shows a period (tables, messages)."""
    if isinstance(end, datetime):
        return (end - timedelta(microseconds=1)).date()
    return end - timedelta(days=1)


def end_day(end: datetime) -> date:
    """A billing period's exclusive end as a date (what an alert event keeps): the day
    after its :func:`last_day`, so that :func:`period` shows the same last day from it
    as from ``end`` itself."""
    return last_day(end) + timedelta(days=1)


def period(start: date | datetime | None, end: date | datetime | None) -> str:
    """The billing period as its first and last day, ``YYYY-MM-DD – YYYY-MM-DD``.

    Atlas's ``endDate`` is exclusive: October's invoice runs from 2026-10-01T00:00Z to
    2026-11-01T00:00Z, and a reader takes "– 2026-11-01" to include November 1. So the
    last day shown is :func:`last_day`: ``2026-10-01 – 2026-10-31``."""
    if start is None or end is None:
        return "—"
    first = start.date() if isinstance(start, datetime) else start
    return f"{first.isoformat()} – {max(first, last_day(end)).isoformat()}"


def duration(delta: timedelta) -> str:
    """A short human duration: ``45s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    seconds = max(0, int(delta.total_seconds()))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"


def ago(when: datetime | None, now: datetime) -> str:
    """Relative time for tables: ``5m ago``, ``in 30s``, ``never``."""
    if when is None:
        return "never"
    delta = now - when
    if delta.total_seconds() < 0:
        return f"in {duration(-delta)}"
    return f"{duration(delta)} ago"


def billing_url(ui_url: str, org_id: str) -> str:
    """Link to the organization's billing overview in the Atlas UI."""
    return f"{ui_url.rstrip('/')}/v2#/org/{org_id}/billing/overview"
