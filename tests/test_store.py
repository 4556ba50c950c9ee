"""What every state backend does (the Protocols of invoice_watch.store), through the
`store` and `open_state` fixtures, on SQLite and on PostgreSQL: a cycle's transactions
and held messages, grouping, the outbox's marks, the snapshot's linked and settled
invoices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta, timezone
from typing import Any

import pytest

from invoice_watch.alerts import Reason, Transition
from invoice_watch.store import AlertState, OrgWrite, Store, grouping
from invoice_watch.types import AlertEvent, EventKind, Part, Severity
from tests.conftest import NOW, ORG_A, ORG_B, Backend, inv


@pytest.fixture
def backend(every_backend: Backend) -> Backend:
    """Every test here runs on each backend (SQLite, PostgreSQL)."""
    return every_backend


def event(key: str = "k") -> AlertEvent:
    return AlertEvent(
        kind=EventKind.FIRING,
        key=key,
        rule="failed",
        rule_type="invoice_status",
        severity=Severity.CRITICAL,
        org_id=ORG_A,
        org_name="Production",
        billing_url="https://example.invalid/billing",
        summary="Invoice is FAILED.",
        at=NOW,
    )


def firing(key: str = "k") -> Transition:
    state = AlertState(key, "failed", ORG_A, ORG_A, inv(1).id, True, NOW, NOW, None, event(key))
    return Transition(state, event(key), Reason.NEW)


async def commit(
    store: Store,
    *orgs: OrgWrite,
    transitions: Sequence[Transition] = (),
    routes: Mapping[str, list[str]] | None = None,
) -> None:
    """One whole cycle in one transaction: its organizations, alerts and messages (the
    rule "failed" goes to "console")."""
    failed = sum(1 for o in orgs if not o.ok)
    await store.finish_cycle(
        store.begin_cycle(),
        NOW,
        NOW,
        list(orgs),
        list(transitions),
        routes or {"failed": ["console"]},
        10,
        orgs_ok=len(orgs) - failed,
        orgs_failed=failed,
    )


ROUTES = {"failed": ["slack", "email"]}


async def test_store_commit_then_reopen_restores_everything(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    await commit(
        store,
        OrgWrite(
            ORG_A,
            True,
            upserts=[inv(1), inv(2, status="FAILED")],
            observations=[(inv(1).id, 100_00)],
        ),
        OrgWrite(ORG_B, False, error="HTTP 503", failing_since=NOW),
        transitions=[firing()],
    )
    await store.close()

    again = await open_state(path)
    assert set(again.snapshot.get(ORG_A)) == {inv(1).id, inv(2).id}
    assert again.snapshot.get(ORG_A).live[inv(2).id].status == "FAILED"
    assert again.snapshot.history(inv(1).id) == [(NOW, 100_00)]
    assert list(again.alerts.firing()) == ["k"]
    assert again.alerts.firing()["k"].last_event == event()
    assert again.snapshot.org_state(ORG_B).failing_since == NOW
    assert again.snapshot.org_state(ORG_A).last_success == NOW
    due = await again.outbox.due(NOW)
    assert [d.events for d in due] == [[event()]]


def test_store_writes_each_timestamp_as_its_own_text():
    """A timestamp is stored as it came, its offset included (equal instants at two
    offsets are two texts), however many a cycle writes (more than it remembers)."""
    from invoice_watch.store.sql.snapshot import _ISO, _invoice_row

    plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
    assert plus_two == NOW
    row = _invoice_row(inv(1, start=NOW, end=plus_two))
    assert row[4:6] == ("2026-11-15T12:00:00+00:00", "2026-11-15T14:00:00+02:00")
    times = [NOW + timedelta(seconds=n) for n in range(5000)]
    for _ in range(2):  # the first ones forgotten by the second round
        for n, at in enumerate(times):
            assert _invoice_row(inv(n, start=at, end=plus_two))[4:6] == (
                at.isoformat(),
                "2026-11-15T14:00:00+02:00",
            )
    assert len(_ISO) <= 4096


async def test_store_mark_retry_defers_the_notifiers_other_rows(store):
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("a"), firing("b")], {"failed": ["slack"]})
    await store.commit_orgs(number, NOW, [], [firing("c")], {"failed": ["mail"]})
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    first, *_ = await store.outbox.due(NOW)
    await store.outbox.mark_retry(first.id, NOW + timedelta(seconds=30), "HTTP 503")
    due = await store.outbox.due(NOW)
    assert [d.notifier for d in due] == ["mail"]
    later = await store.outbox.due(NOW + timedelta(seconds=30))
    assert [d.notifier for d in later] == ["slack", "slack", "mail"]
    assert later[0].attempts == 1


async def test_store_a_message_released_while_its_notifier_waits_waits_behind_it(store):
    """Rows of one notifier go in order: a message released (a later cycle's RESOLVED)
    while the notifier's earlier message waits for its retry is due after it, never
    before (else the RESOLVED could reach the receiver before its FIRING)."""
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("a")], {"failed": ["slack"]})
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    [first] = await store.outbox.due(NOW)
    retry_at = NOW + timedelta(minutes=1)
    await store.outbox.mark_retry(first.id, retry_at, "HTTP 503")

    later = NOW + timedelta(seconds=10)
    number = store.begin_cycle()
    await store.commit_orgs(number, later, [], [firing("b")], {"failed": ["slack", "mail"]})
    await store.finish_cycle(number, later, later, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    assert [d.notifier for d in await store.outbox.due(later)] == ["mail"]
    assert await store.outbox.next_attempt_at() == later  # mail's, then slack's at retry_at
    due = await store.outbox.due(retry_at)
    assert [(d.notifier, d.id > first.id) for d in due] == [
        ("slack", False),
        ("slack", True),
        ("mail", True),
    ]


async def test_store_a_retry_owed_to_some_recipients_keeps_them_and_holds_up_no_other_row(
    store,
):
    """An attempt that reached some of the notifier's recipients: the outbox gives back
    whom the message is still owed to (``Delivery.owed``), and a retry that does not
    ``hold`` leaves the notifier's other messages due; a failed mark keeps them too."""
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("a"), firing("b")], {"failed": ["email"]})
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    assert await store.outbox.waiting_since() == [NOW]
    first, second = await store.outbox.due(NOW)
    assert first.owed is None
    later = NOW + timedelta(minutes=5)
    await store.outbox.mark_retry(first.id, later, "452 mailbox full", ["b@x.test"], hold=False)
    assert [d.id for d in await store.outbox.due(NOW)] == [second.id]
    [again] = await store.outbox.due(later, exclude=[second.id])
    assert again.owed == ("b@x.test",) and again.attempts == 1
    assert again.last_error is not None and again.last_error.endswith("452 mailbox full")
    await store.outbox.mark_failed(first.id, later, "gave up", again.owed)
    await store.outbox.mark_sent(second.id, later)
    assert await store.outbox.waiting_since() == []
    [failed] = await store.outbox.messages(("failed",))
    assert failed.last_error is not None and "b@x.test" in failed.last_error


