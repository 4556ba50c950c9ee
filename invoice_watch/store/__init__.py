"""The state invoice_watch keeps between cycles and across restarts, and its one owner.

Each piece of state has one repository that reads, writes and caches it:

=========================  =========================================  ==============
state                      repository (Protocol)                      SQLite table
=========================  =========================================  ==============
invoices per organization  :class:`~.protocols.SnapshotRepository`    invoices
pending amounts seen       :class:`~.protocols.SnapshotRepository`    amount_history
organizations' read state  :class:`~.protocols.SnapshotRepository`    orgs
state per alert            :class:`~.protocols.NotificationLog`       alerts
messages and attempts      :class:`~.protocols.Outbox`                outbox
cycles that ended          :class:`~.protocols.CycleLog`              cycles
silences                   :class:`~.protocols.SilenceRepository`     silences
=========================  =========================================  ==============

and :class:`~.protocols.UnitOfWork` writes across them in ONE transaction (an
organization's snapshot, its alert changes and its notifications; retention). The
rest of invoice_watch sees only :class:`Store` (:mod:`.protocols`) and the plain values
of :mod:`.records`; how messages are grouped and named is :mod:`.grouping`, how values
become text :mod:`.encoding`. The backends are :mod:`.sqlite` (a file, WAL, locked by one
daemon: the default) and :mod:`.postgres` (a database replicas share, written by the
holder of a lease); :func:`open_store` opens either (:func:`location`: which one a
configuration names).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from invoice_watch.config.models import StateConfig
from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.store.encoding import ERROR_MAX, outbox_error, owed_of, unstorable
from invoice_watch.store.grouping import message_parts, summarize
from invoice_watch.store.postgres.url import StateUrl
from invoice_watch.store.protocols import (
    AlertChange,
    CycleLog,
    NotificationLog,
    Outbox,
    SilenceRepository,
    SnapshotRepository,
    Store,
    UnitOfWork,
    UsageRepository,
)
from invoice_watch.store.records import AlertState, Delivery, OrgState, OrgWrite, OutboxRow

__all__ = [
    "ERROR_MAX",
    "AlertChange",
    "AlertState",
    "CycleLog",
    "Delivery",
    "NotificationLog",
    "OrgState",
    "OrgWrite",
    "Outbox",
    "OutboxRow",
    "SilenceRepository",
    "SnapshotRepository",
    "StateUrl",
    "Store",
    "UnitOfWork",
    "UsageRepository",
    "location",
    "message_parts",
    "open_copy",
    "open_store",
    "outbox_error",
    "owed_of",
    "silences_writer",
    "summarize",
    "unstorable",
]


async def open_store(
    where: Path | StateUrl | None,
    *,
    exclusive: bool = True,
    settles: frozenset[str] = FINAL_STATUSES,
) -> Store:
    """The state at ``where``: an SQLite file (a Path; None: in memory), or a
    PostgreSQL database (a :class:`~invoice_watch.store.postgres.url.StateUrl`, from
    ``state.url``: :func:`location`). The daemon's (``exclusive``: created, migrated and,
    for a file, locked) or an operator command's (read only). ``settles``: the invoice
    statuses the snapshot keeps settled in memory. See
    :meth:`~invoice_watch.store.sqlite.store.SqliteStore.open` and
    :meth:`~invoice_watch.store.postgres.PostgresStore.connect`; a
    :class:`~invoice_watch.errors.StateError` says what is wrong."""
    if isinstance(where, StateUrl):
        from invoice_watch.store.postgres import PostgresStore  # loaded when used

        return await PostgresStore.connect(where, exclusive=exclusive, settles=settles)
    from invoice_watch.store.sqlite.store import SqliteStore  # the backend, loaded when used

    return await SqliteStore.open(where, exclusive=exclusive, settles=settles)


async def open_copy(where: Path | StateUrl, *, settles: frozenset[str] = FINAL_STATUSES) -> Store:
    """The state at ``where`` for ``--dry-run``: read, never written (a copy in memory
    of a file; a database's writes rolled back)."""
    if isinstance(where, StateUrl):
        from invoice_watch.store.postgres import PostgresStore

        return await PostgresStore.connect(where, settles=settles, dry_run=True)
    from invoice_watch.store.sqlite.store import SqliteStore

    return await asyncio.to_thread(SqliteStore.copy, where, settles=settles)


@contextlib.asynccontextmanager
async def silences_writer(where: Path | StateUrl) -> AsyncIterator[SilenceRepository]:
    """The silences of the state at ``where``, writable beside a running daemon (the
    ``silence`` commands): an SQLite file opened for one short write (see
    :func:`~invoice_watch.store.sqlite.database.open_writer`), or a plain short
    connection to the PostgreSQL database (a standby or the leader alike: a silence is
    not fenced, the leader reads the table when it releases and delivers). Closed on
    leaving. A :class:`~invoice_watch.errors.StateError` says what is wrong."""
    from invoice_watch.store.sql import SqlDatabase
    from invoice_watch.store.sql.silences import SqlSilences

    db: SqlDatabase
    if isinstance(where, StateUrl):
        from invoice_watch.store.postgres.database import open_writer as open_pg_writer

        db = await open_pg_writer(where)
    else:
        from invoice_watch.store.sqlite.database import open_writer

        db = await asyncio.to_thread(open_writer, where)
    try:
        yield SqlSilences(db)
    finally:
        await db.close()


def location(state: StateConfig) -> Path | StateUrl:
    """Where the configuration keeps the state: ``state.url`` (PostgreSQL, with
    ``state.password``) when set, else the file ``state.path``."""
    if state.url is None:
        return state.path
    password = state.password.get() if state.password is not None else None
    return StateUrl(state.url.get(), password)
