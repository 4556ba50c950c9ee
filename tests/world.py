"""The world the end-to-end tests run in: the Atlas simulator, a fake Slack and an
aiosmtpd sink on loopback, a FakeClock, and a config builder pointing at them.

Registered in conftest (``pytest_plugins``), so any test can ask for ``world``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.simulator import Simulator
from invoice_watch.simulator.scenario import Scenario
from tests.fakes_slack import FakeSlack
from tests.fakes_smtp import Sink, StartServer

PROD = "5f8a1c2e9b3d4a6f7e0c1b2a"
ANALYTICS = "6a7b8c9d0e1f2a3b4c5d6e7f"
SMTP_PASSWORD = "smtp-passw0rd-never-logged"


def scenario(now: datetime | None = None) -> Scenario:
    """The world's organizations and invoices, their periods relative to ``now``
    (default: the real time, UTC)."""
    s = Scenario(now)
    s.add_org("Production", id=PROD)
    s.add_org("Analytics", id=ANALYTICS)
    s.add_invoice("Production", period=-2, status="PAID", amount_cents=3900_00)
    s.add_invoice("Production", period=-1, status="FAILED", amount_cents=4350_20, name="failed")
    s.add_invoice("Production", period=0, status="PENDING", amount_cents=6000_00, name="pending")
    s.add_invoice("Analytics", period=-1, status="PAID", amount_cents=900_00)
    s.add_invoice("Analytics", period=0, status="PENDING", amount_cents=700_00, name="small")
    return s


class World:
    """The simulator, Slack, SMTP and a config pointing at them."""

    def __init__(self, sim: Simulator, slack: FakeSlack, sink: Sink, smtp_port: int, tmp: Path):
        self.sim, self.slack, self.sink, self.smtp_port, self.tmp = sim, slack, sink, smtp_port, tmp
        self.clock = FakeClock(sim.scenario.now)

    def config_data(
        self,
        *,
        service_account: bool = False,
        rules: list[dict[str, Any]] | None = None,
        **sections: Any,
    ) -> dict[str, Any]:
        auth = (
            {"client_id": self.sim.client_id, "client_secret": self.sim.client_secret}
            if service_account
            else {"public_key": self.sim.public_key, "private_key": self.sim.private_key}
        )
        default_rules = [
            {"name": "failed-charge", "type": "invoice_status", "notify": ["slack", "mail"]},
            {
                "name": "pending-over-budget",
                "type": "pending_amount",
                "threshold": 5000,
                "notify": ["slack", "mail"],
            },
        ]
        return {
            "atlas": {"base_url": self.sim.base_url, "auth": auth},
            "organizations": [
                {"id": PROD, "name": "Production"},
                {"id": ANALYTICS, "name": "Analytics"},
            ],
            "state": {"path": str(self.tmp / "state.db")},
            "notifiers": {
                "slack": {"type": "slack", "webhook_url": self.slack.webhook_url},
                "mail": {
                    "type": "email",
                    "host": "127.0.0.1",
                    "port": self.smtp_port,
                    "tls": "none",
                    "from": "invoice-watch@example.com",
                    "to": ["finops@example.com"],
                },
            },
            "rules": default_rules if rules is None else rules,
            **sections,
        }

    def config(self, **kw: Any) -> Config:
        text = yaml.safe_dump(self.config_data(**kw))
        return load(text, filename="e2e.yaml", env={}, base_dir=self.tmp)

    def write_config(self, **kw: Any) -> Path:
        path = self.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(self.config_data(**kw)))
        return path

    async def run_once(self, config: Config) -> int:
        async with App(config, clock=self.clock) as app:
            return await run_once(app)

    def slack_texts(self) -> list[str]:
        """The ``text`` of every message Slack took, as Slack shows it (mrkdwn's
        ``&amp;``, ``&lt;`` and ``&gt;`` read back)."""
        return [unescape(body["text"]) for body in self.slack.accepted]

    def kinds(self) -> list[tuple[str, str]]:
        """(kind, rule) of every Slack message, in order."""
        out = []
        for text in self.slack_texts():
            kind, rule = text.split("\n", 1)[0].split(": ", 1)
            out.append((kind, rule))
        return out


@asynccontextmanager
async def open_world(
    tmp_path: Path, smtp_server: StartServer, now: datetime | None = None
) -> AsyncIterator[World]:
    """A :class:`World` whose clock starts at ``now`` (default: the real time; a test
    whose outcome depends on the time of day or the date gives one)."""
    sink = Sink()
    port = await smtp_server(sink)
    async with Simulator(scenario(now)) as sim, FakeSlack() as slack:
        yield World(sim, slack, sink, port, tmp_path)


@pytest.fixture
async def world(tmp_path: Path, smtp_server: StartServer) -> AsyncIterator[World]:
    async with open_world(tmp_path, smtp_server) as world:
        yield world
