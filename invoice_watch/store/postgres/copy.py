"""``invoice-watch state copy --to postgresql://...``: an SQLite state file moved into an
empty PostgreSQL database, row for row, so that the replicas resume where the single
daemon stopped: the same snapshot (nothing looks new), the same alert states (nothing
fires again), the outbox and its marks (nothing sent is sent again, nothing pending is
lost), the cycles, the silences.

The file is opened as the daemon opens it (migrated, and locked: refused while a daemon
runs on it); the database is migrated, checked empty, and filled in ONE transaction with
``COPY`` (psycopg 3; ../shared/LIBRARIES.md: 10k rows in ~30 ms). The identity columns
(``outbox.id``, ``cycles.id``) then continue after the copied ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from invoice_watch.errors import StateError
from invoice_watch.store.postgres.database import PgDatabase
from invoice_watch.store.postgres.schema import COPIED_TABLES
from invoice_watch.store.postgres.url import StateUrl
from invoice_watch.store.sql import SqlConnection

Rows = dict[str, tuple[list[str], list[tuple[Any, ...]]]]
_IDENTITIES = ("outbox", "cycles")


def _read_all(conn: SqlConnection) -> Rows:
    """Every copied table's columns and rows, from the SQLite file."""
    tables: Rows = {}
    for table in COPIED_TABLES:
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()]
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
        tables[table] = (columns, [tuple(r) for r in rows])
    return tables


async def copy_state(source: Path, target: StateUrl) -> dict[str, int]:
    """Copy the state file ``source`` into the empty database ``target``; returns the
    rows copied per table. A :class:`StateError` says what is wrong (no file, a daemon
    on it, a database that is not empty or unreachable), never with the password; on
    any error the database is left as it was."""
    from invoice_watch.store.sqlite.files import existing
    from invoice_watch.store.sqlite.store import SqliteStore

    if existing(source) is None:
        raise StateError(f"no state file at {source}: nothing to copy")
    store = await SqliteStore.open(source, exclusive=True)  # a running daemon: refused
    try:
        tables = await store.database.read(_read_all, f"state file {source}")
    finally:
        await store.close()

    db = PgDatabase(target)

    def write() -> dict[str, int]:
        db.migrate()
        conn = db.connection()
        with conn.transaction():
            for table in (*COPIED_TABLES, "lease"):
                conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                    raise StateError(
                        f"state database {db.name} is not empty (table {table} has rows): "
                        "`state copy` fills a new database only; no replica may have run on it"
                    )
            counts = {}
            for table, (columns, rows) in tables.items():
                with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
                counts[table] = len(rows)
            for table in _IDENTITIES:
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
        return counts

    try:
        return await db.run(write)
    except psycopg.Error as exc:  # (not chained: libpq's text may hold the URL)
        raise StateError(
            f"could not copy into state database {db.name}: {db.reason(exc)}"
        ) from None
    finally:
        await db.close()
