"""Reports end to end (issue 19 §2): on their schedule (FakeClock), through the outbox,
to aiosmtpd (HTML with the chart inline by cid, and text) and the fake Slack (a bot's
Block Kit summary with the chart uploaded by files_upload_v2; a webhook's text summary),
sent once per due time across restarts, never twice. No golden images: the PNG is
checked by decoding it."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
import yaml
from PIL import Image

from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.report.chart import SIZE
from invoice_watch.report.message import CHART_CID
from tests.fakes_slack import TOKEN
from tests.world import ANALYTICS, PROD, World


def config_with_reports(world: World, reports: list[dict[str, Any]], **notifiers: Any) -> Config:
    data = world.config_data()
    data["notifiers"]["bot"] = {
        "type": "slack",
        "token": TOKEN,
        "channel": "#finops",
        "api_url": world.slack.api_url,
    }
    data["notifiers"].update(notifiers)
    data["reports"] = reports
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def daily_in(world: World, hours: int) -> str:
    """A daily schedule ``hours`` from the world's now (UTC), on the minute."""
    at = world.clock.now() + timedelta(hours=hours)
    return f"daily {at:%H:%M}"


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes it whole: a broken PNG raises
        assert image.format == "PNG"
        return image.size


async def test_a_report_missed_while_down_is_sent_once_after_the_restart_never_twice(
    world: World,
):
    """Due at 09:00 while the daemon is down: the next start enqueues it once (its
    report_runs row and its outbox rows in one transaction), delivery sends it by email
    with the chart inline (cid) and to Slack with the chart uploaded; looking again, or
    starting once more, sends nothing."""
    reports = [{"name": "weekly", "schedule": daily_in(world, 1), "notify": ["mail", "bot"],
                "orgs": [PROD]}]  # fmt: skip
    config = config_with_reports(world, reports)
    assert await world.run_once(config) == 0  # the invoices are in the state
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 0  # first seen: waits for its first time
    mails = len(world.sink.envelopes)
    world.clock.advance(2 * 3600)  # the daemon was down when the report was due
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 1
        assert await app.reporter.look() == 0  # the same due time: never twice
        stats = await app.deliverer.deliver_due()
        assert (stats.sent, stats.failed) == (2, 0)
    async with App(config, clock=world.clock) as app:  # another restart
        assert app.reporter is not None
        assert await app.reporter.look() == 0
        assert (await app.deliverer.deliver_due()).sent == 0

    assert len(world.sink.envelopes) == mails + 1
    mail = world.sink.message()
    assert "Spend report: Production" in mail["Subject"]
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None and "Spend to date" in text.get_content()
    # The daily line items the line items stage read (the report covers PROD).
    assert "Top SKUs:" in text.get_content()
    assert "Top SKUs: none yet" not in text.get_content()
    assert html is not None and f'src="cid:{CHART_CID}"' in html.get_content()
    images = [part for part in mail.walk() if part.get_content_type() == "image/png"]
    assert len(images) == 1
    assert images[0]["Content-ID"] == f"<{CHART_CID}>"
    assert images[0].get_content_disposition() == "inline"
    png = images[0].get_content()
    assert png_size(png) == SIZE

    summaries = [b for b in world.slack.accepted if b.get("channel") == "#finops"]
    assert len(summaries) == 1
    assert summaries[0]["blocks"][0]["type"] == "header"
    assert "Spend report: Production" in summaries[0]["text"]
    assert len(world.slack.files) == 1
    assert world.slack.files[0]["channel_id"].startswith("C")  # the id Slack answered
    assert world.slack.files[0]["bytes"] == png
    routes = [r.route for r in world.slack.received if r.route != "webhook"]
    assert routes[-4:] == [
        "chat.postMessage",
        "files.getUploadURLExternal",
        "upload",
        "files.completeUploadExternal",
    ]


