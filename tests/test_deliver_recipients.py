"""An email's recipients answered one by one (attack-final NEW-2): a recipient refused for
now (450 greylisted) is retried, alone, until it takes the message; one refused for good
(550 no such user) is reported with the server's reply and holds up no one; those that
took it never get it twice. The real pipeline against the simulator and aiosmtpd on
loopback; time is a FakeClock.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.config import Config, load
from tests.fakes_smtp import Sink, StartServer
from tests.test_reliability_outages import status_text
from tests.world import World

GREY = "grey@example.com"
OK = "ok@example.com"
TYPO = "typo@example.com"


class Greylisting(Sink):
    """Answers RCPT with 450 for the addresses in ``grey`` (while they are there), 550
    for those in ``unknown``; counts every RCPT per address."""

    def __init__(self, grey: Iterable[str], unknown: Iterable[str] = ()) -> None:
        super().__init__()
        self.grey = set(grey)
        self.unknown = set(unknown)
        self.rcpts: dict[str, int] = {}

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.rcpts[address] = self.rcpts.get(address, 0) + 1
        if address in self.grey:
            return "450 4.2.0 greylisted, try again later"
        if address in self.unknown:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def got(self, address: str) -> int:
        """How many messages ``address`` was given."""
        return sum(address in envelope.rcpt_tos for envelope in self.envelopes)


def mail_config(world: World, port: int, to: list[str], **sections: Any) -> Config:
    data = world.config_data(
        rules=[{"name": "failed-charge", "type": "invoice_status", "notify": ["mail"]}],
        **sections,
    )
    data["notifiers"]["mail"].update(port=port, to=to)
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


async def history_text(config: Config) -> str:
    out = io.StringIO()
    assert await ops.history(config, out=out) == 0
    return out.getvalue()


def logged(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_deliver_a_greylisted_recipient_gets_the_message_the_others_once(
    world: World, smtp_server: StartServer
) -> None:
    """NEW-2, to: [grey, ok]: grey's 450 was logged and the message marked delivered;
    grey never got it and `history` said sent. Now ok has it once, the message stays
    pending for grey (`status` and `history` say so, naming grey), and grey gets it once
    its greylisting ends; ok is not sent it again."""
    sink = Greylisting({GREY})
    config = mail_config(world, await smtp_server(sink), [GREY, OK])
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        for _ in range(3):  # greylisted for a few attempts
            world.clock.advance(60)
            await app.deliverer.deliver_due()
        assert await app.store.outbox.counts() == {"pending": 1}
        status = await status_text(config)
        [line] = [line for line in status.splitlines() if line.startswith("PENDING")]
        assert f'still owed to ["{GREY}"]' in line
        history = await history_text(config)
        assert "pending" in history and "sent" not in history
        assert (sink.got(OK), sink.got(GREY)) == (1, 0)
        sink.grey.clear()  # the greylisting ends
        assert await app.deliverer.drain(120) == 0
        assert await app.store.outbox.counts() == {"sent": 1}
    assert (sink.got(OK), sink.got(GREY)) == (1, 1)
    assert sink.rcpts[OK] == 1
    # One message, the same for both: To names both, the Message-ID is the same.
    assert sink.message(0)["Message-ID"] == sink.message(-1)["Message-ID"]
    assert sink.message(-1)["To"] == f"{GREY}, {OK}"
    assert "sent" in await history_text(config)


async def test_deliver_a_recipient_refused_for_now_holds_up_no_later_message(
    world: World, smtp_server: StartServer
) -> None:
    """A full mailbox (452) for days must not hold up everyone's alerts: the messages
    after one still owed to it go out to the others at once, in order, each once."""
    sink = Greylisting({GREY})
    config = mail_config(world, await smtp_server(sink), [GREY, OK])
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        world.clock.advance(60)
        world.sim.set_status(world.sim.scenario.invoice("small").id, "FAILED")
        await app.run_cycle()
        await app.deliverer.deliver_due()
        world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
        world.clock.advance(60)
        await app.run_cycle()
        await app.deliverer.deliver_due()
        assert await app.store.outbox.counts() == {"pending": 3}
    subjects = [str(sink.message(i)["Subject"]) for i in range(len(sink.envelopes))]
    assert len(subjects) == 3 and all(e.rcpt_tos == [OK] for e in sink.envelopes)
    assert [subject.split(" ")[1:4] for subject in subjects] == [
        ["FIRING", "failed-charge:", "Production"],
        ["FIRING", "failed-charge:", "Analytics"],
        ["RESOLVED", "failed-charge:", "Production"],
    ]


async def test_deliver_a_mix_of_temporary_and_permanent_refusals_retries_the_temporary(
    world: World, smtp_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """NEW-2, to: [grey, typo] (no recipient took it): the whole message was failed for
    good. Now typo's 550 is reported once (ERROR, with the server's reply) and typo is
    never asked again; grey is retried and gets it."""
    sink = Greylisting({GREY}, {TYPO})
    config = mail_config(world, await smtp_server(sink), [GREY, TYPO])
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        assert await app.store.outbox.counts() == {"pending": 1}
        world.clock.advance(60)
        await app.deliverer.deliver_due()
        sink.grey.clear()
        assert await app.deliverer.drain(120) == 0
        assert await app.store.outbox.counts() == {"sent": 1}
    assert (sink.got(GREY), sink.got(TYPO)) == (1, 0)
    assert sink.rcpts[TYPO] == 1
    [refused] = [m for m in logged(caplog, logging.ERROR) if TYPO in m]
    assert "refused the message for good: 550 5.1.1 no such user" in refused


async def test_deliver_a_recipient_greylisted_past_max_age_is_failed_naming_it(
    world: World, smtp_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A recipient refused for now until ``max_age``: the message is failed, saying whom
    it never reached; the recipient that took it got it once."""
    sink = Greylisting({GREY})
    config = mail_config(
        world, await smtp_server(sink), [GREY, OK], delivery={"max_age": "10m", "max_backoff": "1m"}
    )
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.drain(15 * 60)
        assert await app.store.outbox.counts() == {"failed": 1}
        [row] = await app.store.outbox.messages(("failed",))
    assert (sink.got(OK), sink.got(GREY)) == (1, 0)
    assert sink.rcpts[OK] == 1
    assert row.last_error is not None and GREY in row.last_error
    assert "gave up after 0:10:00" in row.last_error
    [gave_up] = [m for m in logged(caplog, logging.ERROR) if "giving up" in m]
    assert f"giving up after 0:10:00 to {GREY}" in gave_up


async def test_deliver_owed_recipients_survive_a_restart_and_a_to_change(
    world: World, smtp_server: StartServer
) -> None:
    """Whom a message is owed to is in the state file: after a restart only grey is
    sent it; and a recipient removed from `to` meanwhile is not."""
    other = "other@example.com"
    sink = Greylisting({GREY, other})
    port = await smtp_server(sink)
    async with App(mail_config(world, port, [GREY, OK, other]), clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
    assert sink.got(OK) == 1
    sink.grey.clear()
    world.clock.advance(timedelta(minutes=5))
    async with App(mail_config(world, port, [GREY, OK]), clock=world.clock) as app:
        assert await app.deliverer.drain(60) == 0
        assert await app.store.outbox.counts() == {"sent": 1}
    assert (sink.got(OK), sink.got(GREY), sink.got(other)) == (1, 1, 0)
