"""The PostgreSQL database: one connection (psycopg 3) for the state, its transactions,
its migrations, and the fence that keeps a deposed leader from writing.

The repositories' statements are synchronous (:mod:`invoice_watch.store.sql`), so the
connection lives on one worker thread of its own, called behind a lock, as the SQLite
file's does. It is in autocommit mode: a read is one statement, a write one explicit
transaction. A lost connection (the server restarted, a network cut) fails the call in
flight with a :class:`~invoice_watch.errors.StateError` and is opened again by the next
one. When fenced (a daemon among replicas, :mod:`.lease`), every write transaction
begins with ``SELECT ... FROM lease ... FOR SHARE`` on the lease row with this process's
fencing token: once another replica took the lease, the row no longer carries the token
and the transaction writes nothing (:class:`~invoice_watch.errors.NotLeaderError`); the
``FOR SHARE`` makes a takeover wait for a write in flight (``../shared/LIBRARIES.md``).

Messages name the database by its URL without the password
(:func:`~invoice_watch.store.postgres.url.display`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

from invoice_watch.errors import NotLeaderError, StateError
from invoice_watch.redact import redact
from invoice_watch.safe_text import one_line
from invoice_watch.store.postgres.schema import MIGRATIONS, SCHEMA_VERSION
from invoice_watch.store.postgres.url import StateUrl
from invoice_watch.store.sql import SqlConnection, SqlCursor, Transactions

log = logging.getLogger(__name__)

T = TypeVar("T")

# pg_advisory_xact_lock key: two replicas starting together migrate one after the other.
_MIGRATION_LOCK = 0x1E_0_1CE_17
CONNECT_TIMEOUT = 10  # seconds
STATEMENT_TIMEOUT_MS = 60_000  # every statement and lock wait is bounded


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """A statement with ``?`` placeholders as psycopg takes it (``%s``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """psycopg's connection as :class:`~invoice_watch.store.sql.SqlConnection`."""

    dialect = "postgresql"  # (:func:`~invoice_watch.store.sql.json_text`)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Any = (), /) -> SqlCursor:
        return self.raw.execute(_pg(sql), tuple(parameters))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> SqlCursor:
        cursor = self.raw.cursor()
        cursor.executemany(_pg(sql), [tuple(p) for p in parameters])
        return cursor


class PgDatabase(Transactions[PgConnection]):
    """The state's database at ``url``. ``rollback_only`` (``--dry-run``): every write
    transaction is rolled back, the caches alone see it."""

    kind = "state database"  # how messages name it, before :attr:`name`

    def __init__(self, url: StateUrl, *, rollback_only: bool = False) -> None:
        self.url = url
        self.rollback_only = rollback_only
        # A daemon among replicas writes only while it holds the lease: ``token`` is its
        # fencing token (None: it does not hold it, and writes nothing).
        self.fenced = False
        self.token: int | None = None
        # Seconds a fenced transaction may stay idle (its process paused, its network
        # cut) before the server ends it and frees the lease row (None: no bound).
        self.idle_bound: float | None = None
        self._bounded: psycopg.Connection[Any] | None = None  # the session it is set on
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = asyncio.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="state-db")
        self._closed = False

    @property
    def name(self) -> str:
        return self.url.display

    # -- the connection (on the database's thread) -----------------------------------

    def connection(self) -> psycopg.Connection[Any]:
        """The open connection, opened (again) when there is none."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url.conninfo(),
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                options=f"-c TimeZone=UTC -c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="invoice-watch",
            )
        return self._conn

    def _drop(self) -> None:
        """Forget a connection that failed: the next call opens a new one."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """One transaction, fenced when :attr:`fenced`; rolled back on any error (and
        always when :attr:`rollback_only`)."""
        token = self.token  # (withdrawn meanwhile on the loop's thread: this one is checked)
        if self.fenced and token is None:
            raise NotLeaderError("this replica does not hold the lease: it writes nothing")
        conn = self.connection()
        if self.fenced and self.idle_bound is not None and self._bounded is not conn:
            self._bound(conn, self.idle_bound)
        with conn.transaction():
            if self.fenced:
                row = conn.execute(
                    "SELECT 1 FROM lease WHERE name='leader' AND token=%s FOR SHARE",
                    (token,),
                ).fetchone()
                if row is None:
                    raise NotLeaderError(
                        f"another replica took the lease (this one's fencing token {token} "
                        "is no longer the lease's): this replica writes nothing"
                    )
            yield PgConnection(conn)
            if self.rollback_only:
                raise psycopg.Rollback()

    def _bound(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        """``idle_in_transaction_session_timeout`` on this session: a fenced transaction
        holds the lease row (``FOR SHARE``) and so blocks every takeover; a holder paused
        or cut off inside one is ended by the server after ``seconds``, not after TCP
        keepalive gives up (hours), so a standby takes over within the lease TTL plus
        ``seconds``."""
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
            (str(max(1, round(seconds * 1000))),),
        )
        self._bounded = conn

    def migrate(self) -> None:
        """Bring the schema up to :data:`SCHEMA_VERSION` (one migration at a time, each
        in its transaction, under an advisory lock); a newer schema is refused."""
        conn = self.connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self._version_in(conn)
            self._refuse_newer(version)
            if version == 0:
                conn.execute("INSERT INTO schema_version VALUES (0)")
            for number in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[number - 1])
                conn.execute("UPDATE schema_version SET version=%s", (number,))
                log.info("state database migrated to schema version %d", number)

    def check_version(self) -> None:
        """For an operator command (which migrates nothing): the schema is this
        version's, else a StateError says what to do."""
        conn = self.connection()
        exists = conn.execute("SELECT to_regclass('schema_version')").fetchone()
        version = self._version_in(conn) if exists and exists[0] is not None else 0
        self._refuse_newer(version)
        if version < SCHEMA_VERSION:
            raise StateError(
                f"state database {self.name} has schema version {version}, older than this "
                f"invoice-watch's ({SCHEMA_VERSION}): the daemon has not run on it yet with "
                "this version (`invoice-watch run` migrates it)"
            )

    @staticmethod
    def _version_in(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {self.name} has schema version {version}, newer than this "
                f"invoice-watch understands ({SCHEMA_VERSION}): upgrade invoice-watch"
            )

    # -- statements, on the database's thread ----------------------------------------

    async def open_with(self, fn: Callable[[], T]) -> T:
        """``fn`` (checking or migrating the database: its opening) run as :meth:`run`
        does; when it fails the database is closed, and a psycopg error becomes a
        :class:`~invoice_watch.errors.StateError` naming it, never with the password."""
        try:
            return await self.run(fn)
        except psycopg.Error as exc:  # (not chained: libpq's text may hold the URL)
            await self.close()
            raise StateError(f"cannot use state database {self.name}: {self.reason(exc)}") from None
        except BaseException:
            await self.close()
            raise

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn`` on the database's thread, one at a time; a connection that failed is
        dropped (the next call opens a new one)."""
        async with self._lock:
            if self._closed:
                raise StateError(f"state database {self.name} is closed")
            try:
                return await asyncio.get_running_loop().run_in_executor(self._thread, fn)
            except (
                psycopg.OperationalError,
                psycopg.InterfaceError,
                psycopg.errors.IdleInTransactionSessionTimeout,  # (the session was ended)
            ):
                self._drop()
                raise

    def reason(self, exc: BaseException) -> str:
        """An error's text on one line (libpq's span several: ``...refused`` then
        ``Is the server running...``), never with the password."""
        return one_line(redact(f"{type(exc).__name__}: {exc}", self.url.secrets()))

    async def read(self, fn: Callable[[SqlConnection], T], what: str) -> T:
        """``fn(connection)`` (queries; see :class:`SqlDatabase`). A connection the
        server dropped (a restart) fails once: a read is tried again on a new one."""

        def query() -> T:
            return fn(PgConnection(self.connection()))

        try:
            try:
                return await self.run(query)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                return await self.run(query)
        except psycopg.Error as exc:  # (not chained: libpq's text may hold the URL)
            raise StateError(f"could not read {what}: {self.reason(exc)}") from None

    async def write(self, fn: Callable[[SqlConnection], T], what: str) -> T:
        try:
            return await self.in_transaction(fn)
        except psycopg.Error as exc:  # (not chained: libpq's text may hold the URL)
            raise StateError(f"could not {what}: {self.reason(exc)}") from None

    async def commit(self, fn: Callable[[SqlConnection], T]) -> T:
        """A transaction of the cycle (see :meth:`SqlDatabase.commit`)."""
        try:
            return await self.in_transaction(fn)
        # Neither is chained: libpq's text may hold the URL.
        except psycopg.DataError as exc:
            raise self.unstorable(self.reason(exc)) from None
        except psycopg.Error as exc:
            raise self.not_written(self.reason(exc)) from None
        except (ValueError, OverflowError, TypeError) as exc:  # from psycopg or json
            raise self.unstorable(self.reason(exc)) from exc

    async def scratch(self, fn: Callable[[SqlConnection], T], what: str) -> T:
        """``fn(connection)`` on the session's temporary tables (see
        :class:`~invoice_watch.store.sql.SqlDatabase`): a transaction neither fenced
        (it writes nothing another session sees) nor rolled back by a dry run."""

        def run() -> T:
            conn = self.connection()
            with conn.transaction():
                return fn(PgConnection(conn))

        try:
            return await self.run(run)
        # Neither is chained: libpq's text may hold the URL.
        except psycopg.DataError as exc:
            raise self.unstorable(self.reason(exc)) from None
        except psycopg.Error as exc:
            raise StateError(f"could not {what}: {self.reason(exc)}") from None
        except (ValueError, OverflowError, TypeError) as exc:
            raise self.unstorable(self.reason(exc)) from exc

    async def close(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._thread, self._drop)
            self._thread.shutdown()


async def open_writer(url: StateUrl) -> PgDatabase:
    """The database at ``url`` for one short unfenced write beside the replicas (the
    ``silence`` commands): not migrated (its schema must be this version's). A
    :class:`~invoice_watch.errors.StateError` says what is wrong, never with the
    password."""
    db = PgDatabase(url)
    await db.open_with(db.check_version)
    return db
