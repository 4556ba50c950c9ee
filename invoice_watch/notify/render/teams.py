"""Microsoft Teams: a Workflows message holding an Adaptive Card 1.2
(https://adaptivecards.io/explorer), within :data:`TEAMS_MAX_BYTES` of UTF-8 JSON.

A server's text goes in a TextRun of a RichTextBlock, the one element that renders no
Markdown ("Text to display. Markdown is not supported."), so a name can neither link nor
format."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.format import usd
from invoice_watch.notify.render import facts
from invoice_watch.notify.render.slack import SLACK_LIMITS
from invoice_watch.types import AlertEvent, Part

TEAMS_MAX_BYTES = 27_000  # a Workflows message: "about 28 KB" (msteams-docs), in UTF-8
_TEAMS_LINE_MAX = 200  # one event's line in a grouped card

_TEAMS_COLOR = {
    "critical": "Attention",
    "warning": "Warning",
    "reminder": "Warning",
    "info": "Accent",
    "resolved": "Good",
}


def _run(value: str, **style: Any) -> dict[str, Any]:
    """A TextRun: plain text, never Markdown (an empty one shows a dash: a TextRun
    needs text)."""
    return {"type": "TextRun", "text": value or "—", **style}


def _rich(*runs: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {"type": "RichTextBlock", "inlines": list(runs), **props}


def _open_url(url: str, title: str = facts.BUTTON_LABEL) -> dict[str, Any]:
    return {"type": "Action.OpenUrl", "title": title, "url": url}


def _teams_fact(label: str, value: str) -> dict[str, Any]:
    """A label and its value side by side (a FactSet would render the value as
    Markdown): two columns, the label's of a fixed width so that values align."""
    return {
        "type": "ColumnSet",
        "spacing": "None",
        "columns": [
            {"type": "Column", "width": "120px", "items": [_rich(_run(label, weight="Bolder"))]},
            {"type": "Column", "width": "stretch", "items": [_rich(_run(value))]},
        ],
    }


def _teams_head(title: str, state: str) -> dict[str, Any]:
    color = _TEAMS_COLOR[state]
    return _rich(
        _run(facts.clip(title, SLACK_LIMITS.header), weight="Bolder", size="Medium", color=color)
    )


def _teams_one(event: AlertEvent, *, full: bool) -> tuple[list[dict[str, Any]], list[str]]:
    body = [_teams_head(facts.title(event), facts.state(event))]
    if summary := facts.summary(event):
        body.append(_rich(_run(summary)))
    pairs = facts.table(event) + (facts.details(event) if full else [])
    body += [_teams_fact(label, value) for label, value in pairs]
    if full:
        for title, items in facts.breakdown(event):
            body.append(_rich(_run(title, weight="Bolder"), spacing="Medium"))
            for line in items:
                amount = " ".join(p for p in (usd(line.amount_cents), facts.growth(line)) if p)
                body.append(
                    _rich(_run(f"• {facts.name(line.name)}  "), _run(amount), spacing="None")
                )
    body.append(_rich(_run(facts.footer(event), isSubtle=True, size="Small"), spacing="Medium"))
    link = facts.link(event)
    return body, [link] if link else []


def _teams_line(event: AlertEvent) -> dict[str, Any]:
    """One event of a grouped card, as the Slack line says it (kind, rule, organization,
    invoice, amount), within ``_TEAMS_LINE_MAX`` units: the organization links to its
    billing page."""
    kind, rule, org, invoice, amount = facts.compact(event)
    tail = " · ".join(cell for cell in (invoice, amount) if cell)
    org_run = _run(facts.clip(org, 60))
    if link := facts.link(event):
        org_run["selectAction"] = _open_url(link)
    runs = [_run(f"{kind}  ", weight="Bolder"), _run(f"{facts.clip(rule, 60)} · "), org_run]
    if tail:
        runs.append(_run(facts.clip(f" · {tail}", _TEAMS_LINE_MAX - 140)))
    return _rich(*runs, spacing="None")


def _teams_group(
    events: Sequence[AlertEvent], part: Part | None, *, full: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    body = [_teams_head(facts.group_title(events, part), facts.group_state(events))]
    shown = events[:MESSAGE_MAX_EVENTS] if full else []
    body += [_teams_line(event) for event in shown]
    if len(shown) < len(events):
        more = len(events) - len(shown)
        body.append(_rich(_run(f"…and {more} more", italic=True), spacing="None"))
    body.append(
        _rich(_run(facts.group_footer(events), isSubtle=True, size="Small"), spacing="Medium")
    )
    links = list(dict.fromkeys(link for e in events if (link := facts.link(e))))
    return body, links[:1] if len(links) == 1 else []


def teams_message(events: Sequence[AlertEvent], part: Part | None = None) -> dict[str, Any]:
    """The Teams Workflows message for one or more events: an Adaptive Card 1.2 in the
    envelope Workflows take (LIBRARIES.md, "PagerDuty Events API v2 and Teams
    Workflows"), with the same facts as the Slack message, within
    :data:`TEAMS_MAX_BYTES` of UTF-8 JSON: a message too large for the whole card
    drops its details and breakdown (one event) or its lines (a group), which leaves
    the title, the facts or counts, and the link."""
    for full in (True, False):
        if len(events) == 1:
            body, links = _teams_one(events[0], full=full)
        else:
            body, links = _teams_group(events, part, full=full)
        card: dict[str, Any] = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.2",
            "body": body,
        }
        if links:
            card["actions"] = [_open_url(link) for link in links]
        message = {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": card,
                }
            ],
        }
        if len(teams_json(message)) <= TEAMS_MAX_BYTES:
            break
    return message


def teams_json(message: dict[str, Any]) -> bytes:
    """The message as sent: compact UTF-8 JSON (not ASCII escapes, which would make a
    non-Latin name six bytes a character)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