async def test_a_failed_chart_upload_retries_the_upload_alone(world: World):
    """The summary went, the upload URL answered 500: the next attempt uploads the
    chart only (the summary is not posted twice)."""
    reports = [{"name": "daily", "schedule": daily_in(world, 1), "notify": ["bot"],
                "orgs": [ANALYTICS]}]  # fmt: skip
    config = config_with_reports(world, reports)
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
        world.slack.upload_replies.append(500)
        stats = await app.deliverer.deliver_due()
        assert (stats.sent, stats.retried) == (0, 1)
        assert world.slack.files == []
        world.clock.advance(3600)
        stats = await app.deliverer.deliver_due()
        assert stats.sent == 1
    posts = [r for r in world.slack.received if r.route == "chat.postMessage"]
    assert len(posts) == 1
    assert len(world.slack.files) == 1
    assert png_size(world.slack.files[0]["bytes"]) == SIZE


async def test_a_combined_report_goes_as_text_to_a_slack_webhook(world: World):
    """A webhook cannot carry a file: the summary (blocks and text) goes, one message
    for both organizations (``combined``)."""
    reports = [{"name": "all", "schedule": daily_in(world, 1), "notify": ["slack"],
                "combined": True}]  # fmt: skip
    config = config_with_reports(world, reports)
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        before = len(world.slack.accepted)
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
        assert (await app.deliverer.deliver_due()).sent == 1
    body = world.slack.accepted[before]
    assert "Spend report: 2 organizations" in body["text"]
    assert world.slack.files == []