def test_alert_event_json_round_trip_keeps_every_field():
    from dataclasses import fields, replace

    from invoice_watch.types import BreakdownLine

    full = replace(
        event(),
        invoice_id="1" * 24,
        invoice_status="PENDING",
        amount_cents=123,
        period_start=NOW.date(),
        period_end=NOW.date(),
        firing_since=NOW,
        details=(("Threshold", "$1.00"),),
        breakdown=(BreakdownLine("sku", "M30", 100, 5),),
        previous_status="CLOSED",
    )
    data = full.to_json()
    assert set(data) == {f.name for f in fields(AlertEvent)}  # a new field is not forgotten
    assert AlertEvent.from_json(data) == full


async def test_store_held_messages_wait_for_the_end_of_their_cycle(store):
    number = store.begin_cycle()
    await store.commit_orgs(
        number, NOW, [OrgWrite(ORG_A, True, upserts=[inv(1)])], [firing("a")], ROUTES
    )
    # Committed: the snapshot and the alert are there, the messages are not due yet.
    assert set(store.snapshot.get(ORG_A)) == {inv(1).id}
    assert list(store.alerts.firing()) == ["a"]
    assert await store.outbox.due(NOW) == []
    assert (await store.outbox.counts()) == {"held": 2}

    await store.finish_cycle(
        number,
        NOW,
        NOW,
        [OrgWrite(ORG_B, True)],
        [firing("b")],
        ROUTES,
        5,
        orgs_ok=2,
        orgs_failed=0,
    )
    due = await store.outbox.due(NOW)
    assert [(d.notifier, [e.key for e in d.events]) for d in due] == [
        ("slack", ["a"]),
        ("email", ["a"]),
        ("slack", ["b"]),
        ("email", ["b"]),
    ]
    assert store.snapshot.org_state(ORG_B).last_success == NOW
    assert await store.cycles.last() == (NOW, 2, 0)


