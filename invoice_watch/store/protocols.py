"""The state as the rest of invoice_watch sees it: small Protocols a backend implements.

The cycle (cycle.py), the App (app.py), delivery (deliver/) and the operator commands
(ops.py, cli/) use these and nothing else: no database type, SQL or file detail passes
them. The SQLite backend (:mod:`invoice_watch.store.sqlite`) is the embedded one;
PostgreSQL (:mod:`invoice_watch.store.postgres`, for replicas) implements the same
Protocols, and the store tests run against any backend through the ``store`` fixture.

- :class:`SnapshotRepository`: what Atlas last listed per configured organization
  (invoices), the pending amounts seen (amount history), and each organization's read
  state.
- :class:`NotificationLog`: the state of each alert (firing, last notified, where its
  messages went).
- :class:`Outbox`: the messages to send, with their delivery attempts; what the
  operator commands list of them.
- :class:`CycleLog`: the cycles that ended, for ``status`` and the health check.
- :class:`SilenceRepository`: the silences (issue 18), written by the ``silence``
  commands also while the daemon runs, and their lifting.
- :class:`UsageRepository`: each organization's line items (daily usage) for this
  billing period and the one before, and when they were last fetched (issue 19).
- :class:`ReportRunRepository`: when each report was last due, and due reports
  enqueued once (issue 19 §2).
- :class:`UnitOfWork`: what spans them in ONE transaction: an organization's snapshot
  update, its alert changes and the messages they cause (held until the cycle ends, or
  released while it runs), the release of held messages, and retention.
- :class:`Store`: all of them, and the store's own life (check, close).

Every method that reads or writes the database is a coroutine; a read a cycle makes
per invoice is answered from memory (each repository keeps its cache, updated once a
transaction committed). A failure of the database is a
:class:`~invoice_watch.errors.StateError` saying what to do; a value of a read that the
database cannot take is an :class:`~invoice_watch.errors.UnstorableError`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Protocol

from invoice_watch.store.records import (
    AlertState,
    Delivery,
    Lifted,
    OrgState,
    OrgWrite,
    OutboxRow,
    PeriodUsage,
    Silence,
    UsageRead,
)
from invoice_watch.types import AlertEvent, Invoice, LineItem, Snapshot

if TYPE_CHECKING:
    from invoice_watch.atlas.paging import Stage


class AlertChange(Protocol):
    """A change to one alert's state and the event to send, if any
    (:class:`~invoice_watch.alerts.Transition` is one)."""

    @property
    def state(self) -> AlertState: ...

    @property
    def event(self) -> AlertEvent | None: ...


class SnapshotRepository(Protocol):
    """The snapshot: invoices per configured organization, their amount history, and
    each organization's read state. The cached reads cost no I/O."""

    def get(self, org_id: str) -> Snapshot:
        """The organization's invoices as last listed (settled ones as keys only:
        :class:`~invoice_watch.types.Snapshot`); empty when it holds none."""
        ...

    def org_state(self, org_id: str) -> OrgState: ...

    def org_states(self) -> list[OrgState]:
        """Every organization's read state, by id."""
        ...

    def history(self, invoice_id: str) -> list[tuple[datetime, int]]:
        """A pending invoice's amounts (cents) as observed, oldest first."""
        ...

    def payers(self) -> Mapping[str, str]:
        """Linked organization -> the configured organization whose listing showed its
        invoices nested (its payer), as held since the store was opened."""
        ...

    def invoice_count(self) -> int:
        """Invoices held (one listed by two configured organizations twice)."""
        ...

    async def stored_invoices(
        self, org_id: str | None = None, ids: Sequence[str] | None = None
    ) -> list[Invoice]:
        """Invoices as the database holds them, settled ones whole: every one, one
        configured organization's (``org_id``), or some of its (``ids``)."""
        ...

    async def stored_copies(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, Invoice]]:
        """Some invoices of several configured organizations as the database holds them,
        settled ones whole, in one read: organization -> ids in, organization -> id ->
        invoice out (those it does not hold left out)."""
        ...

    async def settle(self, statuses: frozenset[str]) -> None:
        """Keep invoices of these statuses settled in memory from now on (a reload
        changed what the rules watch)."""
        ...


