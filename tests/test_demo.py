"""The demo's scenario and config, stepped through the timeline without timers: both
alerts fire and both resolve, and the console shows it."""

from __future__ import annotations

import io
from pathlib import Path

from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.clock import FakeClock
from invoice_watch.demo import demo_config
from invoice_watch.notify.console import ConsoleNotifier
from invoice_watch.simulator import Simulator, demo_scenario


async def test_demo_scenario_fires_and_resolves_both_alerts(tmp_path: Path):
    scenario = demo_scenario()
    out = io.StringIO()
    async with Simulator(scenario) as sim:
        config = demo_config(sim, tmp_path, slack_webhook=None)
        notifiers = {"console": ConsoleNotifier("console", out)}
        last = max(step.at for step in scenario.timeline)
        clock = FakeClock(scenario.now)
        t = 0.0
        while t <= last + 2:
            sim.advance_to(t)
            async with App(config, clock=clock, notifiers=notifiers) as app:
                assert await run_once(app) == 0
            t += 2
            clock.advance(2)
    text = out.getvalue()
    heads = [line for line in text.splitlines() if line.startswith(("FIRING", "RESOLVED"))]
    assert heads == [
        "FIRING: failed-charge",
        "FIRING: pending-over-budget",
        "RESOLVED: failed-charge",
        "RESOLVED: pending-over-budget",
    ]
    assert "Production" in text and "Analytics" not in text


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
    path = tmp_path / REPORT_FILE
    assert str(path) in where
    found = re.search(r'src="data:image/png;base64,([^"]+)"', path.read_text())
    assert found is not None
    with Image.open(io.BytesIO(base64.b64decode(found.group(1)))) as image:
        assert image.size == SIZE
