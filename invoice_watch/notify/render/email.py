"""Email: the subject (at most :data:`SUBJECT_MAX` characters) and the HTML part, an
inline-styled table of the same facts as the plain part (:func:`~.plain.text`); every
value HTML-escaped."""

from __future__ import annotations

import html
from collections.abc import Sequence

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.format import usd
from invoice_watch.notify.render import facts
from invoice_watch.types import AlertEvent, Part

SUBJECT_PREFIX = "[invoice-watch]"
SUBJECT_MAX = 150  # characters of an email subject (folded at 78 by the email package)

_COLOR = {
    "critical": "#b00020",
    "warning": "#b35c00",
    "reminder": "#b35c00",
    "info": "#1f6feb",
    "resolved": "#1a7f37",
}


def email_subject(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """``[invoice-watch] KIND rule-name: Org name $amount``, or the group's counts (and
    its part); at most :data:`SUBJECT_MAX` characters, the amount always whole."""
    if len(events) != 1:
        return facts.clip(f"{SUBJECT_PREFIX} {facts.group_title(events, part)}", SUBJECT_MAX)
    event = events[0]
    amount = f" {usd(event.amount_cents)}" if event.amount_cents is not None else ""
    head = f"{SUBJECT_PREFIX} {event.kind.value} "
    rule, org = facts.name(event.rule), facts.org_name(event)
    room = SUBJECT_MAX - len(head) - len(amount) - 2  # ": "
    if len(rule) + len(org) > room:
        rule = facts.clip(rule, max(room // 2, room - len(org)))
        org = facts.clip(org, room - len(rule))
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
    """The HTML part: the same facts as :func:`~.plain.text`, as an inline-styled table."""
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
        _html_heading(facts.title(event), facts.state(event)),
        f'<p style="margin: 0 0 12px">{_e(facts.summary(event))}</p>\n',
        _html_rows([*facts.table(event), *facts.details(event)]),
    ]
    for title, items in facts.breakdown(event):
        rows = "".join(
            f'<tr><td style="{_TD_STYLE}">{_e(facts.name(line.name))}</td>'
            f'<td style="{_TD_STYLE}; text-align: right">{_e(usd(line.amount_cents))}</td>'
            f'<td style="{_TD_STYLE}">{_e(facts.growth(line))}</td></tr>\n'
            for line in items
        )
        parts.append(f'<h3 style="margin: 0 0 4px; font-size: 14px">{_e(title)}</h3>\n')
        parts.append(f'<table style="{_TABLE_STYLE}">\n{rows}</table>\n')
    if link := facts.link(event):
        parts.append(
            f'<p><a href="{_e(link)}" style="{_BUTTON_STYLE}">{_e(facts.BUTTON_LABEL)}</a></p>\n'
        )
    parts.append(f'<p style="{_FOOTER_STYLE}">{_e(facts.footer(event))}</p>\n')
    return "".join(parts)


def _html_group(events: Sequence[AlertEvent], part: Part | None) -> str:
    head = "".join(
        f'<th style="{_TH_STYLE}">{label}</th>'
        for label in ("Kind", "Rule", "Organization", "Invoice", "Amount")
    )
    rows = []
    shown = events[:MESSAGE_MAX_EVENTS]  # the outbox never groups more (store/grouping.py)
    for event in shown:
        kind, rule, _, _, amount = facts.compact(event)
        link = facts.link(event)
        org = _e(facts.org_name(event))
        if link is not None:
            org = f'<a href="{_e(link)}">{org}</a>'
        cells = [_e(kind), _e(rule), org, _e(facts.invoice_id(event) or ""), _e(amount)]
        rows.append(
            "<tr>" + "".join(f'<td style="{_TD_STYLE}">{cell}</td>' for cell in cells) + "</tr>\n"
        )
    if len(shown) < len(events):
        rows.append(f'<tr><td colspan="5">…and {len(events) - len(shown)} more</td></tr>\n')
    return (
        _html_heading(facts.group_title(events, part), facts.group_state(events))
        + f'<table style="{_TABLE_STYLE}">\n<tr>{head}</tr>\n{"".join(rows)}</table>\n'
        + f'<p style="{_FOOTER_STYLE}">{_e(facts.group_footer(events))}</p>\n'
    )
