"""A report as people read it: plain text (also the summary a Slack webhook or Teams gets),
HTML, and the email carrying both with the chart inline. Pure: no I/O.

The email is ``multipart/alternative``: a ``text/plain`` part, then a
``multipart/related`` holding the ``text/html`` part and the chart (``image/png``,
``Content-Disposition: inline``), which the HTML shows by its ``Content-ID``
(``<img src="cid:…">``, RFC 2392). Without a chart (matplotlib failed, or none was
drawn) the HTML says so and the email has no image.

Names come from Atlas (projects, SKUs, organizations) and alerts: each is made one
printable line (:func:`~invoice_watch.safe_text.one_line`), clipped, and HTML-escaped in
the HTML.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime

from invoice_watch.format import duration, period, usd
from invoice_watch.report.data import Change, ReportData
from invoice_watch.safe_text import clip, one_line

CHART_CID = "spend-chart@invoice-watch"
CHART_FILENAME = "spend-chart.png"
SUBJECT_PREFIX = "[invoice-watch]"
_NAME = 80  # characters of a project, SKU, rule or organization name
_SUMMARY = 300  # characters of an alert's summary


def _name(text: str) -> str:
    return clip(one_line(text), _NAME)


def _change(change: int | None, previous: int | None) -> str:
    if change is None:
        return "no data for last period"
    sign = "+" if change >= 0 else "-"
    percent = f", {sign}{abs(change) * 100 / previous:.1f}%" if previous else ""
    return f"{sign}{usd(abs(change))}{percent}"


def _row_change(row: Change) -> str:
    if row.change_cents is None:
        return ""
    return _change(row.change_cents, row.previous_cents)


def _last_month(data: ReportData) -> str:
    if data.last_to_date_cents is None:
        return "no data for last period"
    change = _change(data.change_cents, data.last_to_date_cents)
    return f"{usd(data.last_to_date_cents)} ({change})"


def facts(data: ReportData) -> list[tuple[str, str]]:
    """The report's headline figures, (label, value), in order."""
    rows = [
        (
            "Spend to date",
            f"{usd(data.to_date_cents)} (day {data.days} of {data.period_days})",
        ),
        ("Same point last month", _last_month(data)),
    ]
    if data.billed_cents is not None:
        rows.append(("Pending invoice (billed so far)", usd(data.billed_cents)))
    if data.forecast_cents is not None:
        rows.append(("Forecast to period end", usd(data.forecast_cents)))
    elif data.too_early is not None:
        rows.append(
            (
                "Forecast to period end",
                f"too early to forecast (the period has run less than {duration(data.too_early)})",
            )
        )
    if data.budget_cents is not None:
        verdict = ""
        if data.forecast_cents is not None:
            gap = data.forecast_cents - data.budget_cents
            verdict = f", forecast {usd(gap)} over" if gap > 0 else f", forecast {usd(-gap)} under"
        rules = ", ".join(_name(r) for r in data.budget_rules)
        rows.append(("Budget", f"{usd(data.budget_cents)} ({rules}{verdict})"))
    if data.no_items:
        rows.append(
            (
                "Note",
                f"no daily line items yet for {', '.join(_name(n) for n in data.no_items)}: "
                "spend to date counts none (they are read only for organizations a report "
                "or usage_anomaly rule covers)",
            )
        )
    return rows


def subject(data: ReportData) -> str:
    when = f"{data.now:%Y-%m-%d}"
    return clip(f"{SUBJECT_PREFIX} {one_line(data.title)} ({when})", 150)


def _table(title: str, rows: tuple[Change, ...]) -> list[str]:
    if not rows:
        return [f"{title}: none yet"]
    lines = [f"{title}:"]
    for row in rows:
        change = _row_change(row)
        lines.append(
            f"  {_name(row.name)}: {usd(row.amount_cents)}" + (f" ({change})" if change else "")
        )
    return lines


NO_CHART = "No chart: it could not be drawn."