async def test_store_more_than_group_over_held_messages_go_as_one_grouped_message(store):
    number = store.begin_cycle()
    for key in "abc":  # one transaction per organization's part
        await store.commit_orgs(number, NOW, [], [firing(key)], {"failed": ["slack"]})
    await store.commit_orgs(number, NOW, [], [firing("d")], ROUTES)
    await store.finish_cycle(number, NOW, NOW, [], [], ROUTES, 3, orgs_ok=1, orgs_failed=0)
    due = await store.outbox.due(NOW)
    # slack got 4 > 3: one message, in the order they were held; email got 1.
    by_notifier = {d.notifier: [e.key for e in d.events] for d in due}
    assert len(due) == 2
    assert by_notifier == {"slack": ["a", "b", "c", "d"], "email": ["d"]}
    grouped = next(d for d in due if d.notifier == "slack")
    assert grouped.events == [event(k) for k in "abcd"]
    rows = await store.outbox.messages(("pending",))
    assert sorted(r.summary for r in rows) == [
        "4 alerts (grouped)",
        "FIRING failed Production",
    ]


async def test_store_a_cycle_cut_short_keeps_its_parts_and_releases_their_messages(
    tmp_path, open_state
):
    """A crash between two organizations' transactions: what was committed is whole
    (snapshot, alert and its messages), and its held messages are released when the
    state file is next opened, grouped as the cycle would have grouped them."""
    path = tmp_path / "state.db"
    store = await open_state(path)
    number = store.begin_cycle()
    await store.commit_orgs(
        number,
        NOW,
        [OrgWrite(ORG_A, True, upserts=[inv(1)])],
        [firing("a"), firing("b")],
        {"failed": ["slack"]},
    )
    await store.close()  # the cycle never ends

    again = await open_state(path)
    assert set(again.snapshot.get(ORG_A)) == {inv(1).id}
    assert set(again.alerts.firing()) == {"a", "b"}
    assert await again.outbox.due(NOW) == []
    assert await again.release_held(1, NOW) == 2
    due = await again.outbox.due(NOW)
    assert [[e.key for e in d.events] for d in due] == [["a", "b"]]
    assert await again.release_held(1, NOW) == 0
    # The next cycle's number is above the one its rows were held by.
    assert again.begin_cycle() > number


async def test_store_keeps_an_invoice_once_per_organization_that_lists_it(tmp_path, open_state):
    """A linked invoice is in its own organization's listing and in its payer's: each
    keeps it, across a restart, and one forgetting it leaves the other's (and its
    amount history) alone."""
    path = tmp_path / "state.db"
    linked = inv(1, status="PENDING")
    store = await open_state(path)
    await commit(
        store,
        OrgWrite(ORG_A, True, upserts=[linked], observations=[(linked.id, 100)]),
        OrgWrite(ORG_B, True, upserts=[replace(linked, source_org_id=ORG_B)]),
    )
    await store.close()
    store = await open_state(path)
    assert linked.id in store.snapshot.get(ORG_A) and linked.id in store.snapshot.get(ORG_B)
    await commit(store, OrgWrite(ORG_B, True, gone=[linked.id]))
    assert not store.snapshot.get(ORG_B) and linked.id in store.snapshot.get(ORG_A)
    assert store.snapshot.history(linked.id) == [(NOW, 100)]
    await store.close()
    store = await open_state(path)
    assert not store.snapshot.get(ORG_B) and linked.id in store.snapshot.get(ORG_A)
    assert store.snapshot.history(linked.id) == [(NOW, 100)]


async def test_store_a_grouped_message_is_retried_sent_and_counted_as_one(store):
    number = store.begin_cycle()
    for key in "abc":
        await store.commit_orgs(number, NOW, [], [firing(key)], {"failed": ["slack"]})
    await store.finish_cycle(number, NOW, NOW, [], [], ROUTES, 2, orgs_ok=1, orgs_failed=0)
    assert await store.outbox.counts() == {"pending": 1}
    (message,) = await store.outbox.due(NOW)
    assert [e.key for e in message.events] == ["a", "b", "c"]

    later = NOW + timedelta(minutes=1)
    await store.outbox.mark_retry(message.id, later, "HTTP 503")
    assert await store.outbox.due(NOW) == []  # the whole group waits
    (again,) = await store.outbox.due(later)
    assert again.id == message.id and again.attempts == 1 and len(again.events) == 3

    await store.outbox.mark_sent(message.id, later)
    assert await store.outbox.counts() == {"sent": 1}
    assert await store.outbox.next_attempt_at() is None
    (row,) = await store.outbox.messages(("sent",))
    assert row.summary == "3 alerts (grouped)"


