"""Tests of invoice_watch.report: the report's data (pure), its text and HTML, the email
with the chart inline by cid, and the chart itself (a PNG that decodes, of the right
size, drawn off the event loop, matplotlib imported only then, its cache where we say).
No golden images: the PNG is checked by decoding it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import os
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from PIL import Image

from invoice_watch.config import ForecastRule
from invoice_watch.format import usd
from invoice_watch.report import chart, message, render
from invoice_watch.report.data import OrgSpend, ReportData, build_report
from invoice_watch.simulator import demo_scenario
from invoice_watch.simulator.usage import daily_items
from invoice_watch.types import AlertEvent, EventKind, Invoice, LineItem, Severity

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)  # usage up to 2026-11-20: day 20 of 30
PROD = "5f8a1c2e9b3d4a6f7e0c1b2a"
ANALYTICS = "6a7b8c9d0e1f2a3b4c5d6e7f"
ROOT = Path(__file__).resolve().parent.parent


def demo_items(org: str) -> tuple[Invoice | None, list[LineItem]]:
    """The demo scenario's invoice and daily line items (this and last period) of
    ``org``, as the fetch stage would hand them over."""
    scenario = demo_scenario(now=NOW)
    items: list[LineItem] = []
    pending = None
    for invoice in scenario.invoices_of(org):
        if invoice.start < datetime(2026, 10, 1, tzinfo=UTC):
            continue
        items += [
            LineItem(
                d.item.project,
                d.item.sku,
                d.item.cluster,
                d.cents,
                project_id=d.item.project_id,
                usage_date=d.day,
            )
            for d in daily_items(invoice, NOW)
        ]
        if invoice.status == "PENDING":
            pending = Invoice(
                invoice.id,
                org,
                "PENDING",
                invoice.start,
                invoice.end,
                amount_billed_cents=invoice.amount_billed_cents,
            )
    return pending, items


def spend(org: str = PROD, name: str = "Production") -> OrgSpend:
    pending, items = demo_items(org)
    return OrgSpend(org, name, pending, items, f"https://cloud.example/v2#/org/{org}/billing")


def budget_rule(budget: str, orgs: list[str] | None = None, name: str = "budget") -> ForecastRule:
    return ForecastRule.model_validate(
        {"name": name, "type": "forecast", "budget": budget, "notify": ["x"], "orgs": orgs}
    )


def alert(
    org: str, rule: str = "failed-charge", summary: str = "Invoice x is FAILED."
) -> AlertEvent:
    return AlertEvent(
        kind=EventKind.FIRING,
        key=f"{rule}/{org}",
        rule=rule,
        rule_type="invoice_status",
        severity=Severity.CRITICAL,
        org_id=org,
        org_name="Production",
        billing_url="",
        summary=summary,
        at=NOW - timedelta(hours=3),
        firing_since=NOW - timedelta(days=2),
    )


@pytest.fixture(scope="module")
def report() -> ReportData:
    return build_report(
        [spend()],
        NOW,
        rules=[budget_rule("6000"), budget_rule("5500", [PROD], "tight"), budget_rule("10")],
        firing=[alert(PROD), alert(ANALYTICS, "other-org")],
    )


# ---- the data --------------------------------------------------------------------------


def test_build_report_month_to_date_and_the_same_point_last_month(report: ReportData):
    _, items = demo_items(PROD)
    this = [i for i in items if i.usage_date and i.usage_date >= date(2026, 11, 1)]
    last = [i for i in items if i.usage_date and i.usage_date < date(2026, 11, 1)]

    assert (report.period_start, report.period_end) == (date(2026, 11, 1), date(2026, 12, 1))
    assert (report.days, report.period_days) == (20, 30)
    assert report.to_date_cents == sum(i.amount_cents for i in this) == 3900_00
    assert report.last_to_date_cents == sum(
        i.amount_cents for i in last if i.usage_date and i.usage_date <= date(2026, 10, 20)
    )
    assert report.cumulative[-1] == report.to_date_cents and len(report.cumulative) == 20
    assert report.last_cumulative[-1] == sum(i.amount_cents for i in last)
    assert len(report.last_cumulative) == 31
    assert list(report.cumulative) == sorted(report.cumulative)


def test_build_report_forecast_against_the_tightest_budget_covering_the_org(report: ReportData):
    assert report.billed_cents == 3900_00
    assert report.forecast_cents == 3900_00 * 30 * 86400 // (20 * 86400 + 9 * 3600)
    # "budget" ($10) names no orgs and covers every one: the tightest.
    assert report.budget_cents == 10_00 and report.budget_rules == ("budget",)
    assert report.over_budget


def test_build_report_top_projects_and_skus_with_their_change(report: ReportData):
    (project,) = report.top_projects  # every demo line item is in one project
    assert project.name == "Production Project" and project.amount_cents == 3900_00
    assert project.previous_cents == report.last_to_date_cents
    skus = [row.name for row in report.top_skus]
    assert skus[0] == "ATLAS_AWS_INSTANCE_M40" and len(skus) == 4
    assert all(row.change_cents is not None for row in report.top_skus)
    transfer = next(r for r in report.top_skus if "TRANSFER" in r.name)
    assert transfer.change_percent is not None and transfer.change_percent > 0  # 270 vs ~128


def test_build_report_firing_alerts_of_its_organizations_only(report: ReportData):
    (firing,) = report.firing

    assert (firing.rule, firing.severity, firing.since) == (
        "failed-charge",
        "critical",
        NOW - timedelta(days=2),
    )


def test_build_report_combined_sums_the_organizations():
    both = build_report(
        [spend(), spend(ANALYTICS, "Analytics")],
        NOW,
        rules=[budget_rule("6000", [PROD]), budget_rule("1000", [ANALYTICS], "small")],
    )

    assert both.title == "Spend report: 2 organizations"
    assert both.to_date_cents == 3900_00 + 640_00
    assert both.billed_cents == 3900_00 + 640_00
    assert both.budget_cents == 7000_00 and both.budget_rules == ("budget", "small")
    assert both.top_projects[0].name == "Production Project"
    assert len(both.billing_urls) == 2


def test_build_report_without_a_budget_last_period_or_pending_invoice():
    _, items = demo_items(PROD)
    this = [i for i in items if i.usage_date and i.usage_date >= date(2026, 11, 1)]

    lonely = build_report([OrgSpend(PROD, "Production", None, this)], NOW)

    assert lonely.budget_cents is None and lonely.forecast_cents is None
    assert lonely.billed_cents is None and lonely.last_to_date_cents is None
    assert lonely.change_cents is None and lonely.last_cumulative == ()
    assert all(row.previous_cents is None for row in lonely.top_skus)
    assert (lonely.period_start, lonely.period_end) == (date(2026, 11, 1), date(2026, 12, 1))
    empty = build_report([OrgSpend(PROD, "Production", None)], NOW)
    assert (empty.days, empty.to_date_cents, empty.cumulative) == (0, 0, ())
    with pytest.raises(ValueError, match="at least one organization"):
        build_report([], NOW)


# ---- text, HTML, email -------------------------------------------------------------------


def test_text_says_every_figure(report: ReportData):
    body = message.text(report)

    assert body.startswith("Spend report: Production\nBilling period 2026-11-01 – 2026-11-30")
    assert "Spend to date: $3,900.00 (day 20 of 30)" in body
    assert "Same point last month: $" in body
    assert f"Forecast to period end: {usd(report.forecast_cents)}" in body
    assert "Budget: $10.00 (budget, forecast $" in body and "over)" in body
    assert "Top projects:\n  Production Project: $3,900.00 (+$" in body
    assert "Top SKUs:\n  ATLAS_AWS_INSTANCE_M40: $2,870.00" in body
    assert "Firing alerts (1):\n  [critical] failed-charge (Production, since 2026-11-19" in body
    assert "Billing: https://cloud.example/v2#/org/" in body


def test_text_and_html_make_names_from_atlas_harmless():
    items = [
        LineItem("<b>Web</b>\x1b[2J", "SKU\nX", "c", 100, usage_date=date(2026, 11, 20)),
    ]
    data = build_report(
        [OrgSpend(PROD, "Prod", None, items)],
        NOW,
        firing=[alert(PROD, summary="a\u202eb <script>")],
        title="Spend <report>",
    )

    body, page = message.text(data), message.html_body(data)

    assert "\x1b" not in body and "\u202e" not in body and "SKU X" in body
    assert "<b>Web" not in page and "&lt;b&gt;Web&lt;/b&gt;" in page
    assert "<script>" not in page and "Spend &lt;report&gt;" in page


def test_html_shows_the_chart_by_cid_or_says_there_is_none(report: ReportData):
    assert f'src="cid:{message.CHART_CID}"' in message.html_body(report)
    without = message.html_body(report, chart=False)
    assert "cid:" not in without and "No chart" in without


def _mime(report: ReportData, png: bytes | None) -> EmailMessage:
    built = message.email(
        report, png, from_addr="w <w@example.test>", to=["a@example.test"], report_id="weekly|x"
    )
    parsed = email.message_from_bytes(bytes(built), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.fixture(scope="module")
def png(report: ReportData) -> bytes:
    return chart.chart_png(report)


def test_email_has_text_and_html_with_the_chart_inline_by_cid(report: ReportData, png: bytes):
    parsed = _mime(report, png)

    assert parsed.get_content_type() == "multipart/alternative"
    plain, related = parsed.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    page, image = related.iter_parts()
    assert page.get_content_type() == "text/html"
    assert image.get_content_type() == "image/png"
    assert image["Content-ID"] == f"<{message.CHART_CID}>"
    assert image.get_content_disposition() == "inline"
    assert f'src="cid:{message.CHART_CID}"' in page.get_content()
    attached = image.get_content()
    assert attached == png
    with Image.open(io.BytesIO(attached)) as decoded:
        assert decoded.format == "PNG" and decoded.size == chart.SIZE
    assert parsed["Subject"] == "[invoice-watch] Spend report: Production (2026-11-21)"
    assert parsed["Message-ID"] == _mime(report, None)["Message-ID"]  # stable per report
    assert "Spend to date: $3,900.00" in plain.get_content()


def test_email_without_a_chart_has_no_image(report: ReportData):
    parsed = _mime(report, None)

    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]


# ---- the chart ----------------------------------------------------------------------------


def test_chart_png_decodes_at_its_size(png: bytes):
    with Image.open(io.BytesIO(png)) as decoded:
        decoded.verify()
    with Image.open(io.BytesIO(png)) as decoded:
        assert (decoded.format, decoded.size) == ("PNG", chart.SIZE)
        decoded.load()
        assert len(decoded.getcolors(1_000_000) or ()) > 10  # lines drawn, not a blank


def test_chart_png_of_an_empty_report_and_of_names_with_dollars():
    odd = build_report([OrgSpend(PROD, "$$ org $x$ \\", None)], NOW, title="Spend $report$ of $$")

    with Image.open(io.BytesIO(chart.chart_png(odd))) as decoded:
        assert decoded.size == chart.SIZE


async def test_render_chart_draws_in_a_child_process_off_the_event_loop(report: ReportData):
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    try:
        png = await render.render_chart(report)
    finally:
        done.set()
        await task
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.size == chart.SIZE
    assert ticks >= 3  # the loop kept running while the chart was drawn


def _children() -> list[str]:
    """The process ids of this process's children (Linux; [] elsewhere)."""
    found = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return found.read_text().split() if found.exists() else []


