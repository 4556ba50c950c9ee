"""The PostgreSQL backend's store: the unit of work and repositories both backends share
(:class:`~invoice_watch.store.unit_of_work.SqlStore`: the same statements, the same
caches, an organization's snapshot, alert changes and notifications in ONE transaction)
on a :class:`~.database.PgDatabase`.

Replicas share the database; only the holder of the lease (:mod:`.lease`) writes, and a
replica that takes the lease over reads the caches again (:meth:`PostgresStore.reload`):
what it cached as a standby is stale.
"""

from __future__ import annotations

from datetime import UTC, datetime

from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.store.postgres.database import PgConnection, PgDatabase
from invoice_watch.store.postgres.lease import LEASE_APPLICATION
from invoice_watch.store.postgres.url import StateUrl
from invoice_watch.store.sql import SqlConnection
from invoice_watch.store.unit_of_work import SqlStore


class PostgresStore(SqlStore):
    """The state in a PostgreSQL database. Use :meth:`connect`."""

    database: PgDatabase

    @classmethod
    async def connect(
        cls,
        url: StateUrl,
        *,
        exclusive: bool = True,
        settles: frozenset[str] = FINAL_STATUSES,
        dry_run: bool = False,
    ) -> PostgresStore:
        """Open the state at ``url``. ``exclusive`` (the daemon): create and migrate its
        tables (a newer schema is refused). Otherwise (operator commands, ``dry_run``)
        only read it: its schema must be this version's. ``dry_run``: every write is
        rolled back (the caches alone see it). Every problem is a
        :class:`~invoice_watch.errors.StateError` saying what to do, never with the
        password."""

        db = PgDatabase(url, rollback_only=dry_run)
        store = cls(db, settles)

        def opening() -> None:
            if exclusive and not dry_run:
                db.migrate()
            else:
                db.check_version()
            store.load(PgConnection(db.connection()))

        await db.open_with(opening)
        return store

    async def reload(self) -> None:
        """Read the caches again from the database (a standby that became the leader:
        the old leader wrote since)."""
        await self.database.read(self.load, f"state database {self.database.name}")

    async def lease_now(self) -> tuple[str, int, datetime | None] | None:
        """The lease as the database has it: (holder, fencing token, expiry in UTC, None
        when its holder gave it up stopping); None when no replica ever took it.
        ``status`` shows it."""

        def query(conn: SqlConnection) -> tuple[str, int, datetime | None] | None:
            row = conn.execute(
                "SELECT holder, token, CASE WHEN expires_at > '-infinity' THEN expires_at "
                "END FROM lease WHERE name='leader'"
            ).fetchone()
            if row is None:
                return None
            expires = row[2].astimezone(UTC) if row[2] is not None else None
            return str(row[0]), int(row[1]), expires

        return await self.database.read(query, f"the lease of {self.database.name}")

    async def replicas(self) -> tuple[int, bool]:
        """(how many replicas are connected to the lease now: their lease sessions in
        ``pg_stat_activity``; whether the lease row is locked by a write transaction,
        so that no replica could take it now). ``status`` shows them. The lock is
        probed with ``NOWAIT`` in a statement of its own: it waits for nothing and is
        released at once."""
        import psycopg

        def query(conn: SqlConnection) -> tuple[int, bool]:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = ?",
                (LEASE_APPLICATION,),
            ).fetchone()
            try:
                conn.execute("SELECT 1 FROM lease WHERE name='leader' FOR NO KEY UPDATE NOWAIT")
            except psycopg.errors.LockNotAvailable:
                return int(row[0]), True
            return int(row[0]), False

        return await self.database.read(query, f"the lease of {self.database.name}")

    def check_held(self) -> None:
        """Nothing to check: the lease's fence guards every write."""
