"""One invoice is one alert subject, whichever listing shows it (issue 13, section 1).

A paying organization (Production) and a linked one (Analytics) are both configured:
Analytics's invoices are in its own listing and nested in Production's
(``linkedInvoices``). A change is news once (one NOTICE, one amount observation), in
the cycle that first sees it or when the other listing catches up later; an alert fires,
reminds and resolves once, on whichever successful read lists its invoice. Atlas shows
linked invoices to Organization Billing Admin or Owner only: a payer whose listing
stops showing them is warned about, once.

Through the real App and AtlasClient against the simulator on loopback (its
``billing_viewer`` organizations hide linked invoices, as Atlas does for that role).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.cycle import CycleResult, compare
from invoice_watch.linked import Linked
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.types import EventKind, Invoice, OrgRead, Snapshot
from tests.conftest import ORG_A, ORG_B, inv
from tests.test_convergence import Recorder

PAYER = "5f8a1c2e9b3d4a6f7e0c0016"
LINKED = "6a7b8c9d0e1f2a3b4c5d6e7f"
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
NAMES = {PAYER: "Production", LINKED: "Analytics"}
RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status"},
    {"name": "moves", "type": "status_change"},
    {"name": "jump", "type": "amount_increase", "threshold": 100, "window": "1d"},
    {"name": "over", "type": "pending_amount", "threshold": 1000},
    {"name": "month", "type": "forecast", "budget": 1500, "min_elapsed": "3d"},
]


def linked() -> Scenario:
    scenario = Scenario(now=NOW)
    scenario.add_org("Production", id=PAYER)
    scenario.add_org("Analytics", id=LINKED, linked_to="Production")
    scenario.add_invoice(PAYER, period=-2, status="PAID", amount_cents=800_00)
    scenario.add_invoice(PAYER, period=-1, status="PAID", amount_cents=900_00)
    scenario.add_invoice(PAYER, period=0, status="PENDING", amount_cents=200_00)
    scenario.add_invoice(LINKED, period=-2, status="PAID", amount_cents=300_00, name="old")
    scenario.add_invoice(LINKED, period=-1, status="FAILED", amount_cents=120_00, name="bad")
    scenario.add_invoice(LINKED, period=0, status="PENDING", amount_cents=700_00, name="small")
    return scenario


def config_of(
    sim: Simulator, tmp: Path, *, repeat: str | None = None, orgs: tuple[str, ...] = ()
) -> Config:
    rules = [{**rule, "notify": ["console"]} for rule in RULES]
    if repeat is not None:
        rules[0]["repeat"] = repeat
    data = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 0,
        },
        "organizations": [
            {"id": org_id, "name": NAMES[org_id]} for org_id in orgs or (PAYER, LINKED)
        ],
        "state": {"path": str(tmp / "state.db")},
        "notifiers": {"console": {"type": "console"}},
        "rules": rules,
    }
    return load(yaml.safe_dump(data), filename="linked.yaml", env={}, base_dir=tmp)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(linked(), clock=FakeClock(NOW)) as simulator:
        yield simulator


def events(result: CycleResult) -> list[tuple[EventKind, str, str | None]]:
    return sorted((e.kind, e.rule, e.invoice_id) for e in result.events)


def fail_reads_of(sim: Simulator, org_id: str, times: int = 1) -> None:
    """The next ``times`` listings of the organization fail (a full listing that fails
    is followed by an incremental one in the same cycle: two)."""
    sim.faults.status(503, path="*/invoices", org_id=org_id, times=times)


async def test_linked_invoice_move_is_one_notice_in_one_cycle(sim: Simulator, tmp_path: Path):
    """The issue's example: Analytics's invoice goes FAILED -> PAID; both listings show
    it; one NOTICE, one RESOLVED (the NOTICE used to be sent twice)."""
    bad = sim.scenario.invoice("bad").id
    clock = FakeClock(NOW)
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        first = await app.run_cycle()
        assert (EventKind.FIRING, "failed-charge", bad) in events(first)
        sim.set_status(bad, "PAID")
        clock.advance(timedelta(minutes=15))
        paid = await app.run_cycle()
        assert events(paid) == [
            (EventKind.NOTICE, "moves", bad),
            (EventKind.RESOLVED, "failed-charge", bad),
        ]
        clock.advance(timedelta(minutes=15))
        assert (await app.run_cycle()).events == []


@pytest.mark.parametrize("failing", [PAYER, LINKED], ids=["payer-fails", "linked-fails"])
async def test_linked_invoice_move_seen_by_one_listing_is_not_news_to_the_other(
    sim: Simulator, tmp_path: Path, failing: str
):
    """One listing fails while the invoice moves: the other tells it (NOTICE and
    RESOLVED at once, whichever organization fired the alert), and the failing one,
    read again a cycle later, finds nothing new (it used to send the NOTICE again, and
    the RESOLVED waited for the organization that had fired it)."""
    bad = sim.scenario.invoice("bad").id
    clock = FakeClock(NOW)
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        sim.set_status(bad, "PAID")
        fail_reads_of(sim, failing)
        clock.advance(timedelta(minutes=15))
        paid = await app.run_cycle()
        assert paid.orgs_failed == [failing]
        assert events(paid) == [
            (EventKind.NOTICE, "moves", bad),
            (EventKind.RESOLVED, "failed-charge", bad),
        ]
        (copy,) = await app.store.snapshot.stored_invoices(failing, [bad])  # brought up to date
        assert copy.status == "PAID"
        clock.advance(timedelta(minutes=15))
        caught_up = await app.run_cycle()
        assert caught_up.orgs_failed == []
        assert caught_up.events == [] and caught_up.changes == 0


async def test_linked_invoice_amount_is_observed_once_and_fires_once(
    sim: Simulator, tmp_path: Path
):
    """Analytics's pending invoice grows: both listings show it; its amount history has
    one observation per change (amount_increase measures growth from it), and
    amount_increase, pending_amount and forecast fire once each."""
    small = sim.scenario.invoice("small").id
    clock = FakeClock(NOW)
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        first = clock.now()
        assert app.store.snapshot.history(small) == [(first, 700_00)]
        clock.advance(timedelta(hours=1))
        sim.set_amount(small, 1600_00)
        grew = await app.run_cycle()
        assert app.store.snapshot.history(small) == [(first, 700_00), (clock.now(), 1600_00)]
        assert events(grew) == [
            (EventKind.FIRING, "jump", small),
            (EventKind.FIRING, "month", small),
            (EventKind.FIRING, "over", small),
        ]


async def test_linked_invoice_reminds_once(sim: Simulator, tmp_path: Path):
    bad = sim.scenario.invoice("bad").id
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path, repeat="1h")
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        clock.advance(timedelta(hours=1))
        reminded = await app.run_cycle()
        assert events(reminded) == [(EventKind.REMINDER, "failed-charge", bad)]


async def test_linked_invoices_hidden_from_a_billing_viewer_are_warned_about_once(
    sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """The key is only Organization Billing Viewer on Production now: its listing shows
    no linked invoice. invoice-watch says so once (at the start's full listing, not at
    the next), and Analytics's alert, still listed by Analytics itself, neither resolves
    nor fires again, even in a cycle where Analytics cannot be read."""
    bad = sim.scenario.invoice("bad").id
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
    sim.scenario.org(PAYER).billing_viewer = True
    caplog.set_level(logging.WARNING, logger="invoice_watch.linked")
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).events == []
        clock.advance(timedelta(days=2))  # the next full listings
        assert (await app.run_cycle()).events == []
        fail_reads_of(sim, LINKED)
        clock.advance(timedelta(minutes=15))
        assert (await app.run_cycle()).events == []
        assert [key.split("/")[-1] for key in app.store.alerts.firing()] == [bad]
    warnings = [r.getMessage() for r in caplog.records if "no linked invoices" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("Production: Atlas listed no linked invoices")
    assert "Analytics" in warnings[0] and "Organization Billing Admin" in warnings[0]


async def test_linked_invoices_hidden_from_a_paying_org_alone_keep_their_alerts(
    sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A13-1: only Production (the payer) is configured; Analytics's invoices are seen
    nested in its listing, and two of them alert. The key's role drops to Billing
    Viewer: every linked invoice vanishes from the listing at once. That is a change of
    what Atlas shows, not of the invoices: no RESOLVED (nor, when they show again, a
    second FIRING), and a warning at the first read that shows it (an incremental one),
    not only with the daily full listing. A change made while hidden is told once they
    show again."""
    bad, small = sim.scenario.invoice("bad").id, sim.scenario.invoice("small").id
    sim.set_amount(small, 1200_00)
    clock = FakeClock(NOW)
    config = config_of(sim, tmp_path, orgs=(PAYER,))
    caplog.set_level(logging.WARNING, logger="invoice_watch.linked")
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        first = await app.run_cycle()
        assert events(first) == [
            (EventKind.FIRING, "failed-charge", bad),
            (EventKind.FIRING, "month", small),
            (EventKind.FIRING, "over", small),
        ]
        firing = sorted(app.store.alerts.firing())
        sim.scenario.org(PAYER).billing_viewer = True
        for advance in (timedelta(minutes=15), timedelta(minutes=15), timedelta(days=1)):
            clock.advance(advance)
            hidden = await app.run_cycle()
            assert hidden.events == [] and hidden.orgs_failed == []
            assert sorted(app.store.alerts.firing()) == firing
            assert {bad, small} <= set(app.store.snapshot.get(PAYER))
            warnings = [r.getMessage() for r in caplog.records if "no linked" in r.getMessage()]
            assert len(warnings) == 1  # at the first read that shows it, an incremental one
        assert "the 2 linked invoice(s) invoice-watch holds for it are kept" in warnings[0]

        sim.set_status(bad, "PAID")  # while hidden
        sim.scenario.org(PAYER).billing_viewer = False
        clock.advance(timedelta(minutes=15))
        shown = await app.run_cycle()
        assert events(shown) == [
            (EventKind.NOTICE, "moves", bad),
            (EventKind.RESOLVED, "failed-charge", bad),
        ]
        clock.advance(timedelta(minutes=15))
        assert (await app.run_cycle()).events == []