async def test_store_keeps_settled_invoices_as_keys_in_memory_and_whole_in_the_file(
    tmp_path, open_state
):
    """PAID (final, and no rule watches it) is kept in memory as a key; the file keeps
    the invoice, read back whole on demand, and live again when a rule comes to watch
    PAID."""
    path = tmp_path / "state.db"
    paid, pending = inv(1, status="PAID"), inv(2, status="PENDING")
    store = await open_state(path)
    await commit(store, OrgWrite(ORG_A, True, upserts=[paid, pending]))
    await store.close()

    copy = await open_state(path, copy=True)  # --dry-run's
    store = await open_state(path)
    for snapshot in (store.snapshot.get(ORG_A), copy.snapshot.get(ORG_A)):
        assert snapshot.live == {pending.id: pending}
        assert snapshot.settled == {paid.id: paid.settled_key()}
    assert store.snapshot.invoice_count() == 2
    assert await store.snapshot.stored_invoices(ORG_A, [paid.id]) == [paid]
    assert sorted(await store.snapshot.stored_invoices(), key=lambda i: i.id) == [paid, pending]

    await store.snapshot.settle(frozenset({"FORGIVEN", "FREE"}))  # a rule watches PAID now
    assert store.snapshot.get(ORG_A).live == {paid.id: paid, pending.id: pending}
    assert not store.snapshot.get(ORG_A).settled
    moved = replace(pending, status="FREE")
    await commit(store, OrgWrite(ORG_A, True, upserts=[moved]))
    assert store.snapshot.get(ORG_A).live == {paid.id: paid}
    assert store.snapshot.get(ORG_A).settled == {moved.id: moved.settled_key()}
    await copy.close()


async def test_store_reads_each_settled_key_from_the_file_as_the_invoice_makes_it(
    tmp_path, open_state
):
    """A start reads the settled invoices' keys from their rows without building the
    invoices: each is the invoice's own key, every field counted (a listing that shows
    the invoice unchanged finds it held; one field changed, not)."""
    path = tmp_path / "state.db"
    stamped = replace(
        inv(3, status="PAID", credits_cents=7, sales_tax_cents=3, subtotal_cents=90_00),
        amount_paid_cents=100_00,
        starting_balance_cents=-5,
        created=NOW - timedelta(days=40),
        updated=NOW,
    )
    linked = inv(4, org=ORG_B, status="PAID", source=ORG_A)  # a payer's listing shows it
    store = await open_state(path)
    await commit(store, OrgWrite(ORG_A, True, upserts=[stamped, linked]))
    await store.close()

    store = await open_state(path)
    snapshot = store.snapshot.get(ORG_A)
    assert snapshot.settled == {stamped.id: stamped.settled_key(), linked.id: linked.settled_key()}
    assert snapshot.held(stamped.listed()) == stamped.settled_key()
    assert snapshot.held(replace(stamped, updated=NOW + timedelta(1)).listed()) is None
    assert store.snapshot.payers() == {ORG_B: ORG_A}
    await store.close()


