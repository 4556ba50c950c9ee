"""The receivers of issue 18 in the whole pipeline: the Atlas simulator, the outbox and
each receiver's fake on loopback (tests/fakes_receivers.py), driven by a FakeClock.

Each receiver gets an alert's FIRING and its RESOLVED through the outbox, after a 503
whose answer echoes its secret (retried; the secret reaches no log line and no stored
error). Alertmanager's firing alerts are posted again every ``resend_every`` while they
fire, from the alert state (a restart picks them up), and stop at their RESOLVED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.config import Config, load
from invoice_watch.notify import alertmanager
from tests.fakes_receivers import (
    AM_TOKEN,
    ROUTING_KEY,
    TEAMS_QUERY,
    WEBHOOK_HEADER,
    WEBHOOK_HEADER_VALUE,
    WEBHOOK_SECRET,
    Answer,
    FakeAlertmanager,
    FakePagerDuty,
    FakeTeams,
    FakeWebhook,
    _Fake,
)
from tests.world import PROD, World

RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status", "notify": ["r"], "severity": "critical"},
    {"name": "pending-over-budget", "type": "pending_amount", "threshold": 5000, "notify": ["r"]},
]


@dataclass(frozen=True)
class Receiver:
    name: str
    fake: Callable[[], _Fake]
    settings: Callable[[Any], dict[str, Any]]  # the notifier's config, given its fake
    secrets: tuple[str, ...]  # what no log line or stored error may show


RECEIVERS = [
    Receiver(
        "webhook",
        lambda: FakeWebhook(WEBHOOK_SECRET),
        lambda fake: {
            "type": "webhook",
            "url": fake.endpoint + "?token=webhook-url-token-never-logged",
            "secret": WEBHOOK_SECRET,
            "headers": {WEBHOOK_HEADER: WEBHOOK_HEADER_VALUE},
        },
        (WEBHOOK_SECRET, WEBHOOK_HEADER_VALUE, "webhook-url-token-never-logged"),
    ),
    Receiver(
        "pagerduty",
        FakePagerDuty,
        lambda fake: {"type": "pagerduty", "routing_key": ROUTING_KEY, "url": fake.endpoint},
        (ROUTING_KEY,),
    ),
    Receiver(
        "msteams",
        FakeTeams,
        lambda fake: {"type": "msteams", "webhook_url": fake.webhook_url},
        (TEAMS_QUERY.partition("sig=")[2],),
    ),
    Receiver(
        "alertmanager",
        lambda: FakeAlertmanager(AM_TOKEN),
        lambda fake: {"type": "alertmanager", "url": fake.url, "token": AM_TOKEN},
        (AM_TOKEN,),
    ),
]


def config_with(world: World, settings: dict[str, Any], **extra: Any) -> Config:
    data = world.config_data(rules=RULES)
    data["notifiers"]["r"] = settings
    data.update(extra)
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


@pytest.fixture
def am_clock(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alertmanager reads endsAt on the wall clock: the world's FakeClock here."""
    monkeypatch.setattr(alertmanager, "_now", world.clock.now)


