"""The line items the state keeps (store.UsageRepository, issue 19), on SQLite and on
PostgreSQL: replaced per invoice, two billing periods kept, the fetch time read back
after a restart, a failed fetch keeping what is held."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from invoice_watch.types import LineItem
from tests.conftest import NOW, ORG_A, ORG_B, Backend, OpenState

P1 = "5f1e00000000000000000001"


@pytest.fixture
def backend(every_backend: Backend) -> Backend:
    """Every test here runs on each backend (SQLite, PostgreSQL)."""
    return every_backend


def day_items(start: date, days: int, cents: int = 100) -> list[LineItem]:
    return [
        LineItem("Web", "ATLAS_AWS_INSTANCE_M10", "c0", cents, P1, start + timedelta(days=n))
        for n in range(days)
    ]


async def test_usage_line_items_are_kept_per_period_and_read_back_after_a_restart(
    open_state: OpenState,
) -> None:
    store = await open_state()
    usage = store.usage
    assert usage.read_state(ORG_A) is None and usage.project_totals(ORG_A) == {}
    assert await usage.periods(ORG_A) == []
    await usage.record(
        ORG_A,
        "inv-oct",
        date(2026, 10, 1),
        day_items(date(2026, 10, 1), 31),
        "search",
        NOW,
        current=False,
    )
    await usage.record(
        ORG_A, "inv-nov", date(2026, 11, 1), day_items(date(2026, 11, 1), 5), "search", NOW
    )
    # a newer fetch of the same invoice replaces its line items
    later = NOW + timedelta(hours=6)
    await usage.record(
        ORG_A, "inv-nov", date(2026, 11, 1), day_items(date(2026, 11, 1), 6, 200), "csv", later
    )
    periods = await usage.periods(ORG_A)
    assert [(p.invoice_id, p.period_start, len(p.items)) for p in periods] == [
        ("inv-nov", "2026-11-01", 6),
        ("inv-oct", "2026-10-01", 31),
    ]
    assert periods[0].items[0].usage_date == date(2026, 11, 1)
    assert usage.project_totals(ORG_A) == {(P1, "Web"): 1200}
    await store.close()

    again = await open_state()
    read = again.usage.read_state(ORG_A)
    assert read is not None
    assert (read.fetched_at, read.attempted_at, read.invoice_id, read.source) == (
        later,
        later,
        "inv-nov",
        "csv",
    )
    assert again.usage.project_totals(ORG_A) == {(P1, "Web"): 1200}
    assert again.usage.read_state(ORG_B) is None


async def test_usage_keeps_two_periods_and_a_failure_keeps_what_is_held(
    open_state: OpenState,
) -> None:
    store = await open_state()
    usage = store.usage
    for month in (9, 10, 11):
        start = date(2026, month, 1)
        await usage.record(ORG_A, f"inv-{month}", start, day_items(start, 3), "search", NOW)
    assert [p.invoice_id for p in await usage.periods(ORG_A, 5)] == ["inv-11", "inv-10"]
    failed_at = NOW + timedelta(hours=1)
    await usage.record_failure(ORG_A, failed_at, "HTTP 500 from Atlas")
    await usage.record_failure(ORG_B, failed_at, "HTTP 500 from Atlas")
    read = usage.read_state(ORG_A)
    assert read is not None and read.fetched_at == NOW and read.attempted_at == failed_at
    assert read.last_error == "HTTP 500 from Atlas"
    assert len((await usage.periods(ORG_A))[0].items) == 3
    await store.close()
    again = await open_state()
    b = again.usage.read_state(ORG_B)
    assert b is not None and b.fetched_at is None and b.attempted_at == failed_at
    a = again.usage.read_state(ORG_A)
    assert a is not None and a.fetched_at == NOW and a.last_error == "HTTP 500 from Atlas"


async def test_usage_refuses_an_amount_whose_sums_could_overflow_and_opens_a_state_holding_one(
    open_state: OpenState,
) -> None:
    """Two line items of an int64's largest amount once made SUM(amount_cents) overflow
    when the state was opened (SQLite: "integer overflow"), a StateError for every
    command: such an item is refused now, and a state that holds one still opens (its
    sums leave it out)."""
    from invoice_watch.atlas.bounds import INT64_MAX
    from invoice_watch.store.sql.usage import MAX_ITEM_CENTS

    store = await open_state()
    huge = day_items(date(2026, 11, 1), 2, INT64_MAX)
    with pytest.raises(ValueError, match="more than USD"):
        await store.usage.record(ORG_A, "inv-nov", date(2026, 11, 1), huge, "search", NOW)
    assert store.usage.read_state(ORG_A) is None
    await store.usage.record(
        ORG_A, "inv-nov", date(2026, 11, 1), day_items(date(2026, 11, 1), 3, 100), "search", NOW
    )

    def legacy(conn: Any) -> None:  # what a state written before the bound may hold
        conn.execute(
            "UPDATE line_items SET amount_cents=? WHERE org_id=? AND usage_date<>?",
            (INT64_MAX, ORG_A, "2026-11-01"),
        )

    from invoice_watch.store.unit_of_work import SqlStore

    assert isinstance(store, SqlStore)
    await store.database.write(legacy, "a state written before the bound")
    await store.close()
    again = await open_state()
    assert again.usage.project_totals(ORG_A) == {(P1, "Web"): 100}
    assert MAX_ITEM_CENTS * 160_000 < INT64_MAX


async def test_usage_a_project_renamed_mid_period_is_one_project_of_its_latest_name(
    open_state: OpenState,
) -> None:
    """Month to date per project is keyed by the project's id, named as its latest day
    names it (a rename once split it in two), before and after a restart."""
    store = await open_state()
    items = [
        LineItem("Old name" if n < 3 else "New name", "M10", "c0", 100, P1,
                 date(2026, 11, 1) + timedelta(days=n))
        for n in range(5)
    ]  # fmt: skip
    await store.usage.record(ORG_A, "inv-nov", date(2026, 11, 1), items, "csv", NOW)
    assert store.usage.project_totals(ORG_A) == {(P1, "New name"): 500}
    await store.close()
    again = await open_state()
    assert again.usage.project_totals(ORG_A) == {(P1, "New name"): 500}


async def test_usage_a_reissued_invoice_of_the_period_replaces_the_old_copy(
    open_state: OpenState,
) -> None:
    """A pending invoice re-issued in its period (a new id, the same start): its line
    items replace the old copy's (both were kept: the days doubled and last month's
    period fell out of the two kept)."""
    store = await open_state()
    usage = store.usage
    oct_items = day_items(date(2026, 10, 1), 31)
    await usage.record(ORG_A, "inv-oct", date(2026, 10, 1), oct_items, "search", NOW, current=False)
    nov = day_items(date(2026, 11, 1), 5)
    await usage.record(ORG_A, "inv-nov", date(2026, 11, 1), nov, "search", NOW)
    await usage.record(ORG_A, "inv-nov-2", date(2026, 11, 1), nov, "search", NOW)
    periods = await usage.periods(ORG_A)
    assert [(p.invoice_id, len(p.items)) for p in periods] == [("inv-nov-2", 5), ("inv-oct", 31)]
    assert usage.project_totals(ORG_A) == {(P1, "Web"): 500}
