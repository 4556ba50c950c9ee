"""The snapshot converges to Atlas, old invoices included (issue 13, section 1).

Incremental reads only list the invoices that can still change, so a change Atlas makes
to an older one (a refund, a PAID invoice FORGIVEN, one removed) is seen by the periodic
full reconciliation listing: at every start, then once per ``poll.full_listing_every``
on the monotonic clock, spread across organizations. Its diff alerts like any other.

Through the real App and AtlasClient against the simulator on loopback; time is a
FakeClock.
"""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.cycle import CycleResult
from invoice_watch.listing import FullListings, _phase
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.types import AlertEvent, EventKind, Part
from tests.conftest import ORG_A
from tests.hand_atlas import HandAtlas, hand_config
from tests.hand_atlas import invoice as listed

# Its phase (where in each period its full listing falls) is 0.0026: after the full
# listing at start, its next one is due 0.9974 of a period later (23 h 56 min).
ORG = "5f8a1c2e9b3d4a6f7e0c0016"
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
RULES: list[dict[str, Any]] = [
    {"name": "forgiven", "type": "status_change", "to": ["FORGIVEN"], "notify": ["console"]},
    {"name": "watch-forgiven", "type": "invoice_status", "statuses": ["FORGIVEN"]},
    {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
]
RULES[1]["notify"] = ["console"]


def months() -> Scenario:
    """October PAID ($3,200.00 paid) and November PENDING, and two older PAID months."""
    scenario = Scenario(now=NOW)
    scenario.add_org("Production", id=ORG)
    scenario.add_invoice(ORG, period=-3, status="PAID", amount_cents=2800_00, name="august")
    scenario.add_invoice(ORG, period=-2, status="PAID", amount_cents=3000_00, name="september")
    scenario.add_invoice(ORG, period=-1, status="PAID", amount_cents=3200_00, name="october")
    scenario.add_invoice(ORG, period=0, status="PENDING", amount_cents=1500_00, name="november")
    return scenario


def config_of(sim: Simulator, tmp: Path, **poll: str) -> Config:
    data = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 0,
        },
        "organizations": [{"id": ORG, "name": "Production"}],
        "state": {"path": str(tmp / "state.db")},
        "poll": {"interval": "15m", **poll},
        "notifiers": {"console": {"type": "console"}},
        "rules": RULES,
    }
    return load(yaml.safe_dump(data), filename="convergence.yaml", env={}, base_dir=tmp)


class Recorder:
    """A notifier that keeps what it is sent."""

    name = "console"

    def __init__(self) -> None:
        self.sent: list[AlertEvent] = []

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None:
        self.sent.extend(events)

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(months(), clock=FakeClock(NOW)) as simulator:
        yield simulator


def from_dates(sim: Simulator) -> list[str | None]:
    """The ``fromDate`` of each listing since the last call (None: a full listing),
    those that failed included, Digest challenges not."""
    found: list[str | None] = [
        r.query["fromDate"][0] if "fromDate" in r.query else None
        for r in sim.requests
        if r.path.endswith("/invoices") and r.status != 401
    ]
    sim.requests.clear()
    return found


def events(result: CycleResult) -> list[tuple[EventKind, str, str | None, str | None]]:
    return sorted((e.kind, e.rule, e.invoice_id, e.previous_status) for e in result.events)


def forgive(sim: Simulator, name: str) -> str:
    """Atlas forgives a PAID invoice: FORGIVEN, nothing paid."""
    invoice = sim.scenario.invoice(name)
    sim.set_status(invoice.id, "FORGIVEN")
    invoice.amount_paid_cents = 0
    return invoice.id