class NotificationLog(Protocol):
    """The notification log: the state of every alert. Only firing ones are cached
    (a resolved one is read by no cycle)."""

    def firing(self) -> dict[str, AlertState]:
        """The firing alerts, by key (a copy)."""
        ...


class Outbox(Protocol):
    """The messages to send, one per notifier (a grouped message is one), and what
    became of them: pending (due at ``next_attempt_at``), held (by a cycle that has not
    ended), sent or failed."""

    async def due(
        self, now: datetime, limit: int = 100, *, exclude: Collection[int] = ()
    ) -> list[Delivery]:
        """The pending messages due at ``now``, oldest first, but for those ``exclude``
        names (by id: messages whose outcome is not recorded yet)."""
        ...

    async def waiting_since(self, limit: int = 10_000) -> list[datetime]:
        """When the messages waiting (held or pending) were created: each distinct time
        once, oldest first, at most ``limit`` of them."""
        ...

    async def next_attempt_at(self) -> datetime | None:
        """When the next pending message is due (None: none is pending)."""
        ...

    async def unnotified(self, notifier: str, limit: int = 10_000) -> set[tuple[str, datetime]]:
        """The alert episodes, as (alert key, ``firing_since``), whose FIRING message for
        ``notifier`` has not been sent: it waits, held by a running cycle, silenced, or
        pending and delivered to none of its recipients (its receiver failing, quiet
        hours); at most ``limit`` of them."""
        ...

    async def merge(self, ids: Sequence[int]) -> None:
        """Make the pending messages ``ids`` (in order, oldest first; each one of its own
        or a group's leader) one grouped message led by the first: from then on it is
        sent, retried and marked as one, after a restart too (a quiet-hours summary)."""
        ...

    async def mark_sent(self, delivery_id: int, now: datetime) -> None: ...

    async def mark_retry(
        self,
        delivery_id: int,
        next_attempt_at: datetime,
        error: str,
        owed: Sequence[str] | None = None,
        *,
        hold: bool = True,
    ) -> None:
        """Schedule the message's next attempt, for the recipients ``owed`` when some
        got it already (None: all of them; the next :meth:`due` gives them back as
        :attr:`Delivery.owed <invoice_watch.store.records.Delivery.owed>`); the same
        notifier's other pending messages that were due earlier wait until then too
        (``hold``; not when the failure was only some recipients')."""
        ...

    async def postpone(
        self, delivery_id: int, until: datetime, error: str, owed: Sequence[str] | None = None
    ) -> None:
        """As :meth:`mark_retry`, but counting no attempt (none was made)."""
        ...

    async def mark_failed(
        self, delivery_id: int, now: datetime, error: str, owed: Sequence[str] | None = None
    ) -> None:
        """Mark the message failed (for the recipients ``owed`` only, when some got it)."""
        ...

    async def make_due(self, notifiers: Collection[str], now: datetime) -> int:
        """Make every pending message for ``notifiers`` due ``now``; returns how many."""
        ...

    async def bound_schedule(self, now: datetime, latest: datetime) -> int:
        """Make every pending message scheduled after ``latest`` due ``now`` (a wall
        clock set back since); returns how many."""
        ...

    async def pending_by_notifier(self) -> dict[str, int]: ...

    async def counts(self) -> dict[str, int]:
        """How many messages are in each state (held, pending, sent, failed)."""
        ...

    async def messages(self, states: Iterable[str], limit: int = 50) -> list[OutboxRow]:
        """The newest messages in ``states``, newest first (for the operator)."""
        ...


class CycleLog(Protocol):
    """The cycles that ended."""

    async def last(self) -> tuple[datetime, int, int] | None:
        """(finished at, organizations read, organizations failed) of the last cycle
        that ended; None before the first."""
        ...


