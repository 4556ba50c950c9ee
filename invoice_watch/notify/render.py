"""Message rendering: turns alert events into plain text, Slack Block Kit, an email
subject and an HTML body. Pure functions, no I/O; every notifier renders through here so
a message says the same facts everywhere.

One event is one message. Several events are one grouped message (flood control): a
title with the counts per kind and one compact line per event.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
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

from invoice_watch.format import duration, period, usd
from invoice_watch.types import AlertEvent, BreakdownLine, EventKind, Severity

SUBJECT_PREFIX = "[invoice-watch]"
BUTTON_LABEL = "Open billing in Atlas"

# Slack Block Kit limits (https://api.slack.com/reference/block-kit/blocks).
_SLACK_HEADER_MAX = 150
_SLACK_SECTION_MAX = 3000
_SLACK_FIELD_MAX = 2000
_SLACK_MAX_LIST_SECTIONS = 40  # of the 50 blocks a message may hold
_SLACK_LINE_MAX = 1000  # one event's line in a grouped message

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
    """Collapse whitespace, so names and summaries cannot break a header or a line."""
    return " ".join(value.split())


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


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
        return f"{_one_line(event.org_name)} ({event.org_id})"
    return event.org_id


def _org_name(event: AlertEvent) -> str:
    return _one_line(event.org_name) or event.org_id


def _status(event: AlertEvent) -> str | None:
    if event.kind is EventKind.NOTICE and event.previous_status:
        return f"{event.previous_status} -> {event.invoice_status or '?'}"
    return event.invoice_status


def _facts(event: AlertEvent) -> list[tuple[str, str]]:
    """The label/value pairs of one event, in display order; absent values are left out."""
    status = _status(event)
    facts = [("Organization", _org(event))]
    if event.invoice_id:
        facts.append(("Invoice", event.invoice_id))
    if status:
        facts.append(("Status", status))
    if event.amount_cents is not None:
        facts.append(("Amount", usd(event.amount_cents)))
    if event.period_start is not None and event.period_end is not None:
        facts.append(("Period", period(event.period_start, event.period_end)))
    if event.kind is EventKind.RESOLVED and event.firing_since is not None:
        fired = duration(event.at - event.firing_since)
        facts.append(("Fired for", f"{fired} (since {_when(event.firing_since)})"))
    return facts


def _title(event: AlertEvent) -> str:
    return f"{event.kind.value}: {_one_line(event.rule)}"


def _footer(event: AlertEvent) -> str:
    return f"Severity {event.severity.value} · rule type {event.rule_type} · {_when(event.at)}"


def _counts(events: Sequence[AlertEvent]) -> str:
    counts = [(kind, sum(1 for e in events if e.kind is kind)) for kind in EventKind]
    return ", ".join(f"{n} {kind.value}" for kind, n in counts if n)


def _group_title(events: Sequence[AlertEvent]) -> str:
    return f"{len(events)} alerts: {_counts(events)}"


def _group_footer(events: Sequence[AlertEvent]) -> str:
    return f"invoice-watch · latest event {_when(max(e.at for e in events))}"


def _breakdown(event: AlertEvent) -> list[tuple[str, list[BreakdownLine]]]:
    """The breakdown lines grouped by dimension, dimensions in order of appearance."""
    groups: dict[str, list[BreakdownLine]] = {}
    for line in event.breakdown:
        groups.setdefault(line.dimension, []).append(line)
    return [(_DIMENSION_TITLES.get(dim, dim.capitalize()), lines) for dim, lines in groups.items()]


def _growth(line: BreakdownLine) -> str:
    if line.growth_cents is None:
        return ""
    word = "down" if line.growth_cents < 0 else "up"
    return f"({word} {usd(abs(line.growth_cents))})"


def _compact(event: AlertEvent) -> list[str]:
    """One event of a grouped message as columns: kind, rule, org, invoice, amount."""
    return [
        event.kind.value,
        _one_line(event.rule),
        _org_name(event),
        f"invoice {event.invoice_id}" if event.invoice_id else "",
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


def text(events: Sequence[AlertEvent]) -> str:
    """The plain-text message (console, email plain part, Slack fallback text) for one
    or more events."""
    if len(events) == 1:
        return _text_one(events[0])
    lines = [_group_title(events), ""]
    lines += ["  " + row for row in _columns([_compact(e) for e in events], frozenset({4}))]
    links = {_org_name(e): e.billing_url for e in events}
    lines += ["", f"{BUTTON_LABEL}:"]
    lines += ["  " + row for row in _columns([[name, url] for name, url in links.items()])]
    lines += ["", _group_footer(events)]
    return "\n".join(lines) + "\n"


def _text_one(event: AlertEvent) -> str:
    lines = [_title(event), _one_line(event.summary), ""]
    facts = [(f"{label}:", value) for label, value in (*_facts(event), *event.details)]
    lines += _columns([list(fact) for fact in facts])
    for title, items in _breakdown(event):
        rows = [[line.name, usd(line.amount_cents), _growth(line)] for line in items]
        lines += ["", f"{title}:"]
        lines += ["  " + row for row in _columns(rows, frozenset({1}))]
    lines += ["", f"{BUTTON_LABEL}: {event.billing_url}", _footer(event)]
    return "\n".join(lines) + "\n"


# --- Slack Block Kit -----------------------------------------------------------------


def _mrkdwn_escape(value: str) -> str:
    """Slack mrkdwn needs only these three escaped."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _mrkdwn_link(url: str, label: str) -> str:
    return f"<{url}|{_mrkdwn_escape(label).replace('|', '¦')}>"


