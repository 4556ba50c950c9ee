"""The cycle log in the SQLite state file (``cycles``): one row per cycle that ended,
read by ``status`` and the health check; and the numbers that tag the messages a
running cycle holds in the outbox.
"""

from __future__ import annotations

from datetime import datetime

from invoice_watch.store.sql import SqlConnection, SqlDatabase


class SqlCycleLog:
    """The cycle log (:class:`~invoice_watch.store.protocols.CycleLog`)."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db
        self._number = 0  # the last number given

    def load(self, conn: SqlConnection) -> None:
        self._number = conn.execute(  # above every number a held row may carry
            "SELECT COALESCE(MAX(n), 0) FROM (SELECT MAX(id) AS n FROM cycles "
            "UNION ALL SELECT MAX(cycle) FROM outbox) AS numbers"
        ).fetchone()[0]

    def number(self) -> int:
        """A number for a new cycle (or release), to tag the rows it holds: unique
        among them (the ``cycles`` table numbers the cycles that ended on its own)."""
        self._number += 1
        return self._number

    @staticmethod
    def record(
        conn: SqlConnection,
        started_at: datetime,
        finished_at: str,
        orgs_ok: int,
        orgs_failed: int,
        events: int,
    ) -> None:
        conn.execute(
            "INSERT INTO cycles (started_at, finished_at, orgs_ok, orgs_failed, "
            "events) VALUES (?,?,?,?,?)",
            (started_at.isoformat(), finished_at, orgs_ok, orgs_failed, events),
        )

    async def last(self) -> tuple[datetime, int, int] | None:
        """(finished at, orgs ok, orgs failed) of the last committed cycle."""

        def query(conn: SqlConnection) -> tuple[datetime, int, int] | None:
            row = conn.execute(
                "SELECT finished_at, orgs_ok, orgs_failed FROM cycles ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            return datetime.fromisoformat(row[0]), row[1], row[2]

        return await self._db.read(query, f"{self._db.kind} {self._db.name}")

    @staticmethod
    def prune(conn: SqlConnection, cutoff: str, limit: int) -> int:
        """Delete cycles that finished before ``cutoff``, but the last (``status`` reads
        it), at most ``limit``; returns how many."""
        return conn.execute(
            "DELETE FROM cycles WHERE id IN (SELECT id FROM cycles WHERE "
            "finished_at < ? AND id < (SELECT MAX(id) FROM cycles) ORDER BY id LIMIT ?)",
            (cutoff, limit),
        ).rowcount