async def test_reports_that_are_not_due_never_import_matplotlib(world: World, tmp_path):
    """The daemon's idle memory does not grow because reports exist: looking at
    schedules that are not due imports no matplotlib (a fresh interpreter)."""
    import subprocess
    import sys
    import textwrap

    path = world.write_config(
        reports=[{"name": "weekly", "schedule": "mon 09:00", "notify": ["mail"]}]
    )
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from invoice_watch.app import App
        from invoice_watch.config import load_file
        async def main():
            async with App(load_file({str(path)!r})) as app:
                await app.reporter.look()
                await app.reporter.look()
        asyncio.run(main())
        print("matplotlib" in sys.modules)
        """
    )
    import asyncio

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


async def test_a_report_the_daemon_sends_leaves_no_matplotlib_in_it(world: World):
    """The daemon's memory does not grow because a report went: its chart is drawn in a
    child process, and matplotlib (~56 MiB, for good once imported) never enters the
    daemon's. A fresh interpreter runs the daemon (App) through a poll, a report due
    and its delivery; the mail it sent has the chart."""
    import asyncio
    import json
    import subprocess
    import sys
    import textwrap

    report = {"name": "daily", "schedule": daily_in(world, 1), "notify": ["mail"], "orgs": [PROD]}
    path = world.write_config(reports=[report])
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from datetime import datetime
        from invoice_watch.app import App
        from invoice_watch.cli.commands import run_once
        from invoice_watch.clock import FakeClock
        from invoice_watch.config import load_file
        async def main():
            clock = FakeClock(datetime.fromisoformat({world.clock.now().isoformat()!r}))
            async with App(load_file({str(path)!r}), clock=clock) as app:
                await run_once(app)
                await app.reporter.look()
                clock.advance(3600 + 60)
                enqueued = await app.reporter.look()
                sent = (await app.deliverer.deliver_due()).sent
            return enqueued, sent
        enqueued, sent = asyncio.run(main())
        print(json.dumps([enqueued, sent, "matplotlib" in sys.modules]))
        """
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    enqueued, sent, loaded = json.loads(done.stdout.splitlines()[-1])
    assert (enqueued, sent) == (1, 1)
    assert loaded is False, "matplotlib was imported in the daemon's process"
    mail = world.sink.message()
    assert "Spend report: Production" in mail["Subject"]
    (image,) = [part for part in mail.walk() if part.get_content_type() == "image/png"]
    assert png_size(image.get_content()) == SIZE


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import sys; sys.exit('Fatal Python error: Segmentation fault')",
         "exited with status 1: Fatal Python error: Segmentation fault"),
        ("import sys, time; sys.stdin.read(); time.sleep(60)",
         "did not finish within 0.5 s and was killed"),
    ],
    ids=["crash", "hang"],
)  # fmt: skip
async def test_a_chart_that_cannot_be_drawn_still_sends_the_report_saying_so(
    world: World, caplog: pytest.LogCaptureFixture, code: str, why: str
):
    """The chart's child crashes or hangs (killed at its time limit): the report is
    enqueued and mailed all the same, text and HTML, without an image, saying the chart
    could not be drawn; one WARNING says why, with no traceback."""
    import logging
    import sys

    from invoice_watch.report.message import NO_CHART
    from invoice_watch.report.render import Renderer

    caplog.set_level(logging.INFO)
    reports = [{"name": "daily", "schedule": daily_in(world, 1), "notify": ["mail", "bot"],
                "orgs": [PROD]}]  # fmt: skip
    config = config_with_reports(world, reports)
    assert await world.run_once(config) == 0
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        app.reporter.renderer = Renderer(command=(sys.executable, "-c", code), timeout=0.5)
        await app.reporter.look()
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
        stats = await app.deliverer.deliver_due()
        assert (stats.sent, stats.failed) == (2, 0)

    mail = world.sink.message()
    assert "Spend report: Production" in mail["Subject"]
    assert [part for part in mail.walk() if part.get_content_type() == "image/png"] == []
    text, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert text is not None and NO_CHART in text.get_content()
    assert "Spend to date" in text.get_content()
    assert html is not None and NO_CHART in html.get_content() and "cid:" not in html.get_content()
    assert world.slack.files == []  # the bot posted the summary alone
    (summary,) = [b for b in world.slack.accepted if b.get("channel") == "#finops"]
    assert NO_CHART in summary["text"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"the report's chart could not be drawn (the report goes without it): "
        f"the chart's renderer {why}"
    ]
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize("kind", ["pagerduty", "webhook"])
def test_check_config_refuses_a_report_to_a_notifier_that_cannot_carry_one(world: World, kind: str):
    data = world.config_data()
    data["notifiers"]["pd"] = (
        {"type": "pagerduty", "routing_key": "r" * 32}
        if kind == "pagerduty"
        else {"type": "webhook", "url": "https://hooks.example.com/x"}
    )
    data["reports"] = [{"name": "weekly", "schedule": "mon 09:00", "notify": ["mail", "pd"]}]
    with pytest.raises(Exception) as caught:
        load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)
    assert "cannot carry a report" in str(caught.value)
    assert "e2e.yaml:" in str(caught.value)


# -- invoice-watch report ------------------------------------------------------------


async def _main(*argv: str) -> int:
    import asyncio

    from invoice_watch.cli import main

    return await asyncio.to_thread(main, list(argv))


async def test_report_out_writes_the_html_with_the_chart_embedded_and_the_png(
    world: World, capsys: pytest.CaptureFixture[str]
):
    import base64
    import re

    path = world.write_config()
    assert await world.run_once(world.config()) == 0
    capsys.readouterr()
    html, png = world.tmp / "r.html", world.tmp / "r.png"
    assert await _main("report", "-c", str(path), "--out", str(html)) == 0
    assert await _main("report", "-c", str(path), "--org", "Production", "--out", str(png)) == 0
    out = capsys.readouterr().out
    assert f"to {html}" in out and f"to {png}" in out
    page = html.read_text()
    assert "Spend report: 2 organizations" in page and "cid:" not in page
    found = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert found is not None
    assert png_size(base64.b64decode(found.group(1))) == SIZE
    assert png_size(png.read_bytes()) == SIZE