class SilenceRepository(Protocol):
    """The silences (:mod:`invoice_watch.silences`). Not cached: a ``silence`` command
    writes them while the daemon runs, and the daemon reads them where it uses them.

    Releasing held messages (:meth:`UnitOfWork.finish_cycle`, :meth:`UnitOfWork.
    release_cycle`, :meth:`UnitOfWork.release_held`) applies the active silences to each
    message before grouping, as :func:`~invoice_watch.silences.on_release` says: a
    silenced one waits in state ``silenced``, a RESOLVED whose FIRING was silenced and
    never sent is ``muted`` with the silenced messages of its episode."""

    async def add(self, silence: Silence) -> None: ...

    async def expire(self, silence_id: str, now: datetime) -> Silence | None:
        """End the silence ``now`` (one that ended already stays as it is); None when no
        silence has that id."""
        ...

    async def listing(
        self, now: datetime, *, expired: bool = False, limit: int = 100
    ) -> list[Silence]:
        """The silences that have not ended at ``now``, ending first first; with
        ``expired``, every one kept, the latest ending first."""
        ...

    async def silence_pending(self, now: datetime, ids: Collection[int]) -> dict[str, int]:
        """Apply the silences active at ``now`` to the pending messages ``ids`` (and the
        rows grouped with them) that delivery is about to send, as
        :func:`~invoice_watch.silences.on_delivery` says: silenced ones wait in state
        ``silenced``, a RESOLVED whose FIRING was or would be silenced is ``muted`` with
        its episode's unsent messages, and each leaves its grouped message. A message
        owed to some recipients only (delivered to the others) is left alone. Returns
        how many rows were silenced or muted, per notifier; reads one indexed row and
        writes nothing when no silence holds."""
        ...

    async def lift(self, now: datetime) -> Lifted:
        """Each silenced message that no active silence matches at ``now``: pending now
        (a FIRING whose alert still fires in the same episode) or ``muted``
        (:func:`~invoice_watch.silences.on_lift`)."""
        ...


class UsageRepository(Protocol):
    """The line items held per configured organization: its pending invoice's daily
    usage (``lineItems:search``, or the CSV) for this billing period and the one before
    (:data:`~invoice_watch.store.sql.usage.KEEP_PERIODS`), fetched at most once per
    ``usage.refresh``, and when that was. :meth:`read_state` and
    :meth:`project_totals` are cached (no I/O); the line items are read from the
    database (:meth:`periods`)."""

    def read_state(self, org_id: str) -> UsageRead | None:
        """When the organization's line items were last fetched or tried (None:
        never), as recorded: a restart reads it back."""
        ...

    def project_totals(self, org_id: str) -> Mapping[tuple[str, str], int]:
        """(project id, project name) -> cents of the line items last fetched of the
        pending invoice (month to date per project); empty when none are held."""
        ...

    async def periods(self, org_id: str, count: int = 2) -> list[PeriodUsage]:
        """The line items held of the organization's last ``count`` billing periods,
        newest first (this period, then the one before), each oldest day first."""
        ...

    async def record(
        self,
        org_id: str,
        invoice_id: str,
        period_start: date,
        items: Sequence[LineItem],
        source: str,
        at: datetime,
        *,
        current: bool = True,
    ) -> None:
        """Replace the line items held of one invoice (``source``: "search" or "csv";
        ``current``: the pending invoice's, whose fetch time this is; otherwise a past
        period's), forgetting periods older than those kept."""
        ...

    async def record_failure(self, org_id: str, at: datetime, error: str) -> None:
        """A fetch failed ``at``: the line items held stay, the attempt is recorded."""
        ...


class ReportRunRepository(Protocol):
    """When each report (and scope) was last due, and due reports enqueued in the
    outbox once per due time (``report_runs``; :class:`~invoice_watch.store.sql.reports.
    SqlReportRuns`), for :class:`~invoice_watch.report.scheduler.Reporter`."""

    async def last_due(self) -> dict[tuple[str, str], datetime]: ...

    async def start(self, report: str, scope: str, since: datetime) -> datetime: ...

    async def move(self, report: str, scope: str, old: datetime, new: datetime) -> datetime: ...

    async def forget(self, keys: Sequence[tuple[str, str]]) -> None: ...

    async def enqueue(
        self,
        report: str,
        scope: str,
        due: datetime,
        notifiers: Sequence[str],
        message: str,
        summary: str,
        now: datetime,
    ) -> bool: ...


