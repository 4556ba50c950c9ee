"""The outbox against what receivers do to it (issues 12 and 14): error texts that cannot
be stored or carry a secret, 429s in a row, a notifier renamed or removed under pending
messages, and a notifier failing in a way nobody foresaw. The real pipeline against the
simulator, the fake Slack, aiosmtpd or a raw SMTP server on loopback, and a FakeClock.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.types import AlertEvent, Part
from tests.fakes_slack import TOKEN, Reply
from tests.test_reliability_outages import FIRST_RUN, metric, status_text
from tests.test_reliability_storms import run_delivery
from tests.world import SMTP_PASSWORD, World


def config_of(world: World, data: dict[str, Any]) -> Config:
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def bot_data(world: World) -> dict[str, Any]:
    data = world.config_data()
    data["notifiers"]["slack"] = {
        "type": "slack",
        "token": TOKEN,
        "channel": "#billing",
        "api_url": world.slack.api_url,
    }
    return data


def logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


RawSmtp = Callable[..., Awaitable[int]]


@pytest.fixture
async def raw_smtp() -> AsyncIterator[RawSmtp]:
    """Starts SMTP servers on 127.0.0.1 that answer AUTH and MAIL FROM with the bytes
    given (what aiosmtpd, a well-behaved server, never sends); returns each one's port."""
    servers: list[asyncio.Server] = []

    async def start(*, mail: bytes = b"250 OK", auth: bytes | None = None) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 smtp.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    offer = b"250-AUTH PLAIN LOGIN\r\n" if auth is not None else b""
                    writer.write(b"250-smtp.test\r\n" + offer + b"250 8BITMIME\r\n")
                elif verb == b"AUTH" and auth is not None:
                    writer.write(auth + b"\r\n")
                elif verb == b"MAIL":
                    writer.write(mail + b"\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


# -- a receiver's text: storable --------------------------------------------------------


async def test_deliver_a_bot_error_with_a_surrogate_fails_once_not_forever(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 §14: ``{"ok":false,"error":"ratelimited\\ud800"}``: the "failed" mark could
    not be stored, so the message was posted again every pass (7 times in 40 s), and
    `run --once` ended in "unexpected error: ExceptionGroup". Now it is marked failed
    once, the mark holds the code escaped, and nothing more is sent."""
    world.slack.script_api(*[Reply(error="ratelimited\ud800\x1b[2J")] * 50)
    async with App(config_of(world, bot_data(world)), clock=world.clock) as app:
        await app.run_cycle()
        assert await app.deliverer.drain(60) == 0
        assert await app.store.outbox.counts() == {"failed": 2, "sent": 2}
        rows = await app.store.outbox.messages(("failed",))
    assert len(world.slack.received) == 2
    assert all("'ratelimited\\ud800\\x1b[2J'" in (row.last_error or "") for row in rows)
    assert len(logged(caplog)) == 2 and "\x1b" not in caplog.text


async def test_deliver_an_smtp_reply_that_is_not_utf8_is_stored(
    world: World, raw_smtp: RawSmtp, caplog: pytest.LogCaptureFixture
) -> None:
    """An SMTP reply's bytes that are not UTF-8 reach us as lone surrogates (aiosmtplib
    decodes with surrogateescape): the retry mark is stored all the same, escaped."""
    port = await raw_smtp(mail=b"451 4.3.0 busy \xff\x1b]0;x\x07 try later")
    data = world.config_data()
    data["notifiers"]["mail"]["port"] = port
    async with App(config_of(world, data), clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        rows = await app.store.outbox.messages(("pending",))
    assert [row.notifier for row in rows] == ["mail", "mail"]
    [error] = [row.last_error for row in rows if row.attempts]  # the other one waits
    assert error is not None
    assert "451 4.3.0 busy \\udcff\\x1b]0;x\\x07 try later" in error
    assert "\x1b" not in caplog.text


# -- a receiver's text: redacted ----------------------------------------------------------


async def test_deliver_an_smtp_server_echoing_the_password_never_shows_it(
    world: World, raw_smtp: RawSmtp, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 §4: the server answered AUTH with ``535 5.7.8 credentials <base64 of the
    password> rejected``; it was logged and shown by `status` as it came. Neither the
    password nor its base64 forms (AUTH LOGIN, AUTH PLAIN) reach a log line, the state
    file or `status`."""
    user = "alerts@example.com"
    plain = base64.b64encode(f"\0{user}\0{SMTP_PASSWORD}".encode()).decode()
    login = base64.b64encode(SMTP_PASSWORD.encode()).decode()
    port = await raw_smtp(auth=f"535 5.7.8 credentials {login} {plain} rejected".encode())
    data = world.config_data()
    data["notifiers"]["mail"].update(port=port, username=user, password=SMTP_PASSWORD)
    config = config_of(world, data)
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.drain(10)
        rows = await app.store.outbox.messages(("failed",))
    shown = [row.last_error or "" for row in rows] + [caplog.text, await status_text(config)]
    assert len(rows) == 2 and "535 5.7.8 credentials <secret> <secret> rejected" in shown[0]
    for text in shown:
        assert SMTP_PASSWORD not in text and login not in text and plain not in text


# -- 429s in a row escalate --------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["0", "1"])
async def test_deliver_429s_in_a_row_wait_longer_each_time(world: World, retry_after: str) -> None:
    """Issue 12, minor: ``429 Retry-After: 0`` answered again and again gave one POST a
    second for ever (~86,000 a day). The wait is the longer of Retry-After and the
    backoff for the attempts so far: it grows to max_backoff, as the Atlas client's."""
    reply = Reply(429, "ratelimited", headers={"Retry-After": retry_after})
    world.slack.script_webhook(*[reply] * 10_000)
    async with App(world.config(), clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()  # the email goes; Slack's first 429
        world.clock.sleeps.clear()
        await run_delivery(app, world.clock, seconds=600)
    posts = len(world.slack.received)
    assert posts <= 6 + 600 / 30, posts  # 1-2, 2-4, … 30-60 s: not 600 POSTs
    waits = [s for s in world.clock.sleeps if s > 0]
    assert max(waits) >= 30 and all(w <= 60 for w in waits)


# -- a notifier renamed or removed under pending messages --------------------------------


def renamed(world: World, old: str, new: str, *, port: int | None = None) -> dict[str, Any]:
    """The world's config with notifier ``old`` called ``new`` (rules follow)."""
    data = world.config_data()
    settings = data["notifiers"].pop(old)
    if port is not None:
        settings["webhook_url"] = f"http://127.0.0.1:{port}/services/T000/B000/XXXX"
    data["notifiers"][new] = settings
    for rule in data["rules"]:
        rule["notify"] = [new if n == old else n for n in rule["notify"]]
    return data


async def test_deliver_a_renamed_notifier_keeps_its_messages_until_renamed_back(
    world: World, caplog: pytest.LogCaptureFixture, closed_port: int
) -> None:
    """Issue 14 §3: renaming a notifier failed its pending messages silently (no ERROR, no
    metric, never re-sent). They are kept pending while the notifier is missing: one
    ERROR for it, the invoice_watch_outbox_unrouted gauge, `status` says why they wait,
    no attempt is counted, and renaming it back delivers them."""
    down = config_of(world, renamed(world, "slack", "slack", port=closed_port))
    async with App(down, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()  # Slack is down: both of its messages wait
        assert await app.reload(config_of(world, renamed(world, "slack", "slack2")))
        for _ in range(5):  # five passes, a minute apart: one look each, one ERROR in all
            world.clock.advance(60)
            await app.deliverer.deliver_due()
        assert await app.store.outbox.counts() == {"pending": 2, "sent": 2}
        gauge = app.metrics.registry.get_sample_value(
            "invoice_watch_outbox_unrouted", {"notifier": "slack"}
        )
        assert gauge == 2
        said = await status_text(app.config)
        assert "notifier 'slack' is no longer in the configuration" in said
        [error] = [m for m in logged(caplog) if "no longer in the configuration" in m]
        assert "kept until delivery.max_age (1 day, 0:00:00)" in error and "rename" in error
        assert metric(app, "slack", "failed") == 0
        assert await app.reload(world.config())  # the old name is back, Slack is up
        await app.deliverer.deliver_due()
        assert await app.store.outbox.counts() == {"sent": 4}
        assert (
            app.metrics.registry.get_sample_value(
                "invoice_watch_outbox_unrouted", {"notifier": "slack"}
            )
            == 0
        )
    assert sorted(world.kinds()) == FIRST_RUN
    assert len(world.slack.received) == 2  # one POST each: the waiting counted none


async def test_deliver_a_removed_notifier_fails_its_messages_loudly_at_max_age(
    world: World, caplog: pytest.LogCaptureFixture, closed_port: int
) -> None:
    """At ``delivery.max_age`` the messages of a notifier still missing are marked failed
    as any message is: an ERROR line each and the failed counter."""
    down = config_of(world, renamed(world, "slack", "slack", port=closed_port))
    async with App(down, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        data = world.config_data()
        del data["notifiers"]["slack"]
        for rule in data["rules"]:
            rule["notify"] = ["mail"]
        assert await app.reload(config_of(world, data))
        world.clock.advance(timedelta(days=1).total_seconds())
        await app.deliverer.drain(60)
        assert await app.store.outbox.counts() == {"failed": 2, "sent": 2}
        assert metric(app, "slack", "failed") == 2
    gave_up = [m for m in logged(caplog) if "giving up after 1 day" in m]
    assert len(gave_up) == 2 and all("no longer in the configuration" in m for m in gave_up)


@pytest.fixture
def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- a notifier failing in a way nobody foresaw ------------------------------------------


class Broken:
    """A notifier with a bug (no server can make ours raise this): the first sends raise
    an exception that is no NotifyError, its message quoting a secret."""

    name = "slack"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent = 0

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise KeyError(f"Bearer {TOKEN} \x1b[2J")
        self.sent += 1

    async def aclose(self) -> None:
        pass


async def test_deliver_an_unexpected_error_logs_one_redacted_traceback_and_retries(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    config = world.config(
        rules=[{"name": "failed-charge", "type": "invoice_status", "notify": ["slack"]}]
    )
    async with App(config, clock=world.clock) as app:
        broken = Broken(failures=3)
        app.deliverer.configure(
            {"slack": broken},
            max_age=config.delivery.max_age,
            max_backoff=config.delivery.max_backoff,
        )
        await app.run_cycle()
        await run_delivery(app, world.clock, seconds=300, until=lambda: broken.sent == 1)
        assert await app.store.outbox.counts() == {"sent": 1}
    [error] = logged(caplog)
    assert "unexpected error while sending (a bug: please report it)" in error
    assert "Traceback" in error and "KeyError" in error
    assert TOKEN not in caplog.text and "\x1b" not in caplog.text
