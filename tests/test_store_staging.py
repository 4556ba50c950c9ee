"""The staging area (invoice_watch.store.sql.staging), on SQLite and on PostgreSQL: a
long listing's new settled invoices wait for their organization's commit as rows of a
temporary table, which the commit moves into the snapshot in its one transaction;
nothing of them is visible before, and rows the connection lost fail that organization's
part, never half of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.atlas.parse import Page
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.errors import StateError, UnstorableError
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.store import OrgWrite, Store
from invoice_watch.store.postgres.url import StateUrl
from invoice_watch.types import Invoice, Snapshot
from tests.conftest import NOW, ORG_A, ORG_B, Backend, OpenState, inv


@pytest.fixture
def backend(every_backend: Backend) -> Backend:
    """Every test here runs on each backend (SQLite, PostgreSQL)."""
    return every_backend


def paid(n: int, org: str = ORG_A) -> Invoice:
    start = NOW - timedelta(days=30 * (n + 2))
    return inv(
        n, org=org, status="PAID", cents=100_00 + n, start=start, end=start + timedelta(days=30)
    )


async def stage_pages(store: Store, org: str, *pages: list[Invoice]) -> tuple[Page, ...]:
    """Each page through ``org``'s stage, as a listing's pages after the first go."""
    stage = store.staging.stages({org: store.snapshot.get(org)}, {})(org)
    assert stage is not None
    staged = []
    for invoices in pages:
        async with stage.turn():
            staged.append(await stage.page(Page(len(invoices), None, tuple(invoices))))
    return tuple(staged)


async def test_staging_staged_invoices_reach_the_snapshot_with_the_organizations_commit(
    store: Store, open_state: OpenState
):
    stage = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {})(ORG_A)
    assert stage is not None
    pending = inv(99, status="PENDING", cents=50_00)
    pages = [[paid(n) for n in range(3)], [paid(n) for n in range(3, 5)] + [pending]]
    kept: list[Invoice] = []
    for invoices in pages:
        async with stage.turn():
            page = await stage.page(Page(len(invoices), None, tuple(invoices)))
        kept.extend(page.invoices)
    # What can still change stays an invoice; the settled ones are staged, as keys.
    assert kept == [pending]
    staged = stage.done(())
    assert staged is not None and staged.rows == 5
    assert staged.keys == {paid(n).id: paid(n).settled_key() for n in range(5)}
    # Nothing is visible before the organization's commit.
    assert await store.snapshot.stored_invoices(ORG_A) == []

    write = OrgWrite(ORG_A, ok=True, upserts=[pending], staged=staged, invoice_count=6)
    await store.commit_orgs(store.begin_cycle(), NOW, [write], [], {})
    expected = sorted([pending, *(paid(n) for n in range(5))], key=lambda i: i.id)
    assert sorted(await store.snapshot.stored_invoices(ORG_A), key=lambda i: i.id) == expected
    snapshot = store.snapshot.get(ORG_A)
    assert snapshot.live == {pending.id: pending}
    assert snapshot.settled == {paid(n).id: paid(n).settled_key() for n in range(5)}

    # Kept as the state holds them: a start loads the same keys.
    await store.close()
    assert (await open_state()).snapshot.get(ORG_A).settled == snapshot.settled


async def test_staging_a_linked_organization_and_what_the_snapshot_holds_are_not_staged(
    store: Store,
):
    """An organization known to be linked to a payer is not staged (its payer's listing
    compares with its invoices); nor is an invoice its snapshot holds (compared, not
    added), one that can still change, or a configured linked organization's nested in
    its payer's (its own read compares with it)."""
    held = paid(1)
    await store.commit_orgs(
        store.begin_cycle(),
        NOW,
        [OrgWrite(ORG_A, ok=True, upserts=[held], invoice_count=1)],
        [],
        {},
    )
    known = {org: store.snapshot.get(org) for org in (ORG_A, ORG_B)}  # both configured
    stages = store.staging.stages(known, {ORG_B: ORG_A})
    assert stages(ORG_B) is None
    stage = stages(ORG_A)
    assert stage is not None
    nested = paid(7, ORG_B)
    changed = replace(held, amount_paid_cents=1)
    listed = (changed, paid(2), nested, inv(3, status="FAILED", cents=10_00))
    async with stage.turn():
        page = await stage.page(Page(len(listed), None, listed))
    assert page.staged == (paid(2).id,)
    assert page.invoices == (changed, nested, listed[3])