class UnitOfWork(Protocol):
    """What is written in ONE transaction across the repositories. Each organization's
    part of a cycle (its snapshot changes, its alerts' changes and the messages they
    cause) is committed as soon as it is read; the messages are held until the cycle
    ends (:meth:`finish_cycle`: only then is it known whether a notifier's go one by one
    or grouped), or released while it runs (:meth:`release_cycle`); those of a cycle
    that never ended are released by :meth:`release_held`. Caches change only once a
    transaction committed: a failed one changes nothing."""

    def begin_cycle(self) -> int:
        """A number for a new cycle, to tag the messages it holds."""
        ...

    async def heartbeat(self, at: datetime) -> None:
        """A running cycle made progress at ``at`` (a request to Atlas started): what
        another process (``status --check``) judges a cycle in flight by."""
        ...

    async def commit_orgs(
        self,
        cycle: int,
        at: datetime,
        orgs: Sequence[OrgWrite],
        transitions: Sequence[AlertChange],
        routes: Mapping[str, Sequence[str]],
    ) -> None:
        """These organizations' snapshot changes, alert changes and their events, held
        (one message per event and notifier: the alert's ``notifiers``, else ``routes``:
        rule name -> notifier names)."""
        ...

    async def finish_cycle(
        self,
        cycle: int,
        started_at: datetime,
        finished_at: datetime,
        orgs: Sequence[OrgWrite],
        transitions: Sequence[AlertChange],
        routes: Mapping[str, Sequence[str]],
        group_over: int,
        *,
        orgs_ok: int,
        orgs_failed: int,
        released: int = 0,
    ) -> int:
        """The cycle's last transaction: what is left to write (as :meth:`commit_orgs`),
        every held message released (grouped above ``group_over``), and the cycle
        recorded with its events (those held at its end, and ``released`` before).
        Returns how many messages the outbox released for the cycle: at its end and by
        :meth:`release_cycle` (a grouped message counts once, a silenced one not)."""
        ...

    async def release_cycle(self, cycle: int, group_over: int, now: datetime) -> int:
        """Release the messages ``cycle`` holds so far, while it goes on; returns how
        many were released."""
        ...

    async def release_held(self, group_over: int, now: datetime) -> int:
        """Release the messages held by cycles that never ended (a crash, a stop);
        returns how many were held."""
        ...

    async def prune(self, before: datetime, *, limit: int = 500) -> int:
        """Forget, in one transaction of bounded work, what is older than ``before``
        and that nothing needs any more (sent and failed messages, resolved alerts,
        cycles but the last, amount observations but the newest before); returns how
        many were forgotten: call again while it returns ``limit`` or more."""
        ...


class Staging(Protocol):
    """Where a long listing's new settled invoices wait for their organization's commit
    (:mod:`invoice_watch.store.sql.staging`)."""

    def stages(
        self, known: Mapping[str, Snapshot], payers: Mapping[str, str]
    ) -> Callable[[str], Stage | None]:
        """Each organization's stage in a cycle (None: not staged), by its id; ``known``:
        the configured organizations' snapshots as it began (by id: which organizations
        are configured), ``payers``: linked -> payer."""
        ...


class Store(UnitOfWork, Protocol):
    """The state: its repositories, the unit of work over them, and its own life."""

    @property
    def snapshot(self) -> SnapshotRepository: ...

    @property
    def alerts(self) -> NotificationLog: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def cycles(self) -> CycleLog: ...

    @property
    def silences(self) -> SilenceRepository: ...

    @property
    def usage(self) -> UsageRepository: ...

    @property
    def reports(self) -> ReportRunRepository:
        """When each report was last due (``report_runs``), and due reports enqueued."""
        ...

    @property
    def staging(self) -> Staging:
        """Where a long listing's new settled invoices wait for their organization's
        commit (:mod:`invoice_watch.store.sql.staging`)."""
        ...

    def check_held(self) -> None:
        """Raise :class:`~invoice_watch.errors.StateFileGoneError` when what this
        process opened is no longer the state its configuration names (the SQLite file
        was deleted or replaced): the daemon must stop. Cheap: called every cycle."""
        ...

    async def close(self) -> None:
        """Close it (a second call does nothing)."""
        ...
