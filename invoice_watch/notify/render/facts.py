"""The facts of an alert event that every rendering shows, each within its bound: names,
summary, details, breakdown, link, title and footer, a message's state (its emoji or
colour), and the compact line of a grouped message. Pure functions; every renderer
(:mod:`invoice_watch.notify.render`) takes its facts from here, so that a message says
the same facts everywhere.

Every value an event carries may come from a server (an Atlas error's detail, a name in
a listing): it is put on one line with its control characters written visibly
(:func:`~invoice_watch.safe_text.one_line`), so that it can drive no terminal; each
renderer escapes it for its format.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from invoice_watch.format import duration, period, usd
from invoice_watch.safe_text import one_line
from invoice_watch.types import AlertEvent, BreakdownLine, EventKind, Part, Severity

BUTTON_LABEL = "Open billing in Atlas"

# Bounds on what one event contributes to any message (UTF-16 code units, :func:`units`),
# so that one event, and MESSAGE_MAX_EVENTS of them grouped, fit every channel (see the
# module docstring).
NAME_MAX = 100  # a rule's or an organization's name, an invoice id, a breakdown name
_SUMMARY_MAX = 1000
_DETAILS_MAX = 10  # details shown, each label NAME_MAX and value _DETAIL_MAX
_DETAIL_MAX = 300
_BREAKDOWN_MAX = 10  # breakdown lines shown per dimension
_URL_MAX = 300  # a longer billing link is not shown (the organization's name still is)
_MACHINE_NAME_MAX = 200  # a rule's name may be that long (config), and is a routing key

_DIMENSION_TITLES = {"project": "Top projects", "sku": "Top SKUs"}

# A message's "state" picks its emoji and colour; the first state in this order that
# any event of a grouped message has is the group's state.
_STATES = ("critical", "warning", "reminder", "info", "resolved")


def units(value: str) -> int:
    """The length of ``value`` in UTF-16 code units, as Slack counts its limits (a
    character beyond the Basic Multilingual Plane, as most emoji, counts twice): never
    less than its characters, so a bound kept in units is kept in characters too."""
    return len(value) + sum(1 for c in value if ord(c) > 0xFFFF)


def clip(value: str, limit: int) -> str:
    """``value`` within ``limit`` UTF-16 code units (:func:`units`), an ellipsis
    marking the cut."""
    if len(value) <= limit // 2 or units(value) <= limit:
        return value
    count = 0
    for index, char in enumerate(value):
        count += 2 if ord(char) > 0xFFFF else 1
        if count > limit - 1:
            return value[:index] + "…"
    return value  # not reached: value is longer than limit units


def name(value: str) -> str:
    """A name on one line, within its bound."""
    return clip(one_line(value), NAME_MAX)


def summary(event: AlertEvent) -> str:
    return clip(one_line(event.summary), _SUMMARY_MAX)


def link(event: AlertEvent) -> str | None:
    """The billing link, unless it is too long to show anywhere or not printable."""
    url = event.billing_url
    return url if units(url) <= _URL_MAX and one_line(url) == url else None


def details(event: AlertEvent) -> list[tuple[str, str]]:
    return [
        (name(label), clip(one_line(value), _DETAIL_MAX))
        for label, value in event.details[:_DETAILS_MAX]
    ]


def when(at: datetime) -> str:
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def state(event: AlertEvent) -> str:
    if event.kind is EventKind.RESOLVED:
        return "resolved"
    if event.kind is EventKind.REMINDER:
        return "reminder"
    return {Severity.CRITICAL: "critical", Severity.WARNING: "warning"}.get(event.severity, "info")


def group_state(events: Sequence[AlertEvent]) -> str:
    present = {state(e) for e in events}
    return next(s for s in _STATES if s in present)


def org(event: AlertEvent) -> str:
    if event.org_name and event.org_name != event.org_id:
        return f"{name(event.org_name)} ({name(event.org_id)})"
    return name(event.org_id)


def org_name(event: AlertEvent) -> str:
    return name(event.org_name) or name(event.org_id)


def invoice_id(event: AlertEvent) -> str | None:
    return name(event.invoice_id) if event.invoice_id else None


def _status(event: AlertEvent) -> str | None:
    if event.kind is EventKind.NOTICE and event.previous_status:
        return f"{event.previous_status} -> {event.invoice_status or '?'}"
    return event.invoice_status


def table(event: AlertEvent) -> list[tuple[str, str]]:
    """The label/value pairs of one event, in display order; absent values are left out."""
    status = _status(event)
    facts = [("Organization", org(event))]
    if invoice := invoice_id(event):
        facts.append(("Invoice", invoice))
    if status:
        facts.append(("Status", clip(one_line(status), 2 * NAME_MAX)))
    if event.amount_cents is not None:
        facts.append(("Amount", usd(event.amount_cents)))
    if event.period_start is not None and event.period_end is not None:
        facts.append(("Period", period(event.period_start, event.period_end)))
    if event.kind is EventKind.RESOLVED and event.firing_since is not None:
        fired = duration(event.at - event.firing_since)
        facts.append(("Fired for", f"{fired} (since {when(event.firing_since)})"))
    return facts


def title(event: AlertEvent) -> str:
    return f"{event.kind.value}: {name(event.rule)}"


def footer(event: AlertEvent) -> str:
    rule_type = name(event.rule_type)
    return f"Severity {event.severity.value} · rule type {rule_type} · {when(event.at)}"


def _counts(events: Sequence[AlertEvent]) -> str:
    counts = [(kind, sum(1 for e in events if e.kind is kind)) for kind in EventKind]
    return ", ".join(f"{n} {kind.value}" for kind, n in counts if n)


def group_title(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    title = f"{len(events)} alerts: {_counts(events)}"
    return f"{title} ({part})" if part is not None else title


def group_footer(events: Sequence[AlertEvent]) -> str:
    return f"invoice-watch · latest event {when(max(e.at for e in events))}"


def breakdown(event: AlertEvent) -> list[tuple[str, list[BreakdownLine]]]:
    """The breakdown lines grouped by dimension, dimensions in order of appearance."""
    groups: dict[str, list[BreakdownLine]] = {}
    for line in event.breakdown:
        lines = groups.setdefault(name(line.dimension), [])
        if len(lines) < _BREAKDOWN_MAX:
            lines.append(line)
    return [
        (_DIMENSION_TITLES.get(dim, dim.capitalize()), lines)
        for dim, lines in list(groups.items())[:2]
    ]


def growth(line: BreakdownLine) -> str:
    if line.growth_cents is None:
        return ""
    word = "down" if line.growth_cents < 0 else "up"
    return f"({word} {usd(abs(line.growth_cents))})"


def compact(event: AlertEvent) -> list[str]:
    """One event of a grouped message as columns: kind, rule, org, invoice, amount."""
    invoice = invoice_id(event)
    return [
        event.kind.value,
        name(event.rule),
        org_name(event),
        f"invoice {invoice}" if invoice else "",
        usd(event.amount_cents) if event.amount_cents is not None else "",
    ]


def columns(rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as aligned text columns (two spaces apart); ``right`` columns right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def iso(at: datetime) -> str:
    """An instant as RFC 3339 in UTC, ``2026-11-15T12:00:00Z``."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def machine(value: str, limit: int = _MACHINE_NAME_MAX) -> str:
    """A name as a machine keeps it: printable, on one line, within ``limit``."""
    return clip(one_line(value), limit)