async def test_linked_organization_added_later_tells_a_move_its_payer_did_not_list(
    sim: Simulator, tmp_path: Path
):
    """Only Production is configured: it keeps Analytics's old PAID invoice (settled).
    Atlas forgives that invoice; Analytics is added to the configuration, and its first
    read (Production's failing) is compared with Production's copy, read back from the
    state file: one NOTICE PAID -> FORGIVEN, none when Production is read again."""
    old = sim.scenario.invoice("old").id
    clock = FakeClock(NOW)
    payer_only = config_of(sim, tmp_path, orgs=(PAYER,))
    async with App(payer_only, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        assert old in app.store.snapshot.get(PAYER).settled
    sim.set_status(old, "FORGIVEN")
    fail_reads_of(sim, PAYER, times=2)  # the start's full listing and its stand-in
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        first = await app.run_cycle()
        assert first.orgs_failed == [PAYER]
        assert [(e.kind, e.rule, e.invoice_id, e.previous_status) for e in first.events] == [
            (EventKind.NOTICE, "moves", old, "PAID")
        ]
        clock.advance(timedelta(minutes=15))
        again = await app.run_cycle()
        assert again.orgs_failed == [] and again.events == []


async def test_linked_invoice_news_is_committed_before_the_listing_it_made_no_news(
    sim: Simulator, tmp_path: Path
):
    """Production's read tells that Analytics's pending invoice grew over the threshold;
    its part waits for the breakdown (line items, fetched once every listing is read).
    Analytics's read, no news now, is committed after it, not before: a crash in
    between must not leave the quiet copy committed and the news lost."""
    small = sim.scenario.invoice("small").id
    clock = FakeClock(NOW)
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        sim.set_amount(small, 1600_00)
        sim.faults.hang(seconds=0.3, path="*/invoices", org_id=LINKED)  # read second
        committed: list[str] = []
        commit_orgs = app.store.commit_orgs

        async def recording(cycle: int, at: Any, orgs: Any, *rest: Any) -> None:
            committed.extend(write.org_id for write in orgs)
            await commit_orgs(cycle, at, orgs, *rest)

        app.store.commit_orgs = recording  # type: ignore[method-assign,assignment]
        clock.advance(timedelta(minutes=15))
        grew = await app.run_cycle()
        assert (EventKind.FIRING, "over", small) in events(grew)
        assert committed == [PAYER, LINKED]


async def test_linked_read_reads_the_store_once_for_its_own_and_its_payers_settled_copies(
    sim: Simulator, tmp_path: Path
):
    """Analytics holds its old PAID invoice (settled: kept in memory as a key); Production
    alone holds a later one, listed while Analytics's reads failed. Atlas forgives both,
    and Production's reads fail: Analytics's read needs its own stored copy of the old
    one (the diff) and Production's of the later one (what is news). Both come from one
    read of the store, made before the diff (issue 15, item 3): one NOTICE each."""
    old = sim.scenario.invoice("old").id
    clock = FakeClock(NOW)
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
    late = sim.scenario.add_invoice(LINKED, period=-2, status="PAID", amount_cents=50_00).id
    fail_reads_of(sim, LINKED, times=2)  # the start's full listing and its stand-in
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).orgs_failed == [LINKED]
        assert late in app.store.snapshot.get(PAYER).settled
        assert late not in app.store.snapshot.get(LINKED)
    sim.set_status(old, "FORGIVEN")
    sim.set_status(late, "FORGIVEN")
    fail_reads_of(sim, PAYER, times=2)
    async with App(config_of(sim, tmp_path), clock=clock, notifiers={"console": Recorder()}) as app:
        reads: list[str] = []
        database: Any = app.store.database  # type: ignore[attr-defined]
        read = database.read

        async def counted(fn: Any, what: str) -> Any:
            reads.append(what)
            return await read(fn, what)

        database.read = counted
        result = await app.run_cycle()
        assert result.orgs_failed == [PAYER]
        assert sorted((e.kind, e.rule, e.invoice_id, e.previous_status) for e in result.events) == [
            (EventKind.NOTICE, "moves", invoice_id, "PAID") for invoice_id in sorted((old, late))
        ]
        # The snapshot's reads: the outbox depth gauge, set once the cycle has
        # committed (runner), reads the outbox, not the settled copies.
        assert len([what for what in reads if not what.startswith("the outbox")]) == 1


