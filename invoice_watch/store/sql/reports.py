"""When each report was last due (``report_runs``, issue 19 §2), and a due report put in
the outbox in the same transaction that records it.

A row per (report, scope) holds the last instant the report was due for that scope
(``scope``: an organization id, or ``*`` for a report of them all). A report seen for the
first time gets its row without a message (:meth:`SqlReportRuns.start`: it waits for its
first time, it does not send the one just past). When a report is due, its messages (one
per notifier, ``pending``) are inserted and ``last_due`` moved forward in ONE transaction
(:meth:`SqlReportRuns.enqueue`), and only if ``last_due`` is still before that instant
(one conditional upsert, the database's decision): a restart, a second evaluation, or
two replicas racing enqueue it once. Delivery then
sends and retries it like any outbox message.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from invoice_watch.store.sql import SqlConnection, SqlDatabase
from invoice_watch.types import instant


def _last(conn: SqlConnection, report: str, scope: str) -> datetime | None:
    row = conn.execute(
        "SELECT last_due FROM report_runs WHERE report=? AND scope=?", (report, scope)
    ).fetchone()
    return instant(row[0]) if row else None


class SqlReportRuns:
    """The ``report_runs`` table, on both backends."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db

    async def last_due(self) -> dict[tuple[str, str], datetime]:
        """Every (report, scope)'s last due instant."""

        def query(conn: SqlConnection) -> dict[tuple[str, str], datetime]:
            rows = conn.execute("SELECT report, scope, last_due FROM report_runs")
            return {(report, scope): instant(due) for report, scope, due in rows}

        return await self._db.read(query, f"the report runs of {self._db.kind} {self._db.name}")

    async def start(self, report: str, scope: str, since: datetime) -> datetime:
        """Record ``since`` as the last due instant of a (report, scope) that has none;
        the stored one (this, or one another process wrote first)."""
        stamp = since.isoformat()

        def run(conn: SqlConnection) -> datetime:
            conn.execute(
                "INSERT INTO report_runs (report, scope, last_due) VALUES (?,?,?) "
                "ON CONFLICT (report, scope) DO NOTHING",
                (report, scope, stamp),
            )
            last = _last(conn, report, scope)
            assert last is not None
            return last

        return await self._db.write(run, f"record the report {report!r}")

    async def move(self, report: str, scope: str, old: datetime, new: datetime) -> datetime:
        """Set the last due instant of a (report, scope) from ``old`` to ``new`` (a
        clock fault or a changed schedule, :class:`~invoice_watch.report.scheduler.
        Reporter`), only if it still is ``old`` (another process may have moved it
        first); the stored one."""

        def run(conn: SqlConnection) -> datetime:
            conn.execute(
                "UPDATE report_runs SET last_due=? WHERE report=? AND scope=? AND last_due=?",
                (new.isoformat(), report, scope, old.isoformat()),
            )
            last = _last(conn, report, scope)
            return new if last is None else last

        return await self._db.write(run, f"record the report {report!r}")

    async def forget(self, keys: Sequence[tuple[str, str]]) -> None:
        """Delete the rows of these (report, scope)s (a report removed or disabled, an
        organization it no longer covers): seen again, it waits for its first time."""

        def run(conn: SqlConnection) -> None:
            conn.executemany("DELETE FROM report_runs WHERE report=? AND scope=?", list(keys))

        await self._db.write(run, "forget reports no longer configured")

    async def enqueue(
        self,
        report: str,
        scope: str,
        due: datetime,
        notifiers: Sequence[str],
        message: str,
        summary: str,
        now: datetime,
    ) -> bool:
        """Put the report due at ``due`` in the outbox for ``notifiers`` (``message``: its
        JSON, ``summary``: its one line) and record ``due``, in one transaction; nothing
        (False) when a report due at or after ``due`` was enqueued already."""
        stamp, at = due.isoformat(), now.isoformat()

        def run(conn: SqlConnection) -> bool:
            # One conditional upsert, so the database itself decides: under READ
            # COMMITTED two writers that both read an older last_due would both enqueue;
            # here the second one's row lock waits, then its WHERE sees the first's due
            # and writes nothing. (Stamps are UTC ISO 8601 on the minute: text order is
            # time order.)
            written = conn.execute(
                "INSERT INTO report_runs (report, scope, last_due) VALUES (?,?,?) "
                "ON CONFLICT (report, scope) DO UPDATE SET last_due=excluded.last_due "
                "WHERE report_runs.last_due < excluded.last_due",
                (report, scope, stamp),
            ).rowcount
            if written != 1:
                return False
            conn.executemany(
                "INSERT INTO outbox (notifier, events, summary, created_at, next_attempt_at, "
                "state) VALUES (?,?,?,?,?,'pending')",
                [(notifier, message, summary, at, at) for notifier in notifiers],
            )
            return True

        return await self._db.write(run, f"put the report {report!r} in the outbox")