@pytest.mark.parametrize("receiver", RECEIVERS, ids=[r.name for r in RECEIVERS])
async def test_e2e_receiver_gets_firing_then_resolved_and_its_secret_is_never_shown(
    world: World,
    receiver: Receiver,
    no_secret_in_logs: set[str],
    am_clock: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    no_secret_in_logs.update(receiver.secrets)
    async with receiver.fake() as fake:
        echo = "upstream said: " + " ".join(receiver.secrets) + f" Bearer {AM_TOKEN}"
        fake.script(Answer(503, echo, headers={"Retry-After": "1"}))
        async with App(config_with(world, receiver.settings(fake)), clock=world.clock) as app:
            await app.run_cycle()
            assert await app.deliverer.drain(60) == 0
            world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
            await app.run_cycle()
            assert await app.deliverer.drain(60) == 0
            rows = await app.store.outbox.messages(("sent", "failed", "pending"))
    assert fake.refused == []
    assert [row.state for row in rows] == ["sent"] * 3  # FIRING x2, then a RESOLVED
    assert "HTTP 503" in caplog.text  # the 503 was logged, redacted
    stored = " ".join(row.last_error or "" for row in rows)
    assert [s for s in receiver.secrets if s in stored + caplog.text] == []
    assert AM_TOKEN not in stored


async def test_e2e_pagerduty_incident_closes_by_itself(world: World) -> None:
    async with FakePagerDuty() as pd:
        settings = {"type": "pagerduty", "routing_key": ROUTING_KEY, "url": pd.endpoint}
        async with App(config_with(world, settings), clock=world.clock) as app:
            await app.run_cycle()
            await app.deliverer.drain(60)
            world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
            await app.run_cycle()
            await app.deliverer.drain(60)
    actions = [(body["event_action"], body["dedup_key"]) for body in pd.accepted]
    failed = next(key for action, key in actions if key.startswith("failed-charge/"))
    assert actions.count(("trigger", failed)) == 1
    assert actions[-1] == ("resolve", failed)


# -- Alertmanager: what fires is posted again ----------------------------------------


def am_settings(fake: FakeAlertmanager) -> dict[str, Any]:
    return {"type": "alertmanager", "url": fake.url, "resend_every": "1m"}


def posts_of(fake: FakeAlertmanager) -> dict[str, int]:
    """How often each rule's alert was posted."""
    return {alert.labels["rule"]: alert.posts for alert in fake.alerts.values()}


def firing_rules(fake: FakeAlertmanager, world: World) -> list[str]:
    return sorted(alert.labels["rule"] for alert in fake.firing(world.clock.now()))


async def test_e2e_alertmanager_firing_alerts_are_posted_again_until_they_resolve(
    world: World, am_clock: None
) -> None:
    """Alertmanager ends an alert not posted again before its endsAt: while an alert
    fires, it is posted again every resend_every (endsAt 4 x that ahead); its RESOLVED
    ends it, and it is posted no more."""
    async with (
        FakeAlertmanager() as am,
        App(config_with(world, am_settings(am)), clock=world.clock) as app,
    ):
        await app.run_cycle()
        await app.deliverer.deliver_due()
        assert firing_rules(am, world) == ["failed-charge", "pending-over-budget"]
        posts = posts_of(am)
        for _ in range(10):  # 10 minutes: each alert would have ended after 4
            world.clock.advance(timedelta(minutes=1))
            await app.deliverer.deliver_due()
            assert firing_rules(am, world) == ["failed-charge", "pending-over-budget"]
        after = posts_of(am)
        assert all(after[rule] == posts[rule] + 10 for rule in posts), (posts, after)

        world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
        await app.run_cycle()
        await app.deliverer.deliver_due()
        assert firing_rules(am, world) == ["pending-over-budget"]
        count = posts_of(am)
        world.clock.advance(timedelta(minutes=1))
        await app.deliverer.deliver_due()
        assert posts_of(am)["failed-charge"] == count["failed-charge"]  # no longer posted
        assert posts_of(am)["pending-over-budget"] == count["pending-over-budget"] + 1
    assert am.refused == []


async def test_e2e_alertmanager_a_restart_posts_what_fires_at_once(
    world: World, am_clock: None
) -> None:
    async with FakeAlertmanager() as am:
        config = config_with(world, am_settings(am))
        async with App(config, clock=world.clock) as app:
            await app.run_cycle()
            await app.deliverer.deliver_due()
    world.clock.advance(timedelta(minutes=30))  # down for 30 minutes: ended in Alertmanager
    assert firing_rules(am, world) == []
    async with (
        FakeAlertmanager() as am,
        App(config_with(world, am_settings(am)), clock=world.clock) as app,
    ):
        await app.deliverer.deliver_due()  # before any cycle: from the state file
        assert firing_rules(am, world) == ["failed-charge", "pending-over-budget"]


async def test_e2e_alertmanager_run_once_posts_once_and_does_not_wait(
    world: World, am_clock: None
) -> None:
    """`run --once` delivers and exits: it does not wait out its 60 s for the next
    re-post of what fires."""
    async with (
        FakeAlertmanager() as am,
        App(config_with(world, am_settings(am)), clock=world.clock) as app,
    ):
        start = world.clock.monotonic()
        assert await run_once(app) == 0
        assert world.clock.monotonic() - start < 30
    assert firing_rules(am, world) == ["failed-charge", "pending-over-budget"]


async def test_e2e_alertmanager_a_baseline_posts_nothing(world: World, am_clock: None) -> None:
    """`run --once --baseline` records what fires without telling anyone: Alertmanager
    is not told either, then or at the next runs (until a message about it goes there)."""
    async with FakeAlertmanager() as am:
        config = config_with(world, am_settings(am))
        async with App(config, clock=world.clock) as app:
            assert await run_once(app, baseline=True) == 0
        async with App(config, clock=world.clock) as app:
            await app.run_cycle()
            world.clock.advance(timedelta(minutes=1))
            await app.deliverer.deliver_due()
    assert am.received == []


async def test_e2e_alertmanager_down_a_repost_fails_quietly_and_the_next_one_works(
    world: World, am_clock: None, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        FakeAlertmanager() as am,
        App(config_with(world, am_settings(am)), clock=world.clock) as app,
    ):
        await app.run_cycle()
        await app.deliverer.deliver_due()
        am.script(*[Answer(503)] * 3)
        for _ in range(3):
            world.clock.advance(timedelta(minutes=1))
            await app.deliverer.deliver_due()
        world.clock.advance(timedelta(minutes=1))
        await app.deliverer.deliver_due()
        assert firing_rules(am, world) == ["failed-charge", "pending-over-budget"]
    said = [r.getMessage() for r in caplog.records if "firing alert(s) again" in r.getMessage()]
    warned = [
        r for r in caplog.records if "could not post" in r.getMessage() and r.levelname == "WARNING"
    ]
    assert len(warned) == 1, said
    assert "posting the firing alerts again works again" in caplog.text
    assert PROD  # the world's organization the alerts are about
