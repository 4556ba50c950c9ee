"""The SQLite database: one connection to the state file, its transactions, its
migrations, and the file it holds.

stdlib ``sqlite3`` with one connection (``isolation_level=None``, explicit
``BEGIN IMMEDIATE``), called in one worker thread of its own behind a lock: the
connection stays on that thread, and its memory in one malloc arena
(``asyncio.to_thread`` would spread it over the pool's threads). The daemon's file is
in WAL mode with ``synchronous=FULL``, mode 0600, and locked (:mod:`.files`): one daemon
owns one file. Operator commands read it read-only; ``--dry-run`` works on a copy in
memory. Every SQLite error becomes a :class:`~invoice_watch.errors.StateError` (or an
:class:`~invoice_watch.errors.UnstorableError` for a value it cannot take) here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from invoice_watch.errors import StateError, StateFileGoneError
from invoice_watch.store.sql import Transactions
from invoice_watch.store.sqlite import files
from invoice_watch.store.sqlite.schema import MIGRATIONS, OUR_TABLES, SCHEMA_VERSION

log = logging.getLogger(__name__)

T = TypeVar("T")


class Database(Transactions[sqlite3.Connection]):
    kind = "state file"  # how messages name it, before :attr:`name`
    """The state file's connection (``path`` None: in memory). Open it with
    :func:`open_database` or :func:`copy_database`."""

    def __init__(self, conn: sqlite3.Connection, path: Path | None, lock_fd: int | None) -> None:
        self.connection = conn
        self.path = path
        self._lock_fd = lock_fd
        self._lock = asyncio.Lock()
        # (st_dev, st_ino) of the -wal and -shm files SQLite keeps open beside a daemon's
        # state file (see check_held).
        self._side_files: dict[str, tuple[int, int]] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="state-file")
        self._closed = False
        self._scratch = False  # temp_store set (scratch)

    @property
    def name(self) -> str:
        """The file, as messages name it."""
        return str(self.path or ":memory:")

    # -- the schema ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error (COMMIT's own
        included: a full disk can refuse the commit itself)."""
        conn = self.connection
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def migrate(self, *, name: Path | None = None, quiet: bool = False) -> None:
        """Bring the schema up to :data:`SCHEMA_VERSION`. ``name``: the file messages
        name (default: ``self.path``; an in-memory copy has none of its own); ``quiet``:
        log no migration (a copy's, which changes no file)."""
        conn = self.connection
        name = name or self.path
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state file {name} has schema version {version}, newer than this "
                f"invoice-watch understands ({SCHEMA_VERSION}): upgrade invoice-watch"
            )
        if version == 0:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
                )
            }
            if tables - OUR_TABLES:
                raise StateError(
                    f"{name} is an SQLite file of another program (tables: "
                    f"{', '.join(sorted(tables)[:5])}); point state.path elsewhere"
                )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
            if not quiet:
                log.info("state file migrated to schema version %d", number)

    # -- statements, on the database's thread ----------------------------------------

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn`` on the database's thread, one at a time."""
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """``fn(connection)`` (queries); an SQLite error is a StateError saying it could
        not read ``what``."""
        try:
            return await self.run(lambda: fn(self.connection))
        except sqlite3.Error as exc:
            raise StateError(f"could not read {what}: {exc}") from exc

    async def write(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """``fn(connection)`` in one transaction; an SQLite error is a StateError saying
        it could not ``what`` (e.g. "update the outbox")."""
        try:
            return await self.in_transaction(fn)
        except sqlite3.Error as exc:
            raise StateError(f"could not {what}: {exc}") from exc

    async def commit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A transaction of the cycle: ``fn(connection)`` in one transaction. An error of
        the state file (a full disk, an I/O error) is a :class:`StateError`; a value it
        cannot take (what was read holds it: a string SQLite cannot encode, an integer
        beyond 64 bits, a string over SQLite's size limit) is an
        :class:`UnstorableError`, which the cycle keeps to the organization whose data it
        is. Either way the transaction is rolled back."""
        try:
            return await self.in_transaction(fn)
        except (sqlite3.DataError, sqlite3.InterfaceError) as exc:
            raise self.unstorable(str(exc)) from exc
        except sqlite3.ProgrammingError as exc:
            if "binding" not in str(exc):  # e.g. the connection was closed
                raise StateError(f"could not write state file {self.name}: {exc}") from exc
            raise self.unstorable(str(exc)) from exc
        except sqlite3.Error as exc:
            raise self.not_written(str(exc)) from exc
        except (ValueError, OverflowError, TypeError) as exc:  # from sqlite3 or json
            raise self.unstorable(f"{type(exc).__name__}: {exc}") from exc

    async def scratch(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """``fn(connection)`` on the connection's temporary tables (see
        :class:`~invoice_watch.store.sql.SqlDatabase`): ``BEGIN`` (deferred), so the
        state file itself is not locked for writing, and kept in a file of SQLite's
        (``temp_store=FILE``), never in memory, whatever the build's default, with a
        small page cache."""

        def run() -> T:
            conn = self.connection
            if not self._scratch:
                conn.execute("PRAGMA temp_store=FILE")  # (drops temporary tables: first)
                # Its rows are written once and read once: a page cache of 256 KiB, not
                # the default 2 MB that stayed in memory after the first long listing.
                conn.execute("PRAGMA temp.cache_size=-256")
                self._scratch = True
            conn.execute("BEGIN")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        try:
            return await self.run(run)
        except (sqlite3.DataError, sqlite3.InterfaceError, ValueError, OverflowError) as exc:
            raise self.unstorable(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StateError(f"could not {what}: {exc}") from exc

    # -- the file it holds -----------------------------------------------------------

    def check_held(self) -> None:
        """Raise :class:`StateFileGoneError` when the file at ``self.path`` is no longer
        the file this database has open and locked: deleted, moved, or replaced (a
        restore, another program); or when SQLite's ``-wal`` or ``-shm`` beside it, which
        the daemon's connection keeps open, was deleted or replaced. What the daemon
        holds then matches no file (the recent commits live in the deleted ``-wal`` until
        the connection is closed: stopping writes them back), and a second daemon could
        start on the path and send every alert again: the daemon must stop. Called at the
        start of every cycle (a few ``stat`` calls); a database not opened by a daemon
        (in memory, read-only) has nothing to check.

        A backup copied over the file in place (``cp backup.db state.db``) keeps its
        inode, and SQLite offers no cheap sign of it in WAL mode (the header's change
        counter is not kept up to date there): the README says to stop the daemon
        before restoring."""
        if self.path is None or self._lock_fd is None:
            return
        held = os.fstat(self._lock_fd)
        there = files.identity(self.path)
        if there is None or there != (held.st_dev, held.st_ino):
            what = "was deleted" if there is None else "was replaced by another file"
            raise StateFileGoneError(
                f"state file {self.path} {what} while this daemon was running; stopping, "
                "since its state no longer matches the file and another daemon could start "
                "on the path and send every alert again. Restore the file (with the daemon "
                "stopped), or start invoice-watch again on a new one (`run --once "
                "--baseline` first records the current alerts without sending them)"
            )
        for suffix, known in self._side_files.items():
            side = Path(f"{self.path}{suffix}")
            found = files.identity(side)
            if found == known:
                continue
            what = "was deleted" if found is None else "was replaced by another file"
            role = "write-ahead log" if suffix == "-wal" else "shared-memory index"
            raise StateFileGoneError(
                f"{side}, the {role} SQLite keeps beside state file {self.path}, {what} "
                "while this daemon was running: it holds the latest alert states and "
                "pending notifications until they are written back into the state file. "
                "Stopping, which writes them back (delete none of the state's files while "
                "the daemon runs); then start invoice-watch again"
            )

    def watch_side_files(self) -> None:
        """Remember the -wal and -shm beside the daemon's file, as :meth:`check_held`
        expects to find them."""
        if self.path is not None:
            self._side_files = files.wal_files(self.path)

    async def close(self) -> None:
        """Close the connection and let go of the lock (a second call does nothing)."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._thread, self.connection.close)
            self._thread.shutdown()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


# -- opening (in a worker thread) ------------------------------------------------------


@contextlib.contextmanager
def _closed_on_error(
    conn: sqlite3.Connection, path: Path, *, reader: bool = False
) -> Iterator[None]:
    """Close ``conn`` should the block fail; an SQLite error comes out as the
    :class:`StateError` that says what to do (:func:`files.sqlite_problem`)."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.close()
        if isinstance(exc, sqlite3.Error):
            raise StateError(files.sqlite_problem(path, exc, reader=reader)) from exc
        raise


def open_database(path: Path | None, *, exclusive: bool, build: Callable[[Database], T]) -> T:
    """Open the state file (``path`` None: a database in memory) and ``build`` on it
    (in this thread, under the same error handling): see
    :meth:`~invoice_watch.store.sqlite.store.SqliteStore.open`."""
    if path is None:
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db = Database(conn, None, None)
        db.migrate()
        return build(db)
    if not exclusive:
        return _open_reader(path, build)
    lock_fd = files.open_for_daemon(path)
    try:
        files.lock_file(lock_fd, path)
        if stat.S_IMODE(os.fstat(lock_fd).st_mode) != 0o600:
            os.fchmod(lock_fd, 0o600)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        with _closed_on_error(conn, path):
            db = Database(conn, path, lock_fd)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            db.migrate()
            built = build(db)
            db.watch_side_files()
    except OSError as exc:
        os.close(lock_fd)
        raise StateError(f"cannot use state file {path}: {files.reason(exc)}") from exc
    except BaseException:
        os.close(lock_fd)
        raise
    return built


def open_writer(path: Path) -> Database:
    """The state file opened read-write for one short write beside the daemon (the
    ``silence`` commands): not created, not locked (the daemon's ``flock`` is its own;
    SQLite's locks and WAL let this connection write between the daemon's transactions,
    ``busy_timeout`` waits for them), not migrated (an older schema is refused: the
    daemon migrates it when it starts). Checked as the daemon checks it: a regular
    file, not a link, this user's."""
    info = files.existing(path)
    if info is None:
        raise StateError(
            f"no state file at {path} yet: start the daemon once with this config (or "
            "state.path points elsewhere than the daemon's)"
        )
    files.check_owner(path, info)
    for suffix in files.SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if (side_info := files.existing(side)) is not None:
            files.check_owner(side, side_info)
    try:
        conn = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StateError(files.sqlite_problem(path, exc)) from exc
    with _closed_on_error(conn, path):
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise StateError(
                f"state file {path} has schema version {version}, "
                + (
                    "newer than this invoice-watch understands: upgrade invoice-watch"
                    if newer
                    else f"older than {SCHEMA_VERSION}: start the upgraded daemon once "
                    "(it migrates the file), then run this command again"
                )
            )
    return Database(conn, path, None)


def _open_reader(path: Path, build: Callable[[Database], T]) -> T:
    """The state file opened read-only, for the operator commands."""
    if files.existing(path) is None:
        raise StateError(
            f"no state file at {path} yet: the daemon has not run a cycle with this "
            "config (or state.path points elsewhere than the daemon's)"
        )
    files.check_readable(path)
    try:
        conn = files.connect_read_only(path)
    except sqlite3.Error as exc:
        raise StateError(files.sqlite_problem(path, exc, reader=True)) from exc
    with _closed_on_error(conn, path, reader=True):
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            # Written by an older invoice-watch (the daemon migrates it when it
            # next starts): read a migrated copy, leave the file as it is.
            conn.close()
            return copy_database(path, build=build)
        db = Database(conn, path, None)
        db.migrate()  # only checks: the version is not older
        return build(db)


def copy_database(path: Path, *, build: Callable[[Database], T]) -> T:
    """An in-memory copy of an existing state file (for --dry-run): writes go
    nowhere, and the file itself is only read (checked as :func:`open_database` checks it)."""
    memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    if files.existing(path) is not None:
        files.check_readable(path)
        try:
            source = files.connect_read_only(path)
            try:
                source.backup(memory)
            finally:
                source.close()
        except sqlite3.Error as exc:
            memory.close()
            raise StateError(files.sqlite_problem(path, exc, reader=True)) from exc
    db = Database(memory, None, None)
    try:
        # (the copy is migrated in memory: nothing to log, the file stays as it is)
        db.migrate(name=path, quiet=True)
        return build(db)
    except sqlite3.Error as exc:
        memory.close()
        raise StateError(files.sqlite_problem(path, exc, reader=True)) from exc
    except StateError:
        memory.close()
        raise
