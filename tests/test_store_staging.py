"""The staging area (invoice_watch.store.sql.staging), on SQLite and on PostgreSQL: a
long listing's new settled invoices wait for their organization's commit as rows of a
temporary table, which the commit moves into the snapshot in its one transaction;
nothing of them is visible before, and rows the connection lost fail that organization's
part, never half of it."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from invoice_watch.atlas.client import AtlasClient
from invoice_watch.atlas.parse import Page
from invoice_watch.errors import StateError, UnstorableError
from invoice_watch.store import OrgWrite, Store
from invoice_watch.types import Invoice
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
    added), one that can still change, or a linked organization's nested in its payer's."""
    held = paid(1)
    await store.commit_orgs(
        store.begin_cycle(),
        NOW,
        [OrgWrite(ORG_A, ok=True, upserts=[held], invoice_count=1)],
        [],
        {},
    )
    stages = store.staging.stages({ORG_A: store.snapshot.get(ORG_A)}, {ORG_B: ORG_A})
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