async def test_report_send_mails_it_now_with_the_chart_inline(
    world: World, capsys: pytest.CaptureFixture[str]
):
    path = world.write_config()
    assert await world.run_once(world.config()) == 0
    before = len(world.sink.envelopes)
    assert await _main("report", "-c", str(path), "--org", PROD, "--send", "mail") == 0
    assert "mail: sent Spend report: Production" in capsys.readouterr().out
    assert len(world.sink.envelopes) == before + 1
    mail = world.sink.message()
    (image,) = [part for part in mail.walk() if part.get_content_type() == "image/png"]
    assert image["Content-ID"] == f"<{CHART_CID}>"
    assert png_size(image.get_content()) == SIZE


async def test_report_prints_the_text_summary_by_default(
    world: World, capsys: pytest.CaptureFixture[str]
):
    path = world.write_config()
    assert await world.run_once(world.config()) == 0
    capsys.readouterr()
    assert await _main("report", "-c", str(path), "--org", ANALYTICS) == 0
    out = capsys.readouterr().out
    assert out.startswith("Spend report: Analytics\n")
    assert "Pending invoice (billed so far): $700.00" in out


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (("--send", "nosuch"), 2, "no notifier of that name"),
        (("--out", "r.pdf"), 2, "write FILE.html"),
        (("--org", "nosuch"), 2, "no such organization"),
        (("--out", "r.html", "--send", "mail"), 2, "exclude each other"),
        (("--out", "missing-folder/r.html"), 1, "cannot write"),
    ],
)
async def test_report_refuses_bad_arguments_in_one_line_without_a_traceback(
    world: World, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], status: int, says: str
):
    path = world.write_config()
    assert await world.run_once(world.config()) == 0
    capsys.readouterr()
    argv = [a.replace("missing-folder", str(world.tmp / "missing-folder")) for a in args]
    assert await _main("report", "-c", str(path), *argv) == status
    err = capsys.readouterr().err
    assert says in err
    assert "Traceback" not in err


async def test_report_without_a_state_says_so(world: World, capsys: pytest.CaptureFixture[str]):
    path = world.write_config()
    assert await _main("report", "-c", str(path)) == 1
    err = capsys.readouterr().err
    assert "state" in err and "Traceback" not in err