async def test_full_listing_sees_a_paid_invoice_of_an_earlier_month_forgiven(
    sim: Simulator, tmp_path: Path
):
    """The issue's example: October PAID then FORGIVEN with nothing paid. Incremental
    reads (from November, the oldest invoice that can still change) never list October
    again; the daily full listing does, and its diff alerts like any other: the
    status_change NOTICE, the invoice_status rule watching FORGIVEN, and the snapshot
    (`invoices`) shows October FORGIVEN, $0.00 paid."""
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        assert from_dates(sim) == [None]  # the start: a full listing
        october = forgive(sim, "october")

        for _ in range(4):  # an hour of incremental reads: October is not listed
            clock.advance(timedelta(minutes=15))
            assert (await app.run_cycle()).events == []
            assert from_dates(sim) == ["2026-10-31"]  # a day early

        clock.advance(timedelta(days=1))
        result = await app.run_cycle()
        assert from_dates(sim) == [None]
        assert events(result) == [
            (EventKind.FIRING, "watch-forgiven", october, None),
            (EventKind.NOTICE, "forgiven", october, "PAID"),
        ]
        assert (await app.run_cycle()).events == []  # said once

    shown = io.StringIO()
    await ops.invoices(config, status="FORGIVEN", out=shown)
    row = next(line for line in shown.getvalue().splitlines() if october in line)
    assert row.split()[-3:] == ["FORGIVEN", "$3,200.00", "$0.00"]


async def test_full_listing_at_every_start_a_run_once_sees_a_late_change(
    sim: Simulator, tmp_path: Path
):
    """Every start lists in full (a `run --once` is a start): the change to October,
    made while nothing ran, is delivered by the next `run --once`."""
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert await run_once(app) == 0
    from_dates(sim)
    october = forgive(sim, "october")
    clock.advance(timedelta(minutes=15))
    recorder = Recorder()
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        assert await run_once(app) == 0
    assert from_dates(sim) == [None]
    assert sorted((e.kind, e.rule, e.invoice_id) for e in recorder.sent) == [
        (EventKind.FIRING, "watch-forgiven", october),
        (EventKind.NOTICE, "forgiven", october),
    ]


async def test_full_listing_converges_amounts_and_removals_of_old_invoices(
    sim: Simulator, tmp_path: Path
):
    """Any change outside the incremental window is of the same kind: a partial refund
    of a PAID invoice (amounts only) and an invoice Atlas no longer lists."""
    clock = FakeClock(NOW)
    august, september = sim.scenario.invoice("august"), sim.scenario.invoice("september")
    config = config_of(sim, tmp_path, full_listing_every="6h")
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        august.amount_paid_cents = 2000_00
        sim.remove_invoice(september.id)
        clock.advance(timedelta(minutes=15))
        assert (await app.run_cycle()).changes == 0  # incremental: not seen yet
        clock.advance(timedelta(hours=6))
        result = await app.run_cycle()
        assert from_dates(sim)[-1] is None
        assert result.changes == 2 and result.events == []
        assert september.id not in app.store.snapshot.get(ORG)
        (stored,) = await app.store.snapshot.stored_invoices(ORG, [august.id])
        assert (stored.status, stored.amount_paid_cents) == ("PAID", 2000_00)
        assert len(await app.store.snapshot.stored_invoices(ORG)) == 3


async def test_full_listing_sees_an_invoice_issued_late_for_an_earlier_month(
    sim: Simulator, tmp_path: Path
):
    """A new invoice dated before the oldest one that can still change (issued late, for
    September, FAILED at once) is outside every incremental read's window
    (``fromDate``): the next full listing sees it, and it alerts then (found by a soak
    attack; the README names this case in the convergence bound)."""
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path, full_listing_every="6h")
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        late = sim.add_invoice(ORG, period=-2, status="FAILED", amount_cents=900_00)
        for _ in range(4):
            clock.advance(timedelta(minutes=15))
            assert (await app.run_cycle()).events == []  # incremental: not listed
        assert set(from_dates(sim)) == {None, "2026-10-31"}
        clock.advance(timedelta(hours=6))
        result = await app.run_cycle()
        assert from_dates(sim) == [None]
        assert events(result) == [(EventKind.FIRING, "failed-charge", late, None)]


