"""Slack: Block Kit blocks and the top-level ``text`` of a message, within
:data:`SLACK_LIMITS` (kept in UTF-16 code units). A server's text is mrkdwn-escaped in
the blocks and the ``text`` alike, so that it can neither mention (``<!channel>``) nor
link."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
from invoice_watch.format import usd
from invoice_watch.notify.render import facts, plain
from invoice_watch.types import AlertEvent, Part


@dataclass(frozen=True)
class SlackLimits:
    """What Slack accepts in one message (https://docs.slack.dev/reference/block-kit/blocks,
    https://docs.slack.dev/reference/methods/chat.postMessage). ``block_text``: the
    characters of every text object of the blocks together; Slack refuses a message
    above about 13,000 (``msg_blocks_too_long``, as reported by Slack users), so a
    message keeps within 12,000. Every limit is kept in UTF-16 code units
    (:func:`~.facts.units`), the most Slack may count a character as (it is written in
    JavaScript, whose string length counts them): an emoji-heavy name stays within."""

    blocks: int = 50
    header: int = 150
    section: int = 3000
    fields: int = 10
    field: int = 2000
    url: int = 3000
    block_text: int = 12_000
    text: int = 40_000  # the top-level `text` (msg_too_long)


SLACK_LIMITS = SlackLimits()

_SLACK_FIELD_MAX = 300  # one fact of a single-event message, label included
_SLACK_SECTION_MAX = 1500  # the summary, details and each breakdown section
_SLACK_LINE_MAX = 270  # one event's line in a grouped message
# Checked at import: the worst grouped part fits (header, lines, context).
assert (
    SLACK_LIMITS.header + MESSAGE_MAX_EVENTS * (_SLACK_LINE_MAX + 1) + 400
    <= SLACK_LIMITS.block_text
)

_EMOJI = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "reminder": ":bell:",
    "info": ":information_source:",
    "resolved": ":white_check_mark:",
}


def _mrkdwn_escape(value: str) -> str:
    """Slack mrkdwn needs only these three escaped: what is left cannot mention
    (``<!channel>``, ``<@U123>``) or link (``<https://evil.example|label>``)."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """Slack's top-level ``text`` for a message: :func:`~.plain.text`, mrkdwn-escaped (Slack
    parses it as mrkdwn, and shows it alone when it refuses the blocks: a server's text
    in it must not mention or link), within ``SLACK_LIMITS.text``."""
    return facts.clip(_mrkdwn_escape(plain.text(events, part)), SLACK_LIMITS.text)


def slack_brief_text(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """:func:`~.plain.brief_text` as Slack's top-level ``text`` (see :func:`slack_text`)."""
    return facts.clip(_mrkdwn_escape(plain.brief_text(events, part)), SLACK_LIMITS.text)


def _mrkdwn_link(url: str, label: str) -> str:
    return f"<{url}|{_mrkdwn_escape(label).replace('|', '¦')}>"


def _md(value: str, limit: int = _SLACK_SECTION_MAX) -> MarkdownTextObject:
    return MarkdownTextObject(text=facts.clip(value, limit))


def slack_blocks(events: Sequence[AlertEvent], part: Part | None = None) -> list[dict[str, Any]]:
    """The Block Kit blocks for one or more events (sent with :func:`slack_text` as fallback;
    ``part``: which part of a split group they are). Within :data:`SLACK_LIMITS`."""
    blocks = _slack_one(events[0]) if len(events) == 1 else _slack_group(events, part)
    return [block.to_dict() for block in blocks]


def _header(emoji: str, title: str) -> HeaderBlock:
    return HeaderBlock(
        text=PlainTextObject(text=facts.clip(f"{emoji} {title}", SLACK_LIMITS.header), emoji=True)
    )


def _slack_one(event: AlertEvent) -> list[Block]:
    esc = _mrkdwn_escape
    fields = [
        _md(f"*{label}*\n{esc(value)}", _SLACK_FIELD_MAX) for label, value in facts.table(event)
    ]
    blocks: list[Block] = [_header(_EMOJI[facts.state(event)], facts.title(event))]
    if summary := facts.summary(event):  # Slack refuses an empty text
        blocks.append(SectionBlock(text=_md(esc(summary))))
    blocks.append(SectionBlock(fields=fields[: SLACK_LIMITS.fields]))
    if details := facts.details(event):
        lines = "\n".join(f"*{esc(label)}:* {esc(value)}" for label, value in details)
        blocks.append(SectionBlock(text=_md(lines)))
    for title, items in facts.breakdown(event):
        rows = [
            " ".join(
                part
                for part in (
                    f"• {esc(facts.name(line.name))}",
                    usd(line.amount_cents),
                    facts.growth(line),
                )
                if part
            )
            for line in items
        ]
        blocks.append(SectionBlock(text=_md("\n".join([f"*{title}*", *rows]))))
    rule_type = esc(facts.name(event.rule_type))
    context = (
        f"Severity *{event.severity.value}* · rule type `{rule_type}` · {facts.when(event.at)}"
    )
    blocks.append(ContextBlock(elements=[_md(context)]))
    if link := facts.link(event):
        blocks.append(
            ActionsBlock(
                elements=[
                    ButtonElement(text=facts.BUTTON_LABEL, url=link, action_id="open_billing")
                ]
            )
        )
    return blocks


def _slack_line(event: AlertEvent) -> str:
    """One event of a grouped message, within ``_SLACK_LINE_MAX`` code units: the
    organization is a link when the line has room for it."""

    def line(org: str) -> str:
        parts = [f"*{event.kind.value}*", _mrkdwn_escape(facts.name(event.rule)), org]
        if invoice_id := facts.invoice_id(event):
            parts.append(f"invoice `{_mrkdwn_escape(invoice_id)}`")
        if event.amount_cents is not None:
            parts.append(usd(event.amount_cents))
        return "• " + " · ".join(parts)

    link = facts.link(event)
    if link is not None:
        linked = line(_mrkdwn_link(link, facts.org_name(event)))
        if facts.units(linked) <= _SLACK_LINE_MAX:
            return linked
    return facts.clip(line(_mrkdwn_escape(facts.org_name(event))), _SLACK_LINE_MAX)


def _slack_group(events: Sequence[AlertEvent], part: Part | None) -> list[Block]:
    chunks: list[list[str]] = [[]]
    shown = events[:MESSAGE_MAX_EVENTS]  # the outbox never groups more (store/grouping.py)
    for event in shown:
        line = _slack_line(event)
        if sum(facts.units(x) + 1 for x in chunks[-1]) + facts.units(line) > SLACK_LIMITS.section:
            chunks.append([])
        chunks[-1].append(line)
    if len(shown) < len(events):
        chunks.append([f"_…and {len(events) - len(shown)} more_"])
    blocks: list[Block] = [
        _header(_EMOJI[facts.group_state(events)], facts.group_title(events, part))
    ]
    blocks += [SectionBlock(text=_md("\n".join(chunk), SLACK_LIMITS.section)) for chunk in chunks]
    blocks.append(ContextBlock(elements=[_md(facts.group_footer(events))]))
    return blocks