def _child(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code))


@pytest.mark.parametrize(
    ("command", "bounds", "says"),
    [
        (
            _child("""
                import sys
                print("Traceback (most recent call last):", file=sys.stderr)
                print("RuntimeError: no fonts here", file=sys.stderr)
                sys.exit(3)
            """),
            {},
            "the chart's renderer exited with status 3: RuntimeError: no fonts here",
        ),
        (
            _child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
            {},
            "the chart's renderer was killed by SIGKILL",
        ),
        (
            _child("import sys, time; sys.stdin.read(); time.sleep(60)"),
            {"time_limit": 0.5},
            "the chart's renderer did not finish within 0.5 s and was killed",
        ),
        (
            _child("import sys; sys.stdout.buffer.write(b'\\x89PNG' * 10**6)"),
            {"limit": 1000},
            "the chart's renderer wrote more than 1,000 bytes",
        ),
        (_child("print('hello')"), {}, "the chart's renderer wrote no PNG (6 bytes)"),
        (("/nonexistent/python",), {}, "the chart's renderer could not start: "),
    ],
    ids=["crash", "signal", "hang", "too-big", "not-png", "not-started"],
)
async def test_render_chart_that_fails_says_why_in_one_line_and_leaves_no_child(
    report: ReportData, command: tuple[str, ...], bounds: dict[str, float], says: str
):
    import time

    began = time.monotonic()
    with pytest.raises(render.ChartError) as caught:
        await render.render_chart(report, command=command, **bounds)  # type: ignore[arg-type]

    assert str(caught.value).startswith(says)
    assert "\n" not in str(caught.value)
    assert time.monotonic() - began < 30  # the hang was cut at its time limit
    assert _children() == []  # every child killed and reaped: no zombie left