async def test_the_daemon_sends_a_report_when_its_clock_reaches_the_schedule(world: World):
    """The daemon's own task: it looks at the schedule on the injected clock (never
    sleeping past it, nor more than LOOK_EVERY), enqueues the report when due and wakes
    delivery, which mails it."""
    import asyncio

    from invoice_watch.report.scheduler import LOOK_EVERY
    from tests.manual_clock import ManualClock
    from tests.test_daemon import eventually, serving, until_cycles

    clock = ManualClock(world.clock.now())
    at = clock.now() + timedelta(minutes=10)
    reports = [{"name": "daily", "schedule": f"daily {at:%H:%M}", "notify": ["mail"],
                "orgs": [PROD]}]  # fmt: skip
    data = world.config_data(poll={"interval": "1d"})
    data["reports"] = reports
    config = load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)
    async with App(config, clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        await eventually(lambda: len(world.sink.envelopes) == 2)  # the cycle's alerts
        # The poll loop waits a day, the reports' task LOOK_EVERY at most.
        assert await clock.sleeping(2) == [LOOK_EVERY, 86400.0]
        assert app.reporter is not None and app.reporter.enqueued == 0
        for _ in range(3):  # 15 minutes, a look at most every LOOK_EVERY
            clock.advance(LOOK_EVERY)
            await clock.sleeping(2)
        await eventually(lambda: len(world.sink.envelopes) == 3)
        assert app.reporter.enqueued == 1
        clock.advance(LOOK_EVERY)
        await clock.sleeping(2)
        await asyncio.sleep(0.05)
    assert len(world.sink.envelopes) == 3
    assert "Spend report: Production" in world.sink.message()["Subject"]


async def test_report_send_to_teams_and_the_console_is_the_text_summary(
    world: World, capsys: pytest.CaptureFixture[str]
):
    """Teams (a Workflows webhook takes no file) gets an Adaptive Card of the summary;
    the console prints it."""
    from tests.fakes_receivers import FakeTeams

    async with FakeTeams() as teams:
        data = world.config_data()
        data["notifiers"]["teams"] = {"type": "msteams", "webhook_url": teams.webhook_url}
        data["notifiers"]["out"] = {"type": "console"}
        path = world.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        assert await world.run_once(world.config()) == 0
        capsys.readouterr()
        assert await _main("report", "-c", str(path), "--org", PROD, "--send", "teams") == 0
        assert await _main("report", "-c", str(path), "--org", PROD, "--send", "out") == 0
    assert teams.refused == []
    (card,) = teams.accepted
    runs = [run["text"] for block in card["attachments"][0]["content"]["body"]
            for run in block["inlines"]]  # fmt: skip
    assert runs[0] == "Spend report: Production"
    assert "Pending invoice (billed so far): $6,000.00" in runs[1]
    out = capsys.readouterr().out
    assert "Spend report: Production\nBilling period" in out
    assert "teams: sent" in out and "out: sent" in out


async def test_the_chart_upload_goes_direct_to_loopback_whatever_https_proxy_says(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """The upload takes the notifiers' proxy rule (loopback direct, NO_PROXY honoured),
    not slack-sdk's own reading of HTTPS_PROXY/HTTP_PROXY."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    reports = [{"name": "daily", "schedule": daily_in(world, 1), "notify": ["bot"],
                "orgs": [PROD]}]  # fmt: skip
    config = config_with_reports(world, reports)
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
        assert (await app.deliverer.deliver_due()).sent == 1
    assert len(world.slack.files) == 1


async def test_a_wall_clock_set_back_after_a_report_never_sends_it_again(world: World):
    """Sent at 09:00; an NTP fix sets the clock back two hours (09:00 comes again): the
    stored due time says it went, so it is not sent twice."""
    reports = [{"name": "daily", "schedule": daily_in(world, 1), "notify": ["mail"],
                "orgs": [PROD]}]  # fmt: skip
    config = config_with_reports(world, reports)
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
        world.clock.step(timedelta(hours=-2))
        assert await app.reporter.look() == 0
        world.clock.advance(2 * 3600)  # 09:00 passes again on the wall clock
        assert await app.reporter.look() == 0
        world.clock.advance(24 * 3600)  # the next day's is due
        assert await app.reporter.look() == 1


async def test_without_reports_no_timer_runs_and_a_reload_that_adds_one_is_looked_at(
    world: World,
):
    from invoice_watch.report.scheduler import LOOK_EVERY
    from tests.manual_clock import ManualClock
    from tests.test_daemon import serving, until_cycles

    clock = ManualClock(world.clock.now())
    data = world.config_data(poll={"interval": "1d"})
    async with App(load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp),
                   clock=clock) as app, serving(app):  # fmt: skip
        await until_cycles(app, 1)
        assert await clock.sleeping(1) == [86400.0]  # the poll loop's only
        at = clock.now() + timedelta(minutes=10)
        data["reports"] = [{"name": "daily", "schedule": f"daily {at:%H:%M}", "notify": ["mail"]}]
        assert await app.reload(
            load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)
        )
        assert await clock.sleeping(2) == [LOOK_EVERY, 86400.0]


async def test_a_due_time_recorded_while_the_clock_was_a_year_ahead_is_capped_at_now(
    world: World, caplog: pytest.LogCaptureFixture
):
    """The clock steps a year ahead (the report goes, recorded as due in a year), then is
    corrected: the report goes again at its next time, with one warning, not in a year.
    A report first seen while the clock is ahead is not held back either."""
    reports = [{"name": "daily", "schedule": daily_in(world, 1), "notify": ["mail"],
                "orgs": [PROD]}]  # fmt: skip
    config = config_with_reports(world, reports)
    t0 = world.clock.now()
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 0
        world.clock.step(timedelta(days=365))
        assert await app.reporter.look() == 1
        world.clock.set(t0 + timedelta(minutes=30))  # corrected
        assert await app.reporter.look() == 0
        assert await app.reporter.look() == 0
        world.clock.advance(3600)  # the next time (t0 + 1 h)
        assert await app.reporter.look() == 1
        world.clock.advance(24 * 3600)
        assert await app.reporter.look() == 1
    warnings = [r for r in caplog.records if "the wall clock was wrong" in r.getMessage()]
    assert len(warnings) == 1

    world.clock.step(timedelta(days=365))  # a new report seen while the clock is ahead
    t1 = world.clock.now()
    reports = [{"name": "new", "schedule": daily_in(world, 1), "notify": ["mail"],
                "orgs": [PROD]}]  # fmt: skip
    async with App(config_with_reports(world, reports), clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 0
        world.clock.set(t1 - timedelta(days=365))
        assert await app.reporter.look() == 0
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1


async def test_a_changed_schedule_or_a_re_enabled_report_waits_for_its_next_time(world: World):
    """Sent at T+1h; restarted at T+3h with the time moved to T+2h (past today): nothing
    goes before tomorrow's T+2h. Disabled for a week, then enabled again: nothing stale
    goes at once either."""
    t = world.clock.now()
    first = [{"name": "d", "schedule": daily_in(world, 1), "notify": ["mail"], "orgs": [PROD]}]
    async with App(config_with_reports(world, first), clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
    world.clock.advance(2 * 3600)
    moved = [{**first[0], "schedule": f"daily {t + timedelta(hours=2):%H:%M}"}]
    async with App(config_with_reports(world, moved), clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 0
        world.clock.advance(23 * 3600)  # past tomorrow's T+2h
        assert await app.reporter.look() == 1

    disabled: list[dict[str, Any]] = [{**moved[0], "enabled": False}, {**first[0], "name": "other"}]
    async with App(config_with_reports(world, disabled), clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        world.clock.advance(7 * 24 * 3600)
        assert await app.reporter.look() == 1  # "other" only
    async with App(config_with_reports(world, moved), clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 0


async def test_report_send_says_the_summary_went_when_only_the_chart_failed(
    world: World, capsys: pytest.CaptureFixture[str]
):
    """``report --send bot``: chat.postMessage took the summary, the upload answered
    503. The CLI queues nothing: it says the summary was posted and the chart not,
    without "not sent" nor a promise to send the chart again."""
    data = world.config_data()
    data["notifiers"]["bot"] = {"type": "slack", "token": TOKEN, "channel": "#finops",
                                "api_url": world.slack.api_url}  # fmt: skip
    path = world.tmp / "bot.yaml"
    path.write_text(yaml.safe_dump(data))
    assert await world.run_once(world.config()) == 0
    world.slack.upload_replies.append(503)
    assert await _main("report", "-c", str(path), "--org", PROD, "--send", "bot") == 1
    err = capsys.readouterr().err
    assert "bot: the summary was posted, the chart was not: " in err
    assert "not sent" not in err and "sent again" not in err and "Traceback" not in err
    assert "fontManager" not in err and "INFO" not in err  # matplotlib's own INFO lines
    assert len([r for r in world.slack.received if r.route == "chat.postMessage"]) == 1


async def test_an_ambiguous_post_answer_still_gets_the_chart_to_the_channel_by_its_id(
    world: World, caplog: pytest.LogCaptureFixture
):
    """chat.postMessage answers 200 with an empty body (the summary counts delivered,
    but no channel id came back): the channel's id is looked up by its name
    (conversations.list) and the chart goes there. A name no channel has: the chart's
    failure is an ERROR saying what to set, never silent."""
    from tests.fakes_slack import Reply

    reports = [{"name": "daily", "schedule": daily_in(world, 1), "notify": ["bot"],
                "orgs": [PROD]}]  # fmt: skip
    config = config_with_reports(world, reports)
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()
        world.clock.advance(3600 + 60)
        assert await app.reporter.look() == 1
        world.slack.script_api(Reply(200, body=b"", content_type="text/plain"))
        assert (await app.deliverer.deliver_due()).sent == 1
        assert [f["channel_id"] for f in world.slack.files] == ["C0000000000"]

        world.slack.channels.clear()
        world.clock.advance(24 * 3600)
        assert await app.reporter.look() == 1
        world.slack.script_api(Reply(200, body=b"", content_type="text/plain"))
        await app.deliverer.deliver_due()
    assert len(world.slack.files) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("no channel the app sees is named 'finops'" in e for e in errors), errors


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--org", PROD, "--org", ANALYTICS],
        ["report", "--send", "mail", "--send", "bot"],
        ["invoices", "--status", "PENDING", "--status", "PAID"],
        ["silence", "add", "--rule", "r", "--for", "1h", "--org", PROD, "--org", ANALYTICS],
    ],
)
def test_an_option_given_twice_is_a_usage_error_not_the_last_one_kept(
    argv: list[str], capsys: pytest.CaptureFixture[str]
):
    """argparse keeps the last of a repeated option silently: ``report --org A --org B``
    would report on B alone."""
    from invoice_watch.cli.parser import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "given twice" in capsys.readouterr().err


async def test_status_shows_each_reports_next_and_last_due_time_read_only(world: World):
    """`status` gives, per enabled report and scope, its schedule, when it is next due
    (now, when a due time passed while the daemon was down) and the last due time
    report_runs holds; it writes nothing (it runs beside a daemon)."""
    from invoice_watch import ops

    reports: list[dict[str, Any]] = [
        {"name": "daily", "schedule": daily_in(world, 1), "notify": ["mail"], "orgs": [PROD]},
        {"name": "weekly", "schedule": "mon 09:00", "notify": ["mail"]},
        {"name": "off", "schedule": "mon 09:00", "notify": ["mail"], "enabled": False},
    ]
    config = config_with_reports(world, reports)
    assert await world.run_once(config) == 0
    due = world.clock.now().replace(second=0, microsecond=0) + timedelta(hours=1)

    async def status() -> str:
        out = io.StringIO()
        assert await ops.status(config, out=out, now=world.clock.now()) == 0
        return out.getvalue()

    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        await app.reporter.look()  # first seen: each scope waits for its first time
        runs = await app.store.reports.last_due()
    text = await status()
    assert "Reports: 3" in text  # daily (Production), weekly (each organization)
    [daily] = [line for line in text.splitlines() if line.startswith("daily ")]
    assert "Production" in daily and f"{due:%Y-%m-%d %H:%M} UTC (in " in daily, daily
    assert f"{runs[('daily', PROD)]:%Y-%m-%d %H:%M} UTC" in daily
    weekly = [line for line in text.splitlines() if line.startswith("weekly ")]
    assert len(weekly) == 2 and any("Analytics" in line for line in weekly), weekly
    assert not any(line.startswith("off ") for line in text.splitlines())

    world.clock.advance(2 * 3600)  # the daemon is down when the report is due
    [daily] = [line for line in (await status()).splitlines() if line.startswith("daily ")]
    assert f"now (due {due:%Y-%m-%d %H:%M} UTC" in daily, daily
    async with App(config, clock=world.clock) as app:
        assert app.reporter is not None
        assert await app.reporter.look() == 1
    [daily] = [line for line in (await status()).splitlines() if line.startswith("daily ")]
    tomorrow = due + timedelta(days=1)
    assert f"{tomorrow:%Y-%m-%d %H:%M} UTC (in" in daily, daily
    assert daily.rstrip().endswith(f"{due:%Y-%m-%d %H:%M} UTC"), daily  # last enqueued