async def test_full_listing_is_timed_on_the_monotonic_clock(sim: Simulator, tmp_path: Path):
    """A wall-clock step (an NTP fix, a VM restore) neither postpones the full listing
    nor brings it forward: only time that passes does."""
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        from_dates(sim)
        due = timedelta(days=1 - _phase(ORG))
        clock.step(timedelta(days=3))  # the wall clock jumps forward: not due
        await app.run_cycle()
        clock.step(timedelta(days=-30))  # and back a month: the time passed still counts
        clock.advance(due - timedelta(minutes=1))
        await app.run_cycle()
        assert from_dates(sim) == ["2026-10-31", "2026-10-31"]
        clock.advance(timedelta(minutes=2))
        await app.run_cycle()
        assert from_dates(sim) == [None]


async def test_full_listing_that_fails_is_tried_again_after_a_short_backoff(
    sim: Simulator, tmp_path: Path
):
    """The daily full listing fails once: an incremental read stands in (the
    organization is read), and the full listing comes again within 5 minutes (the
    next cycle here) and sees the late change."""
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        october = forgive(sim, "october")
        clock.advance(timedelta(days=1))
        sim.faults.status(500, path="*/invoices", org_id=ORG)
        assert (await app.run_cycle()).orgs_failed == []
        clock.advance(timedelta(minutes=15))
        result = await app.run_cycle()
        assert from_dates(sim) == [None, None, "2026-10-31", None]
        assert (EventKind.NOTICE, "forgiven", october, "PAID") in events(result)


