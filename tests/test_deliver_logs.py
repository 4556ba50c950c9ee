"""A message that keeps failing is not a log line per attempt, whichever notifier fails
(attack-final NEW-3): Slack refusing every form of a message (``msg_too_long``) logged
two WARNING lines at every attempt, about 2,900 a day at ``max_backoff: 60s``. Each
notifier failing the same way for 100 minutes (about 100 attempts) now logs one WARNING;
a receiver whose every answer differs (an SMTP reply with its own session id) one an
hour. The real pipeline against the simulator, the fake Slack and aiosmtpd on loopback;
time is a FakeClock.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

from invoice_watch.app import App
from invoice_watch.config import load
from invoice_watch.notify import ConsoleNotifier, build_notifiers
from invoice_watch.types import Notifier
from tests.fakes_slack import Reply
from tests.fakes_smtp import Sink
from tests.world import World

MINUTES_100 = 100 * 60


class Busy(Sink):
    """Answers DATA with 451 and a reference of its own each time, as large providers
    do (a session or queue id in every reply)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        return f"451 4.7.0 Try again later, ref {self.attempts:08x}-{id(session):x}"


def slack_refuses_every_form(world: World) -> None:
    world.slack.script_webhook(*[Reply(400, "msg_too_long")] * 1000)


def slack_down(world: World) -> None:
    world.slack.script_webhook(*[Reply(503, "internal_error")] * 400)


Setup = Callable[[World], Any]


@pytest.mark.parametrize(
    ("notifier", "setup", "warnings"),
    [
        ("slack", slack_refuses_every_form, 1),
        ("slack", slack_down, 1),
        ("mail", None, 2),  # a 451 with its own reference each time: once an hour
        ("console", None, 1),  # standard output closed
    ],
    ids=["slack-refuses-every-form", "slack-503", "smtp-451-each-its-own", "console-closed"],
)
async def test_deliver_a_message_failing_for_100_minutes_is_not_a_line_per_attempt(
    world: World,
    smtp_server: Any,
    caplog: pytest.LogCaptureFixture,
    notifier: str,
    setup: Setup | None,
    warnings: int,
) -> None:
    data = world.config_data(
        rules=[{"name": "failed-charge", "type": "invoice_status", "notify": [notifier]}],
        delivery={"max_backoff": "60s"},
    )
    data["notifiers"]["console"] = {"type": "console"}
    busy = Busy()
    data["notifiers"]["mail"]["port"] = await smtp_server(busy)
    config = load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)
    notifiers: dict[str, Notifier] = dict(build_notifiers(config.notifiers))
    closed = io.StringIO()
    closed.close()
    notifiers["console"] = ConsoleNotifier("console", stream=closed)
    if setup is not None:
        setup(world)
    async with App(config, clock=world.clock, notifiers=notifiers) as app:
        await app.run_cycle()
        caplog.clear()
        began = world.clock.monotonic()
        assert await app.deliverer.drain(MINUTES_100) == 1  # still pending, retried
        assert world.clock.monotonic() - began >= MINUTES_100 - 60
        attempts = app.metrics.registry.get_sample_value(
            "invoice_watch_notifications_total", {"notifier": notifier, "outcome": "retry"}
        )
    assert attempts is not None and attempts >= 90
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("invoice_watch")
    ]
    assert len(said) == warnings, said
    assert all("retrying in" in line for line in said)
    if notifier == "mail":
        assert busy.attempts >= 90
