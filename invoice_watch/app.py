"""The application: one poll cycle through every stage, and the daemon around it.

:meth:`App.run_cycle` is the pipeline (fetch -> diff -> rules -> dedup -> commit, each
organization as soon as it is read; then wake delivery). Reads are incremental, and a
full reconciliation listing at every start and once per ``poll.full_listing_every``
(:class:`FullListings`) makes the snapshot converge to Atlas for old invoices too; an
invoice that two configured organizations list (a linked one) is one alert subject
(:class:`CyclePlan`). :meth:`App.serve` is the daemon: a
:class:`~invoice_watch.schedule.PollLoop` runs the cycle on its interval, timed on the
injected clock's monotonic time (first one at start), the deliverer runs as its own
task, and a stop event (set by the CLI on SIGTERM/SIGINT) ends it gracefully: no new
cycle starts, the cycle in flight finishes (or stops where it is when it cannot finish
in time: the organizations it committed stay committed), then everything closes in
reverse order. A reload (SIGHUP) parses the file off the event loop, one at a time, and
applies each changed setting as :mod:`invoice_watch.reload` says, or refuses it.
Signals are the CLI's business, so tests embed the App.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import TextIO, TypeVar

from invoice_watch import sdnotify
from invoice_watch.alerts import (
    Reason,
    Scope,
    Transition,
    plan_holding,
    plan_resolved,
)
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.clock import Clock, SystemClock
from invoice_watch.config import Config, HttpConfig, LogConfig, load_file
from invoice_watch.config.quantities import config_duration
from invoice_watch.constants import (
    FINAL_STATUSES,
    HOLD_SECONDS,
    INVOICE_STATUSES,
    ONCE_DELIVERY_SECONDS,
    SHUTDOWN_SECONDS,
)
from invoice_watch.deliver import Deliverer
from invoice_watch.diff import Diff, diff, settled_to_load, without_news
from invoice_watch.elapsed import Elapsed
from invoice_watch.errors import (
    ConfigError,
    FetchError,
    ListenError,
    StateError,
    StateFileGoneError,
    UnstorableError,
)
from invoice_watch.health import InFlight, health, liveness, progress_limit
from invoice_watch.http_endpoint import HttpEndpoint
from invoice_watch.leader import Leadership
from invoice_watch.metrics import Metrics
from invoice_watch.redact import printable, redact
from invoice_watch.reload import Apply, changes
from invoice_watch.retry import backoff
from invoice_watch.rules import (
    BREAKDOWN_RULES,
    Age,
    History,
    OrgView,
    breakdown,
    evaluate,
    settled_statuses,
    wall_age,
)
from invoice_watch.safe_text import traceback_text
from invoice_watch.schedule import PollLoop, PollSchedule
from invoice_watch.store import (
    AlertState,
    OrgState,
    OrgWrite,
    StateUrl,
    Store,
    location,
    message_parts,
    open_copy,
    open_store,
    unstorable,
)
from invoice_watch.types import (
    AlertEvent,
    EventKind,
    Invoice,
    LineItem,
    Notifier,
    OrgRead,
    Part,
    Snapshot,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A reload's read of the configuration file (and its secret files) that takes longer is
# abandoned, logged, and the running configuration kept (a file on a hung network file
# system): one stuck read never blocks the reloads after it. Past this many abandoned
# reads still stuck, reloads are refused until a restart (each holds a thread).
RELOAD_SECONDS = 30.0
MAX_STUCK_RELOADS = 4


@dataclass
class CycleResult:
    started_at: datetime
    finished_at: datetime
    reads: dict[str, OrgRead]
    events: list[AlertEvent] = field(default_factory=list)
    messages: list[tuple[str, list[AlertEvent], Part | None]] = field(default_factory=list)
    invoices: int = 0
    changes: int = 0

    @property
    def orgs_failed(self) -> list[str]:
        return [org_id for org_id, read in self.reads.items() if not read.ok]

    @property
    def orgs_ok(self) -> int:
        return len(self.reads) - len(self.orgs_failed)


# How much earlier than the window it needs an incremental read asks Atlas to list
# (``fromDate``): a server that reads the boundary another way (exclusive, another time
# zone) then lists a few more rows, and never misses the oldest invoice of the window.
FROM_DATE_MARGIN = timedelta(days=1)


def incremental_from(snapshot: Snapshot) -> date | None:
    """The window of an incremental read: the (UTC) day on which the oldest invoice that
    can still change starts (not PAID, FORGIVEN, FREE or PREPAID), else the newest
    invoice's (so new ones are still seen); None (a full listing) when nothing is known
    yet. The read asks ``fromDate`` :data:`FROM_DATE_MARGIN` earlier (:func:`asked_from`),
    and only invoices starting on this day or later can be "gone" from it.

    A change Atlas makes to an older invoice all the same (a refund, a PAID invoice
    FORGIVEN, one removed) is outside this window: the periodic full listing sees it
    (:class:`FullListings`)."""
    if not snapshot:
        return None
    live = snapshot.live.values()
    open_starts = [i.start_date for i in live if i.status not in FINAL_STATUSES]
    if open_starts:
        return min(open_starts).astimezone(UTC).date()
    days = [i.start_date.astimezone(UTC).date() for i in live]
    newest_settled = snapshot.newest_settled_day()
    return max([*days, newest_settled] if newest_settled else days)


def asked_from(window: date | None) -> date | None:
    """The ``fromDate`` a read of the window :func:`incremental_from` gives asks for (see
    :data:`FROM_DATE_MARGIN`); None (a full listing) for None."""
    return None if window is None else window - FROM_DATE_MARGIN


# A full listing that fails (a timeout on a long history) while an incremental read can
# stand in for it is tried again after a backoff: from this many seconds, doubling up to
# FULL_RETRY_CAP (or poll.full_listing_every when shorter), with jitter.
FULL_RETRY_BASE = 300.0
FULL_RETRY_CAP = 6 * 3600.0


def _phase(org_id: str) -> float:
    """Where in each period an organization's full listing falls, in [0, 1): a stable
    hash of its id (the same in every process), so that organizations spread theirs."""
    digest = hashlib.blake2b(org_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class FullListings:
    """When an organization's read is a full listing (every invoice, however old: no
    ``fromDate``) instead of an incremental one (:func:`incremental_from`): what makes the
    snapshot converge to Atlas for the invoices an incremental read no longer lists.

    Every organization is listed in full by the first cycle of a process (a start, a
    reload that adds it, each ``run --once``), then once per ``every`` (config
    ``poll.full_listing_every``), timed on the monotonic clock (:meth:`Clock.monotonic`:
    a wall-clock step neither postpones nor hurries it). Each organization's period is
    shifted by its own phase (:func:`_phase`), so that 1,000 organizations do theirs over
    the cycles of a period, not all in one cycle. A full listing that fails while an
    incremental read can stand in for it (the organization was read before: the cycle
    reads it so, :meth:`failed`) is tried again after a backoff (from
    :data:`FULL_RETRY_BASE`, doubling up to :data:`FULL_RETRY_CAP` or ``every``); one that
    fails with nothing to stand in for it, at the next cycle. So two successful full
    listings of an organization are at most ``every`` apart, plus the wait for the next
    cycle and the failures between.
    """

    def __init__(self, every: timedelta, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._origin = clock.monotonic()
        self._seconds = every.total_seconds()
        self._done: dict[str, int] = {}  # org id -> period of its last full listing
        # org id -> (full listings failed in a row, monotonic time the next one is due)
        self._retry: dict[str, tuple[int, float]] = {}
        self._last: dict[str, float] = {}  # org id -> when its last full listing started
        # org id -> the latest its next full listing is due (after a shorter period)
        self._latest: dict[str, float] = {}

    def _period(self, org_id: str, at: float) -> int:
        return math.floor((at - self._origin) / self._seconds + _phase(org_id))

    def due(self, org_id: str, at: float) -> bool:
        """Whether a read of ``org_id`` starting at monotonic ``at`` lists in full."""
        retry = self._retry.get(org_id)
        if retry is not None:
            return at >= retry[1]
        done = self._done.get(org_id)
        latest = self._latest.get(org_id)
        return (
            done is None or self._period(org_id, at) > done or (latest is not None and at >= latest)
        )

    def listed(self, org_id: str, at: float) -> None:
        """A full listing of ``org_id`` that started at monotonic ``at`` was committed."""
        self._done[org_id] = self._period(org_id, at)
        self._last[org_id] = at
        self._retry.pop(org_id, None)
        self._latest.pop(org_id, None)

    def failed(self, org_id: str, at: float) -> float:
        """A full listing of ``org_id`` that started at monotonic ``at`` failed, and an
        incremental read stood in for it: the next one is due after a backoff. Returns
        the seconds until then."""
        failures = self._retry.get(org_id, (0, 0.0))[0]
        cap = max(FULL_RETRY_BASE, min(FULL_RETRY_CAP, self._seconds))
        delay = backoff(failures, base=FULL_RETRY_BASE, cap=cap, rng=self._rng)
        self._retry[org_id] = (failures + 1, at + delay)
        return delay

    def configure(self, every: timedelta) -> None:
        """A new period (a reload): each organization's next full listing is due at the
        next boundary of its phase under it, at most ``every`` away, but no later than
        ``every`` after its last one (a shorter period: 7d -> 1d must not leave 7d + 1d
        between two)."""
        if every.total_seconds() == self._seconds:
            return
        now = self._clock.monotonic()
        self._origin, self._seconds = now, every.total_seconds()
        self._done = {org_id: self._period(org_id, now) for org_id in self._done}
        self._latest = {org_id: last + self._seconds for org_id, last in self._last.items()}

    def force(self) -> None:
        """Every organization lists in full at the next cycle (as after a start)."""
        self._done.clear()
        self._retry.clear()
        self._latest.clear()


def group_messages(
    transitions: Iterable[Transition], group_over: int
) -> list[tuple[str, list[AlertEvent], Part | None]]:
    """Outbox messages: one per (event, notifier its alert's messages go to:
    ``state.notifiers``), or grouped messages per notifier when a cycle produced more
    than ``group_over`` events for it (flood control): one, or parts when too many for
    one message (:func:`~invoice_watch.store.message_parts`)."""
    per_notifier: dict[str, list[AlertEvent]] = defaultdict(list)
    for t in transitions:
        if t.event is None:
            continue
        for name in t.state.notifiers:
            per_notifier[name].append(t.event)
    messages: list[tuple[str, list[AlertEvent], Part | None]] = []
    for name, batch in per_notifier.items():
        sizes = message_parts(len(batch), group_over)
        if sizes is None:
            messages.extend((name, [event], None) for event in batch)
            continue
        start = 0
        for number, size in enumerate(sizes, 1):
            part = Part(number, len(sizes)) if len(sizes) > 1 else None
            messages.append((name, batch[start : start + size], part))
            start += size
    return messages


@dataclass(frozen=True)
class Shared:
    """What the other configured organizations already hold of the invoices one read
    found changed, when they list them too (a linked organization's invoice is in its own
    listing and nested in its payer's): see :meth:`CyclePlan.shared`."""

    # Invoices whose listed version another configured organization already holds or
    # told (it listed it in this cycle, or a cycle before): no news.
    told: frozenset[str] = frozenset()
    # Invoices whose listed version another listing of this cycle added (it held none):
    # their amount is observed already; a move from this organization's copy is news.
    observed: frozenset[str] = frozenset()
    # Invoices this organization holds no copy of, and another one does: what this read
    # is compared with (the other's copy), so that a move is news here too.
    baseline: Mapping[str, Invoice] = field(default_factory=dict)
    # Organization -> its settled copies to read from the state file into ``baseline``
    # (:meth:`loaded`): settled invoices are kept in memory as keys only.
    load: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Invoice id -> the other organizations whose stored copy differs from this listing.
    mirror: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The organizations whose listing of this cycle told (their write must come first).
    tellers: frozenset[str] = frozenset()
    # What this read found changed, for the reads after it: invoice id -> (the invoice,
    # whether it was compared with a copy), taken when its step is planned.
    listed: Mapping[str, tuple[Invoice, bool]] = field(default_factory=dict)

    def loaded(self, invoices: Iterable[Invoice]) -> Shared:
        """These, with the copies :attr:`load` names (as the state file holds them)."""
        return replace(self, baseline={**self.baseline, **{i.id: i for i in invoices}}, load={})


NOTHING_SHARED = Shared()


def same_invoice(a: Invoice, b: Invoice) -> bool:
    """Whether two listings show one invoice alike (whichever organization listed it)."""
    if a.source_org_id != b.source_org_id:
        a = replace(a, source_org_id=b.source_org_id)
    return a == b


def _observed(history: History, cents: int) -> bool:
    """Whether ``cents`` is the last amount the history holds (another listing of the
    invoice observed it already: a new observation would add nothing)."""
    return bool(history) and history[-1][1] == cents


@dataclass(frozen=True)
class OrgStep:
    """What one organization's read means for a cycle: what the rules see of it, what the
    commit writes for it, and the amount histories of its pending invoices."""

    view: OrgView
    write: OrgWrite
    history: dict[str, History]
    invoices: int  # in the organization's snapshot once the write is done
    # What the read found changed, for the reads of the cycle after it (Shared.listed).
    listed: Mapping[str, tuple[Invoice, bool]] = field(default_factory=dict)
    # Linked invoices Atlas hid from the read (hidden_linked): their alerts wait.
    hidden: frozenset[str] = frozenset()


def listing_change(
    read: OrgRead,
    snapshot: Snapshot,
    *,
    listed_from: datetime | None = None,
    stored: Mapping[str, Invoice] | None = None,
    hidden: Collection[str] = frozenset(),
) -> Diff:
    """What a successful read changes in its organization's snapshot (the diff
    :func:`step_org` makes of it; arguments as there)."""
    old = {**snapshot.live, **stored} if stored else snapshot.live
    return diff(old, read.invoices, listed_from=listed_from, hidden=hidden)


def hidden_linked(
    read: OrgRead,
    snapshot: Snapshot,
    paying: Collection[str],
    *,
    listed_from: datetime | None = None,
    stored: Mapping[str, Invoice] | None = None,
) -> frozenset[str]:
    """The linked invoices a paying organization's successful read does not show
    because Atlas hides them, not because they are gone: its listing shows none of the
    linked invoices (nested in ``linkedInvoices``) at all, while its snapshot holds some
    that the listing's window covers. Atlas lists linked invoices only to Organization
    Billing Admin or Owner on the paying organization: a role that drops to Billing
    Viewer hides every one of them at once, and they are kept as they are (not gone,
    their alerts neither resolved nor fired again) until a listing shows them again.
    ``paying``: the organizations known to pay for another (whose listing showed
    linked invoices, as the state file knows them); ``stored``, ``listed_from``: as for
    :func:`step_org`. Costs nothing for an organization that pays for no other."""
    org_id = read.org_id
    if not read.ok or read.linked or org_id not in paying:
        return frozenset()
    listed = {invoice.id for invoice in read.invoices}
    candidates = (*snapshot.live.values(), *(stored or {}).values())
    return frozenset(
        invoice.id
        for invoice in candidates
        if invoice.org_id != org_id
        and invoice.id not in listed
        and (listed_from is None or invoice.start_date >= listed_from)
    )


def step_org(
    read: OrgRead,
    snapshot: Snapshot,
    state: OrgState,
    history_of: Callable[[str], History],
    now: datetime,
    *,
    listed_from: datetime | None = None,
    stored: Mapping[str, Invoice] | None = None,
    shared: Shared = NOTHING_SHARED,
    change: Diff | None = None,
    hidden: frozenset[str] = frozenset(),
) -> OrgStep:
    """Diff one organization's read against its snapshot. Pure: the stored snapshot,
    read state and histories in; nothing is changed. A failed read leaves the snapshot
    as it was (no invoice "disappears") and only dates the failure.

    ``stored``: the settled invoices that the read changed or no longer lists, as the
    state file holds them (:func:`~invoice_watch.diff.settled_to_load` names them).
    ``shared``: what other configured organizations that list some of these invoices
    already hold (:meth:`CyclePlan.shared`): a change one of them told already is no news
    (no status change for the rules, no amount observation), though this organization's
    copy is rewritten; a copy of theirs this read finds out of date is updated with it
    (``OrgWrite.mirrors``). ``change``: the read's :func:`listing_change`, when the
    caller has it already. ``hidden``: linked invoices Atlas hides from this read
    (:func:`hidden_linked`): kept in the snapshot as they are, and left out of what the
    rules see (their alerts wait, as for a failed read)."""
    org_id = read.org_id
    if not read.ok:
        view = OrgView(
            org_id,
            ok=False,
            invoices=snapshot.live,
            failing_since=state.failing_since or now,
            error=read.error,
        )
        return OrgStep(view, OrgWrite(org_id, ok=False, error=read.error), {}, len(snapshot))
    old = {**snapshot.live, **stored} if stored else snapshot.live
    if change is None:
        change = diff(old, read.invoices, listed_from=listed_from, hidden=hidden)
    new: dict[str, Invoice] | None = None  # copied only when something changed
    if not change.empty:
        new = dict(old)
        for invoice in change.changed:
            new[invoice.id] = invoice
        for invoice in change.gone:
            del new[invoice.id]
    current = old if new is None else new  # read only
    # The news: compared with the other organization's copy where this one holds none.
    base, news = old, change
    if shared.baseline:
        base = {**old, **shared.baseline}
        news = diff(base, read.invoices, listed_from=listed_from)
    told, observed = shared.told, shared.observed
    observations = [
        (i.id, i.amount_billed_cents)
        for i in news.changed
        if i.status == "PENDING"
        and (i.id not in base or base[i.id].amount_billed_cents != i.amount_billed_cents)
        and i.id not in told
        and i.id not in observed
        and not _observed(history_of(i.id), i.amount_billed_cents)
    ]
    history: dict[str, History] = {
        i.id: history_of(i.id) for i in current.values() if i.status == "PENDING"
    }
    for invoice_id, cents in observations:
        history[invoice_id] = [*history.get(invoice_id, ()), (now, cents)]
    if told:
        news = without_news(news, told)
    seen = current
    if hidden:  # kept as they are, but no rule looks at them until they are listed
        seen = {i: invoice for i, invoice in current.items() if i not in hidden}
    view = OrgView(
        org_id,
        ok=True,
        invoices=seen,
        diff=news,
        first_read=state.last_success is None and not shared.baseline,
    )
    mirrors = shared.mirror
    write = OrgWrite(
        org_id,
        ok=True,
        upserts=change.changed,
        gone=[i.id for i in change.gone],
        observations=observations,
        mirrors=[
            replace(i, source_org_id=other)
            for i in change.changed
            if i.id in mirrors
            for other in mirrors[i.id]
        ]
        if mirrors
        else [],
    )
    count = len(snapshot) + len(change.added) - len(change.gone)
    return OrgStep(view, write, history, count, shared.listed, hidden)


class CyclePlan:
    """What a cycle decides, organization by organization as each one is read, then for
    the whole cycle. Pure: stored alert states and each organization's step in,
    transitions out; nothing is written.

    One invoice is one alert subject, whichever configured organization's listing shows
    it: a linked organization's invoice is in its own listing and nested in its payer's
    (``payers``: linked organization -> paying organization, as the state file knows
    them). Alert keys name the invoice's own organization, and the alert states are kept
    as the cycle changes them, so that it fires once; a change is news from the first
    listing that shows it only (:meth:`shared`), so that it is one NOTICE and one amount
    observation, in this cycle or when the other listing catches up in a later one; and
    an alert resolves on whichever successful read lists its invoice (:meth:`scope`).
    Resolutions wait for the whole cycle: an alert resolves only when no organization
    holds its condition any more.
    """

    def __init__(
        self,
        config: Config,
        states: Mapping[str, AlertState],
        *,
        baseline: bool = False,
        payers: Mapping[str, str] | None = None,
        age: Age | None = None,
    ) -> None:
        self.config = config
        self.baseline = baseline
        self._age = age  # how long ago a stored time was (the wall clock's when None)
        self.states = dict(states)
        # Keys of the conditions that hold -> the organizations whose reads hold them.
        self.held: dict[str, set[str]] = {}
        self.evaluated: set[tuple[str, str]] = set()  # (rule, configured org) scopes
        self.read_ok: set[str] = set()  # configured organizations read this cycle
        # What a resolution may look up, per configured organization: its live invoices
        # and those of the alerts firing (an invoice may have settled this cycle).
        self.invoices_of: dict[str, Mapping[str, Invoice]] = {}
        self._settles = settled_statuses(config.rules)
        self._alerted = {s.invoice_id for s in states.values() if s.invoice_id}
        self._configured = frozenset(org.id for org in config.organizations)
        self._payers = dict(payers or {})  # linked -> payer, configured or not
        # Linked organization -> its payer, both configured: they list the same invoices.
        self._payer = {
            linked: payer
            for linked, payer in (payers or {}).items()
            if linked != payer and linked in self._configured and payer in self._configured
        }
        # Invoices found changed this cycle (those of linked organizations, and those
        # that can still change), whether their read compared them with a copy, and the
        # organization whose read it was.
        self._listed: dict[str, tuple[Invoice, bool, str]] = {}
        self._noticed: set[str] = set()  # keys of this cycle's notices
        self.hidden: set[str] = set()  # invoices a read did not show: Atlas hid them
        self.failing: dict[str, timedelta] = {}  # org whose read failed -> for how long
        self.changes = 0  # invoices added, changed or gone
        self.invoices = 0  # in the snapshots, once the cycle is committed
        self._counted: dict[str, tuple[int, int]] = {}  # org -> its (invoices, changes)

    def shared(
        self,
        org_id: str,
        changed: Iterable[Invoice],
        own: Snapshot,
        snapshot_of: Callable[[str], Snapshot],
    ) -> Shared:
        """What the other configured organizations that list some invoices of a read of
        ``org_id`` (its payer, or the linked organization whose invoice it is) already
        hold of those it found ``changed`` (added or changed: its
        :func:`listing_change`; ``own``: the reading organization's snapshot;
        ``snapshot_of``: any organization's, as committed): whether one listed the same
        version earlier in this cycle, or holds it already (no news), which of their copies
        are out of date (updated with this read's), and, for an invoice this organization
        holds no copy of, the other's copy to compare this read with (its first read, or
        a payer that did not list its linked invoices before). Call it once per read, in
        the order reads are taken: what each read found changed is remembered once its
        step is planned (:meth:`org`; of an organization not known to be linked yet, as
        in a first cycle, the invoices that can still change: a pending amount is then
        observed once too). Costs nothing when nothing changed."""
        payer = self._payer.get(org_id)
        listed, settles = self._listed, self._settles
        told: set[str] = set()
        observed: set[str] = set()
        tellers: set[str] = set()
        remember: dict[str, tuple[Invoice, bool]] = {}
        baseline: dict[str, Invoice] = {}
        load: dict[str, list[str]] = defaultdict(list)
        mirror: dict[str, tuple[str, ...]] = {}
        for invoice in changed:
            invoice_id = invoice.id
            earlier = listed.get(invoice_id)
            owner = invoice.org_id
            if earlier is None and owner == org_id and payer is None:
                # Not known to be linked (most organizations): remember what can still
                # change, in case a payer not known yet lists it later in this cycle.
                if invoice.status not in settles:
                    remember[invoice_id] = (invoice, invoice_id in own)
                continue
            held = invoice_id in own
            if earlier is not None and same_invoice(earlier[0], invoice):
                # Listed so by another one in this cycle: news it told, or only added.
                (told if earlier[1] else observed).add(invoice_id)
                tellers.add(earlier[2])
                remember[invoice_id] = (invoice, earlier[1] or held)
                continue
            if owner == org_id:
                other = payer
            elif owner in self._configured:  # a linked organization's, nested in this one
                other = owner
                self._payer[owner] = org_id  # learnt here if the state file did not know
            else:
                other = None
            compared = held  # whether this read's news says what moved (not just "added")
            if other is not None:
                theirs = snapshot_of(other)
                copy = theirs.live.get(invoice_id)
                key = theirs.settled.get(invoice_id) if copy is None else None
                if copy is not None or key is not None:
                    compared = True
                    if (
                        same_invoice(copy, invoice)
                        if copy is not None
                        else key == invoice.settled_key()
                    ):
                        told.add(invoice_id)  # it holds this version: no news
                    else:
                        mirror[invoice_id] = (other,)
                        if not held:  # compared with the other's copy, none being here
                            if copy is not None:
                                baseline[invoice_id] = copy
                            else:
                                load[other].append(invoice_id)
            if other is not None or invoice.status not in settles:
                remember[invoice_id] = (invoice, compared)
        if not (told or observed or baseline or load or mirror or remember):
            return NOTHING_SHARED
        return Shared(
            frozenset(told),
            frozenset(observed),
            baseline,
            {org: tuple(ids) for org, ids in load.items()},
            mirror,
            frozenset(tellers),
            remember,
        )

    def org(
        self, step: OrgStep, now: datetime
    ) -> tuple[list[Transition], dict[str, AlertState | None]]:
        """One organization's FIRING, REMINDER and NOTICE transitions, and the states
        they replace (a reminder's breakdown says what moved since). Raises before it
        changes anything (a read that cannot be evaluated is then taken as a failed
        one)."""
        view = step.view
        evaluation = evaluate(self.config.rules, [view], step.history, now, age=self._age)
        transitions = plan_holding(
            self.config, evaluation, self.states, now, baseline=self.baseline, age=self._age
        )
        noticed: set[str] = set()
        if evaluation.notices:  # one notice per invoice and move, whoever listed it
            kept = []
            for t in transitions:
                if not t.state.firing and t.reason is Reason.NEW:
                    if t.state.key in self._noticed or t.state.key in noticed:
                        continue
                    noticed.add(t.state.key)
                kept.append(t)
            transitions = kept
        invoices_of = view.invoices
        changes = 0
        if view.diff is not None:
            changes = len(view.diff.changed) + len(view.diff.gone)
            if any(i.status in self._settles for i in view.diff.changed):
                invoices_of = {
                    invoice_id: invoice
                    for invoice_id, invoice in view.invoices.items()
                    if invoice.status not in self._settles or invoice_id in self._alerted
                }
        # Nothing below raises: the cycle takes this read.
        self._noticed |= noticed
        for invoice_id, (invoice, compared) in step.listed.items():
            self._listed[invoice_id] = (invoice, compared, view.org_id)
        self.invoices_of[view.org_id] = invoices_of
        self.hidden |= step.hidden
        if view.ok:
            self.read_ok.add(view.org_id)
            self.failing.pop(view.org_id, None)
        elif view.failing_since is not None:
            self.failing[view.org_id] = (self._age or wall_age(now))(view.failing_since)
        invoices_before, changes_before = self._counted.get(view.org_id, (0, 0))
        self._counted[view.org_id] = (invoices_before + step.invoices, changes_before + changes)
        self.invoices += step.invoices
        self.changes += changes
        for key in evaluation.holding:
            self.held.setdefault(key, set()).add(view.org_id)
        self.evaluated.update(evaluation.evaluated)
        previous = {t.state.key: self.states.get(t.state.key) for t in transitions}
        self.apply(transitions)
        return transitions, previous

    def withdraw(
        self,
        org_id: str,
        transitions: Sequence[Transition],
        previous: Mapping[str, AlertState | None],
    ) -> None:
        """Forget what :meth:`org` planned of ``org_id``'s read, whose part of the cycle
        could not be committed (``transitions`` and the states they replaced, as it
        returned them): as if it had not been read yet; plan its failed read next. What
        a read of another organization planned meanwhile from it stays (a linked
        invoice's news it told: that one's read then tells it again, or the next)."""
        self.read_ok.discard(org_id)
        self.failing.pop(org_id, None)
        self.evaluated = {scope for scope in self.evaluated if scope[1] != org_id}
        for key in [key for key, orgs in self.held.items() if org_id in orgs]:
            self.held[key].discard(org_id)
            if not self.held[key]:
                del self.held[key]
        self.invoices_of.pop(org_id, None)
        for invoice_id in [i for i, listed in self._listed.items() if listed[2] == org_id]:
            del self._listed[invoice_id]
        invoices, changes = self._counted.pop(org_id, (0, 0))
        self.invoices -= invoices
        self.changes -= changes
        for t in transitions:
            before = previous.get(t.state.key)
            if before is None:
                self.states.pop(t.state.key, None)
            else:
                self.states[t.state.key] = before
            self._noticed.discard(t.state.key)

    def apply(self, transitions: Sequence[Transition]) -> None:
        """Take transitions as the state file will (a breakdown added to an event)."""
        for t in transitions:
            if t.state.firing:
                self.states[t.state.key] = t.state
            else:
                self.states.pop(t.state.key, None)

    def resolved(self, now: datetime) -> list[Transition]:
        """The whole cycle's RESOLVED transitions, once every organization is planned."""
        transitions = plan_resolved(
            self.config, self.states, self.held, self.scope, now, baseline=self.baseline
        )
        self.apply(transitions)
        return transitions

    def scope(self, state: AlertState) -> Scope:
        """Whether this cycle evaluated the alert's rule on what the alert is about, and
        its invoice as it stands now (:class:`~invoice_watch.alerts.Scope`).

        An invoice alert is evaluated by any successful read that lists its invoice:
        the organization whose read fired it, the invoice's own organization, or its
        payer. When none lists it, by the read that would have to: the invoice's own
        organization when it is configured (its listing always shows its own invoices;
        a payer's may stop showing linked ones when its role changes), else the
        organization that fired it; but an invoice a read did not show because Atlas
        hid it (:func:`hidden_linked`) is not evaluated. Other alerts: by that
        organization's read. An alert none of whose organizations (the one that read
        it, its invoice's, that one's payer) is configured any more is
        ``unconfigured``."""
        payer = self._payers.get(state.org_id)
        if not ({state.source_org_id, state.org_id, payer} & self._configured):
            return Scope(False, unconfigured=True)
        if not state.invoice_id:
            return Scope(
                (state.rule, state.source_org_id) in self.evaluated,
                failing_for=self.failing.get(state.source_org_id),
            )
        for org_id in (state.source_org_id, state.org_id, self._payer.get(state.org_id)):
            if org_id is None or org_id not in self.read_ok:
                continue
            invoice = self.invoices_of.get(org_id, {}).get(state.invoice_id)
            if invoice is not None:
                return Scope((state.rule, org_id) in self.evaluated, invoice)
        if state.invoice_id in self.hidden:
            return Scope(False)
        owner = state.org_id if state.org_id in self._configured else state.source_org_id
        return Scope((state.rule, owner) in self.evaluated)


def _wants_breakdown(t: Transition) -> bool:
    """A FIRING or REMINDER message about an invoice's amount, which says what is
    behind it."""
    event = t.event
    return (
        event is not None
        and event.rule_type in BREAKDOWN_RULES
        and event.kind in (EventKind.FIRING, EventKind.REMINDER)
        and bool(event.invoice_id)
    )


@dataclass(frozen=True)
class _Part:
    """One organization's part of a cycle, as the writer commits it: its snapshot write,
    its alerts' transitions, and the states they replace (see :meth:`CyclePlan.org`)."""

    write: OrgWrite
    transitions: list[Transition]
    previous: Mapping[str, AlertState | None] = field(default_factory=dict)


class _Writer:
    """Commits organizations' parts as they come in, each batch in one transaction:
    whatever arrived while the previous batch was being written (a group commit: as
    few transactions as keep up with the reads).

    A batch refused for a value its data holds (:class:`UnstorableError`, or any other
    error but the state file's) is written again one part at a time, and the part that
    is refused on its own is replaced by what ``contain`` makes of it (that
    organization's failed read, recorded with its cause): one organization's data never
    holds back another's. An error of the state file (:class:`StateError`), or a
    replacement refused too, stops the writer; :meth:`flush` raises it."""

    def __init__(
        self,
        commit: Callable[[list[OrgWrite], list[Transition]], Awaitable[None]],
        contain: Callable[[_Part, Exception], _Part],
    ) -> None:
        self._commit = commit
        self._contain = contain
        self._parts: list[_Part] = []
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    def add(self, part: _Part) -> None:
        self._parts.append(part)
        if self._task is None and self._error is None and not self._closed:
            self._task = asyncio.create_task(self._drain(), name="commit")

    async def _drain(self) -> None:
        try:
            while self._parts and not self._closed:
                parts, self._parts = self._parts, []
                await self._write(parts)
        except BaseException as exc:  # kept for flush(): nobody awaits this task
            self._error = exc
        finally:
            self._task = None

    async def _write(self, parts: list[_Part]) -> None:
        try:
            await self._commit([p.write for p in parts], [t for p in parts for t in p.transitions])
            return
        except StateError:
            raise  # the state file itself: the whole cycle
        except Exception as exc:
            if len(parts) == 1:
                replacement = self._contain(parts[0], exc)
                await self._commit([replacement.write], replacement.transitions)
                return
        for part in parts:  # whose data it is: each on its own
            await self._write([part])

    def close(self) -> None:
        """No new batch starts (the one being written completes)."""
        self._closed = True

    async def flush(self) -> None:
        """Wait until everything added is committed; raise what stopped the writer."""
        while self._task is not None:
            await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error


class _Hold:
    """Releases what a running cycle holds (:meth:`Store.release_cycle`) ``seconds``
    after a commit first held a message (:meth:`held`), on the clock's monotonic time, and
    again after the next one that holds more: no message waits longer for the cycle to
    end (one slow organization never holds back another's). :meth:`stop` at the cycle's
    end: what is held then goes with the end (:meth:`Store.finish_cycle`)."""

    def __init__(
        self,
        release: Callable[[], Awaitable[int]],
        clock: Clock,
        seconds: float,
        released: Callable[[], None],
    ) -> None:
        self._release = release
        self._clock = clock
        self._seconds = seconds
        self._on_released = released
        self._task: asyncio.Task[None] | None = None
        self._releasing = False
        self.released = 0  # rows released before the cycle's end

    def held(self) -> None:
        """A commit held messages: they are released within ``seconds``."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._later(), name="release-held")

    async def _later(self) -> None:
        await self._clock.sleep(self._seconds)
        self._releasing = True
        try:
            self.released += await self._release()
        except Exception as exc:  # they wait for the cycle's end (or the next start)
            log.error("could not release the messages of the cycle in flight: %s", exc)
            return
        finally:
            self._releasing = False
        self._on_released()

    async def stop(self) -> None:
        """No release after this one (one in progress completes)."""
        task, self._task = self._task, None
        if task is None:
            return
        if not self._releasing:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class App:
    """invoice_watch, embeddable: ``async with App(config) as app: await app.serve(stop)``.

    ``load_config`` reads the config file again on :meth:`request_reload` (SIGHUP);
    ``configure_logging`` applies a reload's ``log`` section (the CLI's; an embedded App
    leaves logging alone)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        notifiers: Mapping[str, Notifier] | None = None,
        rng: random.Random | None = None,
        dry_run: bool = False,
        out: TextIO | None = None,
        load_config: Callable[[Path], Config] = load_file,
        configure_logging: Callable[[LogConfig], None] | None = None,
    ) -> None:
        if not config.secrets_read:
            raise ValueError("a configuration loaded without its secrets cannot run")
        self.config = config
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._notifiers_given = notifiers
        self.dry_run = dry_run
        self._out = out or sys.stdout
        self._load_config = load_config
        self._configure_logging = configure_logging
        self._stack = contextlib.AsyncExitStack()
        self._store: Store | None = None
        self._client: AtlasClient | None = None
        self._deliverer: Deliverer | None = None
        self.notifiers: Mapping[str, Notifier] = {}
        self._cycle_lock = asyncio.Lock()
        self.last_cycle: CycleResult | None = None
        self.cycle_done = asyncio.Event()  # set after every committed cycle
        self.http_port: int | None = None  # bound port of /healthz and /metrics
        self.metrics = Metrics()
        self._poll = PollLoop(
            self.clock,
            PollSchedule(config.poll.interval, config.poll.jitter, self._rng),
            self._scheduled_cycle,
            self.metrics.cycles_late,
        )
        self._http: HttpEndpoint | None = None
        self._serving = False
        self._started = self.clock.monotonic()
        self._finished_at: float | None = None  # monotonic end of the last cycle
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_wanted = False
        self._parsing: set[threading.Thread] = set()  # reload reads, maybe stuck
        # Which organizations list in full at the next cycle: all of them at first.
        self.full_listings = FullListings(config.poll.full_listing_every, self.clock, self._rng)
        self._linked_hidden: set[str] = set()  # paying orgs warned about (once each)
        self._firing_labels: set[str] = set()  # rules the alerts_firing gauge names
        # How long ago stored times were, on the monotonic clock (poll_failure, repeat).
        self._elapsed = Elapsed(self.clock)
        # An error that stops the daemon (the state file gone): serve() raises it.
        self.fatal: StateFileGoneError | None = None
        self._stop: asyncio.Event | None = None
        self.leadership: Leadership | None = None  # replicas on PostgreSQL (leader.py)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> App:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        config = self.config
        settles = settled_statuses(config.rules)
        if self.dry_run:
            store = await open_copy(location(config.state), settles=settles)
        else:
            store = await open_store(location(config.state), settles=settles)
        self._store = store
        self._stack.push_async_callback(store.close)
        self.leadership = self._leadership(store)
        if not self.dry_run and self.leadership is None:
            # Messages of a cycle that a crash cut short (its organizations committed,
            # its end not reached) go out now.
            held = await store.release_held(config.delivery.group_over, self.clock.now())
            if held:
                log.info("released %d message(s) held by a cycle that did not end", held)
        self._client, self.notifiers = self._connect(config)
        self._deliverer = deliverer = Deliverer(
            store,
            self.notifiers,
            clock=self.clock,
            max_age=config.delivery.max_age,
            max_backoff=config.delivery.max_backoff,
            retention=config.delivery.retention,
            rng=self._rng,
            metrics=self.metrics,
            elapsed=self._elapsed,
            quiet=config.quiet_windows(),
        )
        if self.leadership is not None:
            deliverer.may_send = self.leadership.leading

    def _leadership(self, store: Store) -> Leadership | None:
        """Replicas on a PostgreSQL state: this one's part in the lease (None: an SQLite
        file, which one daemon locks, or a dry run, which writes nothing)."""
        url = location(self.config.state)
        if self.dry_run or not isinstance(url, StateUrl):
            return None
        from invoice_watch.store.postgres import PostgresStore
        from invoice_watch.store.postgres.lease import Lease

        assert isinstance(store, PostgresStore)
        lease = Lease(url, self.config.ha.lease_ttl, self.clock.monotonic)
        leadership = Leadership(
            store, lease, self.clock, self.metrics, self.config.delivery.group_over
        )
        self._stack.push_async_callback(leadership.stop)
        leadership.on_lead = self._poll.run_now  # a new leader polls at once
        return leadership

    def _connect(self, config: Config) -> tuple[AtlasClient, Mapping[str, Notifier]]:
        """The Atlas client and the notifiers for ``config``, closed when the App is."""
        return self._new_client(config), self._new_notifiers(config)

    def _new_client(self, config: Config) -> AtlasClient:
        client = AtlasClient(
            config.atlas,
            clock=self.clock,
            rng=self._rng,
            org_names={o.id: o.display_name for o in config.organizations},
            metrics=self.metrics,
        )
        self._stack.push_async_callback(client.aclose)
        return client

    def _new_notifiers(self, config: Config) -> Mapping[str, Notifier]:
        if self._notifiers_given is not None:
            return self._notifiers_given
        from invoice_watch.notify import build_notifiers

        notifiers = build_notifiers(config.notifiers)
        for notifier in notifiers.values():
            self._stack.push_async_callback(notifier.aclose)
        return notifiers

    @property
    def store(self) -> Store:
        assert self._store is not None, "use App inside `async with`"
        return self._store

    @property
    def client(self) -> AtlasClient:
        assert self._client is not None, "use App inside `async with`"
        return self._client

    @property
    def deliverer(self) -> Deliverer:
        assert self._deliverer is not None, "use App inside `async with`"
        return self._deliverer

    # -- one cycle -------------------------------------------------------------------

    async def run_cycle(self, *, baseline: bool = False) -> CycleResult:
        """fetch -> diff -> rules -> dedup -> commit; then wake the deliverer."""
        began = time.monotonic()
        async with self._cycle_lock:
            try:
                self.store.check_held()  # deleted or replaced under us: stop
                result = await self._cycle(baseline)
            except BaseException:
                self.metrics.cycles.labels(outcome="error").inc()
                raise
        self.last_cycle = result
        self._finished_at = self.clock.monotonic()
        self._record(result, time.monotonic() - began)
        self.cycle_done.set()
        sdnotify.status(
            f"last cycle {result.finished_at:%H:%M:%S} UTC: {result.orgs_ok} org(s) read, "
            f"{len(result.orgs_failed)} failed, {len(self.store.alerts.firing())} alert(s) firing"
        )
        self.deliverer.wake.set()
        return result

    def _record(self, result: CycleResult, seconds: float) -> None:
        m = self.metrics
        failed = len(result.orgs_failed)
        outcome = "ok" if not failed else ("partial" if result.orgs_ok else "failed")
        m.cycles.labels(outcome=outcome).inc()
        m.cycle_seconds.observe(seconds)
        m.orgs_failing.set(failed)
        m.invoices_seen.set(result.invoices)  # counted by the cycle already
        m.last_cycle_finished.set(result.finished_at.timestamp())
        firing: dict[str, int] = {rule.name: 0 for rule in self.config.rules}
        for alert in self.store.alerts.firing().values():
            firing[alert.rule] = firing.get(alert.rule, 0) + 1
        for rule_name in self._firing_labels - firing.keys():  # a rule gone, none firing
            with contextlib.suppress(KeyError):
                m.alerts_firing.remove(rule_name)
        for rule_name, count in firing.items():
            m.alerts_firing.labels(rule=rule_name).set(count)
        self._firing_labels = set(firing)

    def health(self) -> tuple[bool, str]:
        """The daemon's health (``/healthz``), from its last cycle and the one in flight
        (see :func:`health.health`), times measured on the monotonic clock (a wall-clock
        step cannot make a stale cycle look fresh)."""
        if self.leadership is not None and not self.leadership.leading():
            return True, self.leadership.describe()  # a healthy standby
        last = self.last_cycle
        age = None
        if self._finished_at is not None:
            age = timedelta(seconds=self.clock.monotonic() - self._finished_at)
        ok, why = health(
            last.finished_at if last else None,
            last.orgs_ok if last else 0,
            len(last.orgs_failed) if last else 0,
            self.config.poll.interval,
            self.clock.now(),
            age=age,
            in_flight=self._in_flight(),
        )
        if self.leadership is not None:
            why = f"{self.leadership.describe()}; {why}"
        return ok, why

    def liveness(self) -> tuple[bool, str]:
        """Whether the poll loop is alive (the systemd watchdog, ``/livez``; see
        :func:`health.liveness`): Atlas's answers play no part."""
        if self.leadership is not None and not self.leadership.leading():
            return True, self.leadership.describe()  # a standby's loop polls nothing
        now = self.clock.monotonic()
        last = self._finished_at if self._finished_at is not None else self._started
        return liveness(
            timedelta(seconds=max(0.0, now - last)), self.config.poll.interval, self._in_flight()
        )

    def _in_flight(self) -> InFlight | None:
        """The scheduled cycle running now, with its last sign of progress: a request to
        Atlas starting (on the monotonic clock), or the cycle's own start."""
        began = self._poll.started_at
        if began is None or self._client is None:
            return None
        now = self.clock.monotonic()
        last = self._client.last_request_at
        progress = began if last is None else max(last, began)
        atlas = self.config.atlas
        return InFlight(
            progress=timedelta(seconds=max(0.0, now - progress)),
            what="the last request to Atlas started",
            limit=progress_limit(atlas.timeout, atlas.max_backoff),
            running=timedelta(seconds=max(0.0, now - began)),
        )

    async def _cycle(self, baseline: bool) -> CycleResult:
        """One cycle, pipelined: each organization is diffed, evaluated, planned and
        committed (in its own transaction, with the other organizations read by then) as
        soon as its read is complete, while the others are still being read. What needs
        the whole cycle comes last, in one transaction: alerts that resolved (no
        organization holds them any more), the release of the cycle's held messages
        (grouped above ``group_over``), and the organizations that changed nothing. A
        daemon's cycle still running :data:`HOLD_SECONDS` after a commit held messages
        releases what it holds then (:class:`_Hold`)."""
        store, config = self.store, self.config
        started = self.clock.now()
        began = time.monotonic()
        org_ids = [org.id for org in config.organizations]
        known = {org_id: store.snapshot.get(org_id) for org_id in org_ids}
        # Incremental reads, but a full listing at start and once a day (FullListings).
        full = self.full_listings
        full.configure(config.poll.full_listing_every)
        decided_at = self.clock.monotonic()
        windows = {
            org_id: None if full.due(org_id, decided_at) else incremental_from(known[org_id])
            for org_id in org_ids
        }
        from_dates = {org_id: asked_from(window) for org_id, window in windows.items()}
        listed_in_full: list[str] = []  # marked done once the cycle is committed
        full_failed: list[str] = []  # read incrementally instead: tried again later
        instead: dict[str, OrgRead] = {}  # org -> the incremental read that stood in
        taken: set[str] = set()  # the organizations whose read `take` was given
        routes = {rule.name: list(rule.notify) for rule in config.rules}
        cycle = store.begin_cycle()
        elapsed = self._elapsed
        elapsed.sweep()
        payers = store.snapshot.payers()
        paying = frozenset(payers.values())  # as the cycle starts
        decide = CyclePlan(
            config, store.alerts.firing(), baseline=baseline, payers=payers, age=elapsed.age
        )
        unchanged: list[OrgWrite] = []  # written with the last transaction
        later: list[_Part] = []  # committed once their breakdowns are added
        deferred: set[str] = set()  # the organizations in `later`
        outgoing: list[Transition] = []  # those with an event, in the order they came
        unreadable: list[StateError] = []  # the state file, when a settled invoice is read
        contained: dict[str, str] = {}  # org -> why its part could not be committed

        def contain(part: _Part, exc: Exception) -> _Part:
            """An organization's part that the state file refused for what its read
            holds: that read counts as failed (recorded, poll_failure counts it), and
            what the cycle planned of it is withdrawn."""
            org_id = part.write.org_id
            cause = printable(str(exc) if isinstance(exc, UnstorableError) else _cause(exc))
            log.error(
                "%s: what Atlas listed could not be recorded (%s); this organization's "
                "read counts as failed, the others are recorded%s",
                config.org_name(org_id),
                cause,
                "" if isinstance(exc, UnstorableError) else ":\n" + traceback_text(exc),
            )
            decide.withdraw(org_id, part.transitions, part.previous)
            dropped = {id(t) for t in part.transitions}
            outgoing[:] = [t for t in outgoing if id(t) not in dropped]
            if org_id in listed_in_full:
                listed_in_full.remove(org_id)
            error = contained[org_id] = f"what Atlas listed could not be recorded: {cause}"
            now = elapsed.stamp()
            failed = OrgRead(org_id, error=error)
            step = step_org(
                failed, known[org_id], store.snapshot.org_state(org_id), store.snapshot.history, now
            )
            transitions, previous = decide.org(step, now)
            outgoing.extend(t for t in transitions if t.event is not None)
            return _Part(step.write, transitions, previous)

        async def stand_in(failed: OrgRead) -> OrgRead:
            """A full listing that failed (a timeout on a long history): the
            organization is read incrementally instead, when it was read before."""
            org_id = failed.org_id
            window = incremental_from(known[org_id])
            if window is None or failed.refused:
                return failed  # nothing can stand in for it: tried again next cycle
            full_failed.append(org_id)
            windows[org_id] = window
            read = await self.client.read_org(org_id, asked_from(window), known[org_id])
            instead[org_id] = read.outcome()
            if read.ok:  # (a failed one is logged as any failed read is)
                log.warning(
                    "%s: the full listing failed (%s); the invoices that can still change "
                    "were read instead, and the full listing is tried again later",
                    config.org_name(org_id),
                    failed.error,
                )
            return read

        hold = _Hold(
            lambda: store.release_cycle(cycle, config.delivery.group_over, self.clock.now()),
            self.clock,
            HOLD_SECONDS,
            self.deliverer.wake.set,
        )

        async def commit(orgs: list[OrgWrite], transitions: list[Transition]) -> None:
            await store.commit_orgs(cycle, elapsed.stamp(), orgs, transitions, routes)
            # Only a daemon delivers while a cycle runs (`run --once` delivers after it).
            if self._serving and any(t.event is not None for t in transitions):
                hold.held()

        writer = _Writer(commit, contain)

        async def take(read: OrgRead) -> None:
            org_id = read.org_id
            if org_id in taken:  # taking its read raised: it comes again, failed
                instead.pop(org_id, None)
            else:
                taken.add(org_id)
                if not read.ok and windows[org_id] is None:
                    read = await stand_in(read)
            from_date = windows[org_id]
            listed_from = datetime.combine(from_date, dtime(), UTC) if from_date else None
            stored = None
            if read.ok and (load := settled_to_load(known[org_id], read, listed_from=listed_from)):
                try:
                    stored = {i.id: i for i in await store.snapshot.stored_invoices(org_id, load)}
                except StateError as exc:
                    unreadable.append(exc)  # this organization waits for the next cycle
                    return
            change = None
            shared = NOTHING_SHARED
            hidden = hidden_linked(
                read, known[org_id], paying, listed_from=listed_from, stored=stored
            )
            if read.ok:
                change = listing_change(
                    read, known[org_id], listed_from=listed_from, stored=stored, hidden=hidden
                )
                shared = decide.shared(org_id, change.changed, known[org_id], store.snapshot.get)
            try:
                for other, ids in shared.load.items():
                    shared = shared.loaded(await store.snapshot.stored_invoices(other, ids))
            except StateError as exc:
                unreadable.append(exc)
                return
            if read.ok and from_date is None:
                listed_in_full.append(org_id)
            if read.ok:
                self._check_linked_visible(read, payers, hidden, full=from_date is None)
            now = elapsed.stamp()
            step = step_org(
                read,
                known[org_id],
                store.snapshot.org_state(org_id),
                store.snapshot.history,
                now,
                listed_from=listed_from,
                stored=stored,
                shared=shared,
                change=change,
                hidden=hidden,
            )
            self._log_read(step.view)
            transitions, previous = decide.org(step, now)
            if any(_wants_breakdown(t) for t in transitions) or shared.tellers & deferred:
                # Line items are fetched once every listing is read (never competing
                # with a listing for Atlas's rate limit); this org is committed then,
                # and so is one whose news another org deferred so told (after it).
                later.append(_Part(step.write, transitions, previous))
                deferred.add(org_id)
            elif transitions or step.write.changes_snapshot or not step.write.ok:
                writer.add(_Part(step.write, transitions, previous))
                outgoing.extend(t for t in transitions if t.event is not None)
            else:
                unchanged.append(step.write)

        try:
            listed = self.client.read_orgs(org_ids, from_dates, known)
            taken_reads = await take_reads(listed, take, config.org_name)
            reads = {org_id: taken_reads[org_id] for org_id in org_ids}
            if unreadable:
                raise unreadable[0]
            if later:
                combined = await self._add_breakdowns(
                    [t for part in later for t in part.transitions],
                    {k: v for part in later for k, v in part.previous.items()},
                )
                done = iter(combined)
                for part in later:
                    mine = [next(done) for _ in part.transitions]
                    decide.apply(mine)
                    writer.add(replace(part, transitions=mine))
                    outgoing.extend(t for t in mine if t.event is not None)
            reads.update(instead)
            await writer.flush()
            for org_id, error in contained.items():  # counted as failed reads
                reads[org_id] = OrgRead(org_id, error=error, requests=reads[org_id].requests)
            resolved = decide.resolved(self.clock.now())
            outgoing.extend(t for t in resolved if t.event is not None)
            events = [t.event for t in outgoing if t.event is not None]
            messages = group_messages(outgoing, config.delivery.group_over)
            finished = self.clock.now()
            result = CycleResult(
                started,
                finished,
                reads,
                events,
                messages,
                invoices=decide.invoices,
                changes=decide.changes,
            )
            if self.dry_run:
                self._print_dry_run(result)
            failed = sum(1 for read in reads.values() if not read.ok)
            await hold.stop()
            # Shielded: once the transaction has begun it completes even if the daemon is
            # told to stop; it is atomic either way.
            await asyncio.shield(
                store.finish_cycle(
                    cycle,
                    started,
                    finished,
                    unchanged,
                    resolved,
                    routes,
                    config.delivery.group_over,
                    orgs_ok=len(reads) - failed,
                    orgs_failed=failed,
                    released=hold.released,
                )
            )
            for org_id in listed_in_full:
                full.listed(org_id, decided_at)
            for org_id in full_failed:
                full.failed(org_id, decided_at)
        except BaseException:
            # What was committed stays (organization by organization, it is whole);
            # its held messages go out now, or when the state file is next opened.
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(writer.flush())
            with contextlib.suppress(Exception):
                await asyncio.shield(hold.stop())
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    store.release_held(config.delivery.group_over, self.clock.now())
                )
            raise
        log.info(
            "cycle: %d orgs read (%d in full), %d failed, %d invoices, %d changes, "
            "%d events, %d messages, %.2fs",
            result.orgs_ok,
            len(listed_in_full),
            len(result.orgs_failed),
            result.invoices,
            result.changes,
            len(events),
            len(messages),
            time.monotonic() - began,
        )
        return result

    def _check_linked_visible(
        self, read: OrgRead, payers: Mapping[str, str], hidden: Collection[str], *, full: bool
    ) -> None:
        """Warn once, at the first read that shows it (incremental or full), when a
        paying organization's listing shows none of the linked invoices it showed before
        (``hidden``: :func:`hidden_linked`; a ``full`` listing: none of the
        organizations known to be linked to it): Atlas shows linked invoices only to
        Organization Billing Admin or Organization Owner on the paying organization."""
        org_id = read.org_id
        if read.linked:
            self._linked_hidden.discard(org_id)  # said again if they vanish again
            return
        linked = sorted(linked for linked, payer in payers.items() if payer == org_id)
        if not (hidden or (full and linked)) or org_id in self._linked_hidden:
            return
        self._linked_hidden.add(org_id)
        log.warning(
            "%s: Atlas listed no linked invoices for this paying organization, though it "
            "listed invoices of %s nested in its listing before. Atlas shows linked "
            "invoices only to Organization Billing Admin or Organization Owner on the "
            "paying organization (Organization Billing Viewer sees none): grant the API "
            "key or service account one of those roles on %s.%s A linked organization "
            "under `organizations:` is still read through its own listing.",
            self.config.org_name(org_id),
            ", ".join(self.config.org_name(other) for other in linked) or "other organizations",
            org_id,
            f" Until Atlas lists them again, the {len(hidden)} linked invoice(s) "
            "invoice-watch holds for it are kept as they were, and their alerts neither "
            "resolve nor fire."
            if hidden
            else "",
        )

    def _log_read(self, view: OrgView) -> None:
        change = view.diff
        if change is None:
            log.warning("%s: %s", self.config.org_name(view.org_id), view.error)
            return
        for invoice in (*change.added, *(c.new for c in change.status_changed)):
            if invoice.status not in INVOICE_STATUSES:  # said once, when it appears
                log.warning(
                    "%s: invoice %s has status %r, which invoice-watch does not know: "
                    "it is kept (and read as an invoice that can still change); %s",
                    self.config.org_name(invoice.org_id),
                    invoice.id,
                    invoice.status,
                    _unknown_status_rules(self.config),
                )

    async def _add_breakdowns(
        self, transitions: list[Transition], previous: Mapping[str, AlertState | None]
    ) -> list[Transition]:
        """Attach the top projects and SKUs to FIRING/REMINDER messages about amounts.

        Line items come from the pending endpoint, fetched only here (never every cycle),
        once per organization, all organizations concurrently. A breakdown that cannot be
        fetched, built or stored (whatever the answer holds) costs the breakdown, never
        the message. ``previous``: the alerts' states before these transitions (a
        reminder says how the breakdown moved since).
        """
        wanted = [t for t in transitions if _wants_breakdown(t)]
        if not wanted:
            return transitions
        wanted_ids = {id(t) for t in wanted}

        async def line_items(org_id: str) -> dict[str, list[LineItem]]:
            try:
                return await self.client.pending_line_items(org_id)
            except FetchError as exc:
                log.warning("no breakdown for %s: %s", self.config.org_name(org_id), exc)
            except Exception as exc:  # a bug an answer triggers: this org's breakdowns
                log.error(
                    "no breakdown for %s: %s\n%s",
                    self.config.org_name(org_id),
                    _cause(exc),
                    traceback_text(exc),
                )
            return {}

        async with asyncio.TaskGroup() as group:  # every organization at once
            fetches = [
                group.create_task(line_items(org_id))
                for org_id in sorted({t.state.source_org_id for t in wanted})
            ]
        items: dict[str, list[LineItem]] = {}
        for fetch in fetches:
            items.update(fetch.result())
        out = []
        for t in transitions:
            event = t.event
            if id(t) in wanted_ids and event is not None and event.invoice_id in items:
                t = self._with_breakdown(t, items[event.invoice_id], previous.get(t.state.key))
            out.append(t)
        return out

    def _with_breakdown(
        self, t: Transition, items: list[LineItem], before: AlertState | None
    ) -> Transition:
        """``t`` with its event's breakdown of ``items``, or as it is when the breakdown
        cannot be built or stored (logged)."""
        event = t.event
        assert event is not None
        try:
            last = before.last_event.breakdown if before and before.last_event else ()
            with_lines = replace(event, breakdown=breakdown(items, last))
            why = unstorable(with_lines)
        except Exception as exc:  # a bug the line items trigger
            why = _cause(exc)
        if why is not None:
            log.warning(
                "no breakdown for %s (invoice %s): its line items cannot be stored (%s); "
                "the message goes without it",
                event.org_name,
                event.invoice_id,
                printable(why),
            )
            return t
        return replace(t, event=with_lines, state=replace(t.state, last_event=with_lines))

    def _print_dry_run(self, result: CycleResult) -> None:
        from invoice_watch.notify.render.plain import text

        out = self._out
        if not result.messages:
            print("dry run: nothing would be sent.", file=out)
        for notifier, events, part in result.messages:
            print(f"--- dry run: would send to {notifier} ---", file=out)
            print(text(events, part), file=out)
        print("dry run: nothing was sent and nothing was written.", file=out)

    # -- entry points ----------------------------------------------------------------

    async def run_once(self, *, baseline: bool = False, stop: asyncio.Event | None = None) -> int:
        """``run --once``: one cycle, then deliver for up to 60 s. Exit status 1 when an
        organization could not be read or a message is still waiting in the outbox.

        ``stop`` (SIGTERM, Ctrl-C or SIGHUP) ends it as the daemon's stop does: the cycle
        in flight finishes or is cut short (what it committed stays committed), what is
        due is delivered within :data:`SHUTDOWN_SECONDS`, and a message still waiting is
        said (exit 1)."""
        stop = stop if stop is not None else asyncio.Event()
        stopped_at: float | None = None  # monotonic

        async def bounded(work: Awaitable[_T], reserve: float | None) -> tuple[bool, _T | None]:
            """``work``'s result, or (False, None) when it was cut short: once ``stop``
            is set, it has until ``reserve`` seconds before the shutdown deadline (None:
            it ends at once)."""
            nonlocal stopped_at
            task = asyncio.ensure_future(work)
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not task.done():
                if stopped_at is None:
                    stopped_at = time.monotonic()
                    log.info("stopping: finishing the cycle in flight, delivering what is due")
                if reserve is not None:
                    left = stopped_at + SHUTDOWN_SECONDS - 2 - reserve - time.monotonic()
                    await asyncio.wait({task}, timeout=max(0.1, left))
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return False, None
            return True, task.result()

        status = 0
        if self.leadership is not None and not await self.leadership.step():
            print(
                f"error: this run is a {self.leadership.describe()}: another invoice-watch "
                "replica holds the lease of the state database; `run --once` runs nothing "
                "while a daemon leads",
                file=sys.stderr,
            )
            return 1
        if not stop.is_set():
            _, result = await bounded(self.run_cycle(baseline=baseline), reserve=2)
            if result is None:
                log.warning(
                    "the cycle was stopped before it ended; the organizations it had not "
                    "committed are read by the next run"
                )
            else:
                for org_id in result.orgs_failed:
                    print(
                        f"error: {self.config.org_name(org_id)}: {result.reads[org_id].error}",
                        file=sys.stderr,
                    )
                    status = 1
        if self.dry_run:
            return status
        failed_before = self.deliverer.totals.failed
        pending: int | None = None
        if not stop.is_set():
            _, pending = await bounded(self.deliverer.drain(ONCE_DELIVERY_SECONDS), None)
        if stop.is_set():  # one last pass over what is due, in the time left
            if stopped_at is None:
                stopped_at = time.monotonic()
            _, pending = await bounded(self.deliverer.drain(0), reserve=0)  # stop is set
            if pending is None:
                pending = (await self.store.outbox.counts()).get("pending", 0)
        assert pending is not None
        failed = self.deliverer.totals.failed - failed_before
        if failed:
            print(
                f"error: {failed} notification(s) failed for good (see `invoice-watch status`)",
                file=sys.stderr,
            )
            status = 1
        if pending:
            why = (
                "stopped before they could be delivered"
                if stop.is_set()
                else ("could not be delivered yet")
            )
            print(
                f"error: {pending} notification(s) {why}; they stay in the outbox for the "
                "next run (see `invoice-watch status`)",
                file=sys.stderr,
            )
            status = 1
        if unrecorded := self.deliverer.unrecorded:
            print(
                f"error: the state file {self.config.state.path} could not record the outcome "
                f"of {unrecorded} notification(s) (is its disk full?): those sent may be sent "
                "again by the next run",
                file=sys.stderr,
            )
            status = 1
        return status

    async def _scheduled_cycle(self) -> None:
        if self.leadership is not None and not self.leadership.leading():
            return  # a standby polls nothing
        try:
            await self.run_cycle()
        except StateFileGoneError as exc:
            log.error("%s", exc)
            self.fatal = exc
            if self._stop is not None:
                self._stop.set()
        except StateError as exc:
            log.error("cycle not recorded: %s", exc)
        except Exception:
            log.exception("cycle failed")

    async def serve(self, stop: asyncio.Event) -> None:
        """Run the daemon until ``stop`` is set. Raises :class:`ListenError` (before any
        cycle) when ``http.listen`` cannot be used, and :class:`StateFileGoneError`
        (after stopping) when the state file was deleted or replaced under it."""
        self._stop = stop
        if self.config.http is not None:
            self._http, self.http_port = await self._listen(self.config.http)
        self._serving = True
        lease = None
        if self.leadership is not None:
            await self.leadership.step()  # the first replica up leads from the start
            lease = asyncio.create_task(self.leadership.run(), name="lease")
        poll = asyncio.create_task(self._poll.run(), name="poll")
        delivery = asyncio.create_task(self.deliverer.run(), name="deliver")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        self._started = self.clock.monotonic()
        sdnotify.ready(f"watching {len(self.config.organizations)} organization(s)")
        log.info(
            "watching %d organization(s) every %s",
            len(self.config.organizations),
            config_duration(self.config.poll.interval),
        )
        try:
            await stop.wait()
        finally:
            sdnotify.stopping()
            log.info("stopping: no new cycle starts; finishing the cycle in flight")
            deadline = time.monotonic() + SHUTDOWN_SECONDS - 2
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
            if lease is not None:  # the lease is kept until the last delivery pass
                lease.cancel()
                await asyncio.gather(lease, return_exceptions=True)
            if self._reload_task is not None:  # a parse in its thread is abandoned
                self._reload_task.cancel()
                await asyncio.gather(self._reload_task, return_exceptions=True)
            await self._finish_cycle_in_flight(SHUTDOWN_SECONDS - 4)
            # Deliver what is due in the time left; the rest stays in the outbox.
            self.deliverer.stop()
            await asyncio.wait({delivery}, timeout=max(0.1, deadline - time.monotonic()))
            for task in (delivery, watchdog):
                task.cancel()
            await asyncio.gather(delivery, watchdog, return_exceptions=True)
            self._serving = False
            if self._http is not None:
                await self._http.stop()
                self._http = None
            log.info("stopped")
        if self.fatal is not None:
            raise self.fatal

    async def _listen(self, http: HttpConfig) -> tuple[HttpEndpoint, int]:
        endpoint = HttpEndpoint(
            self.metrics,
            self.health,
            http.host,
            http.port,
            max_connections=http.max_connections,
            idle_timeout=http.idle_timeout.total_seconds(),
            monotonic=self.clock.monotonic,
            live=self.liveness,
        )
        port = await endpoint.start()
        log.info("serving /healthz and /metrics on %s:%d", http.host, port)
        return endpoint, port

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the poll loop is alive (:meth:`liveness`):
        cycles finish, or the one in flight makes progress. Not while Atlas answers: a
        revoked key or an Atlas outage would get the daemon killed every WatchdogSec
        until the unit's start limit leaves it failed, and poll_failure would never
        fire (issue 14 §1). Judged on the monotonic clock, so a wall-clock step neither
        stops the pings of a daemon that polls nor keeps pinging for one that stopped."""
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        stopped = False
        while True:
            alive, why = self.liveness()
            if alive:
                sdnotify.watchdog()
                if stopped:
                    log.info("pinging systemd's watchdog again: %s", why)
            elif not stopped:
                log.error(
                    "not pinging systemd's watchdog: %s; systemd restarts the daemon once "
                    "WatchdogSec passes",
                    why,
                )
            stopped = not alive
            await self.clock.sleep(interval)

    # -- reload ----------------------------------------------------------------------

    def request_reload(self) -> asyncio.Task[None]:
        """Read the config file again and take it (SIGHUP). The file is parsed in a
        thread, off the event loop (a huge or hostile file cannot freeze the daemon);
        at most one reload runs at a time, and requests that arrive meanwhile make one
        more reload once it ends (the file as it is then), whatever their number; a
        read that takes :data:`RELOAD_SECONDS` is abandoned (logged). Returns the task
        that takes this request (done once it is taken or refused)."""
        self._reload_wanted = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reloads(), name="reload")
        return self._reload_task

    async def _reloads(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False
            source = self.config.source
            if source is None:
                log.error("config reload refused: the configuration was not read from a file")
                return
            self._parsing = {thread for thread in self._parsing if thread.is_alive()}
            if len(self._parsing) >= MAX_STUCK_RELOADS:
                log.error(
                    "config reload refused: %d earlier reads of %s never finished (a file "
                    "on a hung network file system?); restart the daemon to read it again",
                    len(self._parsing),
                    source,
                )
                continue
            try:
                config = await self._parse(source)
            except TimeoutError:
                log.error(
                    "config reload abandoned: reading %s has not finished after %s (a file "
                    "on a hung network file system?); keeping the running configuration%s",
                    source,
                    config_duration(RELOAD_SECONDS),
                    "; reading it again" if self._reload_wanted else "",
                )
                continue
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("config reload refused: %s", problem)
                log.error("keeping the running configuration")
                continue
            except Exception as exc:  # an unreadable file, a bug: the daemon goes on
                log.error("config reload refused: %s: %s", source, exc)
                log.error("keeping the running configuration")
                continue
            await self.reload(config)

    async def _parse(self, source: Path) -> Config:
        """The configuration file, read and validated in a thread of its own (off the
        event loop). Raises TimeoutError when that takes :data:`RELOAD_SECONDS` on the
        daemon's clock (the thread is left to itself: a daemon thread, holding nothing)."""
        parse = asyncio.ensure_future(_in_thread(self._load_config, source, self._parsing))
        timer = asyncio.ensure_future(self.clock.sleep(RELOAD_SECONDS))
        try:
            await asyncio.wait({parse, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not parse.done():
                parse.cancel()
            await asyncio.gather(timer, parse, return_exceptions=True)
        if parse.cancelled():
            raise TimeoutError
        return parse.result()

    async def reload(self, config: Config) -> bool:
        """Take a new configuration between cycles. Each changed setting is applied as
        :data:`invoice_watch.reload.APPLY` says; when one needs a restart (``state.path``),
        or the new ``http.listen`` cannot be used, nothing changes and the reload is
        refused, naming the setting. Returns whether the configuration was taken; logs
        the keys the files changed, and the new configuration's warnings."""
        if not config.secrets_read:
            raise ValueError("a configuration loaded without its secrets cannot run")
        changed = changes(self.config, config)
        restart = [key for key, how in changed.items() if how is Apply.RESTART]
        if restart:
            log.error(
                "config reload refused: %s changed, which takes a restart; keeping the "
                "running configuration",
                ", ".join(restart),
            )
            return False
        kinds = set(changed.values())
        async with self._cycle_lock:
            moved: tuple[HttpEndpoint | None, int | None] | None = None
            if Apply.HTTP in kinds and self._serving:
                try:
                    moved = await self._move_http(config.http)
                except ListenError as exc:
                    log.error("config reload refused: %s; keeping the running configuration", exc)
                    return False
            old_client, old_notifiers, old_config = self._client, self.notifiers, self.config
            if Apply.ATLAS in kinds:
                self._client = self._new_client(config)
            if Apply.NOTIFIERS in kinds:
                self.notifiers = self._new_notifiers(config)
            if kinds & {Apply.NOTIFIERS, Apply.DELIVERY}:
                self.deliverer.configure(
                    self.notifiers,
                    max_age=config.delivery.max_age,
                    max_backoff=config.delivery.max_backoff,
                    retention=config.delivery.retention,
                    quiet=config.quiet_windows(),
                )
            self.config = config
            if Apply.RULES in kinds:  # what the rules watch may have changed
                await self.store.snapshot.settle(settled_statuses(config.rules))
            if Apply.SCHEDULE in kinds:
                self._poll.configure(config.poll.interval, config.poll.jitter)
            if Apply.LOGGING in kinds and self._configure_logging is not None:
                self._configure_logging(config.log)
            if self.notifiers is not old_notifiers:
                for notifier in old_notifiers.values():
                    await notifier.aclose()
            if self._client is not old_client and old_client is not None:
                await old_client.aclose()
            if moved is not None:
                old_http, self._http = self._http, moved[0]
                self.http_port = moved[1]
                if old_http is not None:
                    await old_http.stop()
        log.info(
            "configuration reloaded: %d organization(s), %d rule(s), %d notifier(s)%s",
            len(config.organizations),
            len(config.rules),
            len(config.notifiers),
            _changed_text(list(changes(old_config, config, given=True))),
        )
        for warning in config.warnings:
            log.warning("%s", warning)
        return True

    async def _move_http(self, http: HttpConfig | None) -> tuple[HttpEndpoint | None, int | None]:
        """The endpoint of a reload's ``http`` section, listening (None when the section
        is gone); the caller stops the old one. On the address the old one holds, the
        old one stops first, and starts again if the new one then cannot listen."""
        if http is None:
            return None, None
        old, before = self._http, self.config.http
        if old is None or before is None or before.listen != http.listen or not http.port:
            return await self._listen(http)
        await old.stop()
        try:
            return await self._listen(http)
        except ListenError:
            try:
                self._http, self.http_port = await self._listen(before)
            except ListenError as exc:
                self._http = self.http_port = None
                log.error("the HTTP endpoint is down until the next reload or restart: %s", exc)
            raise

    async def _finish_cycle_in_flight(self, budget: float) -> None:
        task = self._poll.in_flight
        if task is None or task.done():
            return
        _, pending = await asyncio.wait({task}, timeout=budget)
        if pending:
            log.warning(
                "the cycle in flight did not finish in %.0fs: stopped; the organizations it "
                "had not committed are read by the next cycle",
                budget,
            )
            task.cancel()
            await asyncio.wait({task}, timeout=2)


async def take_reads(
    reads: AsyncGenerator[OrgRead, None],
    take: Callable[[OrgRead], Awaitable[None]],
    name: Callable[[str], str] = str,
) -> dict[str, OrgRead]:
    """Await ``take`` with each organization's read as :meth:`AtlasClient.read_orgs`
    hands it back, while the others are still being read, each in a task of its own (one
    that waits, for an incremental read standing in for a failed full listing or for the
    state file, holds back no other); returns the reads' outcomes
    (:meth:`OrgRead.outcome`) by organization, so that no organization's listing is held
    until the last one is taken.

    Containment: an exception from ``take`` for one organization (a bug) is logged with
    its traceback and makes that organization's read a failed one, which ``take`` is
    given again (so that it is recorded as any failed read is); it never stops another
    organization's. ``name``: an organization's name for the log. When this stops before
    every read is taken (cancelled, or a ``take`` raising a BaseException), ``reads`` is
    closed: the reads still under way are cancelled."""
    outcomes: dict[str, OrgRead] = {}

    async def one(read: OrgRead) -> None:
        org_id = read.org_id
        try:
            await take(read)
        except Exception as exc:  # this organization fails; the others go on
            log.error(
                "%s: taking its read failed unexpectedly; this organization's read counts "
                "as failed:\n%s",
                name(org_id),
                traceback_text(exc),
            )
            error = (
                f"organization {org_id}: taking its read failed unexpectedly "
                f"({_cause(exc)}); the traceback is in the log"
            )
            failed = outcomes[org_id] = OrgRead(org_id, error=error, requests=read.requests)
            try:
                await take(failed)
            except Exception as again:
                log.error(
                    "%s: recording its failed read failed unexpectedly:\n%s",
                    name(org_id),
                    traceback_text(again),
                )
            return
        outcomes[org_id] = read.outcome()

    async with contextlib.aclosing(reads), asyncio.TaskGroup() as group:
        async for read in reads:
            group.create_task(one(read))
            del read  # held by its task only, while it is taken
    return outcomes


def _cause(exc: BaseException) -> str:
    """An unforeseen exception in one line (its type and message, redacted, clipped)."""
    return redact(f"{type(exc).__name__}: {exc}")[:300]


def _unknown_status_rules(config: Config) -> str:
    """Which rules can match an invoice whose status invoice-watch does not know, in
    words: only a ``status_change`` rule that accepts any status on one side (no ``to``,
    or no ``from``) can; the other rules name the statuses they watch (or PENDING)."""
    names = [
        rule.name
        for rule in config.rules
        if rule.enabled
        and rule.type == "status_change"
        and (rule.to_statuses is None or rule.from_statuses is None)
    ]
    if not names:
        return "no rule can match it"
    return (
        f"only the status_change rule(s) {', '.join(names)} (without `to:` or `from:`) "
        "tell when an invoice moves to or from it; no other rule can match it"
    )


def _changed_text(keys: list[str], most: int = 10) -> str:
    """``; changed: a, b`` for the reload's log line, at most ``most`` keys named."""
    if not keys:
        return "; nothing changed"
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"; changed: {', '.join(keys[:most])}{more}"


async def _in_thread(
    function: Callable[[Path], _T], path: Path, threads: set[threading.Thread]
) -> _T:
    """``function(path)`` in a daemon thread, added to ``threads``: the event loop goes
    on meanwhile, and a thread still parsing at exit does not hold the process
    (``asyncio.to_thread``'s executor is joined by ``asyncio.run``). Cancelling the
    wait leaves the thread to end by itself."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: the daemon is stopping
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = function(path)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=run, name="config-reload", daemon=True)
    threads.add(thread)
    thread.start()
    return await future
