"""Property-based tests (hypothesis) of the pure stages: diff, rules and the alert
lifecycle, over arbitrary sequences of listings and failed reads.

Properties:
- the diff of two listings, applied to the old one, gives the new one (and keeps what
  an incremental listing did not cover);
- a condition that keeps holding never fires twice (no duplicate FIRING);
- an alert firing in an organization that was read is backed by a condition that holds
  now, so every FIRING is followed by RESOLVED once its condition ends;
- a cycle is deterministic and replaying it after its commit changes nothing;
- an invoice listed by two configured organizations (a linked one, in its own listing
  and its payer's) is one alert subject: one NOTICE per move and one amount observation
  per change, whichever listing shows it first, in whatever order reads end and
  whichever of them fail.

The cycle here is ``cycle.Cycle`` without I/O: each organization through ``step_org``
and ``CyclePlan.org`` (diff, amount history, evaluate, plan), then
``CyclePlan.resolved``; the transitions applied as the store does. The snapshot is the
store's: PAID invoices settled (keys only), their stored versions read when a listing
changes them or no longer shows them, as the client and ``cycle.Cycle`` do.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from invoice_watch.alerts import Transition
from invoice_watch.config import Config, load
from invoice_watch.diff import diff, settled_to_load
from invoice_watch.linked import Shared
from invoice_watch.plan import CyclePlan, listing_change, step_org
from invoice_watch.rules import settled_statuses
from invoice_watch.store import AlertState, OrgState, OrgWrite
from invoice_watch.types import EventKind, Invoice, OrgRead, Snapshot
from tests.conftest import NOW, ORG_A, ORG_B, PERIOD_END, PERIOD_START

ORG_LINKED = "cccccccccccccccccccccccc"  # billed through ORG_A (a linked invoice)
STATUSES = ("PENDING", "PENDING", "PENDING", "FAILED", "PAID", "CLOSED")  # mostly pending
AMOUNTS = (0, 1000_00, 4999_99, 5000_00, 5000_01, 7500_00, 20000_00)
# invoice number -> (its own org, the configured org whose listing shows it)
INVOICES = {1: (ORG_A, ORG_A), 2: (ORG_A, ORG_A), 3: (ORG_LINKED, ORG_A), 4: (ORG_B, ORG_B)}
STEPS = (
    timedelta(minutes=1),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(days=1),
)

CONFIG_YAML = f"""
atlas:
  auth: {{public_key: pub, private_key: secret}}
organizations: [{{id: {ORG_A}}}, {{id: {ORG_B}}}]
state: {{path: /nonexistent/state.db}}
notifiers: {{console: {{type: console}}}}
rules:
  - {{name: failed, type: invoice_status, notify: [console]}}
  - {{name: over, type: pending_amount, threshold: 5000, notify: [console]}}
  - {{name: jump, type: amount_increase, threshold: 1000, percent: 50, window: 1d,
     notify: [console]}}
  - {{name: forecast, type: forecast, budget: 15000, min_elapsed: 3d, notify: [console]}}
  - {{name: unreadable, type: poll_failure, after: 1h, notify: [console]}}
  - {{name: moves, type: status_change, notify: [console]}}