async def test_full_listing_that_keeps_failing_gives_way_to_incremental_reads(tmp_path: Path):
    """A13-5: after a good start, Atlas (or a gateway before it) times out on every full
    listing of the organization, though the short incremental listing works. At every
    start (`run --once` too) the full listing fails and an incremental read stands in,
    so the organization is read (a new FAILED invoice alerts, exit 0); a daemon tries
    the full listing again with a growing backoff, never making the organization
    unreadable; once it works again, a late change to an old invoice is seen."""
    clock = FakeClock(NOW)
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = [
            listed(1, ORG_A, "PAID", start="2026-10-01", end="2026-11-01"),
            listed(2, ORG_A, "PENDING", 100_00),
        ]
        rules = [
            {"name": "moves", "type": "status_change", "notify": ["console"]},
            {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
            {"name": "atlas-down", "type": "poll_failure", "after": "20m", "notify": ["console"]},
        ]
        config = hand_config(tmp_path, atlas.url, rules=rules, orgs=(ORG_A,))
        async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
            await app.run_cycle()
        atlas.full_answers[ORG_A] = (504, b'{"detail": "Gateway Timeout"}')
        atlas.invoices[ORG_A].append(listed(3, ORG_A, "FAILED"))
        atlas.asked.clear()

        recorder = Recorder()
        async with App(config, clock=clock, notifiers={"console": recorder}) as app:
            assert await run_once(app) == 0
        assert atlas.asked == [(ORG_A, None), (ORG_A, "2026-10-31")]
        assert [(e.kind, e.rule) for e in recorder.sent] == [(EventKind.FIRING, "failed-charge")]

        atlas.asked.clear()
        daemon = App(config, clock=clock, notifiers={"console": Recorder()}, rng=random.Random(7))
        async with daemon as app:
            for _ in range(12):  # three hours
                result = await app.run_cycle()
                assert result.orgs_failed == [] and result.events == []
                clock.advance(timedelta(minutes=15))
            full = [n for n, (_, asked) in enumerate(atlas.asked) if asked is None]
            assert 3 <= len(full) <= 8  # the start, then less and less often
            assert len(atlas.asked) == 12 + len(full)

            del atlas.full_answers[ORG_A]
            atlas.invoices[ORG_A][0]["statusName"] = "FORGIVEN"
            seen: list[CycleResult] = []
            for _ in range(6 * 4 + 1):  # within the longest backoff (6 h), and a cycle
                seen.append(await app.run_cycle())
                if seen[-1].events:
                    break
                clock.advance(timedelta(minutes=15))
            assert events(seen[-1]) == [(EventKind.NOTICE, "moves", f"{1:024x}", "PAID")]
            clock.advance(timedelta(minutes=15))
            await app.run_cycle()
            assert atlas.asked[-1] == (ORG_A, "2026-10-31")  # listed in full: done


async def test_full_listing_that_fails_at_a_first_start_is_tried_again_next_cycle(
    tmp_path: Path,
):
    """Nothing is known of the organization yet: no incremental read can stand in, so
    the full listing is tried again at the next cycle, not after a backoff."""
    clock = FakeClock(NOW)
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = [listed(2, ORG_A, "PENDING", 100_00)]
        atlas.full_answers[ORG_A] = (504, b'{"detail": "Gateway Timeout"}')
        config = hand_config(tmp_path, atlas.url, orgs=(ORG_A,))
        async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
            assert (await app.run_cycle()).orgs_failed == [ORG_A]
            del atlas.full_answers[ORG_A]
            clock.advance(timedelta(minutes=15))
            assert (await app.run_cycle()).orgs_failed == []
        assert atlas.asked == [(ORG_A, None), (ORG_A, None)]


def test_full_listings_spread_over_the_period_and_come_every_period():
    """1,000 organizations, cycles every 15 minutes for three days: all list in full at
    start, then about 1,000 / 96 a cycle (never all at once), and no organization's two
    full listings are more than a period (plus a cycle) apart."""
    clock = FakeClock(NOW)
    every, interval = timedelta(days=1), timedelta(minutes=15)
    full = FullListings(every, clock)
    orgs = [f"{n:024x}" for n in range(1000)]
    last: dict[str, float] = {}
    gaps: list[float] = []
    per_cycle: list[int] = []
    for _ in range(3 * 96):
        at = clock.monotonic()
        due = [org for org in orgs if full.due(org, at)]
        for org in due:
            if org in last:
                gaps.append(at - last[org])
            last[org] = at
            full.listed(org, at)
        per_cycle.append(len(due))
        clock.advance(interval)
    assert per_cycle[0] == 1000
    assert max(per_cycle[1:]) <= 30  # 10.4 on average
    assert sum(per_cycle[1:97]) == 1000  # each once in the first day after the start
    assert max(gaps) <= (every + interval).total_seconds()
    assert min(gaps[1000:]) >= (every - interval).total_seconds()  # after the first round


def test_full_listings_after_a_shorter_period_are_due_a_period_after_the_last_one():
    """A13-10: full_listing_every reloaded from 7d to 1d, 6 days after an
    organization's last full listing: its next one is due now (a period after the last
    is past), not at the next boundary of its phase (up to 7d + 1d after the last); one
    listed an hour before the reload, within a day of it."""
    clock = FakeClock(NOW)
    full = FullListings(timedelta(days=7), clock)
    old, recent = "a" * 24, "b" * 24
    full.listed(old, clock.monotonic())
    clock.advance(timedelta(days=6))
    full.listed(recent, clock.monotonic())
    clock.advance(timedelta(hours=1))
    full.configure(timedelta(days=1))
    assert full.due(old, clock.monotonic())
    assert not full.due(recent, clock.monotonic())
    assert full.due(recent, clock.monotonic() + timedelta(hours=23).total_seconds())


def test_full_listings_follow_a_new_period_and_can_be_forced():
    clock = FakeClock(NOW)
    full = FullListings(timedelta(days=1), clock)
    full.listed("a" * 24, clock.monotonic())
    full.configure(timedelta(hours=1))  # a reload: due within the new period, not at once
    assert not full.due("a" * 24, clock.monotonic())
    clock.advance(timedelta(hours=1))
    assert full.due("a" * 24, clock.monotonic())
    full.listed("a" * 24, clock.monotonic())
    full.force()
    assert full.due("a" * 24, clock.monotonic())
