"""``invoice-watch demo``: the whole product in under a minute, no credentials needed.

Starts the built-in Atlas simulator on a free loopback port, runs the real daemon
against it (Digest auth, a 2 s poll interval, a throw-away state file) with the console
notifier (and Slack too when ``SLACK_WEBHOOK_URL`` is set), plays the demo scenario so a
charge FAILS and is paid, and a pending invoice crosses $5,000 and drops back, then
exits 0 by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.simulator import Simulator, demo_scenario

TIME_LIMIT = 55.0
INTERVAL = "2s"


def demo_config(sim: Simulator, state_dir: Path, slack_webhook: str | None) -> Config:
    org_names = {org.id: org.name for org in sim.scenario.orgs}
    notifiers: dict[str, Any] = {"console": {"type": "console"}}
    if slack_webhook:
        notifiers["slack"] = {"type": "slack", "webhook_url": slack_webhook}
    data: dict[str, Any] = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 2,
        },
        "organizations": [{"id": i, "name": org_names.get(i, i)} for i in sim.org_ids],
        "poll": {"interval": INTERVAL},
        "state": {"path": str(state_dir / "demo.db")},
        "notifiers": notifiers,
        "rules": [
            {
                "name": "failed-charge",
                "type": "invoice_status",
                "statuses": ["FAILED"],
                "severity": "critical",
                "notify": list(notifiers),
            },
            {
                "name": "pending-over-budget",
                "type": "pending_amount",
                "threshold": 5000,
                "notify": list(notifiers),
            },
        ],
        "log": {"level": "warning"},
    }
    return load(yaml.safe_dump(data), filename="<demo>", env={}, base_dir=state_dir)


async def run_demo(out: TextIO | None = None, time_limit: float = TIME_LIMIT) -> int:
    out = out or sys.stdout
    logging.getLogger().setLevel(logging.WARNING)
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[demo {time.monotonic() - began:4.0f}s] {text}", file=out, flush=True)

    scenario = demo_scenario()
    last_step = max((step.at for step in scenario.timeline), default=0.0)
    with tempfile.TemporaryDirectory(prefix="invoice-watch-demo-") as folder:
        async with Simulator(scenario) as sim:
            config = demo_config(sim, Path(folder), os.environ.get("SLACK_WEBHOOK_URL"))
            say(f"Atlas simulator serving {len(sim.org_ids)} organizations at {sim.base_url}")
            say(
                "watching them every 2 s: a FAILED charge and a pending invoice over "
                "$5,000 raise alerts; they resolve when paid / back under budget"
            )
            async with App(config) as app:
                stop = asyncio.Event()
                daemon = asyncio.create_task(app.serve(stop))
                timeline = asyncio.create_task(sim.run_timeline())
                try:
                    while time.monotonic() - began < time_limit:
                        await asyncio.sleep(0.5)
                        elapsed = time.monotonic() - began
                        settled = (
                            timeline.done()
                            and elapsed > last_step + 4
                            and not app.store.firing_alerts()
                            and not (await app.store.outbox_counts()).get("pending")
                        )
                        if settled:
                            break
                finally:
                    stop.set()
                    await daemon
                    timeline.cancel()
                    await asyncio.gather(timeline, return_exceptions=True)
                totals = app.deliverer.totals
                firing = len(app.store.firing_alerts())
    say(
        f"done: {totals.sent} notification(s) sent, {totals.failed} failed, "
        f"{firing} alert(s) still firing"
    )
    say("next: copy config.example.yaml, add your API key, and run `invoice-watch run --once`")
    return 0 if totals.failed == 0 else 1