"""
CONFIG: Config = load(CONFIG_YAML, filename="properties.yaml", env={})


def invoice(number: int, status: str, cents: int, start: datetime = PERIOD_START) -> Invoice:
    org, source = INVOICES[number]
    return Invoice(
        id=f"{number:024x}",
        org_id=org,
        status=status,
        start_date=start,
        end_date=PERIOD_END if start == PERIOD_START else start + timedelta(days=30),
        amount_billed_cents=cents,
        source_org_id=source,
    )


# A listing: the invoices an organization's read returned; None: the read failed.
Listing = tuple[Invoice, ...] | None
# What a cycle writes per organization read.
Writes = dict[str, OrgWrite]


@st.composite
def listings(draw: st.DrawFn, org: str) -> Listing:
    if draw(st.integers(0, 5)) == 0:
        return None
    numbers = [n for n, (_, source) in INVOICES.items() if source == org]
    chosen = draw(st.lists(st.sampled_from(numbers), unique=True))
    return tuple(
        invoice(n, draw(st.sampled_from(STATUSES)), draw(st.sampled_from(AMOUNTS))) for n in chosen
    )


@dataclass(frozen=True)
class Step:
    advance: timedelta
    reads: dict[str, Listing]


steps = st.builds(
    Step,
    advance=st.sampled_from(STEPS),
    reads=st.fixed_dictionaries({ORG_A: listings(ORG_A), ORG_B: listings(ORG_B)}),
)


@dataclass
class Pipeline:
    """The state one daemon keeps between cycles, and one cycle over it."""

    now: datetime = NOW
    config: Config = CONFIG
    payers: dict[str, str] = field(default_factory=dict)  # as the store learns them
    snapshot: dict[str, Snapshot] = field(default_factory=dict)
    stored: dict[str, dict[str, Invoice]] = field(default_factory=dict)  # the state file
    history: dict[str, list[tuple[datetime, int]]] = field(default_factory=dict)
    failing_since: dict[str, datetime] = field(default_factory=dict)
    read_once: set[str] = field(default_factory=set)
    alerts: dict[str, AlertState] = field(default_factory=dict)
    sent: list[tuple[str, EventKind]] = field(default_factory=list)  # (alert key, kind)

    def plan(self, reads: Mapping[str, Listing]) -> tuple[CyclePlan, list[Transition], Writes]:
        """One cycle up to the commit, as ``cycle.Cycle`` runs it (organization by
        organization, then the resolutions): what it would write, without writing it."""
        decide = CyclePlan(self.config, self.alerts, payers=self.payers)
        writes: Writes = {}
        transitions: list[Transition] = []
        for org, listing in reads.items():
            snapshot = self.snapshot_of(org)
            read = OrgRead(org, error="x") if listing is None else as_listed(org, snapshot, listing)
            known = OrgState(
                org,
                last_success=self.now if org in self.read_once else None,
                failing_since=self.failing_since.get(org),
            )
            stored = self.stored.get(org, {})
            loaded = {i: stored[i] for i in settled_to_load(snapshot, read)} if read.ok else {}
            step = step_org(
                read,
                snapshot,
                known,
                lambda invoice_id: self.history.get(invoice_id, []),
                self.now,
                stored=loaded,
                shared=self.shared(decide, read, snapshot, loaded),
            )
            transitions += decide.org(step, self.now)[0]
            if listing is not None:
                writes[org] = step.write
        transitions += decide.resolved(self.now)
        return decide, transitions, writes

    def shared(
        self, decide: CyclePlan, read: OrgRead, snapshot: Snapshot, stored: dict[str, Invoice]
    ) -> Shared:
        """What the other organizations hold of this read's linked invoices, the
        settled copies it names read from the state file, as ``cycle.Cycle.compare`` does."""
        if not read.ok:
            return Shared()
        change = listing_change(read, snapshot, stored=stored)
        shared = decide.linked.shared(read.org_id, change.changed, snapshot, self.snapshot_of)
        for other, ids in shared.load.items():
            shared = shared.loaded(self.stored[other][i] for i in ids)
        return shared

    def snapshot_of(self, org: str) -> Snapshot:
        return self.snapshot.get(org) or Snapshot(settles=settled_statuses(self.config.rules))

    def commit(
        self, reads: Mapping[str, Listing], transitions: Sequence[Transition], writes: Writes
    ):
        """What the state file records of a cycle, in memory."""
        for org, listing in reads.items():
            if listing is None:
                self.failing_since.setdefault(org, self.now)
                continue
            write = writes[org]
            self.snapshot[org] = self.snapshot_of(org).updated(write.upserts, write.gone)
            stored = self.stored[org] = {**self.stored.get(org, {}), **by_id(write.upserts)}
            for invoice_id in write.gone:
                del stored[invoice_id]
            assert set(self.snapshot[org]) == set(stored)
            self.failing_since.pop(org, None)
            self.read_once.add(org)
            for inv in stored.values():
                if inv.status != "PENDING":
                    self.history.pop(inv.id, None)
            for invoice_id, cents in write.observations:
                self.history.setdefault(invoice_id, []).append((self.now, cents))
            for upsert in write.upserts:
                if upsert.org_id != org:
                    self.payers[upsert.org_id] = org
            for mirror in write.mirrors:  # the copies other organizations still hold
                holder = mirror.source_org_id
                if mirror.id in self.snapshot_of(holder):
                    self.snapshot[holder] = self.snapshot[holder].updated([mirror], [])
                    self.stored[holder][mirror.id] = mirror
        for t in transitions:
            if t.state.firing:
                self.alerts[t.state.key] = t.state
            else:
                self.alerts.pop(t.state.key, None)
            if t.event is not None:
                self.sent.append((t.state.key, t.event.kind))

    def cycle(self, step: Step) -> tuple[CyclePlan, list[Transition]]:
        self.now += step.advance
        decided, transitions, writes = self.plan(step.reads)
        self.commit(step.reads, transitions, writes)
        return decided, transitions


def by_id(invoices: Sequence[Invoice]) -> dict[str, Invoice]:
    return {i.id: i for i in invoices}


def as_listed(org: str, snapshot: Snapshot, listing: Sequence[Invoice]) -> OrgRead:
    """The read the client makes of ``listing``: a settled invoice listed unchanged
    as its key, every other one as an invoice."""
    keys = {i.id: i.settled_key() for i in listing}
    settled = sorted({k for i, k in keys.items() if snapshot.settled.get(i) == k})
    invoices = tuple(i for i in listing if snapshot.settled.get(i.id) != keys[i.id])
    return OrgRead(org, invoices, settled, listed=len(listing))


def all_paid() -> Step:
    """Every organization readable, every invoice PAID: no condition can hold."""
    return Step(
        timedelta(minutes=1),
        {
            org: tuple(invoice(n, "PAID", 100) for n, (_, src) in INVOICES.items() if src == org)
            for org in (ORG_A, ORG_B)
        },
    )


# --- diff ----------------------------------------------------------------------------

org_a_listing = listings(ORG_A).filter(lambda listing: listing is not None)


@settings(max_examples=300, deadline=None)
@given(old=org_a_listing, new=org_a_listing)
def test_diff_applied_to_the_old_listing_gives_the_new_one(old, new):
    before = by_id(old)
    change = diff(before, new)
    after = {**before, **by_id(change.changed)}
    for gone in change.gone:
        del after[gone.id]
    assert after == by_id(new)
    assert {i.id for i in change.added} == by_id(new).keys() - before.keys()
    assert {i.id for i in change.gone} == before.keys() - by_id(new).keys()
    assert all(c.old.status != c.new.status for c in change.status_changed)
    assert all(old != new for c in change.amounts_changed for old, new in c.fields.values())
    assert diff(by_id(new), new).empty


@settings(max_examples=200, deadline=None)
@given(old=org_a_listing, new=org_a_listing, older=st.sets(st.sampled_from([1, 2, 3])))
def test_diff_of_an_incremental_listing_keeps_what_it_did_not_cover(old, new, older):
    """Invoices starting before ``listed_from`` that the listing skipped are not gone."""
    listed_from = PERIOD_START.date()  # (midnight UTC)
    early = PERIOD_START - timedelta(days=60)
    before = by_id(old) | {
        f"{n + 100:024x}": replace(invoice(n, "PAID", 1), id=f"{n + 100:024x}", start_date=early)
        for n in older
    }
    change = diff(before, new, listed_from=listed_from)
    assert all(i.start_date >= PERIOD_START for i in change.gone)
    assert {i.id for i in change.gone} == by_id(old).keys() - by_id(new).keys()


# --- rules and the alert lifecycle --------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(steps, min_size=1, max_size=12))
def test_lifecycle_never_fires_twice_for_a_held_condition(sequence):
    pipeline = Pipeline()
    for step in sequence:
        pipeline.cycle(step)
    pipeline.cycle(all_paid())
    kinds: dict[str, list[EventKind]] = {}
    for key, kind in pipeline.sent:
        if kind in (EventKind.FIRING, EventKind.RESOLVED):
            kinds.setdefault(key, []).append(kind)
    for key, sequence_of_kinds in kinds.items():
        expected = [EventKind.FIRING, EventKind.RESOLVED] * (len(sequence_of_kinds) // 2 + 1)
        assert sequence_of_kinds == expected[: len(sequence_of_kinds)], key


@settings(max_examples=150, deadline=None)
@given(st.lists(steps, min_size=1, max_size=12))
def test_lifecycle_every_firing_alert_resolves_when_its_condition_ends(sequence):
    pipeline = Pipeline()
    for step in sequence:
        decided, _ = pipeline.cycle(step)
        for key, alert in pipeline.alerts.items():
            # Still firing: its condition holds, or its organization was not read.
            assert key in decided.held or (
                (alert.rule, alert.source_org_id) not in decided.evaluated
            ), key
    pipeline.cycle(all_paid())
    assert pipeline.alerts == {}
    last: dict[str, EventKind] = {}
    for key, kind in pipeline.sent:
        last[key] = kind
    assert EventKind.FIRING not in last.values()


@settings(max_examples=150, deadline=None)
@given(st.lists(steps, min_size=1, max_size=10))
def test_lifecycle_cycle_is_deterministic_and_replaying_it_changes_nothing(sequence):
    pipeline = Pipeline()
    for step in sequence:
        pipeline.now += step.advance
        # A cycle that crashed before its commit runs again from the same state: the
        # same transitions, the same events.
        first = pipeline.plan(step.reads)
        again = pipeline.plan(step.reads)
        assert first[1] == again[1]
        pipeline.commit(step.reads, first[1], first[2])
        # The same listing again after the commit: nothing to send, nothing to change.
        _, transitions, _ = pipeline.plan(step.reads)
        assert transitions == []


@settings(max_examples=150, deadline=None)
@given(st.lists(steps, min_size=1, max_size=12))
def test_lifecycle_a_failed_read_never_fires_or_resolves_that_orgs_invoice_alerts(sequence):
    """No information is not news: while an organization cannot be read, only
    `poll_failure` may speak about it (no phantom RESOLVED, no re-FIRING after)."""
    types = {rule.name: rule.type for rule in CONFIG.rules}
    pipeline = Pipeline()
    for step in sequence:
        _, transitions = pipeline.cycle(step)
        failed = {org for org, listing in step.reads.items() if listing is None}
        for t in transitions:
            if t.state.source_org_id in failed:
                assert types[t.state.rule] == "poll_failure", t.state.key


# --- linked invoices: one alert subject ----------------------------------------------

LINKED_CONFIG: Config = load(
    CONFIG_YAML.replace(
        f"organizations: [{{id: {ORG_A}}}, {{id: {ORG_B}}}]",
        f"organizations: [{{id: {ORG_A}}}, {{id: {ORG_LINKED}}}]",
    ),
    filename="properties-linked.yaml",
    env={},
)


@dataclass(frozen=True)
class Truth:
    """One step of Atlas's truth about invoice 3 (ORG_LINKED's, billed through ORG_A):
    its status and amount, which of the two listings of it fail, and in which order
    the reads end."""

    advance: timedelta
    status: str
    cents: int
    failed: frozenset[str]
    order: tuple[str, ...]

    def reads(self) -> dict[str, Listing]:
        nested = invoice(3, self.status, self.cents)  # in ORG_A's listing
        own = replace(nested, source_org_id=ORG_LINKED)
        listings = {ORG_A: (nested,), ORG_LINKED: (own,)}
        return {org: None if org in self.failed else listings[org] for org in self.order}


truths = st.builds(
    Truth,
    advance=st.sampled_from(STEPS),
    status=st.sampled_from(STATUSES),
    cents=st.sampled_from(AMOUNTS),
    failed=st.sampled_from(
        [frozenset(), frozenset(), frozenset({ORG_A}), frozenset({ORG_LINKED}), frozenset()]
    ),
    order=st.permutations([ORG_A, ORG_LINKED]).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(truths, min_size=1, max_size=12))
def test_lifecycle_a_linked_invoice_is_one_subject_whichever_listing_shows_it(sequence):
    pipeline = Pipeline(config=LINKED_CONFIG)
    linked_id = invoice(3, "PENDING", 0).id
    observed: list[Truth] = []  # the truths a successful read saw
    for truth in sequence:
        pipeline.now += truth.advance
        before = len(pipeline.sent)
        _, transitions, writes = pipeline.plan(truth.reads())
        pipeline.commit(truth.reads(), transitions, writes)
        notices = [k for k, kind in pipeline.sent[before:] if kind is EventKind.NOTICE]
        if len(truth.failed) < 2:
            moved = bool(observed) and observed[-1].status != truth.status
            observed.append(truth)
            # One NOTICE for a move, none otherwise; whichever listing told it.
            assert len(notices) == (1 if moved else 0), (notices, truth)
        else:
            assert notices == []
        if observed:
            # The alerts follow what was last seen, however it was listed.
            last = observed[-1]
            firing = {key.split("/")[0] for key in pipeline.alerts}
            assert ("failed" in firing) == (last.status == "FAILED")
            over = last.status == "PENDING" and last.cents > 5000_00
            assert ("over" in firing) == over, (firing, last)
        # Each change of the pending amount is observed once.
        amounts = [cents for _, cents in pipeline.history.get(linked_id, [])]
        assert all(a != b for a, b in itertools.pairwise(amounts)), amounts
