"""The SQLite backend's store: :class:`~invoice_watch.store.unit_of_work.SqlStore` (the
unit of work both backends share) on the state file (:class:`~.database.Database`): how
it is opened, copied for ``--dry-run``, and checked still held.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.store.sqlite.database import Database, copy_database, open_database
from invoice_watch.store.unit_of_work import SqlStore


class SqliteStore(SqlStore):
    """The state file. Use :meth:`open` (or :meth:`copy`); ``path=None`` keeps
    everything in memory."""

    @property
    def path(self) -> Path | None:
        """The state file (None: in memory)."""
        return self.database.path if isinstance(self.database, Database) else None

    # -- opening and closing ---------------------------------------------------------

    @classmethod
    async def open(
        cls, path: Path | None, *, exclusive: bool = True, settles: frozenset[str] = FINAL_STATUSES
    ) -> SqliteStore:
        """Open the state file. ``exclusive`` (the daemon): create it (mode 0600) and its
        folder when missing, migrate it, and take the lock that keeps a second daemon off
        it. Otherwise (operator commands) only read it: nothing is created, locked,
        chmod-ed or migrated (an older schema is read through a migrated copy in memory).

        Before anything is touched, the file (and SQLite's ``-wal``/``-shm``/``-journal``
        beside it) must be a regular file, not a symbolic link, and (unless running as
        root) belong to this user. Every problem is a :class:`StateError` saying what to
        do; :class:`StateLockedError` when another daemon holds the file. ``settles``:
        the invoice statuses the in-memory snapshot keeps settled (:class:`Snapshot`; by
        default every final one: :func:`~invoice_watch.rules.settled_statuses` says
        which a configuration's rules let be).

        Cancelled while the file is being opened, it waits for the opening to end and
        closes the file before it lets the cancellation through: no thread goes on
        writing it (a demo's temporary folder is removed right after), and its lock is
        let go."""

        def build(db: Database) -> SqliteStore:
            return cls._loaded(db, settles)

        opening = asyncio.ensure_future(
            asyncio.to_thread(open_database, path, exclusive=exclusive, build=build)
        )
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                store = await opening
                await store.close()
            raise

    @classmethod
    def copy(cls, path: Path, *, settles: frozenset[str] = FINAL_STATUSES) -> SqliteStore:
        """An in-memory copy of an existing state file (for --dry-run): writes go
        nowhere, and the file itself is only read (checked as :meth:`open` checks it)."""
        return copy_database(path, build=lambda db: cls._loaded(db, settles))

    @classmethod
    def _loaded(cls, db: Database, settles: frozenset[str]) -> SqliteStore:
        store = cls(db, settles)
        store.load(db.connection)
        return store

    def check_held(self) -> None:
        """See :meth:`Database.check_held`: the file deleted or replaced under the
        daemon."""
        if isinstance(self.database, Database):
            self.database.check_held()