def _md(value: str) -> MarkdownTextObject:
    return MarkdownTextObject(text=_clip(value, _SLACK_SECTION_MAX))


def slack_blocks(events: Sequence[AlertEvent]) -> list[dict[str, Any]]:
    """The Block Kit blocks for one or more events (sent with :func:`text` as fallback)."""
    blocks = _slack_one(events[0]) if len(events) == 1 else _slack_group(events)
    return [block.to_dict() for block in blocks]


def _header(emoji: str, title: str) -> HeaderBlock:
    return HeaderBlock(
        text=PlainTextObject(text=_clip(f"{emoji} {title}", _SLACK_HEADER_MAX), emoji=True)
    )


def _slack_one(event: AlertEvent) -> list[Block]:
    esc = _mrkdwn_escape
    fields = [
        _md(_clip(f"*{label}*\n{esc(value)}", _SLACK_FIELD_MAX)) for label, value in _facts(event)
    ]
    blocks: list[Block] = [
        _header(_EMOJI[_state(event)], _title(event)),
        SectionBlock(text=_md(esc(_one_line(event.summary)))),
        SectionBlock(fields=fields),
    ]
    if event.details:
        details = "\n".join(f"*{esc(label)}:* {esc(value)}" for label, value in event.details)
        blocks.append(SectionBlock(text=_md(details)))
    for title, items in _breakdown(event):
        rows = [
            " ".join(
                part
                for part in (f"• {esc(line.name)}", usd(line.amount_cents), _growth(line))
                if part
            )
            for line in items
        ]
        blocks.append(SectionBlock(text=_md("\n".join([f"*{title}*", *rows]))))
    context = (
        f"Severity *{event.severity.value}* · rule type `{event.rule_type}` · {_when(event.at)}"
    )
    blocks.append(ContextBlock(elements=[_md(context)]))
    blocks.append(
        ActionsBlock(
            elements=[
                ButtonElement(text=BUTTON_LABEL, url=event.billing_url, action_id="open_billing")
            ]
        )
    )
    return blocks


def _slack_line(event: AlertEvent) -> str:
    parts = [
        f"*{event.kind.value}*",
        _mrkdwn_escape(_one_line(event.rule)),
        _mrkdwn_link(event.billing_url, _org_name(event)),
    ]
    if event.invoice_id:
        parts.append(f"invoice `{event.invoice_id}`")
    if event.amount_cents is not None:
        parts.append(usd(event.amount_cents))
    return "• " + " · ".join(parts)


