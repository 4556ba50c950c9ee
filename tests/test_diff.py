from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.diff import diff, settled_to_load
from invoice_watch.types import OrgRead, Snapshot
from tests.conftest import ORG_A, PERIOD_START, inv


def test_diff_identical_listing_is_empty():
    old = {i.id: i for i in [inv(1), inv(2, status="PAID")]}
    result = diff(old, list(old.values()))
    assert result.empty
    assert result.changed == [] and result.gone == []


def test_diff_reports_added_status_amounts_and_gone():
    old = {i.id: i for i in [inv(1), inv(2, status="CLOSED"), inv(3, status="PAID")]}
    new = [inv(1, cents=150_00), inv(2, status="FAILED"), inv(4)]
    result = diff(old, new)
    assert [i.id for i in result.added] == [inv(4).id]
    assert [(c.old.status, c.new.status) for c in result.status_changed] == [("CLOSED", "FAILED")]
    assert [c.fields for c in result.amounts_changed] == [{"amountBilledCents": (100_00, 150_00)}]
    assert [i.id for i in result.gone] == [inv(3).id]
    assert {i.id for i in result.changed} == {inv(1).id, inv(2).id, inv(4).id}


def test_diff_status_and_amount_change_together():
    old = {inv(1).id: inv(1, status="PENDING", cents=10)}
    result = diff(old, [inv(1, status="CLOSED", cents=20, amount_paid_cents=5)])
    assert len(result.status_changed) == 1
    assert result.amounts_changed[0].fields == {
        "amountBilledCents": (10, 20),
        "amountPaidCents": (0, 5),
    }


def test_diff_incremental_listing_does_not_make_old_invoices_gone():
    old_invoice = inv(1, status="PAID", start=datetime(2025, 1, 1, tzinfo=UTC))
    recent = inv(2, status="PAID", start=datetime(2026, 10, 1, tzinfo=UTC))
    old = {old_invoice.id: old_invoice, recent.id: recent}
    result = diff(old, [], listed_from=date(2026, 9, 1))
    assert [i.id for i in result.gone] == [recent.id]


def test_settled_to_load_names_the_settled_invoices_listed_changed_or_no_longer_listed():
    """A listing that shows every settled invoice unchanged needs nothing from the state
    file; one changed, or missing within the listing's window, is read from it."""
    early = PERIOD_START - timedelta(days=90)
    paid = [inv(1, status="PAID"), inv(2, status="PAID"), inv(3, status="PAID", start=early)]
    snapshot = Snapshot(settles=FINAL_STATUSES).updated([*paid, inv(4)], [])
    keys = {i.id: i.settled_key() for i in paid}

    def read(*listed: str, changed: tuple[str, ...] = ()) -> OrgRead:
        changes = tuple(inv(int(i, 16), status="FAILED") for i in changed)
        return OrgRead(ORG_A, (inv(4), *changes), sorted({keys[i] for i in listed}))

    one, two, three = (i.id for i in paid)
    assert settled_to_load(snapshot, read(one, two, three)) == []
    assert settled_to_load(snapshot, read(one, three, changed=(two,))) == [two]
    assert settled_to_load(snapshot, read(one, two)) == [three]
    # an incremental listing from PERIOD_START does not show `three`: not gone
    assert settled_to_load(snapshot, read(one, two), listed_from=PERIOD_START.date()) == []
    assert settled_to_load(snapshot, read(two), listed_from=PERIOD_START.date()) == [one]


def test_settled_to_load_by_count_names_what_a_scan_of_the_snapshot_names():
    """A steady read is found whole by counting its keys against the snapshot's count of
    the window (no scan of the history): the same ids as the scan, for every subset of
    settled invoices listed, changed or missing, two invoices sharing a key included."""
    import itertools

    from invoice_watch.types import day_number, first_key_of

    early = PERIOD_START - timedelta(days=90)
    paid = [inv(n, status="PAID", start=early if n < 3 else PERIOD_START) for n in range(1, 6)]
    settled = {i.id: i.settled_key() for i in paid}
    settled[paid[4].id] = settled[paid[3].id]  # a fingerprint shared by two invoices
    snapshot = Snapshot({}, settled, FINAL_STATUSES)

    def scanned(read: OrgRead, lowest: int) -> list[str]:
        changed = [i.id for i in read.invoices if i.id in settled]
        return changed + [
            i
            for i, key in settled.items()
            if key >= lowest and key not in read.settled and i not in changed
        ]

    for listed_from in (None, PERIOD_START.date()):
        lowest = first_key_of(day_number(listed_from)) if listed_from else -1
        for fates in itertools.product(("listed", "changed", "missing"), repeat=len(paid)):
            keys = sorted(
                {settled[i.id] for i, f in zip(paid, fates, strict=True) if f == "listed"}
            )
            changes = tuple(
                inv(n + 1, status="FAILED") for n, f in enumerate(fates) if f == "changed"
            )
            read = OrgRead(ORG_A, changes, keys)
            assert settled_to_load(snapshot, read, listed_from=listed_from) == scanned(
                read, lowest
            ), (listed_from, fates)


def test_a_snapshot_keeps_its_generation_while_its_settled_invoices_stay_the_same():
    """A page kept from the last listing is reused against a snapshot of the same
    generation only (atlas.paging): a live invoice's change keeps it (the pages that do
    not list that invoice need no new parse); a settled one's change, or a snapshot
    loaded again, is another."""
    snapshot = Snapshot(settles=FINAL_STATUSES).updated([inv(1, status="PAID"), inv(2)], [])
    pending_changed = snapshot.updated([inv(2, cents=5)], [])
    assert pending_changed.generation == snapshot.generation
    assert pending_changed.settled_since(-1) == 1
    assert snapshot.updated([inv(3, status="PAID")], []).generation != snapshot.generation
    assert snapshot.updated([], [inv(1).id]).generation != snapshot.generation
    again = Snapshot(dict(snapshot.live), dict(snapshot.settled), FINAL_STATUSES)
    assert again.generation != snapshot.generation and again == snapshot


@pytest.mark.parametrize("day", [0, 1, 738_000, 738_001, 3_652_058])
def test_first_key_of_a_day_orders_settled_keys_as_their_days(day):
    """settled_to_load checks the window with one int comparison: a settled key is at
    least first_key_of(day) exactly when the day it holds is at least ``day``."""
    from invoice_watch.types import _FINGERPRINT_BITS, _FINGERPRINT_MASK, first_key_of, settled_day

    for key_day in (day - 1, day, day + 1):
        if key_day < 0:
            continue
        for fingerprint in (0, 1, _FINGERPRINT_MASK):
            key = (key_day << _FINGERPRINT_BITS) | fingerprint
            assert (key >= first_key_of(day)) == (settled_day(key) >= day)


def test_a_settled_key_of_this_era_fits_in_two_int_digits():
    """The snapshot keeps one int per settled invoice (100,000 of them at the memory
    target): for a period starting before 2500 it is under 2**60, two of CPython's
    30-bit digits (32 bytes; 42 fingerprint bits made it three digits, 48 bytes)."""
    import sys

    paid = inv(1, status="PAID", start=datetime(2499, 12, 1, tzinfo=UTC))
    key = paid.settled_key()
    assert key.bit_length() <= 60
    assert sys.getsizeof(key) == sys.getsizeof(2**59)
