"""Message rendering: turns alert events into plain text, Slack Block Kit, an email
subject and an HTML body. Pure functions, no I/O; every notifier renders through here so
a message says the same facts everywhere.

One event is one message. Several events are one grouped message (flood control): a
title with the counts per kind and one compact line per event. A group larger than
:data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` is split into parts by the outbox
(``store.message_parts``), each its own message saying "part i of n".

Every message fits its channel's limits by construction: each value an event carries
(names, summary, details, breakdown, link) is clipped to a bound of its own below, so one
event renders within every limit, and so do up to ``MESSAGE_MAX_EVENTS`` of them as one
grouped message (``tests/test_notify_render.py::test_render_fits_*`` proves it for any
values). Slack's limits are :data:`SLACK_LIMITS`, kept in UTF-16 code units; email
headers are folded by the ``email`` package (RFC 5322 lines of at most 78 characters,
bodies quoted-printable when a line is longer); the subject is clipped to
:data:`SUBJECT_MAX`.

Every value an event carries may come from a server (an Atlas error's detail, a name in
a listing): it is shown with its control characters written visibly
(:func:`~invoice_watch.redact.printable`), HTML-escaped in email and mrkdwn-escaped
in Slack, blocks and top-level ``text`` alike (:func:`slack_text`), so that it can
neither drive a terminal nor mention (``<!channel>``) or link in Slack.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.format import duration, period, usd
from invoice_watch.safe_text import one_line
from invoice_watch.types import AlertEvent, BreakdownLine, EventKind, Part, Severity

SUBJECT_PREFIX = "[invoice-watch]"
SUBJECT_MAX = 150  # characters of an email subject (folded at 78 by the email package)
BUTTON_LABEL = "Open billing in Atlas"


@dataclass(frozen=True)
class SlackLimits:
    """What Slack accepts in one message (https://docs.slack.dev/reference/block-kit/blocks,
    https://docs.slack.dev/reference/methods/chat.postMessage). ``block_text``: the
    characters of every text object of the blocks together; Slack refuses a message
    above about 13,000 (``msg_blocks_too_long``, as reported by Slack users), so a
    message keeps within 12,000. Every limit is kept in UTF-16 code units
    (:func:`units`), the most Slack may count a character as (it is written in
    JavaScript, whose string length counts them): an emoji-heavy name stays within."""

    blocks: int = 50
    header: int = 150
    section: int = 3000
    fields: int = 10
    field: int = 2000
    context_elements: int = 10
    button_text: int = 75
    url: int = 3000
    block_text: int = 12_000
    text: int = 40_000  # the top-level `text` (msg_too_long)


SLACK_LIMITS = SlackLimits()

# Bounds on what one event contributes to any message (UTF-16 code units, :func:`units`),
# so that one event, and MESSAGE_MAX_EVENTS of them grouped, fit every channel (see the
# module docstring).
_NAME_MAX = 100  # a rule's or an organization's name, an invoice id, a breakdown name
_SUMMARY_MAX = 1000
_DETAILS_MAX = 10  # details shown, each label _NAME_MAX and value _DETAIL_MAX
_DETAIL_MAX = 300
_BREAKDOWN_MAX = 10  # breakdown lines shown per dimension
_URL_MAX = 300  # a longer billing link is not shown (the organization's name still is)
_SLACK_FIELD_MAX = 300  # one fact of a single-event message, label included
_SLACK_SECTION_MAX = 1500  # the summary, details and each breakdown section
_SLACK_LINE_MAX = 270  # one event's line in a grouped message
# Checked at import: the worst grouped part fits (header, lines, context).
assert (
    SLACK_LIMITS.header + MESSAGE_MAX_EVENTS * (_SLACK_LINE_MAX + 1) + 400
    <= SLACK_LIMITS.block_text
)

_DIMENSION_TITLES = {"project": "Top projects", "sku": "Top SKUs"}

# A message's "state" picks its emoji and colour; the first state in this order that
# any event of a grouped message has is the group's state.
_STATES = ("critical", "warning", "reminder", "info", "resolved")
_EMOJI = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "reminder": ":bell:",
    "info": ":information_source:",
    "resolved": ":white_check_mark:",
}
_COLOR = {
    "critical": "#b00020",
    "warning": "#b35c00",
    "reminder": "#b35c00",
    "info": "#1f6feb",
    "resolved": "#1a7f37",
}


# --- facts shared by every rendering -------------------------------------------------


def _one_line(value: str) -> str:
    """Collapse whitespace, so names and summaries cannot break a header or a line, and
    write control characters visibly (:func:`~invoice_watch.safe_text.one_line`: a
    name or an Atlas error's detail cannot drive a terminal or hide in a message)."""
    return one_line(value)


def units(value: str) -> int:
    """The length of ``value`` in UTF-16 code units, as Slack counts its limits (a
    character beyond the Basic Multilingual Plane, as most emoji, counts twice): never
    less than its characters, so a bound kept in units is kept in characters too."""
    return len(value) + sum(1 for c in value if ord(c) > 0xFFFF)


def _clip(value: str, limit: int) -> str:
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


def _name(value: str) -> str:
    """A name on one line, within its bound."""
    return _clip(_one_line(value), _NAME_MAX)


def _summary(event: AlertEvent) -> str:
    return _clip(_one_line(event.summary), _SUMMARY_MAX)


def _link(event: AlertEvent) -> str | None:
    """The billing link, unless it is too long to show anywhere or not printable."""
    url = event.billing_url
    return url if units(url) <= _URL_MAX and one_line(url) == url else None


def _details(event: AlertEvent) -> list[tuple[str, str]]:
    return [
        (_name(label), _clip(_one_line(value), _DETAIL_MAX))
        for label, value in event.details[:_DETAILS_MAX]
    ]


def _when(at: datetime) -> str:
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _state(event: AlertEvent) -> str:
    if event.kind is EventKind.RESOLVED:
        return "resolved"
    if event.kind is EventKind.REMINDER:
        return "reminder"
    return {Severity.CRITICAL: "critical", Severity.WARNING: "warning"}.get(event.severity, "info")


def _group_state(events: Sequence[AlertEvent]) -> str:
    present = {_state(e) for e in events}
    return next(s for s in _STATES if s in present)


def _org(event: AlertEvent) -> str:
    if event.org_name and event.org_name != event.org_id:
        return f"{_name(event.org_name)} ({_name(event.org_id)})"
    return _name(event.org_id)


def _org_name(event: AlertEvent) -> str:
    return _name(event.org_name) or _name(event.org_id)


def _invoice_id(event: AlertEvent) -> str | None:
    return _name(event.invoice_id) if event.invoice_id else None


def _status(event: AlertEvent) -> str | None:
    if event.kind is EventKind.NOTICE and event.previous_status:
        return f"{event.previous_status} -> {event.invoice_status or '?'}"
    return event.invoice_status


def _facts(event: AlertEvent) -> list[tuple[str, str]]:
    """The label/value pairs of one event, in display order; absent values are left out."""
    status = _status(event)
    facts = [("Organization", _org(event))]
    if invoice_id := _invoice_id(event):
        facts.append(("Invoice", invoice_id))
    if status:
        facts.append(("Status", _clip(_one_line(status), 2 * _NAME_MAX)))
    if event.amount_cents is not None:
        facts.append(("Amount", usd(event.amount_cents)))
    if event.period_start is not None and event.period_end is not None:
        facts.append(("Period", period(event.period_start, event.period_end)))
    if event.kind is EventKind.RESOLVED and event.firing_since is not None:
        fired = duration(event.at - event.firing_since)
        facts.append(("Fired for", f"{fired} (since {_when(event.firing_since)})"))
    return facts


def _title(event: AlertEvent) -> str:
    return f"{event.kind.value}: {_name(event.rule)}"


def _footer(event: AlertEvent) -> str:
    rule_type = _name(event.rule_type)
    return f"Severity {event.severity.value} · rule type {rule_type} · {_when(event.at)}"


def _counts(events: Sequence[AlertEvent]) -> str:
    counts = [(kind, sum(1 for e in events if e.kind is kind)) for kind in EventKind]
    return ", ".join(f"{n} {kind.value}" for kind, n in counts if n)


def _group_title(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    title = f"{len(events)} alerts: {_counts(events)}"
    return f"{title} ({part})" if part is not None else title


def _group_footer(events: Sequence[AlertEvent]) -> str:
    return f"invoice-watch · latest event {_when(max(e.at for e in events))}"


def _breakdown(event: AlertEvent) -> list[tuple[str, list[BreakdownLine]]]:
    """The breakdown lines grouped by dimension, dimensions in order of appearance."""
    groups: dict[str, list[BreakdownLine]] = {}
    for line in event.breakdown:
        lines = groups.setdefault(_name(line.dimension), [])
        if len(lines) < _BREAKDOWN_MAX:
            lines.append(line)
    return [
        (_DIMENSION_TITLES.get(dim, dim.capitalize()), lines)
        for dim, lines in list(groups.items())[:2]
    ]


def _growth(line: BreakdownLine) -> str:
    if line.growth_cents is None:
        return ""
    word = "down" if line.growth_cents < 0 else "up"
    return f"({word} {usd(abs(line.growth_cents))})"


def _compact(event: AlertEvent) -> list[str]:
    """One event of a grouped message as columns: kind, rule, org, invoice, amount."""
    invoice_id = _invoice_id(event)
    return [
        event.kind.value,
        _name(event.rule),
        _org_name(event),
        f"invoice {invoice_id}" if invoice_id else "",
        usd(event.amount_cents) if event.amount_cents is not None else "",
    ]


def _columns(rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as aligned text columns (two spaces apart); ``right`` columns right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


# --- plain text ----------------------------------------------------------------------


def text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """The plain-text message (console, email plain part, Slack fallback text) for one
    or more events (``part``: which part of a split group they are)."""
    if len(events) == 1:
        return _text_one(events[0])
    shown = events[:MESSAGE_MAX_EVENTS]
    lines = [_group_title(events, part), ""]
    lines += ["  " + row for row in _columns([_compact(e) for e in shown], frozenset({4}))]
    if len(shown) < len(events):
        lines.append(f"  …and {len(events) - len(shown)} more")
    links = {_org_name(e): link for e in shown if (link := _link(e))}
    if links:
        lines += ["", f"{BUTTON_LABEL}:"]
        lines += ["  " + row for row in _columns([[name, url] for name, url in links.items()])]
    lines += ["", _group_footer(events)]
    return "\n".join(lines) + "\n"


def _text_one(event: AlertEvent) -> str:
    lines = [_title(event), _summary(event), ""]
    facts = [(f"{label}:", value) for label, value in (*_facts(event), *_details(event))]
    lines += _columns([list(fact) for fact in facts])
    for title, items in _breakdown(event):
        rows = [[_name(line.name), usd(line.amount_cents), _growth(line)] for line in items]
        lines += ["", f"{title}:"]
        lines += ["  " + row for row in _columns(rows, frozenset({1}))]
    lines.append("")
    if link := _link(event):
        lines.append(f"{BUTTON_LABEL}: {link}")
    lines.append(_footer(event))
    return "\n".join(lines) + "\n"


def brief_text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """The shortest complete message (a Slack refusal's last fallback): the title and
    one line per event with its kind, rule, organization, invoice and amount; at most
    a few thousand characters for up to ``MESSAGE_MAX_EVENTS`` events."""
    if len(events) == 1:
        event = events[0]
        rows = [_compact(event)]
        title = _title(event)
    else:
        rows = [_compact(e) for e in events[:MESSAGE_MAX_EVENTS]]
        title = _group_title(events, part)
    lines = [title, *(" ".join(cell for cell in row if cell) for row in rows)]
    return "\n".join(lines) + "\n"


# --- Slack Block Kit -----------------------------------------------------------------


def _mrkdwn_escape(value: str) -> str:
    """Slack mrkdwn needs only these three escaped: what is left cannot mention
    (``<!channel>``, ``<@U123>``) or link (``<https://evil.example|label>``)."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """Slack's top-level ``text`` for a message: :func:`text`, mrkdwn-escaped (Slack
    parses it as mrkdwn, and shows it alone when it refuses the blocks: a server's text
    in it must not mention or link), within ``SLACK_LIMITS.text``."""
    return _clip(_mrkdwn_escape(text(events, part)), SLACK_LIMITS.text)


def slack_brief_text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """:func:`brief_text` as Slack's top-level ``text`` (see :func:`slack_text`)."""
    return _clip(_mrkdwn_escape(brief_text(events, part)), SLACK_LIMITS.text)


def _mrkdwn_link(url: str, label: str) -> str:
    return f"<{url}|{_mrkdwn_escape(label).replace('|', '¦')}>"


def _md(value: str, limit: int = _SLACK_SECTION_MAX) -> MarkdownTextObject:
    return MarkdownTextObject(text=_clip(value, limit))


def slack_blocks(events: Sequence[AlertEvent], part: Part | None = None) -> list[dict[str, Any]]:
    """The Block Kit blocks for one or more events (sent with :func:`text` as fallback;
    ``part``: which part of a split group they are). Within :data:`SLACK_LIMITS`."""
    blocks = _slack_one(events[0]) if len(events) == 1 else _slack_group(events, part)
    return [block.to_dict() for block in blocks]


def _header(emoji: str, title: str) -> HeaderBlock:
    return HeaderBlock(
        text=PlainTextObject(text=_clip(f"{emoji} {title}", SLACK_LIMITS.header), emoji=True)
    )


def _slack_one(event: AlertEvent) -> list[Block]:
    esc = _mrkdwn_escape
    fields = [_md(f"*{label}*\n{esc(value)}", _SLACK_FIELD_MAX) for label, value in _facts(event)]
    blocks: list[Block] = [_header(_EMOJI[_state(event)], _title(event))]
    if summary := _summary(event):  # Slack refuses an empty text
        blocks.append(SectionBlock(text=_md(esc(summary))))
    blocks.append(SectionBlock(fields=fields[: SLACK_LIMITS.fields]))
    if details := _details(event):
        lines = "\n".join(f"*{esc(label)}:* {esc(value)}" for label, value in details)
        blocks.append(SectionBlock(text=_md(lines)))
    for title, items in _breakdown(event):
        rows = [
            " ".join(
                part
                for part in (f"• {esc(_name(line.name))}", usd(line.amount_cents), _growth(line))
                if part
            )
            for line in items
        ]
        blocks.append(SectionBlock(text=_md("\n".join([f"*{title}*", *rows]))))
    rule_type = esc(_name(event.rule_type))
    context = f"Severity *{event.severity.value}* · rule type `{rule_type}` · {_when(event.at)}"
    blocks.append(ContextBlock(elements=[_md(context)]))
    if link := _link(event):
        blocks.append(
            ActionsBlock(
                elements=[ButtonElement(text=BUTTON_LABEL, url=link, action_id="open_billing")]
            )
        )
    return blocks


def _slack_line(event: AlertEvent) -> str:
    """One event of a grouped message, within ``_SLACK_LINE_MAX`` code units: the
    organization is a link when the line has room for it."""

    def line(org: str) -> str:
        parts = [f"*{event.kind.value}*", _mrkdwn_escape(_name(event.rule)), org]
        if invoice_id := _invoice_id(event):
            parts.append(f"invoice `{_mrkdwn_escape(invoice_id)}`")
        if event.amount_cents is not None:
            parts.append(usd(event.amount_cents))
        return "• " + " · ".join(parts)

    link = _link(event)
    if link is not None:
        linked = line(_mrkdwn_link(link, _org_name(event)))
        if units(linked) <= _SLACK_LINE_MAX:
            return linked
    return _clip(line(_mrkdwn_escape(_org_name(event))), _SLACK_LINE_MAX)


def _slack_group(events: Sequence[AlertEvent], part: Part | None) -> list[Block]:
    chunks: list[list[str]] = [[]]
    shown = events[:MESSAGE_MAX_EVENTS]  # the outbox never groups more (store/grouping.py)
    for event in shown:
        line = _slack_line(event)
        if sum(units(x) + 1 for x in chunks[-1]) + units(line) > SLACK_LIMITS.section:
            chunks.append([])
        chunks[-1].append(line)
    if len(shown) < len(events):
        chunks.append([f"_…and {len(events) - len(shown)} more_"])
    blocks: list[Block] = [_header(_EMOJI[_group_state(events)], _group_title(events, part))]
    blocks += [SectionBlock(text=_md("\n".join(chunk), SLACK_LIMITS.section)) for chunk in chunks]
    blocks.append(ContextBlock(elements=[_md(_group_footer(events))]))
    return blocks


# --- email ---------------------------------------------------------------------------


def email_subject(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """``[invoice-watch] KIND rule-name: Org name $amount``, or the group's counts (and
    its part); at most :data:`SUBJECT_MAX` characters, the amount always whole."""
    if len(events) != 1:
        return _clip(f"{SUBJECT_PREFIX} {_group_title(events, part)}", SUBJECT_MAX)
    event = events[0]
    amount = f" {usd(event.amount_cents)}" if event.amount_cents is not None else ""
    head = f"{SUBJECT_PREFIX} {event.kind.value} "
    rule, org = _name(event.rule), _org_name(event)
    room = SUBJECT_MAX - len(head) - len(amount) - 2  # ": "
    if len(rule) + len(org) > room:
        rule = _clip(rule, max(room // 2, room - len(org)))
        org = _clip(org, room - len(rule))
    return f"{head}{rule}: {org}{amount}"


_BODY_STYLE = (
    "font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; "
    "font-size: 14px; color: #1d1d1d; line-height: 1.4"
)
_TH_STYLE = "text-align: left; padding: 4px 16px 4px 0; color: #555; font-weight: 600"
_TD_STYLE = "padding: 4px 16px 4px 0"
_TABLE_STYLE = "border-collapse: collapse; margin: 0 0 16px"
_BUTTON_STYLE = (
    "display: inline-block; padding: 8px 14px; background: #00684a; color: #ffffff; "
    "text-decoration: none; border-radius: 4px"
)
_FOOTER_STYLE = "color: #777; font-size: 12px; margin: 16px 0 0"


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def email_html(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """The HTML part: the same facts as :func:`text`, as an inline-styled table."""
    body = _html_one(events[0]) if len(events) == 1 else _html_group(events, part)
    return (
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"></head>\n'
        f'<body style="{_BODY_STYLE}">\n{body}</body>\n</html>\n'
    )


def _html_heading(title: str, state: str) -> str:
    return f'<h2 style="margin: 0 0 8px; color: {_COLOR[state]}">{_e(title)}</h2>\n'


def _html_rows(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(
        f'<tr><th style="{_TH_STYLE}">{_e(label)}</th><td style="{_TD_STYLE}">{_e(value)}</td>'
        "</tr>\n"
        for label, value in rows
    )
    return f'<table style="{_TABLE_STYLE}">\n{cells}</table>\n'


def _html_one(event: AlertEvent) -> str:
    parts = [
        _html_heading(_title(event), _state(event)),
        f'<p style="margin: 0 0 12px">{_e(_summary(event))}</p>\n',
        _html_rows([*_facts(event), *_details(event)]),
    ]
    for title, items in _breakdown(event):
        rows = "".join(
            f'<tr><td style="{_TD_STYLE}">{_e(_name(line.name))}</td>'
            f'<td style="{_TD_STYLE}; text-align: right">{_e(usd(line.amount_cents))}</td>'
            f'<td style="{_TD_STYLE}">{_e(_growth(line))}</td></tr>\n'
            for line in items
        )
        parts.append(f'<h3 style="margin: 0 0 4px; font-size: 14px">{_e(title)}</h3>\n')
        parts.append(f'<table style="{_TABLE_STYLE}">\n{rows}</table>\n')
    if link := _link(event):
        parts.append(
            f'<p><a href="{_e(link)}" style="{_BUTTON_STYLE}">{_e(BUTTON_LABEL)}</a></p>\n'
        )
    parts.append(f'<p style="{_FOOTER_STYLE}">{_e(_footer(event))}</p>\n')
    return "".join(parts)


def _html_group(events: Sequence[AlertEvent], part: Part | None) -> str:
    head = "".join(
        f'<th style="{_TH_STYLE}">{label}</th>'
        for label in ("Kind", "Rule", "Organization", "Invoice", "Amount")
    )
    rows = []
    shown = events[:MESSAGE_MAX_EVENTS]  # the outbox never groups more (store/grouping.py)
    for event in shown:
        kind, rule, _, _, amount = _compact(event)
        link = _link(event)
        org = _e(_org_name(event))
        if link is not None:
            org = f'<a href="{_e(link)}">{org}</a>'
        cells = [_e(kind), _e(rule), org, _e(_invoice_id(event) or ""), _e(amount)]
        rows.append(
            "<tr>" + "".join(f'<td style="{_TD_STYLE}">{cell}</td>' for cell in cells) + "</tr>\n"
        )
    if len(shown) < len(events):
        rows.append(f'<tr><td colspan="5">…and {len(events) - len(shown)} more</td></tr>\n')
    return (
        _html_heading(_group_title(events, part), _group_state(events))
        + f'<table style="{_TABLE_STYLE}">\n<tr>{head}</tr>\n{"".join(rows)}</table>\n'
        + f'<p style="{_FOOTER_STYLE}">{_e(_group_footer(events))}</p>\n'
    )


# --- JSON receivers: the webhook body, Teams, PagerDuty, Alertmanager ------------------
#
# The same facts as the text above, as data. Every text value is the bounded, printable
# one the other renderings show (names at most 200 characters, the summary 1,000, ten
# details of 300, ten breakdown lines per dimension), so every body is bounded too.

WEBHOOK_VERSION = 1
WEBHOOK_TYPE = "invoice_watch.notification"
_MACHINE_NAME_MAX = 200  # a rule's name may be that long (config), and is a routing key
_PD_SUMMARY_MAX = 1024  # PagerDuty: payload.summary
_PD_FIELD_MAX = 255  # PagerDuty: dedup_key, source, component, group, class
_AM_VALUE_MAX = 2000  # an Alertmanager annotation: no limit is documented; ours
TEAMS_MAX_BYTES = 27_000  # a Workflows message: "about 28 KB" (msteams-docs), in UTF-8
_TEAMS_LINE_MAX = 200  # one event's line in a grouped card

_TEAMS_COLOR = {
    "critical": "Attention",
    "warning": "Warning",
    "reminder": "Warning",
    "info": "Accent",
    "resolved": "Good",
}
_PD_SEVERITY = {Severity.CRITICAL: "critical", Severity.WARNING: "warning", Severity.INFO: "info"}


def _iso(at: datetime) -> str:
    """An instant as RFC 3339 in UTC, ``2026-11-15T12:00:00Z``."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _machine(value: str, limit: int = _MACHINE_NAME_MAX) -> str:
    """A name as a machine keeps it: printable, on one line, within ``limit``."""
    return _clip(_one_line(value), limit)


def message_id(events: Sequence[AlertEvent]) -> str:
    """A stable id for a message: the event's id, or one made of its events' ids (in
    any order) for a grouped message; the same when the message is sent again. Letters,
    digits and ``_`` only (Standard Webhooks' ``webhook-id`` may hold no ``.``)."""
    if len(events) == 1:
        return f"msg_{events[0].event_id}"
    digest = hashlib.sha256("|".join(sorted(e.event_id for e in events)).encode())
    return f"msg_group_{digest.hexdigest()[:32]}"


def _event_data(event: AlertEvent) -> dict[str, Any]:
    """One event of the webhook body (``notify/webhook-v1.schema.json``, ``event``)."""
    invoice = None
    if event.invoice_id:
        invoice = {
            "id": _machine(event.invoice_id),
            "status": _machine(event.invoice_status) if event.invoice_status else None,
            "previous_status": (_machine(event.previous_status) if event.previous_status else None),
        }
    amount = None
    if event.amount_cents is not None:
        amount = {"cents": event.amount_cents, "text": usd(event.amount_cents), "currency": "USD"}
    billing_period = None
    if event.period_start is not None and event.period_end is not None:
        billing_period = {
            "start": event.period_start.isoformat(),
            "end": event.period_end.isoformat(),
            "text": period(event.period_start, event.period_end),
        }
    return {
        "id": event.event_id,
        "kind": event.kind.value,
        "alert_key": _machine(event.key, 1000),
        "rule": _machine(event.rule),
        "rule_type": _machine(event.rule_type),
        "severity": event.severity.value,
        "summary": _summary(event),
        "at": _iso(event.at),
        "firing_since": _iso(event.firing_since) if event.firing_since else None,
        "org": {"id": _machine(event.org_id), "name": _machine(event.org_name or event.org_id)},
        "invoice": invoice,
        "amount": amount,
        "period": billing_period,
        "link": _link(event),
        "details": [{"label": label, "value": value} for label, value in _details(event)],
        "breakdown": [
            {
                "dimension": _machine(line.dimension, _NAME_MAX),
                "name": _name(line.name),
                "amount_cents": line.amount_cents,
                "amount_text": usd(line.amount_cents),
                "growth_cents": line.growth_cents,
            }
            for _, lines in _breakdown(event)
            for line in lines
        ],
    }


def webhook_body(
    events: Sequence[AlertEvent], part: Part | None = None, *, notifier: str
) -> dict[str, Any]:
    """The generic webhook's JSON body for one or more events (version
    :data:`WEBHOOK_VERSION`, described by ``invoice_watch/notify/webhook-v1.schema.json``
    and README "Receivers"): the message's stable ``id`` (also the ``webhook-id``
    header), its ``title`` and plain ``text`` (:func:`text`), and each event's facts."""
    shown = events[:MESSAGE_MAX_EVENTS]
    title = _title(events[0]) if len(events) == 1 else _group_title(events, part)
    return {
        "version": WEBHOOK_VERSION,
        "type": WEBHOOK_TYPE,
        "id": message_id(events),
        "timestamp": _iso(max(e.at for e in events)),
        "notifier": _machine(notifier),
        "part": {"number": part.number, "count": part.count} if part is not None else None,
        "title": title,
        "text": text(events, part),
        "events": [_event_data(event) for event in shown],
    }


# Teams: an Adaptive Card (https://adaptivecards.io/explorer). A server's text goes in a
# TextRun of a RichTextBlock, the one element that renders no Markdown ("Text to display.
# Markdown is not supported."), so a name can neither link nor format.


def _run(value: str, **style: Any) -> dict[str, Any]:
    """A TextRun: plain text, never Markdown (an empty one shows a dash: a TextRun
    needs text)."""
    return {"type": "TextRun", "text": value or "—", **style}


def _rich(*runs: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {"type": "RichTextBlock", "inlines": list(runs), **props}


def _open_url(url: str, title: str = BUTTON_LABEL) -> dict[str, Any]:
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
        _run(_clip(title, SLACK_LIMITS.header), weight="Bolder", size="Medium", color=color)
    )


def _teams_one(event: AlertEvent, *, full: bool) -> tuple[list[dict[str, Any]], list[str]]:
    body = [_teams_head(_title(event), _state(event))]
    if summary := _summary(event):
        body.append(_rich(_run(summary)))
    facts = _facts(event) + (_details(event) if full else [])
    body += [_teams_fact(label, value) for label, value in facts]
    if full:
        for title, items in _breakdown(event):
            body.append(_rich(_run(title, weight="Bolder"), spacing="Medium"))
            for line in items:
                amount = " ".join(p for p in (usd(line.amount_cents), _growth(line)) if p)
                body.append(_rich(_run(f"• {_name(line.name)}  "), _run(amount), spacing="None"))
    body.append(_rich(_run(_footer(event), isSubtle=True, size="Small"), spacing="Medium"))
    link = _link(event)
    return body, [link] if link else []


def _teams_line(event: AlertEvent) -> dict[str, Any]:
    """One event of a grouped card, as the Slack line says it (kind, rule, organization,
    invoice, amount), within ``_TEAMS_LINE_MAX`` units: the organization links to its
    billing page."""
    kind, rule, org, invoice, amount = _compact(event)
    tail = " · ".join(cell for cell in (invoice, amount) if cell)
    org_run = _run(_clip(org, 60))
    if link := _link(event):
        org_run["selectAction"] = _open_url(link)
    runs = [_run(f"{kind}  ", weight="Bolder"), _run(f"{_clip(rule, 60)} · "), org_run]
    if tail:
        runs.append(_run(_clip(f" · {tail}", _TEAMS_LINE_MAX - 140)))
    return _rich(*runs, spacing="None")


def _teams_group(
    events: Sequence[AlertEvent], part: Part | None, *, full: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    body = [_teams_head(_group_title(events, part), _group_state(events))]
    shown = events[:MESSAGE_MAX_EVENTS] if full else []
    body += [_teams_line(event) for event in shown]
    if len(shown) < len(events):
        more = len(events) - len(shown)
        body.append(_rich(_run(f"…and {more} more", italic=True), spacing="None"))
    body.append(_rich(_run(_group_footer(events), isSubtle=True, size="Small"), spacing="Medium"))
    links = list(dict.fromkeys(link for e in events if (link := _link(e))))
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


# PagerDuty Events API v2 (developer.pagerduty.com "Send an Alert Event";
# PagerDuty/api-schema reference/events-v2/openapiv3.json).


def pagerduty_dedup_key(event: AlertEvent) -> str:
    """The ``dedup_key`` of an event: its alert key, so that a FIRING, its REMINDERs
    and its RESOLVED are one PagerDuty alert (a key longer than PagerDuty's 255
    characters as its SHA-256); a NOTICE's key has its time added, so that each notice
    is an alert of its own."""
    key = event.key
    if event.kind is EventKind.NOTICE:
        key = f"{key}@{_iso(event.at)}"
    if len(key) > _PD_FIELD_MAX:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def pagerduty_event(event: AlertEvent) -> dict[str, Any]:
    """The Events API v2 event for ``event``, without its ``routing_key``: a RESOLVED
    resolves its alert; any other kind triggers (or updates) it, with the facts as
    ``custom_details`` and the billing page as a link."""
    dedup_key = pagerduty_dedup_key(event)
    if event.kind is EventKind.RESOLVED:
        return {"event_action": "resolve", "dedup_key": dedup_key}
    org = _org(event)
    summary = f"{_title(event)} · {_org_name(event)}: {_summary(event)}"
    details: dict[str, Any] = {"kind": event.kind.value, "summary": _summary(event)}
    details.update(_facts(event))
    details.update(_details(event))
    for title, items in _breakdown(event):
        details[title] = [
            " ".join(p for p in (_name(line.name), usd(line.amount_cents), _growth(line)) if p)
            for line in items
        ]
    details["Alert key"] = _machine(event.key, 1000)
    result: dict[str, Any] = {
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": _clip(summary, _PD_SUMMARY_MAX),
            "severity": _PD_SEVERITY[event.severity],
            "source": _clip(f"MongoDB Atlas organization {org}", _PD_FIELD_MAX),
            "timestamp": _iso(event.at),
            "component": _clip(f"invoice {_invoice_id(event)}", _PD_FIELD_MAX)
            if event.invoice_id
            else "billing",
            "group": _clip(_org_name(event), _PD_FIELD_MAX),
            "class": _clip(_name(event.rule_type), _PD_FIELD_MAX),
            "custom_details": details,
        },
        "client": "invoice-watch",
    }
    if link := _link(event):
        result["client_url"] = link
        result["links"] = [{"href": link, "text": BUTTON_LABEL}]
    return result


# Alertmanager API v2 (prometheus/alertmanager api/v2/openapi.yaml: postableAlert).


def alertname(rule_type: str) -> str:
    """The ``alertname`` label of a rule type: ``invoice_status`` -> ``AtlasInvoiceStatus``."""
    return "Atlas" + "".join(word.capitalize() for word in rule_type.split("_"))


def alertmanager_labels(event: AlertEvent) -> dict[str, str]:
    """The labels that identify an event's alert in Alertmanager (the same for its
    FIRING, REMINDERs and RESOLVED): ``alertname``, ``rule``, ``org_id``, ``org``,
    ``invoice_id`` (when it is about one), ``severity``; a NOTICE adds ``transition``
    (``PENDING->CLOSED``). Empty values are left out, as Alertmanager ignores them."""
    labels = {
        "alertname": alertname(_machine(event.rule_type)),
        "rule": _machine(event.rule),
        "org_id": _machine(event.org_id),
        "org": _machine(event.org_name or event.org_id),
        "invoice_id": _machine(event.invoice_id or ""),
        "severity": event.severity.value,
    }
    if event.kind is EventKind.NOTICE and event.previous_status:
        labels["transition"] = _machine(f"{event.previous_status}->{event.invoice_status or '?'}")
    return {name: value for name, value in labels.items() if value}


def alertmanager_alert(event: AlertEvent, *, ends_at: datetime) -> dict[str, Any]:
    """The ``postableAlert`` for ``event``: its labels, the text as annotations
    (``summary``, ``description``, and one per fact), ``startsAt`` when it began to fire,
    ``endsAt`` (``ends_at``: the caller's; a RESOLVED's is its own time), and the billing
    page as ``generatorURL``."""
    starts = event.firing_since or event.at
    ends = event.at if event.kind is EventKind.RESOLVED else ends_at
    annotations = {
        "summary": _clip(f"{_name(event.rule)} · {_org(event)}", _AM_VALUE_MAX),
        "description": _summary(event),
        "alert_key": _machine(event.key, 1000),
    }
    for label, value in (*_facts(event), *_details(event)):
        annotations[_annotation_name(label)] = _clip(value, _AM_VALUE_MAX)
    alert: dict[str, Any] = {
        "labels": alertmanager_labels(event),
        "annotations": {name: value for name, value in annotations.items() if value},
        "startsAt": _iso(starts),
        "endsAt": _iso(max(ends, starts)),
    }
    if link := _link(event):
        alert["generatorURL"] = link
    return alert


def _annotation_name(label: str) -> str:
    """A fact's label as an annotation name: ``Fired for`` -> ``fired_for``."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in label.lower()).strip("_")
    return name if name and not name[0].isdigit() else f"fact_{name}"
