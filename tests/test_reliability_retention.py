"""The state file stays bounded (issue 14 §4): sent and failed notifications, resolved
alerts and notices, cycle records and old amount observations are pruned after
``delivery.retention``, a bounded batch at a time, by the delivery loop; what the alert
lifecycle needs (firing alerts, pending and held messages, the last cycle, the
observation an ``amount_increase`` window starts from) is never touched.
"""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from invoice_watch import ops
from invoice_watch.alerts import Reason, Transition
from invoice_watch.app import App
from invoice_watch.store import OrgWrite, Store
from invoice_watch.types import EventKind
from tests.conftest import NOW, ORG_A, inv
from tests.test_store import event, firing
from tests.world import World

DAY = timedelta(days=1)


def resolved(key: str) -> Transition:
    fired = firing(key)
    state = replace(fired.state, firing=False, resolved_at=NOW)
    return Transition(state, replace(event(key), kind=EventKind.RESOLVED), Reason.RESOLVED)


async def cycle(
    store: Store,
    transitions: Sequence[Transition] = (),
    orgs: Sequence[OrgWrite] = (),
    group_over: int = 10,
) -> None:
    await store.finish_cycle(
        store.begin_cycle(),
        NOW,
        NOW,
        list(orgs),
        list(transitions),
        {"failed": ["slack"]},
        group_over,
        orgs_ok=1,
        orgs_failed=0,
    )


def rows(path: Path, table: str, where: str = "1") -> int:
    conn = sqlite3.connect(path)
    try:
        count: int = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()[0]
        return count
    finally:
        conn.close()


async def test_retention_prunes_what_is_done_and_keeps_what_the_lifecycle_needs(
    tmp_path, open_state
):
    path = tmp_path / "state.db"
    store = await open_state(path)
    pending_id = inv(1).id
    await cycle(
        store,
        [firing("old-firing"), resolved("old-resolved"), firing("x"), firing("y")],
        [OrgWrite(ORG_A, True, upserts=[inv(1)], observations=[(pending_id, 100)])],
    )
    await cycle(store, [firing(k) for k in "abc"], group_over=2)  # one grouped message
    due = await store.outbox.due(NOW)
    sent, failed, grouped, waiting = due[0], due[1], due[-1], due[2:4]
    await store.outbox.mark_sent(sent.id, NOW)
    await store.outbox.mark_failed(failed.id, NOW, "HTTP 404 no_service")
    await store.outbox.mark_sent(grouped.id, NOW)
    for days, cents in ((5, 200), (10, 300), (40, 400)):
        await store.commit_orgs(
            store.begin_cycle(),
            NOW + days * DAY,
            [OrgWrite(ORG_A, True, observations=[(pending_id, cents)])],
            [],
            {},
        )
    before = {t: rows(path, t) for t in ("outbox", "alerts", "cycles", "amount_history")}

    deleted = await store.prune(NOW + 30 * DAY, limit=500)

    # Sent and failed messages go (a grouped one whole); the one waiting stays.
    assert rows(path, "outbox") == before["outbox"] - 2 - 3
    assert await store.outbox.due(NOW) == waiting
    # The resolved alert goes; firing ones stay, however old.
    assert rows(path, "alerts", "key='old-resolved'") == 0
    assert set(store.alerts.firing()) == {"old-firing", "x", "y", "a", "b", "c"}
    assert rows(path, "alerts", "firing=1") == 6
    # The last cycle stays (status reads it).
    assert rows(path, "cycles") == 1 and await store.cycles.last() is not None
    # Observations before the cutoff go but the newest of them (a window's base).
    assert [c for _, c in store.snapshot.history(pending_id)] == [300, 400]
    assert rows(path, "amount_history") == 2
    assert deleted == sum(before.values()) - sum(
        rows(path, t) for t in ("outbox", "alerts", "cycles", "amount_history")
    )
    await store.close()
    again = await open_state(path)  # the file holds what the cache holds
    assert [c for _, c in again.snapshot.history(pending_id)] == [300, 400]


async def test_retention_prunes_a_bounded_batch_at_a_time(store):
    await cycle(store, [firing(f"k{n}") for n in range(30)], group_over=100)
    for delivery in await store.outbox.due(NOW):
        await store.outbox.mark_sent(delivery.id, NOW)
    counts = []
    while deleted := await store.prune(NOW + DAY, limit=8):
        counts.append(deleted)
    assert counts == [8, 8, 8, 6] and await store.outbox.counts() == {}


async def test_retention_the_state_file_stops_growing_under_a_steady_alert_load(world: World):
    """Two pending invoices cross their threshold up or down every 12 hours: a FIRING or
    a RESOLVED each time, for Slack and email, and a new amount observation; a cycle every
    12 hours for 40 days with a 10-day retention. The file grows for 10 days, then not
    at all; `history` still shows the last 10 days."""
    config = world.config(
        delivery={"retention": "10d"},
        rules=[
            {
                "name": "pending-over-budget",
                "type": "pending_amount",
                "threshold": 5000,
                "notify": ["slack", "mail"],
            }
        ],
    )
    invoices = [world.sim.scenario.invoice(name).id for name in ("pending", "small")]
    pages: list[int] = []
    async with App(config, clock=world.clock) as app:
        for step in range(80):
            for invoice_id in invoices:
                world.sim.set_amount(invoice_id, (4000_00, 6000_00)[step % 2] + step)
            await app.run_cycle()
            assert await app.deliverer.drain(60) == 0
            pages.append(rows_pages(config.state.path))
            world.clock.advance(timedelta(hours=12))
        kept = await app.store.outbox.counts()
    sent = len(world.slack.accepted) + len(world.sink.envelopes)
    assert sent >= 4 * 79  # the load: every cycle sent something
    assert kept["sent"] <= 4 * 22  # 10 days of it, and a pass's worth
    assert max(pages[40:]) <= pages[39], pages  # no growth over the last 20 days
    assert rows(config.state.path, "cycles") <= 22
    assert rows(config.state.path, "amount_history") <= 2 * 22
    out = io.StringIO()
    assert await ops.history(config, limit=1000, out=out) == 0
    assert len(out.getvalue().splitlines()) == 1 + kept["sent"]  # the header, then each


def rows_pages(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
        return pages
    finally:
        conn.close()