async def test_store_a_group_larger_than_a_message_goes_as_parts_in_order(store):
    """120 messages of one cycle for one notifier: three grouped messages of 40, each a
    message of its own (sent, retried and marked on its own), in order, each knowing
    which part it is; a second notifier's one message and the next cycle's group are
    numbered apart."""
    number = store.begin_cycle()
    keys = [f"k{n:03d}" for n in range(120)]
    for start in range(0, 120, 30):  # four organizations' transactions
        part = [firing(k) for k in keys[start : start + 30]]
        await store.commit_orgs(number, NOW, [], part, {"failed": ["slack"]})
    await store.commit_orgs(number, NOW, [], [firing("other")], {"failed": ["email"]})
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=1, orgs_failed=0)
    again = store.begin_cycle()
    await store.commit_orgs(again, NOW, [], [firing(k) for k in "abc"], {"failed": ["slack"]})
    await store.finish_cycle(again, NOW, NOW, [], [], {}, 2, orgs_ok=1, orgs_failed=0)

    due = await store.outbox.due(NOW)
    slack = [d for d in due if d.notifier == "slack"]
    assert [[e.key for e in d.events] for d in slack[:3]] == [
        keys[:40],
        keys[40:80],
        keys[80:],
    ]
    assert [(d.part.number, d.part.count) for d in slack[:3] if d.part] == [
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    assert [e.key for e in slack[3].events] == ["a", "b", "c"] and slack[3].part is None
    assert [d.part for d in due if d.notifier == "email"] == [None]
    rows = await store.outbox.messages(("pending",))
    assert sorted(r.summary for r in rows if r.notifier == "slack") == [
        "3 alerts (grouped)",
        "40 alerts (grouped, part 1 of 3)",
        "40 alerts (grouped, part 2 of 3)",
        "40 alerts (grouped, part 3 of 3)",
    ]
    # Part 2 failing leaves parts 1 and 3 alone: each is recorded on its own.
    await store.outbox.mark_sent(slack[0].id, NOW)
    await store.outbox.mark_retry(slack[1].id, NOW + timedelta(minutes=1), "HTTP 503")
    later = await store.outbox.due(NOW + timedelta(minutes=1))
    assert [d.part for d in later if d.notifier == "slack"][:2] == [
        slack[1].part,
        slack[2].part,
    ]


@pytest.mark.parametrize(("count", "sizes"), [(41, [21, 20]), (81, [27, 27, 27]), (120, [40] * 3)])
def test_message_parts_are_even_and_never_larger_than_a_message(count, sizes):
    from invoice_watch.store import message_parts

    assert message_parts(count, 5) == sizes
    assert message_parts(5, 5) is None  # not more than group_over: one by one
    assert message_parts(40, 5) == [40]


@pytest.mark.parametrize(
    "error",
    ["ratelimited\ud800", "busy \udcff\udcfe", "nul\x00 esc\x1b[2J bidi\u202e", "x" * 5000],
    ids=["surrogate", "surrogateescape", "controls", "long"],
)
async def test_store_outbox_marks_store_any_error_text(error: str, store):
    """Issue 12 §14: a receiver's error text with a lone surrogate could not be stored, so
    the "failed" mark failed and the message was sent again for ever. Whatever the text,
    the retry and failed marks are written (escaped, bounded) and read back."""
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("a"), firing("b")], {"failed": ["x"]})
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    first, second = await store.outbox.due(NOW)
    await store.outbox.mark_retry(first.id, NOW, error)
    await store.outbox.mark_failed(second.id, NOW, error)
    await store.outbox.postpone(first.id, NOW, error)
    rows = await store.outbox.messages(("pending", "failed"))
    for row in rows:
        assert row.last_error is not None and len(row.last_error) <= 1000
        row.last_error.encode("utf-8")
        assert not any(c in row.last_error for c in "\x00\x1b\u202e")


async def test_store_postpone_counts_no_attempt_and_make_due_brings_rows_back(store):
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("a"), firing("b")], {"failed": ["gone"]})
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    first, _ = await store.outbox.due(NOW)
    await store.outbox.postpone(first.id, NOW + timedelta(minutes=1), "notifier 'gone' is missing")
    assert await store.outbox.due(NOW) == []  # the notifier's rows wait together
    assert await store.outbox.pending_by_notifier() == {"gone": 2}
    assert await store.outbox.make_due({"gone"}, NOW) == 2
    due = await store.outbox.due(NOW)
    assert [d.attempts for d in due] == [0, 0]
    assert due[0].last_error == "notifier 'gone' is missing"


async def test_store_unnotified_names_the_episodes_whose_firing_was_not_sent(store):
    # What an Alertmanager re-post leaves out: an alert whose FIRING waits unsent (its
    # receiver failing, quiet hours, a silence); not one sent, nor one owed to some of
    # its recipients only (sent to the others).
    def fired(key: str) -> Transition:
        transition = firing(key)
        assert transition.event is not None
        return replace(transition, event=replace(transition.event, firing_since=NOW))

    number = store.begin_cycle()
    await store.commit_orgs(
        number, NOW, [], [fired("a"), fired("b"), fired("c")], {"failed": ["am"]}
    )
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
    assert await store.outbox.unnotified("am") == {("a", NOW), ("b", NOW), ("c", NOW)}
    sent, owed, waiting = await store.outbox.due(NOW)
    await store.outbox.mark_sent(sent.id, NOW)
    await store.outbox.mark_retry(owed.id, NOW, "HTTP 503", ["x@example.com"], hold=False)
    await store.outbox.postpone(waiting.id, NOW + timedelta(hours=8), "quiet hours until 08:00")
    assert await store.outbox.unnotified("am") == {("c", NOW)}
    assert await store.outbox.unnotified("other") == set()