@pytest.mark.parametrize(
    "loss", ["DELETE FROM staged_invoices", "DROP TABLE staged_invoices"], ids=["rows", "table"]
)
async def test_staging_rows_the_connection_lost_fail_the_organizations_part_whole(
    store: Store, loss: str
):
    """A move that finds fewer rows than were staged (a connection opened again since:
    its temporary table went with the old one) refuses the organization's part, as a
    value the database cannot take (UnstorableError: its read counts as failed, the
    others commit): nothing of it is written, the next cycle reads it again. Also when
    the new connection has no staging area at all (``table``: that failed the whole
    cycle, as an error of the state's database: "no such table" / "relation does not
    exist")."""
    stage = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {})(ORG_A)
    assert stage is not None
    async with stage.turn():
        await stage.page(Page(2, None, (paid(1), paid(2))))
    staged = stage.done(())
    assert staged is not None

    def lose(conn: object) -> None:
        conn.execute(loss)  # type: ignore[attr-defined]

    await store.database.scratch(lose, "lose the staged rows")  # type: ignore[attr-defined]
    write = OrgWrite(ORG_A, ok=True, upserts=[inv(3, cents=1)], staged=staged)
    with pytest.raises(UnstorableError, match="no longer there"):
        await store.commit_orgs(store.begin_cycle(), NOW, [write], [], {})
    assert await store.snapshot.stored_invoices(ORG_A) == []
    assert len(store.snapshot.get(ORG_A)) == 0


async def test_staging_what_a_cycle_left_is_gone_by_the_next_cycles_first_staging(store: Store):
    """Rows a cycle staged and never moved (its listing failed after some pages) are
    deleted at the next cycle's first staging: its move finds exactly its own."""
    await stage_pages(store, ORG_A, [paid(1), paid(2)])  # never committed
    stage = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {})(ORG_A)
    assert stage is not None
    async with stage.turn():
        await stage.page(Page(1, None, (paid(3),)))
    staged = stage.done(())
    assert staged is not None and staged.rows == 1
    await store.commit_orgs(
        store.begin_cycle(), NOW, [OrgWrite(ORG_A, ok=True, staged=staged)], [], {}
    )
    assert [i.id for i in await store.snapshot.stored_invoices(ORG_A)] == [paid(3).id]


async def test_staging_an_invoice_a_firing_alert_is_about_is_not_staged(store: Store):
    """An invoice new to the snapshot that a firing alert is about (its resolution reads
    the invoice, whatever its status) stays an invoice."""
    from tests.test_store import firing

    await store.commit_orgs(store.begin_cycle(), NOW, [], [firing()], {"failed": ["console"]})
    assert paid(1).id == inv(1).id
    stage = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {})(ORG_A)
    assert stage is not None
    async with stage.turn():
        page = await stage.page(Page(2, None, (paid(1), paid(2))))
    assert page.invoices == (paid(1),) and page.staged == (paid(2).id,)


