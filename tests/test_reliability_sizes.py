"""No message is lost to its size (issue 13 §4): a burst too large for one message goes
out as several, in order, each complete and saying "part i of n", each an outbox message
of its own; every message fits the channel's limits (the fake Slack refuses what Slack
refuses: ``tests/fakes_slack.py``).

The real pipeline against the simulator, the fake Slack and aiosmtpd; time is a
FakeClock.
"""

from __future__ import annotations

import re

from invoice_watch.app import App
from tests.fakes_slack import BLOCK_TEXT_MAX, Reply, block_text, slack_problem
from tests.world import World

BURST = 120


def add_failed_invoices(world: World, count: int) -> list[str]:
    """``count`` more FAILED invoices in Production, one per earlier month."""
    return [
        world.sim.add_invoice("Production", period=-3 - n, status="FAILED", amount_cents=100_00 + n)
        for n in range(count)
    ]


def invoice_ids(text: str) -> list[str]:
    return re.findall(r"invoice `?([0-9a-f]{24})", text)


async def test_size_a_burst_of_120_alerts_arrives_whole_in_parts(world: World, open_state):
    """The issue's example: 120 alerts for one Slack notifier were one message of ~27k
    characters of block text, refused (msg_blocks_too_long) as permanent: none arrived.
    Now three messages of 40, in order, each within Slack's limits; email alike."""
    added = add_failed_invoices(world, BURST - 2)  # + the scenario's FAILED and pending
    config = world.config()
    assert await world.run_once(config) == 0

    bodies = world.slack.accepted
    assert len(bodies) == 3 and len(world.slack.received) == 3  # no refusal, no fallback
    headers = [body["blocks"][0]["text"]["text"] for body in bodies]
    assert [h.rsplit("(", 1)[1] for h in headers] == [
        "part 1 of 3)",
        "part 2 of 3)",
        "part 3 of 3)",
    ]
    for body in bodies:
        assert slack_problem(body) is None and block_text(body["blocks"]) <= BLOCK_TEXT_MAX
        assert body["text"].startswith("40 alerts: 40 FIRING (part ")
    seen = [i for body in bodies for i in invoice_ids(body["text"])]
    assert len(seen) == BURST and set(added) <= set(seen)  # every alert, once

    subjects = [world.sink.message(i)["Subject"] for i in range(len(world.sink.envelopes))]
    assert subjects == [f"[invoice-watch] 40 alerts: 40 FIRING (part {n} of 3)" for n in (1, 2, 3)]
    store = await open_state(config.state.path, exclusive=False)
    rows = await store.outbox.messages(("sent",))
    assert sorted({r.summary for r in rows}) == [
        f"40 alerts (grouped, part {n} of 3)" for n in (1, 2, 3)
    ]


async def test_size_a_part_that_fails_is_retried_alone(world: World):
    """Parts are outbox messages of their own: Slack failing part 2 retries part 2 only;
    parts 1 and 3 are not sent again."""
    add_failed_invoices(world, BURST - 2)
    world.slack.script_webhook(Reply(), Reply(503))  # part 1 taken, part 2 refused
    async with App(world.config(), clock=world.clock) as app:
        await app.run_cycle()
        assert await app.deliverer.drain(60) == 0
    parts = [b["blocks"][0]["text"]["text"].rsplit("(", 1)[1] for b in world.slack.accepted]
    assert parts == ["part 1 of 3)", "part 2 of 3)", "part 3 of 3)"]
    assert len(world.slack.received) == 4  # the one 503, retried once


async def test_size_slack_refusing_a_message_for_its_size_still_delivers_it(world: World):
    """Should Slack refuse a message's size all the same (a limit it lowered), the alert
    is not marked failed: it goes as plain text."""
    world.slack.script_webhook(Reply(400, "msg_blocks_too_long"), Reply(400, "invalid_blocks"))
    assert await world.run_once(world.config()) == 0
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    first, second = world.slack.accepted
    assert "blocks" not in first and first["text"].startswith("FIRING: failed-charge\n")
    assert "blocks" in second  # Slack's answer is about one message, not the notifier