def text(data: ReportData, *, chart_failed: bool = False) -> str:
    """The report as plain text (the email's text part; the summary for channels that
    cannot carry the chart); ``chart_failed``: it says the chart could not be drawn."""
    lines = [
        one_line(data.title),
        f"Billing period {period(data.period_start, data.period_end)}, as of "
        f"{data.now:%Y-%m-%d %H:%M} UTC",
        "",
        *(f"{label}: {value}" for label, value in facts(data)),
        "",
        *_table("Top projects", data.top_projects),
        "",
        *_table("Top SKUs", data.top_skus),
        "",
    ]
    if data.firing:
        lines.append(f"Firing alerts ({len(data.firing)}):")
        for alert in data.firing:
            since = f", since {alert.since:%Y-%m-%d %H:%M} UTC" if alert.since else ""
            lines.append(
                f"  [{alert.severity}] {_name(alert.rule)} ({_name(alert.org_name)}{since}): "
                f"{clip(one_line(alert.summary), _SUMMARY)}"
            )
    else:
        lines.append("Firing alerts: none")
    if chart_failed:
        lines.append(NO_CHART)
    lines += [f"Billing: {url}" for url in data.billing_urls]
    return "\n".join(lines) + "\n"


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _html_table(title: str, rows: tuple[Change, ...]) -> str:
    if not rows:
        return f"<h3>{_e(title)}</h3><p>None yet.</p>"
    body = "".join(
        f"<tr><td>{_e(_name(row.name))}</td>"
        f'<td style="text-align:right">{_e(usd(row.amount_cents))}</td>'
        f'<td style="text-align:right">{_e(_row_change(row))}</td></tr>'
        for row in rows
    )
    return (
        f'<h3>{_e(title)}</h3><table cellpadding="4">'
        '<tr><th align="left">Name</th><th align="right">To date</th>'
        f'<th align="right">Change</th></tr>{body}</table>'
    )


def html_body(data: ReportData, *, chart: bool = True) -> str:
    """The report as HTML; with ``chart``, the chart is shown by ``cid:`` (the image
    part of :func:`email`)."""
    figures = "".join(
        f'<tr><th align="left">{_e(label)}</th><td>{_e(value)}</td></tr>'
        for label, value in facts(data)
    )
    image = (
        f'<p><img src="cid:{CHART_CID}" alt="Cumulative spend this period against last '
        f'period" width="900" height="400"></p>'
        if chart
        else f"<p><em>{NO_CHART}</em></p>"
    )
    if data.firing:
        items = "".join(
            f"<li><strong>{_e(_name(a.rule))}</strong> ({_e(a.severity)}, "
            f"{_e(_name(a.org_name))}): {_e(clip(one_line(a.summary), _SUMMARY))}</li>"
            for a in data.firing
        )
        alerts = f"<h3>Firing alerts ({len(data.firing)})</h3><ul>{items}</ul>"
    else:
        alerts = "<h3>Firing alerts</h3><p>None.</p>"
    links = "".join(
        f'<p><a href="{_e(url)}">Open billing in Atlas</a></p>' for url in data.billing_urls
    )
    return (
        '<html><body style="font-family:sans-serif">'
        f"<h2>{_e(one_line(data.title))}</h2>"
        f"<p>Billing period {_e(period(data.period_start, data.period_end))}, as of "
        f"{data.now:%Y-%m-%d %H:%M} UTC</p>"
        f'<table cellpadding="4">{figures}</table>{image}'
        f"{_html_table('Top projects', data.top_projects)}"
        f"{_html_table('Top SKUs', data.top_skus)}{alerts}{links}</body></html>"
    )


def email(
    data: ReportData,
    chart_png: bytes | None,
    *,
    from_addr: str,
    to: list[str],
    report_id: str,
) -> EmailMessage:
    """The report as an email (see the module docstring); ``report_id`` (the report's
    name and the time it is for) makes its Message-ID, the same for a resend."""
    digest = hashlib.sha256(report_id.encode()).hexdigest()[:32]
    return mime(
        subject=subject(data),
        from_addr=from_addr,
        to=to,
        date=data.now,
        message_id=f"<report-{digest}@invoice-watch>",
        text_body=text(data, chart_failed=chart_png is None),
        html=html_body(data, chart=chart_png is not None),
        chart_png=chart_png,
    )


def mime(
    *,
    subject: str,
    from_addr: str,
    to: Sequence[str],
    date: datetime,
    message_id: str,
    text_body: str,
    html: str,
    chart_png: bytes | None,
) -> EmailMessage:
    """The email of a report made (the module docstring's structure): ``html`` shows
    ``chart_png`` (when given) by ``cid:``."""
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = from_addr
    message["To"] = ", ".join(to)
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    message.set_content(text_body)
    message.add_alternative(html, subtype="html")
    if chart_png is not None:
        *_, html_part = message.iter_parts()
        html_part.add_related(
            chart_png,
            maintype="image",
            subtype="png",
            cid=f"<{CHART_CID}>",
            filename=CHART_FILENAME,
            disposition="inline",
        )
    return message
