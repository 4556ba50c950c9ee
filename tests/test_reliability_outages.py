"""Slack and SMTP outages, in process: nothing is lost, nothing is sent twice, permanent
failures show in `status` and in /metrics, and the poll cycle never waits on a notifier.

Every test runs the real pipeline against the simulator, a real HTTP Slack endpoint and
aiosmtpd. Time is a FakeClock stepped explicitly (backoff and Retry-After are asserted
through it), so no test waits for a timer.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session
from prometheus_client import generate_latest

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.simulator import Simulator
from tests.fakes_slack import TOKEN, WEBHOOK_PATH, FakeSlack, Reply
from tests.fakes_smtp import Sink, StartServer
from tests.manual_clock import ManualClock
from tests.world import World, scenario

FIRST_RUN = [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]


class CountingSink(Sink):
    """A Sink that also counts every DATA command, accepted or refused."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self._changed = asyncio.Condition()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        reply = await super().handle_DATA(server, session, envelope)
        async with self._changed:
            self._changed.notify_all()
        return reply

    async def wait_for(self, messages: int) -> None:
        """Until ``messages`` messages were accepted."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.envelopes) >= messages)


def counting(world: World) -> CountingSink:
    assert isinstance(world.sink, CountingSink)
    return world.sink


@pytest.fixture
async def world(tmp_path: Path, smtp_server: StartServer) -> AsyncIterator[World]:
    sink = CountingSink()
    port = await smtp_server(sink)
    async with Simulator(scenario()) as sim, FakeSlack() as slack:
        yield World(sim, slack, sink, port, tmp_path)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def config_with(world: World, **notifiers: dict[str, Any]) -> Config:
    """The world's config, with some notifiers' settings replaced."""
    data = world.config_data()
    for name, settings in notifiers.items():
        data["notifiers"][name] = {**data["notifiers"][name], **settings}
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def metric(app: App, notifier: str, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "invoice_watch_notifications_total", {"notifier": notifier, "outcome": outcome}
    )
    return value or 0.0


async def status_text(config: Config) -> str:
    out = io.StringIO()
    assert await ops.status(config, out=out) == 0
    return out.getvalue()


async def step_to_next_attempt(app: App, world: World) -> bool:
    """Move the fake clock to the outbox's next due row; False when nothing is pending."""
    next_at = await app.store.outbox.next_attempt_at()
    if next_at is None:
        return False
    world.clock.set(max(world.clock.now(), next_at))
    return True


async def test_outage_slack_500_then_recovers_delivers_each_message_once(world: World):
    world.slack.script_webhook(*[Reply(500)] * 4)
    async with App(world.config(), clock=world.clock) as app:
        await app.run_cycle()
        assert await app.deliverer.drain(3600) == 0
        retries = metric(app, "slack", "retry")
    assert sorted(world.kinds()) == FIRST_RUN  # each once, after Slack came back
    assert len(world.slack.received) == 4 + 2  # the queue waited: no row hammered Slack
    assert retries == 4
    assert len(world.sink.envelopes) == 2  # email was not held up, nor sent twice
    backoff = world.clock.sleeps
    assert backoff == sorted(backoff) and max(backoff) <= 60  # growing, capped


@pytest.mark.parametrize("bot", [False, True], ids=["webhook", "bot token"])
@pytest.mark.parametrize(("retry_after", "wait"), [(7, 7), (3600, 60)])
async def test_outage_slack_429_waits_retry_after_capped_by_max_backoff(
    world: World, bot: bool, retry_after: int, wait: int
):
    reply = Reply(429, "ratelimited", headers={"Retry-After": str(retry_after)})
    if bot:
        world.slack.script_api(reply)
        settings = {"webhook_url": None, "token": TOKEN, "channel": "#billing"}
        config = config_with(world, slack={**settings, "api_url": world.slack.api_url})
    else:
        world.slack.script_webhook(reply)
        config = world.config()
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        assert len(world.slack.received) == 1 and world.slack.accepted == []
        world.clock.advance(wait - 0.5)
        await app.deliverer.deliver_due()
        assert len(world.slack.received) == 1  # not one request before Retry-After
        world.clock.advance(0.5)
        await app.deliverer.deliver_due()
    assert sorted(world.kinds()) == FIRST_RUN
    assert len(world.slack.received) == 3


async def test_outage_slack_connection_refused_keeps_messages_until_it_is_back(world: World):
    down = config_with(
        world, slack={"webhook_url": f"http://127.0.0.1:{closed_port()}{WEBHOOK_PATH}"}
    )
    async with App(down, clock=world.clock) as app:
        await app.run_cycle()
        assert await app.deliverer.drain(60) == 2  # still pending, not failed
    status = await status_text(down)
    assert "Undelivered notifications: 2" in status and "Slack is unreachable" in status
    assert "PENDING" in status and "FAILED" not in status

    world.clock.advance(timedelta(minutes=30))  # Slack is reachable again
    async with App(world.config(), clock=world.clock) as app:
        assert await app.deliverer.drain(60) == 0
    assert sorted(world.kinds()) == FIRST_RUN
    assert len(world.sink.envelopes) == 2


