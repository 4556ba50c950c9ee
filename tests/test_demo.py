"""The demo's scenario and config, stepped through the timeline without timers: both
alerts fire and both resolve, and the console shows it."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.clock import FakeClock
from invoice_watch.demo import demo_config
from invoice_watch.notify.console import ConsoleNotifier
from invoice_watch.simulator import Simulator, demo_scenario


async def _play_demo(tmp_path: Path, now: datetime | None = None) -> str:
    """The demo's scenario and config stepped through the timeline (a poll every 2 s),
    at ``now`` (the simulator's clock too: its daily line items end the day before);
    what the console printed."""
    scenario = demo_scenario(now=now)
    out = io.StringIO()
    clock = FakeClock(scenario.now)
    async with Simulator(scenario, clock=FakeClock(scenario.now)) as sim:
        config = demo_config(sim, tmp_path, slack_webhook=None)
        notifiers = {"console": ConsoleNotifier("console", out)}
        last = max(step.at for step in scenario.timeline)
        t = 0.0
        while t <= last + 2:
            sim.advance_to(t)
            async with App(config, clock=clock, notifiers=notifiers) as app:
                assert await run_once(app) == 0
            t += 2
            clock.advance(2)
    return out.getvalue()


def _heads(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("FIRING", "RESOLVED"))]


async def test_demo_scenario_fires_and_resolves_both_alerts_and_shows_the_spike(tmp_path: Path):
    """The charge and the budget fire and resolve; the usage_anomaly rule fires at the
    second poll (the first read the line items), naming the cluster whose spend spiked
    yesterday, and stays firing."""
    text = await _play_demo(tmp_path, datetime(2026, 11, 21, 9, 0, tzinfo=UTC))

    assert _heads(text) == [
        "FIRING: usage-spike",
        "FIRING: failed-charge",
        "FIRING: pending-over-budget",
        "RESOLVED: failed-charge",
        "RESOLVED: pending-over-budget",
    ]
    assert "Production" in text and "Analytics" not in text
    assert "Unusual spend: cluster orders of project Production Project" in text
    assert "Top contributors:  ATLAS AWS Instance M40" in text


@pytest.mark.parametrize(
    "now",
    [
        datetime(2026, 12, 1, 0, 30, tzinfo=UTC),  # the period's first day
        datetime(2027, 2, 28, 23, 30, tzinfo=UTC),  # its last day (28 days)
        datetime(2026, 7, 12, 12, 0, tzinfo=UTC),  # a Sunday: a weekend's lower usage
    ],
    ids=["first-day", "last-day", "sunday"],
)
async def test_the_demo_shows_the_usage_spike_whatever_the_day(tmp_path: Path, now: datetime):
    text = await _play_demo(tmp_path, now)

    assert "FIRING: usage-spike" in _heads(text)
    assert "Unusual spend: cluster orders of project Production Project" in text
    assert _heads(text)[-2:] == ["RESOLVED: failed-charge", "RESOLVED: pending-over-budget"]


async def test_a_demo_that_shows_no_alert_says_why_and_exits_1(monkeypatch):
    """A13-6: every read of the simulator failing (a proxy in the way, here the API key
    refused everywhere): the demo does not end as if it had shown something, exit 0,
    but says what it could not read, exit 1."""
    from invoice_watch import demo
    from invoice_watch.simulator.scenario import parse_scenario

    def refused() -> object:
        return parse_scenario(
            {
                "orgs": [{"name": "Production", "forbidden": True}],
                "invoices": [
                    {"name": "due", "org": "Production", "period": -1, "status": "FAILED"}
                ],
            }
        )

    monkeypatch.setattr(demo, "demo_scenario", refused)
    out = io.StringIO()
    assert await demo.run_demo(out=out, time_limit=2) == 1
    text = out.getvalue()
    assert "the demo showed no alert: 1 organization(s) of the simulator could not be read" in (
        text
    ), text
    assert "Production: " in text.splitlines()[-1]
    assert "next: copy config.example.yaml" not in text


async def test_the_demo_shows_a_spend_report_and_writes_its_html(tmp_path: Path, monkeypatch):
    """After its alerts, the demo prints a report's text and writes its HTML (the chart
    embedded) in the temporary folder, saying where."""
    import base64
    import re
    import tempfile

    from PIL import Image

    from invoice_watch.demo import REPORT_FILE, demo_report
    from invoice_watch.report.chart import SIZE

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / REPORT_FILE).symlink_to(victim)  # planted at the old fixed name
    scenario = demo_scenario()
    async with Simulator(scenario) as sim:
        config = demo_config(sim, tmp_path, slack_webhook=None)
        notifiers = {"console": ConsoleNotifier("console", io.StringIO())}
        async with App(config, clock=FakeClock(scenario.now), notifiers=notifiers) as app:
            assert await run_once(app) == 0
            text, where = await demo_report(app)
    assert text.startswith("Spend report: 2 organizations\n")
    assert "Pending invoice (billed so far): $" in text
    # The daily line items the daemon read for the organizations a report covers.
    assert "Top projects:\n  Production Project: $" in text
    shown = where.removeprefix("the HTML with its chart: ")
    path = tmp_path / shown.removeprefix(f"{tmp_path}/")
    assert str(path) == shown and path.name.endswith(".html")
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # a private new file
    assert victim.read_text() == "keep"  # no symlink followed
    found = re.search(r'src="data:image/png;base64,([^"]+)"', path.read_text())
    assert found is not None
    with Image.open(io.BytesIO(base64.b64decode(found.group(1)))) as image:
        assert image.size == SIZE


async def test_simulate_write_config_watches_usage_and_shows_metrics_when_uncommented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """`simulate --write-config` writes the usage_anomaly rule: its second poll fires
    the demo scenario's spike on the console; the commented `http:` lines at its end,
    uncommented, are a valid /metrics section."""
    from invoice_watch.config import load, load_file
    from invoice_watch.demo import write_simulator_config

    now = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
    path = tmp_path / "sim.yaml"
    async with Simulator(demo_scenario(now=now), clock=FakeClock(now)) as sim:
        write_simulator_config(sim, path)
        config = load_file(path)
        assert [(r.name, r.type) for r in config.rules][-1] == ("usage-spike", "usage_anomaly")
        clock = FakeClock(now)
        for _ in range(2):  # the first poll reads the line items, the second judges them
            async with App(config, clock=clock) as app:
                assert await run_once(app) == 0
            clock.advance(5)
    out = capsys.readouterr().out
    assert "FIRING: usage-spike" in out
    assert "Unusual spend: cluster orders" in out

    text = path.read_text()
    assert "\n# http:\n#   listen: 127.0.0.1:8934\n" in text
    enabled = text.replace("# http:", "http:").replace("#   listen", "  listen")
    assert load(enabled, filename="sim.yaml", env={}, base_dir=tmp_path).http is not None
