"""One poll cycle, a straight pipeline: each organization's read, as Atlas hands it
back, is compared with the snapshot, evaluated and planned, then committed, while the
others are still being read; what needs the whole cycle comes last.

The walk of one read (:meth:`Cycle.take`), each stage once, in order:

1. the read (:meth:`~invoice_watch.atlas.client.AtlasClient.read_orgs`, taken by
   :func:`take_reads`; a failed full listing read again incrementally,
   :meth:`~invoice_watch.listing.Windows.stand_in`);
2. compared with the snapshot (:func:`compare`: the settled invoices it needs whole,
   read from the store in one read before the diff; the diff; what other
   organizations listing the same invoices hold: :mod:`invoice_watch.linked`), then
   :func:`~invoice_watch.plan.step_org`;
3. the rules and the alert lifecycle (:meth:`~invoice_watch.plan.CyclePlan.org`);
4. the store's unit of work (:class:`~invoice_watch.writer.GroupCommit`), or, for a
   message that shows a breakdown, once the line items are fetched
   (:mod:`invoice_watch.breakdowns`).

Then, once: the RESOLVED transitions, and the store's last transaction
(:meth:`~invoice_watch.store.UnitOfWork.finish_cycle`), which releases the cycle's
messages, grouped as :func:`~invoice_watch.store.grouping.messages` says; the cycle's
result counts the messages the outbox released for it, while it ran (the held release)
and at its end (``CycleResult.released``, the "N messages" of its log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from functools import partial
from typing import TYPE_CHECKING, Protocol

from invoice_watch.alerts import Transition
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.breakdowns import add_breakdowns, wants_breakdown
from invoice_watch.clock import Clock
from invoice_watch.config import Config
from invoice_watch.constants import HOLD_SECONDS, INVOICE_STATUSES
from invoice_watch.diff import Diff, settled_to_load
from invoice_watch.elapsed import Elapsed
from invoice_watch.errors import StateError, UnstorableError
from invoice_watch.linked import (
    NOTHING_SHARED,
    HiddenLinkedWarning,
    Linked,
    Shared,
    hidden_linked,
)
from invoice_watch.listing import FullListings, Windows
from invoice_watch.plan import CyclePlan, listing_change, step_org
from invoice_watch.redact import printable
from invoice_watch.safe_text import exception_line, traceback_text
from invoice_watch.store import OrgWrite, SnapshotRepository, Store, grouping
from invoice_watch.types import AlertEvent, Invoice, OrgRead, Part, Snapshot
from invoice_watch.writer import GroupCommit, HeldRelease
from invoice_watch.writer import Part as CommitPart

if TYPE_CHECKING:
    from invoice_watch.anomaly import Detection

log = logging.getLogger(__name__)

# What processes a read in the task that read it (AtlasClient.read_orgs's `then`).
Then = Callable[[OrgRead], Awaitable[OrgRead]]


class ReadOrgs(Protocol):
    """:meth:`AtlasClient.read_orgs` with its organizations given (``then`` left)."""

    def __call__(self, *, then: Then) -> AsyncGenerator[OrgRead, None]: ...


Message = tuple[str, list[AlertEvent], Part | None]  # notifier, events, which part


@dataclass
class CycleResult:
    started_at: datetime
    finished_at: datetime
    reads: dict[str, OrgRead]
    events: list[AlertEvent] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    invoices: int = 0
    changes: int = 0
    # The messages the outbox released for the cycle (while it ran and at its end; None
    # until it ended); ``messages``: its events as grouped all at once (a dry run's).
    released: int | None = None

    @property
    def orgs_failed(self) -> list[str]:
        return [org_id for org_id, read in self.reads.items() if not read.ok]

    @property
    def orgs_ok(self) -> int:
        return len(self.reads) - len(self.orgs_failed)


@dataclass
class Compared:
    """What the snapshot stage makes of one read (:func:`compare`)."""

    read: OrgRead
    stored: dict[str, Invoice] | None = None  # settled invoices read from the store
    change: Diff | None = None
    shared: Shared = NOTHING_SHARED
    hidden: frozenset[str] = frozenset()


class Cycle:
    """One cycle's run (:meth:`run`): built by :class:`~invoice_watch.runner.
    CycleRunner` for each cycle, with what outlives it (the full listings' schedule,
    the monotonic ages, the warning about hidden linked invoices). ``delivering``: a
    daemon, whose deliverer sends what a running cycle releases (``wake``)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        client: AtlasClient,
        clock: Clock,
        *,
        elapsed: Elapsed,
        full: FullListings,
        warning: HiddenLinkedWarning,
        baseline: bool = False,
        delivering: bool = False,
        wake: Callable[[], None] = lambda: None,
        usage: Callable[[str], Mapping[str, Detection]] = lambda org_id: {},
    ) -> None:
        self.config, self.store, self.client, self.clock = config, store, client, clock
        self._elapsed, self._warning = elapsed, warning
        org_ids = self.org_ids = [org.id for org in config.organizations]
        self._known = {org_id: store.snapshot.get(org_id) for org_id in org_ids}
        full.configure(config.poll.full_listing_every)
        self._windows = Windows(self._known, full, clock.monotonic())
        self._taken: set[str] = set()  # the organizations whose read `take` was given
        self._routes = {rule.name: list(rule.notify) for rule in config.rules}
        self._number = store.begin_cycle()
        elapsed.sweep()
        self._payers = store.snapshot.payers()
        self._paying = frozenset(self._payers.values())  # as the cycle starts
        self.plan = CyclePlan(
            config,
            store.alerts.firing(),
            baseline=baseline,
            payers=self._payers,
            age=elapsed,
        )
        self._unchanged: list[OrgWrite] = []  # written with the last transaction
        self._later: list[CommitPart] = []  # committed once their breakdowns are added
        self._deferred: set[str] = set()  # the organizations in `later`
        self._outgoing: list[Transition] = []  # those with an event, in the order they came
        self._unreadable: list[StateError] = []  # the state file, for a settled invoice
        self._contained: dict[str, str] = {}  # org -> why its part could not be committed
        self._delivering, self._usage = delivering, usage  # usage: usage_watch.py's verdicts
        self._hold = HeldRelease(
            lambda: store.release_cycle(self._number, config.delivery.group_over, clock.now()),
            clock,
            HOLD_SECONDS,
            wake,
        )
        self._writer = GroupCommit(self._commit, self._contain)

    async def run(self) -> CycleResult:
        """The cycle, start to end; what it committed stays committed when it raises
        or is cancelled (organization by organization, each is whole), and the messages
        it held are released then (or when the state file is next opened)."""
        began, started = time.monotonic(), self.clock.now()
        config, store, plan, writer = self.config, self.store, self.plan, self._writer
        try:
            from_dates = self._windows.from_dates()
            stage = store.staging.stages(self._known, self._payers)
            listed = partial(self.client.read_orgs, self.org_ids, from_dates, self._known, stage)
            taken = await take_reads(listed, self.take, config.org_name)
            reads = {org_id: taken[org_id] for org_id in self.org_ids}
            if self._unreadable:
                raise self._unreadable[0]
            await self._commit_later()
            reads.update(self._windows.instead)
            await writer.flush()
            for org_id, error in self._contained.items():  # counted as failed reads
                reads[org_id] = OrgRead(org_id, error=error, requests=reads[org_id].requests)
            resolved = plan.resolved(self.clock.now())
            self._outgoing.extend(t for t in resolved if t.event is not None)
            outgoing = self._outgoing
            result = CycleResult(
                started,
                self.clock.now(),
                reads,
                [t.event for t in outgoing if t.event is not None],
                grouping.cycle_messages(outgoing, self._routes, config.delivery.group_over),
                invoices=plan.invoices,
                changes=plan.changes,
            )
            result.released = await self._finish(result, resolved)
        except BaseException:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(writer.flush())
            with contextlib.suppress(Exception):
                await asyncio.shield(self._hold.stop())
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    store.release_held(config.delivery.group_over, self.clock.now())
                )
            raise
        finally:
            # The writer and the held release call back into this cycle: let go of them,
            # so that nothing of a cycle outlives it until the garbage collector runs.
            del self._writer, self._hold
        log.info(
            "cycle: %d orgs read (%d in full), %d failed, %d invoices, %d changes, "
            "%d events, %d messages, %.2fs",
            result.orgs_ok,
            len(self._windows.in_full),
            len(result.orgs_failed),
            result.invoices,
            result.changes,
            len(result.events),
            result.released,
            time.monotonic() - began,
        )
        return result

    async def take(self, read: OrgRead) -> None:
        """One organization's read through the pipeline (see the module's docstring)."""
        org_id = read.org_id
        if org_id in self._taken:  # taking its read raised: it comes again, failed
            self._windows.instead.pop(org_id, None)
        else:
            self._taken.add(org_id)
            if not read.ok and self._windows.window[org_id] is None:
                name = self.config.org_name(org_id)
                read = await self._windows.stand_in(read, self.client.read_org, name)
        listed_from, known = self._windows.window[org_id], self._known[org_id]
        try:
            compared = await compare(
                read, known, listed_from, self.store.snapshot, self.plan.linked, self._paying
            )
        except StateError as exc:
            self._unreadable.append(exc)  # this organization waits for the next cycle
            return
        if read.ok and listed_from is None:
            self._windows.in_full.append(org_id)
        if read.ok:
            self._warning.check(
                self.config, read, self._payers, compared.hidden, full=listed_from is None
            )
        now = self._elapsed.stamp()
        step = step_org(
            read,
            known,
            self.store.snapshot.org_state(org_id),
            self.store.snapshot.history,
            now,
            listed_from=listed_from,
            stored=compared.stored,
            shared=compared.shared,
            change=compared.change,
            hidden=compared.hidden,
        )
        log_read(self.config, org_id, step.view.diff, step.view.error)
        if read.ok and (usage := self._usage(org_id)):
            step = replace(step, view=replace(step.view, usage=usage))
        transitions, previous = self.plan.org(step, now)
        part = CommitPart(step.write, transitions, previous)
        if any(wants_breakdown(t) for t in transitions) or (
            compared.shared.tellers & self._deferred
        ):
            # Line items are fetched once every listing is read (never competing
            # with a listing for Atlas's rate limit); this org is committed then,
            # and so is one whose news another org deferred so told (after it).
            self._later.append(part)
            self._deferred.add(org_id)
        elif transitions or step.write.changes_snapshot or not step.write.ok:
            self._writer.add(part)
            self._outgoing.extend(t for t in transitions if t.event is not None)
        else:
            self._unchanged.append(step.write)

    async def _commit(self, orgs: list[OrgWrite], transitions: list[Transition]) -> None:
        await self.store.commit_orgs(
            self._number, self._elapsed.stamp(), orgs, transitions, self._routes
        )
        # Only a daemon delivers while a cycle runs (`run --once` delivers after it).
        if self._delivering and any(t.event is not None for t in transitions):
            self._hold.held()

    def _contain(self, part: CommitPart, exc: Exception) -> CommitPart:
        """An organization's part that the state file refused for what its read holds:
        that read counts as failed (recorded, poll_failure counts it), and what the
        cycle planned of it is withdrawn."""
        org_id = part.write.org_id
        unstorable = isinstance(exc, UnstorableError)
        cause = printable(str(exc) if unstorable else exception_line(exc))
        log.error(
            "%s: what Atlas listed could not be recorded (%s); this organization's "
            "read counts as failed, the others are recorded%s",
            self.config.org_name(org_id),
            cause,
            "" if unstorable else ":\n" + traceback_text(exc),
        )
        self.plan.withdraw(org_id)
        dropped = {id(t) for t in part.transitions}
        self._outgoing[:] = [t for t in self._outgoing if id(t) not in dropped]
        if org_id in self._windows.in_full:
            self._windows.in_full.remove(org_id)
        error = self._contained[org_id] = f"what Atlas listed could not be recorded: {cause}"
        now = self._elapsed.stamp()
        snapshot = self.store.snapshot
        failed = OrgRead(org_id, error=error)
        step = step_org(
            failed, self._known[org_id], snapshot.org_state(org_id), snapshot.history, now
        )
        transitions, previous = self.plan.org(step, now)
        self._outgoing.extend(t for t in transitions if t.event is not None)
        return CommitPart(step.write, transitions, previous)

    async def _commit_later(self) -> None:
        """The parts that waited for their breakdowns, with them, in the order read."""
        later = self._later
        if not later:
            return
        combined = await add_breakdowns(
            self.client,
            self.config,
            [t for part in later for t in part.transitions],
            {k: v for part in later for k, v in part.previous.items()},
        )
        done = iter(combined)
        for part in later:
            mine = [next(done) for _ in part.transitions]
            self._writer.add(replace(part, transitions=mine))
            self._outgoing.extend(t for t in mine if t.event is not None)

    async def _finish(self, result: CycleResult, resolved: list[Transition]) -> int:
        """The cycle's last transaction, then the full listings it did are marked; the
        messages the outbox released for the cycle."""
        failed = len(result.orgs_failed)
        await self._hold.stop()
        # Shielded: once the transaction has begun it completes even if the daemon is
        # told to stop; it is atomic either way.
        released = await asyncio.shield(
            self.store.finish_cycle(
                self._number,
                result.started_at,
                result.finished_at,
                self._unchanged,
                resolved,
                self._routes,
                self.config.delivery.group_over,
                orgs_ok=len(result.reads) - failed,
                orgs_failed=failed,
                released=self._hold.released,
            )
        )
        self._windows.done()
        return released


async def compare(
    read: OrgRead,
    known: Snapshot,
    listed_from: date | None,
    snapshot: SnapshotRepository,
    linked: Linked,
    paying: Collection[str],
) -> Compared:
    """The snapshot stage of one read: what the snapshot holds of ``read`` (``known``:
    its organization's, as the cycle began; ``listed_from``: its window), and how the
    read differs from it (the diff, and what other configured organizations that list
    the same invoices hold: ``linked``). Raises :class:`StateError` when the store
    cannot be read.

    The store is read once, before the diff (:meth:`~invoice_watch.store.
    SnapshotRepository.stored_copies`), and only when the read needs a settled
    invoice whole: settled invoices are kept in memory as keys only, and the diff
    needs those the read changed or no longer lists
    (:func:`~invoice_watch.diff.settled_to_load`), the news the other organizations'
    copies of the linked invoices this one holds no copy of
    (:meth:`~invoice_watch.linked.Linked.to_load`). The rest is pure. Only when, while
    this read waited for the store, another organization's read or commit of this cycle
    gave it a settled copy of an invoice this one lists for the first time (the first
    read could not name it) is the store read again, for those copies alone."""
    if not read.ok:
        return Compared(read)
    org_id = read.org_id
    wanted: dict[str, list[str]] = linked.to_load(read, known, snapshot.get)
    if own := settled_to_load(known, read, listed_from=listed_from):
        wanted[org_id] = own
    copies = await snapshot.stored_copies(wanted) if wanted else {}
    stored = copies.get(org_id)
    hidden = hidden_linked(read, known, paying, listed_from=listed_from, stored=stored)
    change = listing_change(read, known, listed_from=listed_from, stored=stored, hidden=hidden)
    shared = linked.shared(org_id, change.changed, known, snapshot.get, copies)
    if shared.load:  # named by no read before: see above
        shared = shared.loaded(
            invoice
            for found in (await snapshot.stored_copies(shared.load)).values()
            for invoice in found.values()
        )
    return Compared(read, stored, change, shared, hidden)


async def take_reads(
    read_orgs: ReadOrgs,
    take: Callable[[OrgRead], Awaitable[None]],
    name: Callable[[str], str] = str,
) -> dict[str, OrgRead]:
    """Await ``take`` with each organization's read as soon as it is read, while the
    others are still being read, in the task that read it (``read_orgs(then=...)``:
    :meth:`AtlasClient.read_orgs` with ``then``; one that waits, for an incremental
    read standing in for a failed full listing or for the state file, holds back no
    other); returns the reads' outcomes (:meth:`OrgRead.outcome`) by organization, so
    that no organization's listing is held until the last one is taken. One task per
    organization, not one to read and one to take (a steady reference cycle: 2.7% fewer
    instructions, 300 tasks fewer).

    Containment: an exception from ``take`` for one organization (a bug) is logged with
    its traceback and makes that organization's read a failed one, which ``take`` is
    given again (so that it is recorded as any failed read is); it never stops another
    organization's. ``name``: an organization's name for the log. When this stops before
    every read is taken (cancelled, or a ``take`` raising a BaseException), the reads
    still under way are cancelled (as the others' takes are)."""

    async def one(read: OrgRead) -> OrgRead:
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
                f"({exception_line(exc)}); the traceback is in the log"
            )
            failed = OrgRead(org_id, error=error, requests=read.requests)
            try:
                await take(failed)
            except Exception as again:
                log.error(
                    "%s: recording its failed read failed unexpectedly:\n%s",
                    name(org_id),
                    traceback_text(again),
                )
            return failed
        return read.outcome()

    async with contextlib.aclosing(read_orgs(then=one)) as reads:
        return {outcome.org_id: outcome async for outcome in reads}


def log_read(config: Config, org_id: str, change: Diff | None, error: str | None) -> None:
    """A failed read's warning, and one for each invoice in a status unknown so far."""
    if change is None:
        log.warning("%s: %s", config.org_name(org_id), error)
        return
    for invoice in (*change.added, *(c.new for c in change.status_changed)):
        if invoice.status not in INVOICE_STATUSES:  # said once, when it appears
            log.warning(
                "%s: invoice %s has status %r, which invoice-watch does not know: "
                "it is kept (and read as an invoice that can still change); %s",
                config.org_name(invoice.org_id),
                invoice.id,
                invoice.status,
                _unknown_status_rules(config),
            )


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