async def test_store_a_cycle_reports_the_messages_its_outbox_releases(store):
    """What a cycle says it sends (``run --once``, a dry run: grouping.cycle_messages)
    is what its outbox releases: the same notifiers (the alert's, else the rule's route),
    events, grouping and parts (issue 15, item 8: grouping decided in one place)."""
    transitions = [firing(f"k{n:02d}") for n in range(45)]
    routed = replace(transitions[0], state=replace(transitions[0].state, notifiers=("email",)))
    transitions[0] = routed
    routes = {"failed": ["slack"]}
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], transitions[:20], routes)
    await store.commit_orgs(number, NOW, [], transitions[20:], routes)
    await store.finish_cycle(number, NOW, NOW, [], [], routes, 5, orgs_ok=1, orgs_failed=0)
    released = sorted(
        (d.notifier, [e.key for e in d.events], d.part) for d in await store.outbox.due(NOW)
    )
    reported = sorted(
        (name, [e.key for e in events], part)
        for name, events, part in grouping.cycle_messages(transitions, routes, 5)
    )
    assert reported == released
    assert [(name, len(keys), part) for name, keys, part in released] == [
        ("email", 1, None),
        ("slack", 22, Part(1, 2)),
        ("slack", 22, Part(2, 2)),
    ]


class _QueriesOnly:
    """A database through which only queries pass: a statement other than a SELECT, or
    a transaction, fails the test."""

    def __init__(self, db: Any) -> None:
        self._db, self.name, self.kind = db, db.name, db.kind
        self.statements: list[str] = []

    async def read(self, fn: Any, what: str) -> Any:
        return await self._db.read(lambda conn: fn(_SelectOnly(conn, self.statements)), what)

    async def write(self, fn: Any, what: str) -> Any:
        raise AssertionError(f"a query wrote: {what}")

    async def commit(self, fn: Any) -> Any:
        raise AssertionError("a query committed a transaction")

    async def scratch(self, fn: Any, what: str) -> Any:
        raise AssertionError(f"a query staged rows: {what}")

    async def close(self) -> None:
        raise AssertionError("a query closed the database")


class _SelectOnly:
    def __init__(self, conn: Any, seen: list[str]) -> None:
        self._conn, self._seen = conn, seen
        self.dialect = getattr(conn, "dialect", "sqlite")

    def execute(self, sql: str, parameters: Any = ()) -> Any:
        assert sql.lstrip().upper().startswith("SELECT"), sql
        self._seen.append(sql)
        return self._conn.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> Any:
        raise AssertionError(f"a query wrote: {sql}")


async def test_store_the_outbox_queries_only_read(store):
    """The outbox's queries (delivery's, the health check's, the operator's: SqlOutboxReads)
    change nothing: run on a database that lets only SELECTs through, every one answers
    as the outbox does, over held, pending, grouped and sent messages."""
    from invoice_watch.store.sql.outbox_reads import SqlOutboxReads

    await commit(store, transitions=[firing(f"k{n}") for n in range(12)], routes=ROUTES)
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("held")], ROUTES)
    (first, *_) = await store.outbox.due(NOW)
    await store.outbox.mark_sent(first.id, NOW)
    outbox = store.outbox
    database = _QueriesOnly(outbox._db)
    reads = SqlOutboxReads(database)

    assert [d.id for d in await reads.due(NOW)] == [d.id for d in await outbox.due(NOW)]
    assert await reads.waiting_since() == await outbox.waiting_since()
    assert await reads.unnotified("slack") == await outbox.unnotified("slack")
    assert await reads.next_attempt_at() == await outbox.next_attempt_at()
    assert await reads.pending_by_notifier() == await outbox.pending_by_notifier()
    assert await reads.counts() == await outbox.counts() == {"held": 2, "pending": 1, "sent": 1}
    states = ("held", "pending", "sent")
    assert await reads.messages(states) == await outbox.messages(states)
    assert database.statements  # they went through it
    public = {name for name in vars(SqlOutboxReads) if not name.startswith("_")}
    assert public == {"due", "waiting_since", "unnotified", "next_attempt_at",
                      "pending_by_notifier", "counts", "messages"}  # fmt: skip
    await store.finish_cycle(number, NOW, NOW, [], [], {}, 5, orgs_ok=0, orgs_failed=0)
