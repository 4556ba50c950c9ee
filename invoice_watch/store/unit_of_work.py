"""The unit of work both SQL backends share: one transaction across the repositories.

:class:`SqlStore` is the state (:class:`~invoice_watch.store.protocols.Store`) over any
:class:`~invoice_watch.store.sql.SqlDatabase`: the snapshot
(:mod:`.sql.snapshot`), the notification log (:mod:`.sql.notification_log`), the
outbox (:mod:`.sql.outbox`), the cycle log (:mod:`.sql.cycles`), the silences
(:mod:`.sql.silences`) and the line items (:mod:`.sql.usage`), whose statements run on
both databases (:mod:`.sql`). An
organization's snapshot update, its alert-state changes and the notifications they cause
are written in ONE transaction (:meth:`SqlStore.commit_orgs`, as soon as the cycle has
read it; the notifications are held until the cycle ends, :meth:`SqlStore.finish_cycle`,
or for at most ``HOLD_SECONDS`` while it goes on, :meth:`SqlStore.release_cycle`);
delivery reads the outbox afterwards. Each repository's cache changes only once the
transaction committed.

The backends subclass it with how they open their database:
:class:`~invoice_watch.store.sqlite.store.SqliteStore` (a file) and
:class:`~invoice_watch.store.postgres.PostgresStore` (a server, replicas, a lease).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.store.protocols import AlertChange
from invoice_watch.store.records import OrgWrite
from invoice_watch.store.sql import SqlConnection, SqlDatabase
from invoice_watch.store.sql.cycles import SqlCycleLog
from invoice_watch.store.sql.notification_log import SqlNotificationLog
from invoice_watch.store.sql.outbox import (
    SqlOutbox,
    hold_events,
    prune_done,
    release_held,
    released_messages,
    retag_held,
    split_oversized,
)
from invoice_watch.store.sql.reports import SqlReportRuns
from invoice_watch.store.sql.silences import SqlSilences, prune_silences
from invoice_watch.store.sql.snapshot import SqlSnapshot
from invoice_watch.store.sql.staging import SqlStaging
from invoice_watch.store.sql.usage import SqlUsage


class SqlStore:
    """The state on an SQL database ``db`` (use a backend's subclass to open one).
    ``settles``: the invoice statuses the in-memory snapshot keeps settled."""

    def __init__(self, db: SqlDatabase, settles: frozenset[str] = FINAL_STATUSES) -> None:
        self.database = db
        self._snapshot = SqlSnapshot(db, settles)
        self._alerts = SqlNotificationLog()
        self._outbox = SqlOutbox(db)
        self._cycles = SqlCycleLog(db)
        self._silences = SqlSilences(db)
        self._usage = SqlUsage(db)
        self.reports = SqlReportRuns(db)  # report_runs (issue 19 §2)
        # Long listings' new settled invoices.
        self.staging = SqlStaging(db, self._alerts.firing, self._snapshot.history)
        # cycle -> the messages its release_cycle() calls released (finish_cycle's count)
        self._released: dict[int, int] = {}

    @property
    def snapshot(self) -> SqlSnapshot:
        return self._snapshot

    @property
    def alerts(self) -> SqlNotificationLog:
        return self._alerts

    @property
    def outbox(self) -> SqlOutbox:
        return self._outbox

    @property
    def cycles(self) -> SqlCycleLog:
        return self._cycles

    @property
    def silences(self) -> SqlSilences:
        return self._silences

    @property
    def usage(self) -> SqlUsage:
        return self._usage

    def load(self, conn: SqlConnection) -> None:
        """Fill the repositories' caches from the database (on its thread)."""
        self._snapshot.load(conn)
        self._cycles.load(conn)
        self._alerts.load(conn, self._snapshot.get)
        self._usage.load(conn)

    def check_held(self) -> None:
        """What the backend checks before a cycle writes (see the subclasses)."""

    async def close(self) -> None:
        await self.database.close()

    # -- a cycle committed organization by organization ------------------------------
    #
    # A cycle that commits each organization's part as soon as it is read (snapshot,
    # alert state and events of that organization, in one transaction) holds the events
    # in the outbox (state 'held', tagged with the cycle) until the cycle ends: only
    # then is it known how many messages each notifier gets, and so whether they go out
    # one by one or as one grouped message. A cycle that never ends (a crash, a stop)
    # leaves held rows that :meth:`release_held` releases.

    def begin_cycle(self) -> int:
        """A number for a new cycle, to tag the rows it holds (unique among them; the
        ``cycles`` table numbers the cycles that ended on its own)."""
        return self._cycles.number()

    async def heartbeat(self, at: datetime) -> None:
        """A running cycle made progress at ``at`` (a request to Atlas started; AD-5):
        recorded as the organizations' ``last_attempt`` (a read under way; only health
        reads it), so that ``status --check``, another process, sees the cycle in
        flight as the daemon's ``/healthz`` does
        (:func:`~invoice_watch.health.in_flight_from_reads`), also while a read retries
        and has written nothing else. Never moves a time back; the cache is left to the
        cycle's commits."""
        stamp = at.isoformat()

        def run(conn: SqlConnection) -> None:
            conn.execute(
                "UPDATE orgs SET last_attempt=? WHERE last_attempt IS NULL OR last_attempt < ?",
                (stamp, stamp),
            )

        await self.database.write(run, "record the running cycle's progress")

    async def commit_orgs(
        self,
        cycle: int,
        at: datetime,
        orgs: Sequence[OrgWrite],
        transitions: Sequence[AlertChange],
        routes: Mapping[str, Sequence[str]],
    ) -> None:
        """One transaction of a running cycle: these organizations' snapshot changes,
        alert-state changes and their events, held (one row per event and notifier;
        ``routes``: rule name -> notifier names)."""
        now = at.isoformat()
        await self.database.commit(
            lambda conn: self._write_part(conn, cycle, orgs, transitions, routes, now)
        )
        self._apply(orgs, transitions, at)

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
        """The last transaction of a running cycle: what is left to write (``orgs`` and
        ``transitions``, as in :meth:`commit_orgs`), then every held row is released
        (see :meth:`release_held`) and the cycle is recorded (with its events: those
        held at its end, and ``released`` by :meth:`release_cycle` before). Returns how
        many messages the cycle's rows went out as: those its end released and those
        :meth:`release_cycle` did (:func:`~.sql.outbox.released_messages`)."""
        now = finished_at.isoformat()

        def run(conn: SqlConnection) -> int:
            self._write_part(conn, cycle, orgs, transitions, routes, now)
            events = released + release_held(conn, group_over, now, cycle)
            self._cycles.record(conn, started_at, now, orgs_ok, orgs_failed, events)
            return released_messages(conn, cycle)

        messages = await self.database.commit(run)
        self._apply(orgs, transitions, finished_at)
        return self._released.pop(cycle, 0) + messages

    async def release_cycle(self, cycle: int, group_over: int, now: datetime) -> int:
        """Release the rows ``cycle`` holds so far, while it goes on (its messages are not
        held longer than :data:`~invoice_watch.constants.HOLD_SECONDS`): per notifier, one
        by one, or as grouped messages when there are more than ``group_over``, as
        :meth:`finish_cycle` does with the rows held at its end. The rows released get a
        tag of their own (a new number, as :meth:`begin_cycle` gives), so that their
        grouped messages' parts are numbered apart from those of the rows the cycle
        holds after. Returns how many rows were released."""
        tag = self.begin_cycle()

        def run(conn: SqlConnection) -> tuple[int, int]:
            retag_held(conn, cycle, tag)
            rows = release_held(conn, group_over, now.isoformat(), tag, only=True)
            return rows, released_messages(conn, tag)

        rows, messages = await self.database.commit(run)
        self._released[cycle] = self._released.get(cycle, 0) + messages
        return rows

    async def release_held(self, group_over: int, now: datetime) -> int:
        """Release the rows held by cycles that never ended (a crash, a stop, a failed
        commit): per cycle and notifier, one by one, or as grouped messages when there
        are more than ``group_over`` (:func:`~invoice_watch.store.grouping.
        message_parts`). Returns how many rows were held. A pending group larger than a
        message may be (written by an earlier version) is split into parts as well."""

        def run(conn: SqlConnection) -> int:
            split_oversized(conn)
            return release_held(conn, group_over, now.isoformat())

        return await self.database.commit(run)

    def _write_part(
        self,
        conn: SqlConnection,
        cycle: int,
        orgs: Sequence[OrgWrite],
        transitions: Sequence[AlertChange],
        routes: Mapping[str, Sequence[str]],
        now: str,
    ) -> None:
        """Organizations' snapshot changes, alert states, and their events held."""
        self._snapshot.write(conn, orgs, now)
        written = self._alerts.write(conn, transitions)
        hold_events(conn, cycle, transitions, routes, now, written)

    def _apply(
        self, orgs: Sequence[OrgWrite], transitions: Sequence[AlertChange], at: datetime
    ) -> None:
        """Bring the caches in line with what was just committed."""
        self._snapshot.apply(orgs, at)
        self._alerts.apply(transitions)

    # -- retention -------------------------------------------------------------------

    async def prune(self, before: datetime, *, limit: int = 500) -> int:
        """Forget what is older than ``before`` (now - ``delivery.retention``) and that
        nothing needs any more, in one transaction of bounded work (at most ``limit``
        messages, alerts and cycles; call again while it returns that many):

        - messages sent or failed before (a grouped one whole); pending and held ones
          are never touched;
        - alerts resolved before, and notices (one-shot, never firing) sent before: a
          firing alert is never touched (SPEC §3: its state does not expire), and the
          cycle reads only firing ones;
        - cycles that finished before, but the last (``status`` reads it);
        - amount observations made before, but each invoice's newest one made before:
          an ``amount_increase`` window within the retention finds the same base
          (:func:`~invoice_watch.rules.growth`); a longer one sees the retention. (A
          history ends anyway when its invoice leaves PENDING: only an invoice pending
          for longer than the retention has any to prune.)

        The snapshot is not: it mirrors what Atlas lists. Returns how many rows were
        deleted."""
        cutoff = before.isoformat()

        def run(conn: SqlConnection) -> int:
            return (
                prune_done(conn, cutoff, limit)
                + self._alerts.prune(conn, cutoff, limit)
                + self._cycles.prune(conn, cutoff, limit)
                + self._snapshot.prune(conn, cutoff, limit)
                + prune_silences(conn, cutoff, limit)
            )

        deleted = await self.database.write(run, "prune the state")
        self._snapshot.pruned(before)
        return deleted