async def test_a_render_cancelled_kills_and_reaps_its_child(report: ReportData):
    """The daemon stopping while a chart is drawn leaves no child process behind."""
    hang = _child("import sys, time; sys.stdin.read(); time.sleep(60)")
    task = asyncio.create_task(render.render_chart(report, command=hang))
    for _ in range(1000):  # until the child runs (bounded: 10 s)
        if _children():
            break
        await asyncio.sleep(0.01)
    assert _children() != []

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _children() == []


async def test_renderer_draw_logs_one_warning_and_gives_none(
    report: ReportData, caplog: pytest.LogCaptureFixture
):
    renderer = render.Renderer(command=_child("import sys; sys.exit('cairo: out of memory')"))

    assert await renderer.draw(report, None) is None
    (record,) = [r for r in caplog.records if r.name == render.__name__]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage() == (
        "the report's chart could not be drawn (the report goes without it): "
        "the chart's renderer exited with status 1: cairo: out of memory"
    )


def test_the_chart_child_refuses_bad_input_in_one_line_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "invoice_watch.report.chart"],
        input=b'{"title": "x"}',
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode() == "ValueError: not a chart's data: KeyError: 'cache'\n"


async def test_the_child_keeps_matplotlib_cache_where_we_say_when_home_is_not_writable(
    report: ReportData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """MPLCONFIGDIR reaches the child: the folder of cache_dir (made 0700) holds
    matplotlib's font cache, and nothing is written to a home that cannot be."""
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    (tmp_path / "home").mkdir(mode=0o500)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = chart.cache_dir(tmp_path / "state" / "state.db", {})

    png = await render.render_chart(report, folder)

    assert png.startswith(b"\x89PNG")
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert list(folder.glob("fontlist-*.json"))  # matplotlib's font cache, there


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_matplotlib_is_imported_only_when_a_chart_is_drawn(tmp_path: Path):
    """Loading the config, building a report and its email cost nothing of matplotlib's
    (~56 MiB): the daemon's idle memory does not grow because reports exist."""
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    result = _python(
        f"""
        import sys
        import invoice_watch.app, invoice_watch.cli, invoice_watch.config
        from invoice_watch.report import chart, data, message, schedule
        from tests.test_report import NOW, build_report, spend
        report = build_report([spend()], NOW)
        message.email(report, None, from_addr="a@b.c", to=["d@e.f"], report_id="x")
        assert "matplotlib" not in sys.modules, "imported too early"
        chart.chart_png(report, __import__("pathlib").Path({str(tmp_path)!r}))
        assert "matplotlib" in sys.modules
        print("ok")
        """,
        env,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_chart_sets_matplotlib_cache_folder_when_home_is_not_writable(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "no-such-home")
    (tmp_path / "no-such-home").mkdir(mode=0o500)
    folder = tmp_path / "state" / "matplotlib-cache"
    result = _python(
        f"""
        from pathlib import Path
        from invoice_watch.report import chart
        from tests.test_report import NOW, build_report, spend
        folder = chart.cache_dir(Path({str(tmp_path / "state" / "state.db")!r}), {{}})
        chart.chart_png(build_report([spend()], NOW), folder)
        """,
        env,
    )

    assert result.returncode == 0, result.stderr
    assert "mkdir -p failed" not in result.stderr
    assert "temporary cache directory" not in result.stderr
    assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700"


def test_an_unusable_cache_folder_falls_back_to_a_private_temporary_one(tmp_path: Path):
    """``CACHE_DIRECTORY=/dev/null``: the chart is drawn all the same, with one warning
    and no traceback; the temporary folder is private."""
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    result = _python(
        """
        import os, tempfile
        from pathlib import Path
        from invoice_watch.report import chart
        from tests.test_report import NOW, build_report, spend
        folder = chart.cache_dir(Path("/x/state.db"), {"CACHE_DIRECTORY": "/dev/null"})
        report = build_report([spend()], NOW)
        assert chart.chart_png(report, folder).startswith(b"\\x89PNG")
        assert chart.chart_png(report, folder).startswith(b"\\x89PNG")
        used = Path(os.environ["MPLCONFIGDIR"])
        print(oct(used.stat().st_mode & 0o777), used.parent == Path(tempfile.gettempdir()))
        """,
        env,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0o700", "True"]
    assert "Traceback" not in result.stderr
    assert result.stderr.count("cannot be used") == 1
    assert "/dev/null/matplotlib" in result.stderr


def test_cache_dir_prefers_systemd_cache_directory():
    state = Path("/var/lib/invoice-watch/state.db")

    assert chart.cache_dir(state, {"CACHE_DIRECTORY": "/var/cache/invoice-watch"}) == Path(
        "/var/cache/invoice-watch/matplotlib"
    )
    assert chart.cache_dir(state, {}) == Path("/var/lib/invoice-watch/matplotlib-cache")


def test_a_report_without_line_items_says_so_per_organization():
    """The state holds the pending invoice but no daily line items: the report names
    the organization in a note instead of showing "$0.00" as if nothing was spent."""
    pending, _ = demo_items(PROD)
    bare = OrgSpend(PROD, "Production", pending, ())
    report = build_report([bare, spend(ANALYTICS, "Analytics")], NOW)
    assert report.no_items == ("Production",)
    body = message.text(report)
    assert "Note: no daily line items yet for Production: spend to date counts none" in body
    assert "Analytics:" not in body.split("Note:")[1].splitlines()[0]
    assert "no daily line items" not in message.text(build_report([spend()], NOW))


def test_a_report_forecasts_nothing_before_the_forecast_rules_min_elapsed():
    """A monthly report on day 1 at 09:00: nine hours extrapolated to a month would be
    "over budget" every month. Like the forecast rule, the report waits min_elapsed."""
    day1 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    pending, items = demo_items(PROD)
    early = OrgSpend(PROD, "Production", pending, items)
    report = build_report([early], day1, rules=[budget_rule("$10")])
    assert report.forecast_cents is None and report.too_early == timedelta(days=3)
    body = message.text(report)
    assert "Forecast to period end: too early to forecast (the period has run less than 3d)" in body
    assert "over)" not in body
    short = ForecastRule.model_validate(
        {"name": "b", "type": "forecast", "budget": "$10", "notify": ["x"], "min_elapsed": "6h"}
    )
    assert build_report([early], day1, rules=[short]).forecast_cents is not None
    assert build_report([spend()], NOW, rules=[budget_rule("$10")]).too_early is None