class _Snapshots:
    """A snapshot repository for :func:`compare` alone: ``snapshots`` by organization,
    ``stored`` the invoices the database holds (organization -> id -> invoice);
    ``meanwhile`` runs while the first read waits (another organization's commit)."""

    def __init__(
        self,
        snapshots: dict[str, Snapshot],
        stored: dict[str, dict[str, Invoice]],
        meanwhile: Callable[[], None] = lambda: None,
    ) -> None:
        self.snapshots, self.stored, self.meanwhile = snapshots, stored, meanwhile
        self.reads: list[dict[str, list[str]]] = []

    def get(self, org_id: str) -> Snapshot:
        return self.snapshots.get(org_id, Snapshot(settles=FINAL_STATUSES))

    async def stored_copies(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        self.reads.append({org_id: list(ids) for org_id, ids in wanted.items()})
        if len(self.reads) == 1:
            self.meanwhile()
        held = self.stored
        return {
            o: {i: held[o][i] for i in ids if i in held.get(o, {})} for o, ids in wanted.items()
        }


def _settled(*invoices: Invoice) -> Snapshot:
    return Snapshot({}, {i.id: i.settled_key() for i in invoices}, FINAL_STATUSES)


@pytest.mark.parametrize("committed", ["before", "while it waits"])
async def test_compare_reads_the_store_once_unless_a_copy_is_committed_while_it_waits(
    committed: str,
):
    """ORG_A (linked to ORG_B, its payer) holds invoice 1 settled and no copy of invoice
    2, which its read lists for the first time; Atlas forgave both. The stored copy of 1
    (the diff) and ORG_B's of 2 (the news: PAID -> FORGIVEN) come from one read made
    before the diff. Only when ORG_B's copy is committed while that read waits is the
    store read again, for it alone."""
    paid, forgiven = inv(1, status="PAID"), inv(1, status="FORGIVEN")
    theirs, listed = inv(2, status="PAID", source=ORG_B), inv(2, status="FORGIVEN")
    snapshots = {ORG_A: _settled(paid)}
    if committed == "before":
        snapshots[ORG_B] = _settled(theirs)

    def commit() -> None:
        snapshots[ORG_B] = _settled(theirs)

    repo = _Snapshots(snapshots, {ORG_A: {paid.id: paid}, ORG_B: {theirs.id: theirs}}, commit)
    linked = Linked(frozenset({ORG_A, ORG_B}), {ORG_A: ORG_B}, FINAL_STATUSES)
    read = OrgRead(ORG_A, invoices=(forgiven, listed), listed=2)
    compared = await compare(read, snapshots[ORG_A], None, cast(Any, repo), linked, {ORG_B})
    if committed == "before":
        assert repo.reads == [{ORG_B: [theirs.id], ORG_A: [paid.id]}]
    else:
        assert repo.reads == [{ORG_A: [paid.id]}, {ORG_B: [theirs.id]}]
    assert compared.stored == {paid.id: paid}
    assert compared.shared.baseline == {theirs.id: theirs}
    assert compared.shared.mirror == {theirs.id: (ORG_B,)}
    assert compared.change is not None
    assert [(c.old, c.new) for c in compared.change.status_changed] == [(paid, forgiven)]
