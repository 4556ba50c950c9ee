"""Plain text of a message: the console, email's plain part, the generic webhook's
``text`` and Slack's fallback (:mod:`.slack` escapes it): one event as a table of its
facts, a group as one aligned line per event. :func:`brief_text` is the shortest
complete message, Slack's last fallback."""

from __future__ import annotations

from collections.abc import Sequence

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.format import usd
from invoice_watch.notify.render import facts
from invoice_watch.types import AlertEvent, Part


def text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """The plain-text message (console, email plain part, Slack fallback text) for one
    or more events (``part``: which part of a split group they are)."""
    if len(events) == 1:
        return _text_one(events[0])
    shown = events[:MESSAGE_MAX_EVENTS]
    lines = [facts.group_title(events, part), ""]
    lines += [
        "  " + row for row in facts.columns([facts.compact(e) for e in shown], frozenset({4}))
    ]
    if len(shown) < len(events):
        lines.append(f"  …and {len(events) - len(shown)} more")
    links = {facts.org_name(e): link for e in shown if (link := facts.link(e))}
    if links:
        lines += ["", f"{facts.BUTTON_LABEL}:"]
        lines += ["  " + row for row in facts.columns([[name, url] for name, url in links.items()])]
    lines += ["", facts.group_footer(events)]
    return "\n".join(lines) + "\n"


def _text_one(event: AlertEvent) -> str:
    lines = [facts.title(event), facts.summary(event), ""]
    pairs = [(f"{label}:", value) for label, value in (*facts.table(event), *facts.details(event))]
    lines += facts.columns([list(pair) for pair in pairs])
    for title, items in facts.breakdown(event):
        rows = [
            [facts.name(line.name), usd(line.amount_cents), facts.growth(line)] for line in items
        ]
        lines += ["", f"{title}:"]
        lines += ["  " + row for row in facts.columns(rows, frozenset({1}))]
    lines.append("")
    if link := facts.link(event):
        lines.append(f"{facts.BUTTON_LABEL}: {link}")
    lines.append(facts.footer(event))
    return "\n".join(lines) + "\n"


def brief_text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """The shortest complete message (a Slack refusal's last fallback): the title and
    one line per event with its kind, rule, organization, invoice and amount; at most
    a few thousand characters for up to ``MESSAGE_MAX_EVENTS`` events."""
    if len(events) == 1:
        event = events[0]
        rows = [facts.compact(event)]
        title = facts.title(event)
    else:
        rows = [facts.compact(e) for e in events[:MESSAGE_MAX_EVENTS]]
        title = facts.group_title(events, part)
    lines = [title, *(" ".join(cell for cell in row if cell) for row in rows)]
    return "\n".join(lines) + "\n"
