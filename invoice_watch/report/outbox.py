"""A report as the outbox keeps it and the notifiers send it (issue 19 §2): a
:class:`ReportMessage`, made once when the report is due (its figures, its text, its HTML
and its chart as PNG bytes), stored in the outbox row's ``events`` column as a JSON
object ``{"report": {...}}`` (an alert message's is a JSON array of events, so the two
kinds never mix: :func:`is_report_json`), and sent as it was made by every attempt,
after a restart too. Pure: no I/O, no matplotlib.

What each notifier does with one (:func:`send_report`): email sends the HTML with the
chart inline (``cid:``) and the plain text; a Slack bot posts a Block Kit summary and
uploads the chart (``files_upload_v2``); a Slack webhook (which cannot carry files),
Teams and the console get the text summary. Webhook, PagerDuty and Alertmanager carry
alerts, not digests: a report naming one is a ``check-config`` error
(:data:`REPORT_NOTIFIER_TYPES`), and one that reaches such a notifier all the same (the
configuration changed while it waited) is failed, saying why.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from invoice_watch.errors import PermanentNotifyError
from invoice_watch.safe_text import clip, one_line

if TYPE_CHECKING:
    from invoice_watch.report.data import ReportData

# The notifier types a report can go to (config check) and the key of a report's JSON.
REPORT_NOTIFIER_TYPES = frozenset({"email", "slack", "msteams", "console"})
KEY = "report"
CHART_MAX = 4 * 1024 * 1024  # bytes of a chart kept: a 900x400 PNG is about 50 KB
_TEXT_MAX = 20_000  # characters of the text and of the HTML (bounded by the data anyway)


@dataclass(frozen=True)
class ReportMessage:
    """One report for one scope, due at ``due``: ``report`` (its name), ``scope`` (an
    organization id, or ``*`` for one of them all), what it says (``title``,
    ``subject``, ``facts``, ``text``, ``html``: the HTML shows ``chart`` by ``cid:``),
    and the chart (PNG bytes; None when it could not be drawn)."""

    report: str
    scope: str
    due: datetime
    title: str
    subject: str
    facts: tuple[tuple[str, str], ...]
    text: str
    html: str
    chart: bytes | None = None

    @property
    def message_id(self) -> str:
        """The email's Message-ID: the same for every attempt of this report."""
        key = f"{self.report}|{self.scope}|{self.due.isoformat()}"
        return f"<report-{hashlib.sha256(key.encode()).hexdigest()[:32]}@invoice-watch>"

    @property
    def summary(self) -> str:
        """One line naming it (``status``, ``history``, logs)."""
        scope = "all organizations" if self.scope == "*" else self.scope  # SCOPE_ALL
        return one_line(f"REPORT {self.report} ({scope}) {self.due:%Y-%m-%d %H:%M}Z")

    def to_json(self) -> str:
        """The outbox's ``events`` text of this report: ``{"report": {...}}``."""
        body = {
            "report": self.report,
            "scope": self.scope,
            "due": self.due.isoformat(),
            "title": self.title,
            "subject": self.subject,
            "facts": [list(fact) for fact in self.facts],
            "text": self.text,
            "html": self.html,
            "chart": base64.b64encode(self.chart).decode() if self.chart is not None else None,
        }
        return json.dumps({KEY: body}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ReportMessage:
        """The report :meth:`to_json` wrote. :class:`ValueError` when ``text`` is not one."""
        try:
            body = json.loads(text)[KEY]
            chart = body["chart"]
            return cls(
                report=str(body["report"]),
                scope=str(body["scope"]),
                due=datetime.fromisoformat(body["due"]),
                title=str(body["title"]),
                subject=str(body["subject"]),
                facts=tuple((str(label), str(value)) for label, value in body["facts"]),
                text=str(body["text"]),
                html=str(body["html"]),
                chart=base64.b64decode(chart, validate=True) if chart is not None else None,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ValueError(f"not a stored report: {type(exc).__name__}: {exc}") from None


def is_report_json(text: str) -> bool:
    """Whether an outbox row's ``events`` text is a report (a JSON object) rather than
    alert events (a JSON array)."""
    return text.lstrip().startswith("{")


def make_message(
    data: ReportData,
    chart: bytes | None,
    *,
    report: str,
    scope: str,
    due: datetime,
    drawn: bool = True,
) -> ReportMessage:
    """The message of the report ``report`` for ``scope`` due at ``due``, from its data
    and chart (:mod:`invoice_watch.report.message` writes the text and HTML). With
    ``drawn`` (a chart was asked for) and no ``chart``, the text and HTML say it could
    not be drawn."""
    from invoice_watch.report import message

    if chart is not None and len(chart) > CHART_MAX:
        chart = None
    failed = drawn and chart is None
    return ReportMessage(
        report=report,
        scope=scope,
        due=due,
        title=one_line(data.title),
        subject=message.subject(data),
        facts=tuple(message.facts(data)),
        text=clip(message.text(data, chart_failed=failed), _TEXT_MAX),
        html=clip(message.html_body(data, chart=chart is not None), _TEXT_MAX),
        chart=chart,
    )


def report_email(msg: ReportMessage, *, from_addr: str, to: Sequence[str]) -> EmailMessage:
    """The report as an email: ``multipart/alternative`` of the text and a
    ``multipart/related`` of the HTML and the chart inline (``cid:``, RFC 2392):
    :func:`invoice_watch.report.message.mime`."""
    from invoice_watch.report.message import mime

    return mime(
        subject=msg.subject,
        from_addr=from_addr,
        to=to,
        date=msg.due,
        message_id=msg.message_id,
        text_body=msg.text,
        html=msg.html,
        chart_png=msg.chart,
    )


@runtime_checkable
class ReportReceiver(Protocol):
    """A notifier that can carry a report (:data:`REPORT_NOTIFIER_TYPES`).
    ``send_report`` raises as ``Notifier.send`` does; ``recipients`` is what an
    earlier attempt said is still owed (an email's recipients; a Slack bot's
    ``chart`` when the summary went and the upload did not)."""

    name: str

    async def send_report(
        self, msg: ReportMessage, *, recipients: Sequence[str] | None = None
    ) -> None: ...


async def send_report(
    notifier: Any, msg: ReportMessage, *, recipients: Sequence[str] | None = None
) -> None:
    """Send ``msg`` through ``notifier``; :class:`PermanentNotifyError` when it cannot
    carry a report (module docstring)."""
    if not isinstance(notifier, ReportReceiver):
        raise PermanentNotifyError(
            f"notifier {getattr(notifier, 'name', '?')!r} cannot carry a report (reports go "
            f"to {', '.join(sorted(REPORT_NOTIFIER_TYPES))} notifiers): remove it from the "
            "report's notify"
        )
    await notifier.send_report(msg, recipients=recipients)


# -- what channels without the chart show --------------------------------------------


def slack_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_summary(msg: ReportMessage) -> tuple[str, list[dict[str, Any]]]:
    """The Slack message of a report: the fallback ``text`` (the text summary,
    mrkdwn-escaped) and Block Kit blocks: a header, the figures as fields, the top
    lists and firing alerts (preformatted), within Slack's limits."""
    from slack_sdk.models.blocks import (
        ContextBlock,
        HeaderBlock,
        MarkdownTextObject,
        PlainTextObject,
        SectionBlock,
    )

    text = clip(slack_escape(msg.text), 39_000)
    fields = [
        MarkdownTextObject(text=clip(f"*{slack_escape(label)}*\n{slack_escape(value)}", 1900))
        for label, value in msg.facts[:10]
    ]
    lines = msg.text.split("\n")
    # The text's lines after its figures: the top projects and SKUs, the firing alerts.
    rest = "\n".join(lines[len(msg.facts) + 4 :]).strip()
    blocks: list[Any] = [
        HeaderBlock(text=PlainTextObject(text=clip(f":bar_chart: {msg.title}", 150), emoji=True)),
    ]
    if fields:
        blocks.append(SectionBlock(fields=fields))
    if rest:
        blocks.append(SectionBlock(text=MarkdownTextObject(text=clip(slack_escape(rest), 2900))))
    blocks.append(
        ContextBlock(
            elements=[
                MarkdownTextObject(
                    text=clip(slack_escape(lines[1] if len(lines) > 1 else ""), 290) or " "
                )
            ]
        )
    )
    return text, [block.to_dict() for block in blocks]


def teams_summary(msg: ReportMessage) -> dict[str, Any]:
    """The Teams Workflows message of a report: an Adaptive Card of its title and text
    summary (TextRuns: plain text, no Markdown), within Teams' size."""
    body = [
        {
            "type": "RichTextBlock",
            "inlines": [{"type": "TextRun", "text": clip(msg.title, 200), "weight": "Bolder",
                         "size": "Medium"}],
        },
        {
            "type": "RichTextBlock",
            "inlines": [{"type": "TextRun", "text": clip(msg.text, 12_000) or "-"}],
        },
    ]  # fmt: skip
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.2",
                    "body": body,
                },
            }
        ],
    }
