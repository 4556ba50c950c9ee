"""Reading less, and reading once: the incremental listing (``fromDate`` from the oldest
invoice that can still change), pages reused when unchanged, a big organization's pages
requested together, and one Digest challenge per cycle; and holding less: invoices that
can no longer change kept as keys (settled), still watched.

The cycles run through the real App and AtlasClient against the simulator (or, for
``totalCount`` estimates the simulator never gets wrong, a small listing server here).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from invoice_watch.app import App
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.cycle import CycleResult
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.types import AlertEvent, EventKind, OrgRead, Snapshot
from tests.conftest import ORG_A, base_config, make_config
from tests.hand_atlas import HandAtlas, hand_config
from tests.hand_atlas import invoice as listed
from tests.loopback import LoopbackServer

ORG = "0123456789abcdef01234567"
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
    {"name": "status-moves", "type": "status_change", "notify": ["console"]},
]


def two_years(*, open_age: int = 14) -> Scenario:
    """24 monthly invoices: this month PENDING, the one ``open_age`` months old still
    CLOSED (unpaid, so it can change), every other one PAID (final)."""
    scenario = Scenario(now=NOW)
    scenario.add_org("Payer", id=ORG)
    for age in range(23, -1, -1):
        status = "PENDING" if age == 0 else "CLOSED" if age == open_age else "PAID"
        scenario.add_invoice(ORG, period=-age, status=status, amount_cents=1000_00, name=f"m{age}")
    return scenario


def app_config(
    sim: Simulator, tmp: Path, orgs: list[str] | None = None, rules: list[dict[str, Any]] = RULES
) -> Config:
    data = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
        },
        "organizations": [{"id": org} for org in orgs or [ORG]],
        "state": {"path": str(tmp / "state.db")},
        "notifiers": {"console": {"type": "console"}},
        "rules": rules,
    }
    return load(yaml.safe_dump(data), filename="incremental.yaml", env={}, base_dir=tmp)


class Silent:
    name = "console"

    async def send(self, events: Any, *, part: Any = None, recipients: Any = None) -> None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(two_years(), clock=FakeClock(NOW)) as simulator:
        yield simulator


def listing_queries(sim: Simulator) -> list[dict[str, list[str]]]:
    queries = [r.query for r in sim.requests if r.path.endswith("/invoices") and r.status == 200]
    sim.requests.clear()
    return queries


def events(result: CycleResult) -> list[tuple[EventKind, str, str | None]]:
    return sorted((e.kind, e.rule, e.invoice_id) for e in result.events)


def by_kind(result: CycleResult, kind: EventKind) -> list[AlertEvent]:
    return [e for e in result.events if e.kind == kind]


async def test_incremental_read_starts_at_the_oldest_open_invoice_and_sees_it_change(
    sim: Simulator, tmp_path: Path
):
    closed = sim.scenario.invoice("m14")
    async with App(
        app_config(sim, tmp_path), clock=FakeClock(NOW), notifiers={"console": Silent()}
    ) as app:
        await app.run_cycle()
        assert [q.get("fromDate") for q in listing_queries(sim)] == [None]  # a full listing

        quiet = await app.run_cycle()
        day_before = closed.start - timedelta(days=1)  # FROM_DATE_MARGIN
        assert [q["fromDate"] for q in listing_queries(sim)] == [[f"{day_before:%Y-%m-%d}"]]
        assert quiet.events == [] and quiet.changes == 0
        assert quiet.reads[ORG].listed == 15  # m14 .. m0, not the 9 older PAID ones

        sim.set_status(closed.id, "FAILED")
        changed = await app.run_cycle()
        assert events(changed) == [
            (EventKind.FIRING, "failed-charge", closed.id),
            (EventKind.NOTICE, "status-moves", closed.id),
        ]
        assert by_kind(changed, EventKind.NOTICE)[0].previous_status == "CLOSED"
        assert len(app.store.snapshot.get(ORG)) == 24


async def test_incremental_read_never_reports_old_final_invoices_as_gone(
    sim: Simulator, tmp_path: Path
):
    closed, pending = sim.scenario.invoice("m14"), sim.scenario.invoice("m0")
    async with App(
        app_config(sim, tmp_path), clock=FakeClock(NOW), notifiers={"console": Silent()}
    ) as app:
        await app.run_cycle()
        sim.set_status(closed.id, "PAID")  # now every invoice but this month's is final
        paid = await app.run_cycle()
        assert events(paid) == [(EventKind.NOTICE, "status-moves", closed.id)]
        listing_queries(sim)

        for _ in range(2):
            result = await app.run_cycle()
            day_before = pending.start - timedelta(days=1)
            assert [q["fromDate"] for q in listing_queries(sim)] == [[f"{day_before:%Y-%m-%d}"]]
            assert result.reads[ORG].listed == 1  # this month's
            assert result.events == [] and result.changes == 0
            assert len(app.store.snapshot.get(ORG)) == 24
            (stored,) = await app.store.snapshot.stored_invoices(ORG, [closed.id])
            assert stored.status == "PAID"


async def test_incremental_read_asks_a_day_early_so_an_exclusive_boundary_loses_nothing(
    tmp_path: Path,
):
    """A13-9: a server that reads ``fromDate`` as exclusive (Atlas documents "greater
    than or equal") would leave out the oldest open invoice, the one the window starts
    at: asked a day earlier, it lists it, and its alert neither resolves nor fires again.
    An invoice of the margin day that such a server leaves out is not "gone" either."""
    async with HandAtlas() as atlas:
        atlas.from_exclusive = True
        atlas.invoices[ORG_A] = [
            listed(1, ORG_A, "PAID", start="2026-10-01", end="2026-11-01"),
            listed(2, ORG_A, "PAID", start="2026-10-31", end="2026-11-01"),
            listed(3, ORG_A, "PENDING", 900_00),
        ]
        rules = [
            {"name": "over", "type": "pending_amount", "threshold": 500, "notify": ["console"]}
        ]
        config = hand_config(tmp_path, atlas.url, rules=rules, orgs=(ORG_A,))
        async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
            first = await app.run_cycle()
            assert events(first) == [(EventKind.FIRING, "over", f"{3:024x}")]
            for _ in range(2):
                again = await app.run_cycle()
                assert again.events == [] and again.changes == 0
                assert len(app.store.snapshot.get(ORG_A)) == 3
        assert atlas.asked == [(ORG_A, None), (ORG_A, "2026-10-31"), (ORG_A, "2026-10-31")]


async def test_incremental_read_of_a_prepaid_organization_lists_only_what_can_change(
    tmp_path: Path,
):
    """A13-10: an organization on a prepaid plan has every closed month PREPAID ("won't
    be charged", as final as FREE): its incremental reads start at this month's invoice,
    not two years back (before, every one of its reads was a full listing)."""
    scenario = Scenario(now=NOW)
    scenario.add_org("Prepaid", id=ORG)
    for age in range(23, -1, -1):
        status = "PENDING" if age == 0 else "PREPAID"
        scenario.add_invoice(ORG, period=-age, status=status, amount_cents=1000_00, name=f"m{age}")
    async with Simulator(scenario, clock=FakeClock(NOW)) as sim:
        config = app_config(sim, tmp_path)
        async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
            await app.run_cycle()
            listing_queries(sim)
            quiet = await app.run_cycle()
            assert [q["fromDate"] for q in listing_queries(sim)] == [["2026-10-31"]]
            assert quiet.reads[ORG].listed == 1 and quiet.events == []
            assert len(app.store.snapshot.get(ORG).settled) == 23


async def test_unknown_status_warning_names_the_rules_that_still_match_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A13-10: a status invoice-watch does not know is kept, and a status_change rule
    without ``to:`` tells the move to it: the warning says so, not "no rule can match
    it"."""
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = [listed(1, ORG_A, "PAID")]
        rules = [
            {"name": "moves", "type": "status_change", "notify": ["console"]},
            {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
        ]
        config = hand_config(tmp_path, atlas.url, rules=rules, orgs=(ORG_A,))
        async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
            await app.run_cycle()
            atlas.invoices[ORG_A] = [listed(1, ORG_A, "REFUNDED")]
            moved = await app.run_cycle()
    assert [(e.kind, e.rule, e.previous_status) for e in moved.events] == [
        (EventKind.NOTICE, "moves", "PAID")
    ]
    (warning,) = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert "'REFUNDED'" in warning and "no rule can match it" not in warning
    assert "only the status_change rule(s) moves (without `to:` or `from:`)" in warning


async def test_incremental_read_hands_back_the_stored_invoices_when_nothing_changed(
    sim: Simulator, tmp_path: Path
):
    async with App(
        app_config(sim, tmp_path), clock=FakeClock(NOW), notifiers={"console": Silent()}
    ) as app:
        await app.run_cycle()
        reads = record_reads(app)
        for _ in range(2):  # a page parsed anew, then a page known byte for byte
            await app.run_cycle()
            (read,) = reads
            reads.clear()
            stored = app.store.snapshot.get(ORG)
            assert read.listed == 15
            assert all(invoice is stored.live[invoice.id] for invoice in read.invoices)
            assert set(read.settled) <= set(stored.settled.values())

        sim.set_amount(sim.scenario.invoice("m0").id, 1234_00)
        result = await app.run_cycle()
        assert result.changes == 1
        pending = app.store.snapshot.get(ORG).live[sim.scenario.invoice("m0").id]
        assert pending.amount_billed_cents == 1234_00


async def test_settled_invoices_are_keys_and_a_change_to_one_is_noticed(
    sim: Simulator, tmp_path: Path
):
    """PAID invoices are kept in memory as keys only; one that Atlas lists changed (PAID
    -> FAILED) is read back from the state file and reported as a move from PAID, and
    resolves with the invoice as it is once it is PAID again."""
    paid = sim.scenario.invoice("m5")  # newer than m14 (CLOSED): within every listing
    async with App(
        app_config(sim, tmp_path), clock=FakeClock(NOW), notifiers={"console": Silent()}
    ) as app:
        await app.run_cycle()
        snapshot = app.store.snapshot.get(ORG)
        assert set(snapshot.live) == {sim.scenario.invoice(n).id for n in ("m14", "m0")}
        assert len(snapshot.settled) == 22 and paid.id in snapshot.settled

        sim.set_status(paid.id, "FAILED")
        failed = await app.run_cycle()
        assert events(failed) == [
            (EventKind.FIRING, "failed-charge", paid.id),
            (EventKind.NOTICE, "status-moves", paid.id),
        ]
        assert by_kind(failed, EventKind.NOTICE)[0].previous_status == "PAID"
        assert app.store.snapshot.get(ORG).live[paid.id].status == "FAILED"

        sim.set_status(paid.id, "PAID")
        again = await app.run_cycle()
        assert events(again) == [
            (EventKind.NOTICE, "status-moves", paid.id),
            (EventKind.RESOLVED, "failed-charge", paid.id),
        ]
        assert by_kind(again, EventKind.RESOLVED)[0].summary == f"Invoice {paid.id} is now PAID."
        assert paid.id in app.store.snapshot.get(ORG).settled
        assert (await app.run_cycle()).changes == 0


async def test_settled_invoice_no_longer_listed_is_gone_from_the_state_file(
    sim: Simulator, tmp_path: Path
):
    paid, old = sim.scenario.invoice("m5"), sim.scenario.invoice("m20")  # m20: before m14
    async with App(
        app_config(sim, tmp_path), clock=FakeClock(NOW), notifiers={"console": Silent()}
    ) as app:
        await app.run_cycle()
        sim.remove_invoice(paid.id)
        result = await app.run_cycle()
        assert result.changes == 1 and result.events == []
        assert paid.id not in app.store.snapshot.get(ORG)
        assert paid.id not in {i.id for i in await app.store.snapshot.stored_invoices(ORG)}
        assert old.id in app.store.snapshot.get(ORG)  # not listed by the incremental read: kept
        assert len(app.store.snapshot.get(ORG)) == 23


async def test_settled_follows_the_rules_a_rule_on_paid_sees_paid_invoices(
    sim: Simulator, tmp_path: Path
):
    """What is settled follows the rules: a reload that adds a rule on PAID invoices
    makes them live again (read from the state file), and the rule sees them."""
    config = app_config(sim, tmp_path)
    async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
        await app.run_cycle()
        assert len(app.store.snapshot.get(ORG).settled) == 22
        paid_rule = {"name": "paid", "type": "invoice_status", "statuses": ["PAID"]}
        watching = app_config(sim, tmp_path, rules=[*RULES, {**paid_rule, "notify": ["console"]}])
        assert await app.reload(watching)
        assert not app.store.snapshot.get(ORG).settled
        result = await app.run_cycle()
        assert len(by_kind(result, EventKind.FIRING)) == 22
        assert result.changes == 0


async def test_a_reload_that_watches_paid_invoices_again_parses_pages_it_had_kept(
    sim: Simulator, tmp_path: Path
):
    """A page whose body comes back byte for byte is not parsed again, but only when the
    snapshot holds its settled invoices as when it was parsed: after a reload that makes
    PAID invoices live, the page kept lists them as keys of invoices the snapshot no
    longer keeps settled (they went missing: 13 "gone", deleted from the state file)."""
    config = app_config(sim, tmp_path)
    async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
        for _ in range(3):  # full, then an incremental page parsed, then one kept
            await app.run_cycle()
        paid_rule = {"name": "paid", "type": "invoice_status", "statuses": ["PAID"]}
        watching = app_config(sim, tmp_path, rules=[*RULES, {**paid_rule, "notify": ["console"]}])
        assert await app.reload(watching)
        result = await app.run_cycle()
        assert result.changes == 0
        assert len(app.store.snapshot.get(ORG)) == 24
        assert len(by_kind(result, EventKind.FIRING)) == 22
        assert len(await app.store.snapshot.stored_invoices(ORG)) == 24


def record_reads(app: App) -> list[OrgRead]:
    """Every organization's read, as the client hands it to the cycle (the cycle's
    result keeps only their outcomes)."""
    reads: list[OrgRead] = []
    read_org = app.client.read_org

    async def recording(*args: Any, **kwargs: Any) -> OrgRead:
        read = await read_org(*args, **kwargs)
        reads.append(read)
        return read

    app.client.read_org = recording  # type: ignore[method-assign]
    return reads


async def test_steady_cycles_draw_one_digest_challenge_each_even_with_a_stale_nonce(
    tmp_path: Path,
):
    scenario = Scenario(now=NOW)
    orgs = [f"{n:024x}" for n in range(1, 9)]
    for org in orgs:
        scenario.add_org(f"Org {org[-1]}", id=org)
        scenario.add_invoice(org, period=0, status="PENDING", amount_cents=10_00)
    sim_clock = FakeClock(NOW)
    async with Simulator(scenario, clock=sim_clock, nonce_lifetime=300) as sim:
        config = app_config(sim, tmp_path, orgs)
        async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
            challenges = []
            for advance in (0, 0, 301, 0):  # the third cycle finds the nonce stale
                sim_clock.advance(advance)
                sim.requests.clear()
                await app.run_cycle()
                challenges.append(sum(r.challenge for r in sim.requests))
                assert sum(r.status == 200 for r in sim.requests) == len(orgs)
            assert challenges == [1, 0, 1, 0]


class _Counted:
    """A connection that counts the statements it is given (``execute`` and
    ``executemany`` calls, whatever their rows)."""

    def __init__(self, conn: Any, calls: list[str]) -> None:
        self._conn, self._calls = conn, calls

    def execute(self, sql: str, *args: Any) -> Any:
        self._calls.append(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        self._calls.append(sql)
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_steady_cycle_writes_its_read_times_in_one_statement_and_no_invoices(
    tmp_path: Path,
):
    """Nothing changed at 8 organizations: the cycle's last transaction writes their
    read times in one statement, not one (and two empty ones for their invoices' amount
    histories) per organization."""
    scenario = Scenario(now=NOW)
    orgs = [f"{n:024x}" for n in range(1, 9)]
    for org in orgs:
        scenario.add_org(f"Org {org[-1]}", id=org)
        scenario.add_invoice(org, period=0, status="PENDING", amount_cents=10_00)
    async with Simulator(scenario, clock=FakeClock(NOW)) as sim:
        config = app_config(sim, tmp_path, orgs)
        async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
            await app.run_cycle()
            database: Any = app.store.database  # type: ignore[attr-defined]
            commit = database.commit
            statements: list[str] = []

            async def counted(fn: Any) -> Any:
                return await commit(lambda conn: fn(_Counted(conn, statements)))

            database.commit = counted
            result = await app.run_cycle()
            assert result.changes == 0 and not result.orgs_failed
            assert len([sql for sql in statements if "INTO orgs" in sql]) == 1
            assert not [sql for sql in statements if "invoices" in sql or "amount_history" in sql]
            assert app.store.snapshot.org_state(orgs[-1]).last_success is not None


# -- a big organization: pages requested together, totalCount only an estimate -----------

BIG_ORG = "abcdefabcdefabcdefabcdef"


class Listing(LoopbackServer):
    """A listing server for one org: ``count`` invoices, 500 a page, and whatever
    ``totalCount`` the test wants it to claim. Pages 2 and 3 each wait until the other
    has been asked for, so a client that pages one after the other times out."""

    def __init__(self, count: int, claimed: int | None) -> None:
        self.count, self.claimed = count, claimed
        self.pages: list[int] = []
        self.arrived = {2: asyncio.Event(), 3: asyncio.Event()}
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        page = int(request.query["pageNum"])
        self.pages.append(page)
        if page in self.arrived and self.claimed and self.claimed > 1000:
            self.arrived[page].set()
            await asyncio.wait_for(self.arrived[5 - page].wait(), 10)
        numbers = range((page - 1) * 500, min(page * 500, self.count))
        body: dict[str, Any] = {"results": [invoice(n) for n in numbers], "links": []}
        if self.claimed is not None and request.query.get("includeCount") == "true":
            body["totalCount"] = self.claimed
        return web.json_response(body)


def invoice(n: int) -> dict[str, Any]:
    start = date(2000, 1, 1) + timedelta(days=n)
    return {
        "id": f"{n:024x}",
        "orgId": BIG_ORG,
        "statusName": "PAID",
        "startDate": f"{start}T00:00:00Z",
        "endDate": f"{start + timedelta(days=1)}T00:00:00Z",
        "amountBilledCents": n,
        "amountPaidCents": n,
    }


@pytest.mark.parametrize(
    ("claimed", "pages"),
    [
        (1600, [1, 2, 3, 4]),  # right: pages 2-4 together
        (1200, [1, 2, 3, 4]),  # short: pages 2-3 together, then page 4 on its own
        (4000, [1, 2, 3, 4, 5, 6, 7, 8, 9]),  # long: pages 5-9 come back empty
    ],
)
async def test_read_org_of_a_big_org_asks_for_pages_together(
    tmp_path: Path, claimed: int, pages: list[int]
):
    async with Listing(1600, claimed) as server:
        atlas = base_config()["atlas"] | {"base_url": server.url}
        config = make_config(tmp_path, base_config(atlas=atlas))
        async with AtlasClient(config.atlas) as client:
            invoices = (await client.read_org(BIG_ORG)).invoices
    assert sorted(server.pages) == pages
    assert sorted(i.id for i in invoices) == [f"{n:024x}" for n in range(1600)]


async def test_read_org_without_a_count_pages_one_after_the_other(tmp_path: Path):
    async with Listing(1000, None) as server:
        atlas = base_config()["atlas"] | {"base_url": server.url}
        config = make_config(tmp_path, base_config(atlas=atlas))
        async with AtlasClient(config.atlas) as client:
            invoices = (await client.read_org(BIG_ORG)).invoices
    assert server.pages == [1, 2, 3]  # 500, 500, then the short (empty) page
    assert len(invoices) == 1000


async def test_settled_invoices_are_not_kept_as_objects_in_cached_pages(tmp_path: Path):
    """A first listing's pages hold its PAID invoices as objects. They are not reused as
    they are (that would keep them in memory, and have each cycle read them back from
    the state file as if changed): the same pages are parsed again against the
    snapshot that keeps them settled, which lists them as its keys."""
    async with Listing(1200, 1200) as server:
        atlas = base_config()["atlas"] | {"base_url": server.url}
        config = make_config(tmp_path, base_config(atlas=atlas))
        async with AtlasClient(config.atlas) as client:
            empty = Snapshot(settles=FINAL_STATUSES)
            first = await client.read_org(BIG_ORG, None, empty)
            assert len(first.invoices) == 1200 and not first.settled
            settled = empty.updated(first.invoices, [])
            assert len(settled.settled) == 1200
            for _ in range(2):  # parsed again, then the same pages reused
                again = await client.read_org(BIG_ORG, None, settled)
                assert again.invoices == ()
                assert again.settled == sorted(settled.settled.values())
                assert again.listed == 1200
