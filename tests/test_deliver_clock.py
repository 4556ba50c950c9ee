"""A message's age against ``delivery.max_age`` survives wall-clock steps (attack-final
NEW-1): a wall clock set forward a day (an NTP fix of a VM a day behind) never gives up
a message seconds old, and one set back never keeps a message past ``max_age``. The
real pipeline against the simulator and the fake Slack on loopback; time is a
FakeClock, whose ``step`` sets the wall clock without time passing.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.config import Config, load
from tests.fakes_slack import Reply
from tests.world import World

DOWN = Reply(503, error="internal_error")
DAY_AND_2H = timedelta(hours=26)


def config_of(world: World, data: dict[str, Any]) -> Config:
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def only(notifier: str) -> list[dict[str, Any]]:
    return [{"name": "failed-charge", "type": "invoice_status", "notify": [notifier]}]


def slack_only(world: World, **sections: Any) -> Config:
    return config_of(world, world.config_data(rules=only("slack"), **sections))


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("attempted", [False, True], ids=["before-any-attempt", "after-one"])
async def test_deliver_a_wall_clock_set_forward_a_day_gives_up_no_message_seconds_old(
    world: World, caplog: pytest.LogCaptureFixture, attempted: bool
) -> None:
    """NEW-1: Slack answers 503; 8 s after the FIRING was committed the wall clock jumps
    26 h forward (max_age is 24 h). It was given up at once ("giving up after 1 day"),
    and never sent when Slack came back. Now it is retried and delivered, whether the
    step came before its first attempt (its age is the cycle's stamp's) or after."""
    world.slack.script_webhook(DOWN, DOWN, DOWN)
    async with App(slack_only(world), clock=world.clock) as app:
        await app.run_cycle()
        if attempted:
            await app.deliverer.deliver_due()
            assert await app.store.outbox.counts() == {"pending": 1}
        world.clock.advance(8)
        world.clock.step(DAY_AND_2H)
        await app.deliverer.deliver_due()  # Slack still down: retried, not given up
        assert await app.store.outbox.counts() == {"pending": 1}
        assert await app.deliverer.drain(120) == 0  # Slack comes back
        assert await app.store.outbox.counts() == {"sent": 1}
    assert world.kinds() == [("FIRING", "failed-charge")]
    assert not [m for m in errors(caplog) if "giving up" in m]


async def test_deliver_a_wall_clock_set_back_keeps_no_message_past_max_age(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The other way: the wall clock set 2 days back right after the first attempt
    would have kept the message 2 days past ``max_age`` (10 min); it is given up 10 min
    after it was committed, as the time that passed says."""
    world.slack.script_webhook(*[DOWN] * 100)
    config = slack_only(world, delivery={"max_age": "10m", "max_backoff": "1m"})
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        world.clock.step(timedelta(days=-2))
        began = world.clock.monotonic()
        await app.deliverer.drain(15 * 60)
        assert await app.store.outbox.counts() == {"failed": 1}
        assert world.clock.monotonic() - began <= 11 * 60
    [gave_up] = [m for m in errors(caplog) if "giving up" in m]
    assert "giving up after 0:10:00" in gave_up


async def test_deliver_a_wall_clock_set_forward_keeps_a_removed_notifiers_message(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for a message whose notifier a reload removed (kept until max_age in
    case it comes back): a day's step forward does not fail it; putting the notifier
    back delivers it."""
    world.slack.script_webhook(DOWN)
    async with App(slack_only(world), clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()  # 503: retried
        data = world.config_data(rules=only("mail"))
        del data["notifiers"]["slack"]
        assert await app.reload(config_of(world, data))
        world.clock.step(DAY_AND_2H)
        world.clock.advance(60)
        await app.deliverer.deliver_due()
        assert await app.store.outbox.counts() == {"pending": 1}
        assert await app.reload(slack_only(world))
        await app.deliverer.drain(60)
        assert await app.store.outbox.counts() == {"sent": 1}
    assert world.kinds() == [("FIRING", "failed-charge")]
    assert not [m for m in errors(caplog) if "giving up" in m]


async def test_deliver_a_message_waiting_behind_another_keeps_its_age(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A message never attempted while the one before it keeps failing (its notifier's
    rows wait together) has its age kept all the same: cycles go by (the cycle forgets
    its stamps), then the wall clock jumps 26 h forward; its first attempt fails, and it
    is retried, not given up."""
    world.slack.script_webhook(DOWN, DOWN)
    async with App(slack_only(world), clock=world.clock) as app:
        await app.run_cycle()  # Production's FIRING
        await app.deliverer.deliver_due()  # 503
        world.clock.advance(60)
        world.sim.set_status(world.sim.scenario.invoice("small").id, "FAILED")
        await app.run_cycle()  # Analytics' FIRING, committed a minute later
        await app.deliverer.deliver_due()  # the first: 503 again; the second waits
        for _ in range(4):
            world.clock.advance(60)
            await app.run_cycle()  # nothing new
        world.clock.step(DAY_AND_2H)
        world.slack.script_webhook(Reply(200), DOWN)  # the first goes, the second: 503
        await app.deliverer.drain(120)
        assert await app.store.outbox.counts() == {"sent": 2}
    assert world.kinds() == [("FIRING", "failed-charge")] * 2
    assert not [m for m in errors(caplog) if "giving up" in m]