async def test_outage_smtp_refusing_connections_keeps_mail_until_it_is_back(world: World):
    down = config_with(world, mail={"port": closed_port()})
    async with App(down, clock=world.clock) as app:
        await app.run_cycle()
        assert await app.deliverer.drain(60) == 2
    assert "cannot connect" in await status_text(down)
    assert sorted(world.kinds()) == FIRST_RUN  # Slack was not held up

    world.clock.advance(timedelta(minutes=30))
    async with App(world.config(), clock=world.clock) as app:
        assert await app.deliverer.drain(60) == 0
    assert len(world.sink.envelopes) == 2 and len(world.slack.accepted) == 2
    subjects = sorted(world.sink.message(i)["Subject"] for i in range(2))
    assert subjects[0].startswith("[invoice-watch] FIRING failed-charge")


async def test_outage_smtp_4xx_is_retried_then_delivered_once(world: World):
    sink = counting(world)
    sink.reply = "451 4.3.0 Mailbox busy, try again later"
    async with App(world.config(), clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        assert sink.attempts == 1  # the second message waits behind the first
        await step_to_next_attempt(app, world)
        await app.deliverer.deliver_due()
        assert sink.attempts == 2 and sink.envelopes == []
        sink.reply = "250 OK"
        assert await step_to_next_attempt(app, world)
        await app.deliverer.deliver_due()
        assert not await step_to_next_attempt(app, world)  # nothing left
        assert metric(app, "mail", "retry") == 2 and metric(app, "mail", "sent") == 2
    assert sink.attempts == 4 and len(sink.envelopes) == 2


@pytest.mark.parametrize(
    ("notifier", "break_it", "error"),
    [
        ("mail", lambda w: setattr(w.sink, "reply", "554 5.7.1 Relay denied"), "554"),
        ("slack", lambda w: w.slack.script_webhook(*[Reply(404, "no_service")] * 2), "no_service"),
    ],
)
async def test_outage_permanent_failure_is_not_retried_and_shows_in_status_and_metrics(
    world: World, notifier: str, break_it: Any, error: str
):
    break_it(world)
    config = world.config()
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        stats = await app.deliverer.deliver_due()
        assert stats.failed == 2 and stats.retried == 0
        world.clock.advance(timedelta(days=2))
        await app.deliverer.deliver_due()
        assert await app.store.outbox.next_attempt_at() is None  # nothing is waiting to retry
        metrics = generate_latest(app.metrics.registry).decode()
    assert f'invoice_watch_notifications_total{{notifier="{notifier}",outcome="failed"}} 2.0' in (
        metrics
    )
    attempts = counting(world).attempts if notifier == "mail" else len(world.slack.received)
    assert attempts == 2  # one try each, never again
    status = await status_text(config)
    failed = [line for line in status.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and all(notifier in line and error in line for line in failed)


async def test_outage_longer_than_max_age_is_marked_failed_not_dropped(world: World):
    world.slack.script_webhook(*[Reply(503)] * 1000)
    config = world.config(delivery={"max_age": "10m", "max_backoff": "1m"})
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        for _ in range(100):
            await app.deliverer.deliver_due()
            if not await step_to_next_attempt(app, world):
                break
        assert metric(app, "slack", "failed") == 2
    status = await status_text(config)
    assert "Undelivered notifications: 2" in status and "gave up after" in status
    assert world.slack.accepted == [] and len(world.sink.envelopes) == 2


class HangingSlack:
    """A webhook endpoint that accepts connections and answers only when released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.requests = 0
        app = web.Application()
        app.router.add_post(WEBHOOK_PATH, self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        self.url = ""

    async def _hook(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.arrived.set()
        await self.release.wait()
        return web.Response(text="ok")

    async def __aenter__(self) -> HangingSlack:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}{WEBHOOK_PATH}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self._runner.cleanup()


async def test_outage_hanging_slack_never_delays_the_poll_cycle(world: World):
    async with HangingSlack() as hanging:
        config = config_with(world, slack={"webhook_url": hanging.url})
        stop = asyncio.Event()
        # A clock whose sleeps wait for the test: no second cycle runs by itself.
        async with App(config, clock=ManualClock(world.clock.now())) as app:
            daemon = asyncio.create_task(app.serve(stop))
            async with asyncio.timeout(10):
                await app.cycles.done.wait()
                await hanging.arrived.wait()  # delivery is stuck inside Slack's send
                await counting(world).wait_for(2)  # ... and email went out anyway
            world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
            async with asyncio.timeout(3):  # a cycle does not wait for the hung send
                result = await app.run_cycle()
            assert [e.kind for e in result.events] == ["RESOLVED"]
            assert hanging.requests == 1
            hanging.release.set()
            stop.set()
            async with asyncio.timeout(10):
                await daemon
        # The two FIRING and the RESOLVED, once each: the RESOLVED, committed while the
        # hung pass was in flight, still went out in the pass made on stop.
        assert hanging.requests == 3


async def test_outage_run_once_exits_1_when_a_delivery_failed_for_good(world: World):
    world.sink.reply = "554 5.7.1 Relay denied"
    assert await world.run_once(world.config()) == 1