def _slack_group(events: Sequence[AlertEvent]) -> list[Block]:
    chunks: list[list[str]] = [[]]
    shown = 0
    for event in events:
        line = _clip(_slack_line(event), _SLACK_LINE_MAX)
        if sum(len(x) + 1 for x in chunks[-1]) + len(line) > _SLACK_SECTION_MAX:
            if len(chunks) == _SLACK_MAX_LIST_SECTIONS:
                break
            chunks.append([])
        chunks[-1].append(line)
        shown += 1
    if shown < len(events):
        chunks.append([f"_…and {len(events) - shown} more, see `invoice-watch history`_"])
    blocks: list[Block] = [_header(_EMOJI[_group_state(events)], _group_title(events))]
    blocks += [SectionBlock(text=_md("\n".join(chunk))) for chunk in chunks]
    blocks.append(ContextBlock(elements=[_md(_group_footer(events))]))
    return blocks


# --- email ---------------------------------------------------------------------------


def email_subject(events: Sequence[AlertEvent]) -> str:
    """``[invoice-watch] KIND rule-name: Org name $amount``, or the group's counts."""
    if len(events) != 1:
        return f"{SUBJECT_PREFIX} {_group_title(events)}"
    event = events[0]
    subject = f"{SUBJECT_PREFIX} {event.kind.value} {_one_line(event.rule)}: {_org_name(event)}"
    if event.amount_cents is not None:
        subject += f" {usd(event.amount_cents)}"
    return subject


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


def email_html(events: Sequence[AlertEvent]) -> str:
    """The HTML part: the same facts as :func:`text`, as an inline-styled table."""
    body = _html_one(events[0]) if len(events) == 1 else _html_group(events)
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
        f'<p style="margin: 0 0 12px">{_e(_one_line(event.summary))}</p>\n',
        _html_rows([*_facts(event), *event.details]),
    ]
    for title, items in _breakdown(event):
        rows = "".join(
            f'<tr><td style="{_TD_STYLE}">{_e(line.name)}</td>'
            f'<td style="{_TD_STYLE}; text-align: right">{_e(usd(line.amount_cents))}</td>'
            f'<td style="{_TD_STYLE}">{_e(_growth(line))}</td></tr>\n'
            for line in items
        )
        parts.append(f'<h3 style="margin: 0 0 4px; font-size: 14px">{_e(title)}</h3>\n')
        parts.append(f'<table style="{_TABLE_STYLE}">\n{rows}</table>\n')
    parts.append(
        f'<p><a href="{_e(event.billing_url)}" style="{_BUTTON_STYLE}">{_e(BUTTON_LABEL)}</a></p>\n'
    )
    parts.append(f'<p style="{_FOOTER_STYLE}">{_e(_footer(event))}</p>\n')
    return "".join(parts)


def _html_group(events: Sequence[AlertEvent]) -> str:
    head = "".join(
        f'<th style="{_TH_STYLE}">{label}</th>'
        for label in ("Kind", "Rule", "Organization", "Invoice", "Amount")
    )
    rows = []
    for event in events:
        kind, rule, _, _, amount = _compact(event)
        org = f'<a href="{_e(event.billing_url)}">{_e(_org_name(event))}</a>'
        cells = [_e(kind), _e(rule), org, _e(event.invoice_id or ""), _e(amount)]
        rows.append(
            "<tr>" + "".join(f'<td style="{_TD_STYLE}">{cell}</td>' for cell in cells) + "</tr>\n"
        )
    return (
        _html_heading(_group_title(events), _group_state(events))
        + f'<table style="{_TABLE_STYLE}">\n<tr>{head}</tr>\n{"".join(rows)}</table>\n'
        + f'<p style="{_FOOTER_STYLE}">{_e(_group_footer(events))}</p>\n'
    )