async def test_staging_an_error_of_the_staging_area_fails_that_organizations_read_only(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The staging area's database refusing a page (a full disk under SQLite's temporary
    files, which need not be the state file's) fails the read of the organization whose
    listing it was, as any failed read: the others are read and handed back (it raised a
    StateError out of read_orgs, which failed the whole cycle)."""
    from tests.test_atlas_containment import Listings, client_config, item

    def full(*args: object) -> None:
        raise StateError("could not stage the invoices listed: database or disk is full")

    monkeypatch.setattr(store.database, "scratch", full)  # type: ignore[attr-defined]
    results = [item(n, ORG_A, status="PAID") for n in range(500)]
    async with Listings() as listings:
        # A full page 1 promising a second one: page 2 goes through the stage.
        body = json.dumps({"results": results, "totalCount": 600}).encode()
        listings.answers[ORG_A] = (200, body)
        stages = store.staging.stages({org: store.snapshot.get(org) for org in (ORG_A, ORG_B)}, {})
        async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
            reads = {r.org_id: r async for r in client.read_orgs([ORG_A, ORG_B], stage=stages)}
    assert reads[ORG_B].ok
    assert not reads[ORG_A].ok
    assert "disk is full" in (reads[ORG_A].error or "")


async def test_staging_space_of_what_cycles_left_is_given_back(store: Store, backend: Backend):
    """Rows staged cycle after cycle and never moved (a big organization's listing that
    fails halfway each cycle) take the space of one cycle's, not of every row ever
    staged: on PostgreSQL the leftovers' DELETE left them dead in the session's
    temporary table, which autovacuum never visits (it grew by about 8 MB in 12
    cycles of 3,000 rows)."""
    sizes: list[int] = []

    def size(conn: object) -> None:
        if getattr(conn, "dialect", "sqlite") == "postgresql":
            [(total,)] = conn.execute(  # type: ignore[attr-defined]
                "SELECT pg_total_relation_size('staged_invoices')"
            ).fetchall()
        else:
            [(total,)] = conn.execute(  # type: ignore[attr-defined]
                "SELECT count(*) FROM staged_invoices"
            ).fetchall()
        sizes.append(int(total))

    for _ in range(8):
        await stage_pages(store, ORG_A, [paid(n) for n in range(500)])
        await store.database.scratch(size, "measure the staging area")  # type: ignore[attr-defined]
    # From the second cycle on, the same: one cycle's rows.
    assert max(sizes[1:]) <= sizes[1] * 1.5, sizes


async def test_staging_a_payers_nested_invoices_of_an_organization_not_configured_are_staged(
    store: Store,
):
    """A payer's listing nests its linked organizations' invoices (``linkedInvoices``):
    those of an organization that is not configured (no other read lists or compares
    them) are staged as its own are, and reach the snapshot with its commit as the rows
    the unstaged path writes (``org_id`` theirs, ``source_org_id`` the payer's); the
    payer is then known to pay for them. They were held as invoices until the commit:
    a payer of 70,000 entries, half of them nested, peaked at 99 MB."""
    stage = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {})(ORG_A)
    assert stage is not None
    nested = [replace(paid(n, ORG_B), source_org_id=ORG_A) for n in range(10, 13)]
    own = [paid(n) for n in range(3)]
    listed = (own[0], nested[0], own[1], nested[1], own[2], nested[2])
    async with stage.turn():
        page = await stage.page(Page(3, None, listed))
    assert page.invoices == ()
    assert page.staged == tuple(i.id for i in listed)
    staged = stage.done(())
    assert staged is not None and staged.rows == 6 and staged.linked == {ORG_B}
    write = OrgWrite(ORG_A, ok=True, staged=staged, invoice_count=6)
    await store.commit_orgs(store.begin_cycle(), NOW, [write], [], {})
    assert sorted(await store.snapshot.stored_invoices(ORG_A), key=lambda i: i.id) == sorted(
        listed, key=lambda i: i.id
    )
    assert store.snapshot.get(ORG_A).settled == {i.id: i.settled_key() for i in listed}
    assert store.snapshot.payers() == {ORG_B: ORG_A}


async def test_staging_a_nested_invoice_held_alerted_or_with_a_history_is_not_staged(
    store: Store,
):
    """A nested invoice of an organization not configured is staged only when its own
    would be: not one the payer's snapshot holds (compared), nor one a firing alert is
    about (its resolution reads it), nor one with an amount history (an upsert of a
    settled invoice ends it); nor, whatever it is, one of a configured organization."""
    from tests.test_store import firing

    org_c = "c" * 24

    def nested(n: int, org: str = ORG_B) -> Invoice:
        return replace(paid(n, org), source_org_id=ORG_A)

    held = nested(20)
    # A PENDING copy with an observation: another payer listed it before (the linked
    # organization changed payer), its amount history is kept.
    elsewhere = replace(nested(22, ORG_B), status="PENDING", source_org_id=org_c)
    writes = [
        OrgWrite(ORG_A, ok=True, upserts=[held], invoice_count=1),
        OrgWrite(org_c, ok=True, upserts=[elsewhere], observations=[(elsewhere.id, 1)]),
    ]
    alerted = nested(21)
    alert = firing()
    alert = replace(alert, state=replace(alert.state, org_id=ORG_B, invoice_id=alerted.id))
    await store.commit_orgs(store.begin_cycle(), NOW, writes, [alert], {"failed": ["console"]})
    assert store.snapshot.history(elsewhere.id)
    known = {org: store.snapshot.get(org) for org in (ORG_A, org_c)}
    stage = store.staging.stages(known, {})(ORG_A)
    assert stage is not None
    fresh = nested(23)
    listed = (
        replace(held, amount_paid_cents=1),
        alerted,
        nested(22),
        nested(24, org_c),  # a configured organization's
        fresh,
    )
    async with stage.turn():
        page = await stage.page(Page(len(listed), None, listed))
    assert page.staged == (fresh.id,)
    assert page.invoices == listed[:4]


# A payer and the organization it pays for (cross-org billing), listed through the
# simulator: the payer's listing nests the other's invoice of each period.
PAYER = "5f8a1c2e9b3d4a6f7e0c0016"
LINKED = "6a7b8c9d0e1f2a3b4c5d6e7f"
PERIODS = 520  # the payer's listing: two pages (500 invoices a page), nested ones beside


def billing(now: datetime) -> Scenario:
    scenario = Scenario(now=now)
    scenario.add_org("Payer", id=PAYER)
    scenario.add_org("Linked", id=LINKED, linked_to="Payer")
    for period in range(-PERIODS, 1):
        status = "PENDING" if period == 0 else "PAID"
        scenario.add_invoice(PAYER, period=period, status=status, amount_cents=900_00 + period)
        if period == -3:  # two of the payer's invoices nest the linked one of the period
            scenario.add_invoice(PAYER, period=period, status="PAID", amount_cents=1_00)
        if period == -1:
            status = "FAILED"  # on the second page, nested: an alert's subject
        scenario.add_invoice(LINKED, period=period, status=status, amount_cents=300_00 - period)
    return scenario


def app_config(sim: Simulator, tmp: Path, where: Path | StateUrl, orgs: tuple[str, ...]) -> Config:
    data = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 0,
        },
        "organizations": [{"id": org_id} for org_id in orgs],
        "state": {"url": where.url} if isinstance(where, StateUrl) else {"path": str(where)},
        "notifiers": {"console": {"type": "console"}},
        "rules": [
            {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
            {"name": "moves", "type": "status_change", "notify": ["console"]},
        ],
    }
    return load(yaml.safe_dump(data), filename="billing.yaml", env={}, base_dir=tmp)


@dataclass
class Run:
    staged: list[Invoice]  # what the stages put into the staging area
    events: list[list[tuple[str, str, str | None, str]]]  # each cycle's
    rows: list[tuple[str, ...]]  # every row of `invoices`, as text
    snapshots: dict[str, Snapshot]
    payers: dict[str, str]


async def two_cycles(
    tmp: Path,
    where: Path | StateUrl,
    orgs: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    *,
    staging: bool = True,
) -> Run:
    """A fresh state's first cycle, then a second one after an invoice moved (the
    nested FAILED one paid) and a new one came: what was staged, the events, and the
    end state (``staging=False``: every listing unstaged, as one page is)."""
    from tests.test_convergence import Recorder

    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    clock = FakeClock(now)
    run = Run([], [], [], {}, {})
    async with Simulator(billing(now), clock=clock) as sim:
        config = app_config(sim, tmp, where, orgs)
        async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
            if app.leadership is not None:  # PostgreSQL: the lease, to write
                assert await app.leadership.step()
            area = app.store.staging
            if staging:
                put = area.put  # type: ignore[attr-defined]

                async def spy(listing: int, invoices: list[Invoice]) -> None:
                    run.staged.extend(invoices)
                    await put(listing, invoices)

                monkeypatch.setattr(area, "put", spy)
            else:
                monkeypatch.setattr(area, "stages", lambda known, payers: lambda org: None)
            for cycle in range(2):
                if cycle:
                    failed = next(i for i in sim.scenario.invoices if i.status == "FAILED")
                    sim.set_status(failed.id, "PAID")
                    clock.advance(timedelta(minutes=15))
                result = await app.run_cycle()
                assert not result.orgs_failed
                run.events.append(
                    sorted((e.kind.value, e.rule, e.invoice_id, e.org_id) for e in result.events)
                )

            def rows(conn: Any) -> list[tuple[str, ...]]:
                found = conn.execute("SELECT * FROM invoices").fetchall()
                return sorted(tuple(str(value) for value in row) for row in found)

            run.rows = await app.store.database.read(rows, "the invoices")  # type: ignore[attr-defined]
            run.snapshots = {org: app.store.snapshot.get(org) for org in (PAYER, LINKED)}
            run.payers = dict(app.store.snapshot.payers())
    return run


async def test_staging_a_payers_long_listing_stages_the_nested_invoices_of_one_not_configured(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Only the payer configured: its listing's second page stages the new settled
    invoices nested in it (its linked organization's) as it stages its own, and the
    state ends as the unstaged path leaves it (every row of ``invoices``, whose
    ``source_org_id`` is the payer's, the snapshot in memory, who pays for whom, the
    events), the FAILED one nested included (not staged: an alert's subject)."""
    run = await two_cycles(tmp_path / "a", backend(tmp_path / "a.db"), (PAYER,), monkeypatch)
    nested = [i for i in run.staged if i.org_id == LINKED]
    assert nested, "the nested invoices of the second page were held, not staged"
    assert all(i.source_org_id == PAYER and i.status == "PAID" for i in nested)
    # The second page's PAID ones (not its FAILED and PENDING ones), each once.
    assert len(nested) == len({i.id for i in nested}) == PERIODS + 2 - 500 - 3
    unstaged = await two_cycles(
        tmp_path / "b", tmp_path / "b.db", (PAYER,), monkeypatch, staging=False
    )
    assert run.events == unstaged.events
    assert ("FIRING", "failed-charge") in {e[:2] for e in run.events[0]}
    assert run.rows == unstaged.rows
    assert len(run.rows) == 2 * (PERIODS + 1) + 1
    assert run.snapshots == unstaged.snapshots
    assert run.payers == unstaged.payers == {LINKED: PAYER}


async def test_staging_a_configured_linked_organizations_invoices_nested_are_not_staged(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The linked organization configured too: its invoices nested in the payer's
    listing are never staged (its own read compares with them), and the alerts are as
    the unstaged path gives (one invoice, one alert subject: one FIRING, one NOTICE,
    one RESOLVED, whichever listing shows it)."""
    orgs = (PAYER, LINKED)
    run = await two_cycles(tmp_path / "a", backend(tmp_path / "a.db"), orgs, monkeypatch)
    assert run.staged, "the second pages stage their own invoices"
    assert not [i for i in run.staged if i.source_org_id == PAYER and i.org_id == LINKED]
    unstaged = await two_cycles(tmp_path / "b", tmp_path / "b.db", orgs, monkeypatch, staging=False)
    assert run.events == unstaged.events
    kinds = [(kind, rule) for kind, rule, _, _ in (*run.events[0], *run.events[1])]
    assert kinds.count(("FIRING", "failed-charge")) == 1
    assert kinds.count(("RESOLVED", "failed-charge")) == 1
    assert run.rows == unstaged.rows
    assert run.snapshots == unstaged.snapshots


async def test_staging_an_invoice_listed_again_alike_is_dropped_as_staged_already(store: Store):
    """A linked invoice is nested under each of its payer's invoices of its period: listed
    again alike (the same settled key), it is not held as an invoice until the commit
    (the simulator's payer of 70,000 entries held about two thirds of its nested ones
    so); listed again otherwise (the listing moved while it was paged), it stays one,
    which the commit writes after the staged row."""
    stage = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {})(ORG_A)
    assert stage is not None
    nested = replace(paid(10, ORG_B), source_org_id=ORG_A)
    moved = replace(paid(11, ORG_B), source_org_id=ORG_A)
    pages = [(nested, moved, nested), (nested, replace(moved, amount_paid_cents=1))]
    listed = []
    for invoices in pages:
        async with stage.turn():
            listed.append(await stage.page(Page(len(invoices), None, invoices)))
    assert listed[0].invoices == () and listed[0].staged == (nested.id, moved.id, nested.id)
    assert listed[1].invoices == (pages[1][1],) and listed[1].staged == (nested.id,)
    staged = stage.done({moved.id})
    assert staged is not None and staged.rows == 2 and set(staged.keys) == {nested.id}
    write = OrgWrite(ORG_A, ok=True, upserts=[pages[1][1]], staged=staged, invoice_count=2)
    await store.commit_orgs(store.begin_cycle(), NOW, [write], [], {})
    stored = sorted(await store.snapshot.stored_invoices(ORG_A), key=lambda i: i.id)
    assert stored == [nested, pages[1][1]]
