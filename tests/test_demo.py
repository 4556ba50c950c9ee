"""The demo's scenario and config, stepped through the timeline without timers: both
alerts fire and both resolve, and the console shows it."""

from __future__ import annotations

import io
from pathlib import Path

from invoice_watch.app import App
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
                assert await app.run_once() == 0
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
