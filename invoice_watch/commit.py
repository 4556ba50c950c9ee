"""Stage 5, commit: the SQLite state file.

Owns the snapshot of invoices, the history of pending amounts, the per-organization read
state, the alert state and the outbox of notifications. An organization's snapshot
update, its alert-state changes and the notifications they cause are written in ONE
transaction (:meth:`StateStore.commit_orgs`, as soon as the cycle has read it; the
notifications are held until the cycle ends, :meth:`StateStore.finish_cycle`, or for
at most ``HOLD_SECONDS`` while it goes on, :meth:`StateStore.release_cycle`);
delivery reads the outbox afterwards. WAL mode, ``synchronous=FULL``, versioned
migrations, file mode 0600, and an exclusive lock so that one daemon owns one file.

stdlib ``sqlite3`` with one connection, called in one worker thread of its own behind a
lock. What the poll cycle reads (snapshot, history, firing alerts) is cached in memory
after the first load and updated only once a commit succeeded; of the snapshot's
settled invoices (final, and watched by no rule) only a key each, the file keeping them
whole (:class:`~invoice_watch.types.Snapshot`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import pwd
import sqlite3
import stat
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from invoice_watch.constants import FINAL_STATUSES, MESSAGE_MAX_EVENTS
from invoice_watch.dedup import AlertState, Transition
from invoice_watch.errors import (
    StateError,
    StateFileGoneError,
    StateLockedError,
    UnstorableError,
)
from invoice_watch.safe_text import one_line, storable
from invoice_watch.types import AlertEvent, Invoice, Part, Snapshot, events_from_json, instant

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE invoices (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL,
        source_org_id TEXT NOT NULL,
        status TEXT NOT NULL,
        start_date TEXT NOT NULL,
        end_date TEXT NOT NULL,
        amount_billed_cents INTEGER NOT NULL,
        amount_paid_cents INTEGER NOT NULL,
        credits_cents INTEGER NOT NULL,
        sales_tax_cents INTEGER NOT NULL,
        starting_balance_cents INTEGER NOT NULL,
        subtotal_cents INTEGER NOT NULL,
        created TEXT,
        updated TEXT,
        first_seen TEXT NOT NULL,
        last_changed TEXT NOT NULL
    );
    CREATE INDEX invoices_by_source ON invoices (source_org_id);
    CREATE TABLE amount_history (
        invoice_id TEXT NOT NULL,
        observed_at TEXT NOT NULL,
        amount_cents INTEGER NOT NULL,
        PRIMARY KEY (invoice_id, observed_at)
    );
    CREATE TABLE orgs (
        org_id TEXT PRIMARY KEY,
        last_attempt TEXT,
        last_success TEXT,
        failing_since TEXT,
        last_error TEXT,
        invoice_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE alerts (
        key TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        org_id TEXT NOT NULL,
        source_org_id TEXT NOT NULL,
        invoice_id TEXT,
        firing INTEGER NOT NULL,
        firing_since TEXT NOT NULL,
        last_notified TEXT,
        resolved_at TEXT,
        last_event TEXT
    );
    CREATE INDEX alerts_firing ON alerts (firing);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        notifier TEXT NOT NULL,
        events TEXT NOT NULL,
        summary TEXT NOT NULL,
        created_at TEXT NOT NULL,
        next_attempt_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT,
        done_at TEXT
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        orgs_ok INTEGER NOT NULL,
        orgs_failed INTEGER NOT NULL,
        events INTEGER NOT NULL
    );
    """,
    # 2: outbox rows written while a cycle runs are held until it ends (then released,
    # one by one or as a group: see 4); ``cycle`` tells which cycle holds them
    """
    ALTER TABLE outbox ADD COLUMN cycle INTEGER;
    """,
    # 3: an invoice is kept once per configured organization that lists it (a linked
    # organization's invoice is in its own listing and in its payer's)
    """
    CREATE TABLE invoices_v3 (
        id TEXT NOT NULL,
        org_id TEXT NOT NULL,
        source_org_id TEXT NOT NULL,
        status TEXT NOT NULL,
        start_date TEXT NOT NULL,
        end_date TEXT NOT NULL,
        amount_billed_cents INTEGER NOT NULL,
        amount_paid_cents INTEGER NOT NULL,
        credits_cents INTEGER NOT NULL,
        sales_tax_cents INTEGER NOT NULL,
        starting_balance_cents INTEGER NOT NULL,
        subtotal_cents INTEGER NOT NULL,
        created TEXT,
        updated TEXT,
        first_seen TEXT NOT NULL,
        last_changed TEXT NOT NULL,
        PRIMARY KEY (source_org_id, id)
    );
    INSERT INTO invoices_v3 SELECT id, org_id, source_org_id, status, start_date,
        end_date, amount_billed_cents, amount_paid_cents, credits_cents, sales_tax_cents,
        starting_balance_cents, subtotal_cents, created, updated, first_seen, last_changed
        FROM invoices;
    DROP TABLE invoices;
    ALTER TABLE invoices_v3 RENAME TO invoices;
    """,
    # 4: a grouped message is its events' rows, led by the first one (``grp`` = the
    # leader's id): grouping a burst rewrites nothing
    """
    ALTER TABLE outbox ADD COLUMN grp INTEGER;
    CREATE INDEX outbox_group ON outbox (grp) WHERE grp IS NOT NULL;
    """,
)
# A row that is a message of its own, or leads a group (the others follow it).
_MESSAGE = "(grp IS NULL OR grp = id)"
SCHEMA_VERSION = len(MIGRATIONS)
_OUR_TABLES = {"invoices", "amount_history", "orgs", "alerts", "outbox", "cycles"}

_INVOICE_COLUMNS = (
    "id, org_id, source_org_id, status, start_date, end_date, amount_billed_cents, "
    "amount_paid_cents, credits_cents, sales_tax_cents, starting_balance_cents, "
    "subtotal_cents, created, updated"
)


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# Invoices share their period bounds: this remembers the last few thousand conversions
# (keyed with the UTC offset, which the text shows and equality ignores), so that each is
# done once; types.instant does the same the other way.
@functools.lru_cache(maxsize=4096)
def _iso(value: datetime, offset: timedelta | None) -> str:
    return value.isoformat()


def _invoice_row(invoice: Invoice) -> tuple[Any, ...]:
    created, updated = invoice.created, invoice.updated
    return (
        invoice.id,
        invoice.org_id,
        invoice.source_org_id,
        invoice.status,
        _iso(invoice.start_date, invoice.start_date.utcoffset()),
        _iso(invoice.end_date, invoice.end_date.utcoffset()),
        invoice.amount_billed_cents,
        invoice.amount_paid_cents,
        invoice.credits_cents,
        invoice.sales_tax_cents,
        invoice.starting_balance_cents,
        invoice.subtotal_cents,
        None if created is None else _iso(created, created.utcoffset()),
        None if updated is None else _iso(updated, updated.utcoffset()),
    )


def _invoice_from_row(row: Sequence[Any]) -> Invoice:
    """A stored invoice, its strings and amounts shared where equal (thousands of
    invoices share an organization and a status; billed and paid are often equal)."""
    amounts: dict[int, int] = {}
    billed, paid, credits, tax, balance, subtotal = (
        amounts.setdefault(value, value) for value in row[6:12]
    )
    return Invoice(
        id=row[0],
        org_id=sys.intern(row[1]),
        source_org_id=sys.intern(row[2]),
        status=sys.intern(row[3]),
        start_date=instant(row[4]),
        end_date=instant(row[5]),
        amount_billed_cents=billed,
        amount_paid_cents=paid,
        credits_cents=credits,
        sales_tax_cents=tax,
        starting_balance_cents=balance,
        subtotal_cents=subtotal,
        created=instant(row[12]) if row[12] else None,
        updated=instant(row[13]) if row[13] else None,
    )


@dataclass(frozen=True)
class OrgState:
    org_id: str
    last_attempt: datetime | None = None
    last_success: datetime | None = None
    failing_since: datetime | None = None
    last_error: str | None = None
    invoice_count: int = 0


@dataclass
class OrgWrite:
    """What one organization's read changes in the state file."""

    org_id: str
    ok: bool
    upserts: list[Invoice] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    observations: list[tuple[str, int]] = field(default_factory=list)  # pending amounts seen
    error: str | None = None
    # Invoices another configured organization lists too (a linked one: in its own
    # organization's listing and in its payer's), as this read found them changed: that
    # organization's stored copy (``source_org_id``: that organization) is updated with
    # it, when it still holds one, so that the next read through it is no news.
    mirrors: list[Invoice] = field(default_factory=list)

    @property
    def changes_snapshot(self) -> bool:
        return bool(self.upserts or self.gone or self.observations or self.mirrors)


@dataclass(frozen=True)
class Delivery:
    """One outbox message due: ``id`` is its row's (a group's leader's), ``part`` which
    part it is of a group split for size (None when whole), ``last_error`` what its last
    attempt met (as stored: :func:`outbox_error`), ``owed`` the recipients within the
    notifier still owed it when an attempt reached only some (None: all of them)."""

    id: int
    notifier: str
    events: list[AlertEvent]
    created_at: datetime
    attempts: int
    part: Part | None = None
    last_error: str | None = None
    owed: tuple[str, ...] | None = None


@dataclass(frozen=True)
class OutboxRow:
    id: int
    notifier: str
    summary: str
    created_at: datetime
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    done_at: datetime | None


def grouped(count: int, group_over: int) -> bool:
    """Whether a notifier's ``count`` messages of one cycle go as one grouped message
    (flood control): more than ``group_over`` of them, and more than one."""
    return count > max(group_over, 1)


def message_parts(count: int, group_over: int) -> list[int] | None:
    """How a notifier's ``count`` messages of one cycle go out: one by one (None: not
    :func:`grouped`), or grouped, as messages of these sizes in order: one, or parts of
    at most :data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` events, as even as can
    be (120 -> 40, 40, 40; 81 -> 27, 27, 27), each a message of its own in the outbox,
    so that each fits its channel and is sent and recorded on its own."""
    if not grouped(count, group_over):
        return None
    parts = -(-count // MESSAGE_MAX_EVENTS)
    size, extra = divmod(count, parts)
    return [size + 1 if number < extra else size for number in range(parts)]


def summarize(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """One line naming a message, for `history` and logs (no secrets in events), and
    storable: its names may come from a server (:func:`~invoice_watch.safe_text.
    one_line`)."""
    if len(events) == 1:
        e = events[0]
        parts = [str(e.kind), e.rule, e.org_name]
        if e.invoice_id:
            parts.append(e.invoice_id)
        return one_line(" ".join(parts))
    return _group_summary(len(events), part)


def _group_summary(count: int, part: Part | None) -> str:
    return f"{count} alerts (grouped, {part})" if part else f"{count} alerts (grouped)"


def _group(
    conn: sqlite3.Connection, ids: Sequence[int], sizes: Sequence[int], now: str | None
) -> None:
    """Make the rows ``ids`` (in order) grouped messages of ``sizes`` (at most
    MESSAGE_MAX_EVENTS each): each part led by its first row, pending (due ``now`` when
    given, else when it already was)."""
    start = 0
    for number, size in enumerate(sizes, 1):
        members = ids[start : start + size]
        start += size
        first = members[0]
        marks = ",".join("?" * len(members))
        if now is None:
            conn.execute(f"UPDATE outbox SET grp=? WHERE id IN ({marks})", (first, *members))
        else:
            conn.execute(
                f"UPDATE outbox SET state='pending', grp=?, next_attempt_at=? "
                f"WHERE id IN ({marks})",
                (first, now, *members),
            )
        part = Part(number, len(sizes)) if len(sizes) > 1 else None
        conn.execute("UPDATE outbox SET summary=? WHERE id=?", (_group_summary(size, part), first))


class StateStore:
    """The state file. Use :meth:`open`; ``path=None`` keeps everything in memory."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path | None,
        lock_fd: int | None,
        settles: frozenset[str] = FINAL_STATUSES,
    ) -> None:
        self._conn = conn
        self.path = path
        self._lock_fd = lock_fd
        self._lock = asyncio.Lock()
        # Which statuses the in-memory snapshot keeps settled (see Snapshot).
        self._settles = settles
        self._snapshot: dict[str, Snapshot] | None = None
        self._history: dict[str, list[tuple[datetime, int]]] = {}
        self._alerts: dict[str, AlertState] = {}
        self._orgs: dict[str, OrgState] = {}
        # Linked organization -> the configured organization whose listing showed its
        # invoices nested (its payer), as the snapshot has ever held them.
        self._payers: dict[str, str] = {}
        self._cycle_id = 0  # the last cycle's number
        # (st_dev, st_ino) of the -wal and -shm files SQLite keeps open beside a daemon's
        # state file (see check_file).
        self._side_files: dict[str, tuple[int, int]] = {}
        # One thread for every statement: the connection stays on it, and its memory in
        # one malloc arena (asyncio.to_thread would spread it over the pool's threads).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="state-file")

    # -- opening ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: Path | None, *, exclusive: bool = True, settles: frozenset[str] = FINAL_STATUSES
    ) -> StateStore:
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
        opening = asyncio.ensure_future(asyncio.to_thread(cls._open_sync, path, exclusive, settles))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                store = await opening
                await store.close()
            raise

    @classmethod
    def open_copy(cls, path: Path, *, settles: frozenset[str] = FINAL_STATUSES) -> StateStore:
        """An in-memory copy of an existing state file (for --dry-run): writes go
        nowhere, and the file itself is only read (checked as :meth:`open` checks it)."""
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        if _existing(path) is not None:
            _check_readable(path)
            try:
                source = _connect_read_only(path)
                try:
                    source.backup(memory)
                finally:
                    source.close()
            except sqlite3.Error as exc:
                memory.close()
                raise StateError(_sqlite_problem(path, exc, reader=True)) from None
        store = cls(memory, None, None, settles)
        try:
            # (the copy is migrated in memory: nothing to log, the file stays as it is)
            store._migrate(name=path, quiet=True)
            store._load()
        except sqlite3.Error as exc:
            memory.close()
            raise StateError(_sqlite_problem(path, exc, reader=True)) from None
        except StateError:
            memory.close()
            raise
        return store

    @classmethod
    def _open_sync(cls, path: Path | None, exclusive: bool, settles: frozenset[str]) -> StateStore:
        if path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            store = cls(conn, None, None, settles)
            store._migrate()
            store._load()
            return store
        if not exclusive:
            return cls._open_reader(path, settles)
        lock_fd = _open_for_daemon(path)
        try:
            _lock(lock_fd, path)
            if stat.S_IMODE(os.fstat(lock_fd).st_mode) != 0o600:
                os.fchmod(lock_fd, 0o600)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                store = cls(conn, path, lock_fd, settles)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=5000")
                store._migrate()
                store._load()
                store._side_files = _wal_files(path)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                if isinstance(exc, sqlite3.Error):
                    raise StateError(_sqlite_problem(path, exc)) from None
                raise
        except OSError as exc:
            os.close(lock_fd)
            raise StateError(f"cannot use state file {path}: {_reason(exc)}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    @classmethod
    def _open_reader(cls, path: Path, settles: frozenset[str]) -> StateStore:
        """The state file opened read-only, for the operator commands."""
        if _existing(path) is None:
            raise StateError(
                f"no state file at {path} yet: the daemon has not run a cycle with this "
                "config (or state.path points elsewhere than the daemon's)"
            )
        _check_readable(path)
        try:
            conn = _connect_read_only(path)
        except sqlite3.Error as exc:
            raise StateError(_sqlite_problem(path, exc, reader=True)) from None
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                # Written by an older invoice-watch (the daemon migrates it when it
                # next starts): read a migrated copy, leave the file as it is.
                conn.close()
                return cls.open_copy(path, settles=settles)
            store = cls(conn, path, None, settles)
            store._migrate()  # only checks: the version is not older
            store._load()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StateError(_sqlite_problem(path, exc, reader=True)) from None
            raise
        return store

    def check_file(self) -> None:
        """Raise :class:`StateFileGoneError` when the file at ``self.path`` is no longer
        the file this store has open and locked: deleted, moved, or replaced (a restore,
        another program); or when SQLite's ``-wal`` or ``-shm`` beside it, which the
        daemon's connection keeps open, was deleted or replaced. What the daemon holds
        then matches no file (the recent commits live in the deleted ``-wal`` until the
        connection is closed: stopping writes them back), and a second daemon could start
        on the path and send every alert again: the daemon must stop. Called at the start
        of every cycle (a few ``stat`` calls); a store not opened by a daemon (in memory,
        read-only) has nothing to check.

        A backup copied over the file in place (``cp backup.db state.db``) keeps its
        inode, and SQLite offers no cheap sign of it in WAL mode (the header's change
        counter is not kept up to date there): the README says to stop the daemon
        before restoring."""
        if self.path is None or self._lock_fd is None:
            return
        held = os.fstat(self._lock_fd)
        there = self._identity(self.path)
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
            found = self._identity(side)
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

    @staticmethod
    def _identity(path: Path) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file at ``path``, None when there is none."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot check state file {path}: {_reason(exc)}") from None
        return info.st_dev, info.st_ino

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error (COMMIT's own
        included: a full disk can refuse the commit itself)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _migrate(self, *, name: Path | None = None, quiet: bool = False) -> None:
        """Bring the schema up to :data:`SCHEMA_VERSION`. ``name``: the file messages
        name (default: ``self.path``; an in-memory copy has none of its own); ``quiet``:
        log no migration (a copy's, which changes no file)."""
        conn = self._conn
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
            if tables - _OUR_TABLES:
                raise StateError(
                    f"{name} is an SQLite file of another program (tables: "
                    f"{', '.join(sorted(tables)[:5])}); point state.path elsewhere"
                )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
            if not quiet:
                log.info("state file migrated to schema version %d", number)

    def _load_snapshot(self) -> dict[str, Snapshot]:
        live: dict[str, dict[str, Invoice]] = {}
        settled: dict[str, dict[str, int]] = {}
        payers = self._payers
        for row in self._conn.execute(f"SELECT {_INVOICE_COLUMNS} FROM invoices"):
            invoice = _invoice_from_row(row)
            if invoice.org_id != invoice.source_org_id:
                payers[invoice.org_id] = invoice.source_org_id
            if invoice.status in self._settles:
                settled.setdefault(invoice.source_org_id, {})[invoice.id] = invoice.settled_key()
            else:
                live.setdefault(invoice.source_org_id, {})[invoice.id] = invoice
        return {
            org_id: Snapshot(live.get(org_id, {}), settled.get(org_id, {}), self._settles)
            for org_id in live.keys() | settled.keys()
        }

    def _load(self) -> None:
        conn = self._conn
        snapshot = self._snapshot = self._load_snapshot()
        self._history = {}
        for invoice_id, observed_at, cents in conn.execute(
            "SELECT invoice_id, observed_at, amount_cents FROM amount_history "
            "ORDER BY invoice_id, observed_at"
        ):
            at = _dt(observed_at)
            assert at is not None
            self._history.setdefault(invoice_id, []).append((at, cents))
        self._cycle_id = conn.execute(  # above every number a held row may carry
            "SELECT MAX((SELECT COALESCE(MAX(id), 0) FROM cycles), "
            "(SELECT COALESCE(MAX(cycle), 0) FROM outbox))"
        ).fetchone()[0]
        self._alerts = {}
        for row in conn.execute(
            "SELECT key, rule, org_id, source_org_id, invoice_id, firing, firing_since, "
            "last_notified, resolved_at, last_event FROM alerts WHERE firing = 1"
        ):
            self._alerts[row[0]] = _alert_from_row(row, snapshot.get(row[3], Snapshot()).live)
        self._orgs = {}
        for row in conn.execute(
            "SELECT org_id, last_attempt, last_success, failing_since, last_error, "
            "invoice_count FROM orgs"
        ):
            self._orgs[row[0]] = OrgState(
                row[0], _dt(row[1]), _dt(row[2]), _dt(row[3]), row[4], row[5]
            )

    async def close(self) -> None:
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
            self._thread.shutdown()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    async def _run(self, fn: Callable[[], T]) -> T:
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    # -- what the cycle reads (cached) -----------------------------------------------

    def snapshot(self, org_id: str) -> Snapshot:
        assert self._snapshot is not None
        snapshot = self._snapshot.get(org_id)
        return snapshot if snapshot is not None else Snapshot(settles=self._settles)

    async def settle(self, statuses: frozenset[str]) -> None:
        """Keep invoices of these statuses settled from now on (a configuration reload
        changed what the rules watch): the snapshot is read again from the file."""
        if statuses == self._settles:
            return

        def load() -> dict[str, Snapshot]:
            self._settles = statuses
            return self._load_snapshot()

        self._snapshot = await self._run(load)

    async def stored_invoices(
        self, org_id: str | None = None, ids: Sequence[str] | None = None
    ) -> list[Invoice]:
        """Invoices as the state file holds them: every one, one configured
        organization's (``org_id``), or some of its (``ids``)."""

        def query() -> list[Invoice]:
            sql = f"SELECT {_INVOICE_COLUMNS} FROM invoices"
            if org_id is None:
                return [_invoice_from_row(row) for row in self._conn.execute(sql)]
            sql += " WHERE source_org_id=?"
            if ids is None:
                return [_invoice_from_row(row) for row in self._conn.execute(sql, (org_id,))]
            found: list[Invoice] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = self._conn.execute(
                    f"{sql} AND id IN ({','.join('?' * len(chunk))})", (org_id, *chunk)
                )
                found.extend(_invoice_from_row(row) for row in rows)
            return found

        try:
            return await self._run(query)
        except sqlite3.Error as exc:
            raise StateError(
                f"could not read state file {self.path or ':memory:'}: {exc}"
            ) from None

    def history(self, invoice_id: str) -> list[tuple[datetime, int]]:
        return self._history.get(invoice_id, [])

    def all_history(self) -> dict[str, list[tuple[datetime, int]]]:
        return self._history

    def org_state(self, org_id: str) -> OrgState:
        return self._orgs.get(org_id) or OrgState(org_id)

    def payers(self) -> Mapping[str, str]:
        """Linked organization -> the organization that pays for it: whose listing
        showed its invoices nested (``linkedInvoices``), as the state file held them when
        opened or a read has shown them since (never forgotten while the process runs)."""
        return self._payers

    def firing_alerts(self) -> dict[str, AlertState]:
        return dict(self._alerts)

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
        self._cycle_id += 1
        return self._cycle_id

    async def commit_orgs(
        self,
        cycle: int,
        at: datetime,
        orgs: Sequence[OrgWrite],
        transitions: Sequence[Transition],
        routes: Mapping[str, Sequence[str]],
    ) -> None:
        """One transaction of a running cycle: these organizations' snapshot changes,
        alert-state changes and their events, held (one row per event and notifier;
        ``routes``: rule name -> notifier names)."""
        now = at.isoformat()

        def run() -> None:
            with self._transaction() as conn:
                self._write_part(conn, cycle, orgs, transitions, routes, now)

        await self._commit(run)
        self._apply(orgs, transitions, at)

    async def finish_cycle(
        self,
        cycle: int,
        started_at: datetime,
        finished_at: datetime,
        orgs: Sequence[OrgWrite],
        transitions: Sequence[Transition],
        routes: Mapping[str, Sequence[str]],
        group_over: int,
        *,
        orgs_ok: int,
        orgs_failed: int,
        released: int = 0,
    ) -> None:
        """The last transaction of a running cycle: what is left to write (``orgs`` and
        ``transitions``, as in :meth:`commit_orgs`), then every held row is released
        (see :meth:`release_held`) and the cycle is recorded (with its events: those
        held at its end, and ``released`` by :meth:`release_cycle` before)."""
        now = finished_at.isoformat()

        def run() -> None:
            with self._transaction() as conn:
                self._write_part(conn, cycle, orgs, transitions, routes, now)
                events = released + self._release(conn, group_over, now, cycle)
                conn.execute(
                    "INSERT INTO cycles (started_at, finished_at, orgs_ok, orgs_failed, "
                    "events) VALUES (?,?,?,?,?)",
                    (started_at.isoformat(), now, orgs_ok, orgs_failed, events),
                )

        await self._commit(run)
        self._apply(orgs, transitions, finished_at)

    async def release_cycle(self, cycle: int, group_over: int, now: datetime) -> int:
        """Release the rows ``cycle`` holds so far, while it goes on (its messages are not
        held longer than :data:`~invoice_watch.constants.HOLD_SECONDS`): per notifier, one
        by one, or as grouped messages when there are more than ``group_over``, as
        :meth:`finish_cycle` does with the rows held at its end. The rows released get a
        tag of their own (a new number, as :meth:`begin_cycle` gives), so that their
        grouped messages' parts are numbered apart from those of the rows the cycle
        holds after. Returns how many rows were released."""
        tag = self.begin_cycle()

        def run() -> int:
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE outbox SET cycle=? WHERE state='held' AND cycle=?", (tag, cycle)
                )
                return self._release(conn, group_over, now.isoformat(), tag, only=True)

        return await self._commit(run)

    async def release_held(self, group_over: int, now: datetime) -> int:
        """Release the rows held by cycles that never ended (a crash, a stop, a failed
        commit): per cycle and notifier, one by one, or as grouped messages when there
        are more than ``group_over`` (:func:`message_parts`). Returns how many rows were
        held. A pending group larger than a message may be (written by an earlier
        version) is split into parts as well."""

        def run() -> int:
            with self._transaction() as conn:
                self._split_oversized(conn)
                return self._release(conn, group_over, now.isoformat())

        return await self._commit(run)

    def _write_part(
        self,
        conn: sqlite3.Connection,
        cycle: int,
        orgs: Iterable[OrgWrite],
        transitions: Sequence[Transition],
        routes: Mapping[str, Sequence[str]],
        now: str,
    ) -> None:
        """Organizations' snapshot changes, alert states, and their events held."""
        self._write_orgs(conn, orgs, now)
        written = self._write_alerts(conn, transitions)
        self._hold(conn, cycle, transitions, routes, now, written)

    @staticmethod
    def _hold(
        conn: sqlite3.Connection,
        cycle: int,
        transitions: Iterable[Transition],
        routes: Mapping[str, Sequence[str]],
        now: str,
        written: Mapping[int, str],
    ) -> None:
        rows: list[tuple[str, str, str, str, str, int]] = []
        for t in transitions:
            event = t.event
            if event is None:
                continue
            text = written.get(id(event))
            events = f"[{text if text is not None else _event_json(event)}]"
            summary = summarize((event,))
            # The notifiers its alert's messages go to (dedup.recipients); the rule's
            # route for a transition made without them.
            notifiers = t.state.notifiers or routes.get(event.rule, ())
            rows.extend((notifier, events, summary, now, now, cycle) for notifier in notifiers)
        conn.executemany(
            "INSERT INTO outbox (notifier, events, summary, created_at, next_attempt_at, "
            "state, cycle) VALUES (?,?,?,?,?,'held',?)",
            rows,
        )

    @staticmethod
    def _release(
        conn: sqlite3.Connection,
        group_over: int,
        now: str,
        cycle: int | None = None,
        *,
        only: bool = False,
    ) -> int:
        """Release held rows (of every cycle, or of ``cycle`` ``only``; ``cycle``'s own
        count is returned, or all of them). More than ``group_over`` of one cycle for one
        notifier become grouped messages (:func:`message_parts`): the first row of each
        leads it (its summary says so), the others follow (``grp``), and they are sent,
        retried and marked together, in order; the parts of a group go in order, each on
        its own."""
        counted = 0
        if only:
            groups = conn.execute(
                "SELECT cycle, notifier, COUNT(*) FROM outbox WHERE state='held' AND "
                "cycle=? GROUP BY notifier",
                (cycle,),
            ).fetchall()
        else:
            groups = conn.execute(
                "SELECT cycle, notifier, COUNT(*) FROM outbox WHERE state='held' "
                "GROUP BY cycle, notifier"
            ).fetchall()
        for held_by, notifier, count in groups:
            if cycle is None or held_by == cycle:
                counted += count
            where = "state='held' AND cycle IS ? AND notifier=?"
            sizes = message_parts(count, group_over)
            if sizes is None:
                conn.execute(
                    f"UPDATE outbox SET state='pending' WHERE {where}", (held_by, notifier)
                )
                continue
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM outbox WHERE {where} ORDER BY id", (held_by, notifier)
                )
            ]
            _group(conn, ids, sizes, now)
        return counted

    @staticmethod
    def _split_oversized(conn: sqlite3.Connection) -> None:
        """Split each pending group larger than a message may be into parts."""
        oversized = conn.execute(
            "SELECT grp FROM outbox WHERE grp IS NOT NULL AND state='pending' "
            "GROUP BY grp HAVING COUNT(*) > ?",
            (MESSAGE_MAX_EVENTS,),
        ).fetchall()
        for (leader,) in oversized:
            rows = conn.execute("SELECT id FROM outbox WHERE grp=? ORDER BY id", (leader,))
            ids = [row[0] for row in rows]
            sizes = message_parts(len(ids), 1)
            assert sizes is not None
            _group(conn, ids, sizes, None)

    async def _commit(self, run: Callable[[], T]) -> T:
        """Run a transaction of the cycle. An error of the state file (a full disk, an I/O
        error) is a :class:`StateError`; a value it cannot take (what was read holds it:
        a string SQLite cannot encode, an integer beyond 64 bits, a string over SQLite's
        size limit) is an :class:`UnstorableError`, which the cycle keeps to the
        organization whose data it is. Either way the transaction is rolled back."""
        try:
            return await self._run(run)
        except (sqlite3.DataError, sqlite3.InterfaceError) as exc:
            raise UnstorableError(f"the state file cannot store a value: {exc}") from None
        except sqlite3.ProgrammingError as exc:
            if "binding" not in str(exc):  # e.g. the connection was closed
                raise StateError(
                    f"could not write state file {self.path or ':memory:'}: {exc}"
                ) from None
            raise UnstorableError(f"the state file cannot store a value: {exc}") from None
        except sqlite3.Error as exc:
            raise StateError(
                f"could not write state file {self.path or ':memory:'}: {exc}; nothing of "
                "this cycle was recorded (it will be evaluated again)"
            ) from None
        except (ValueError, OverflowError, TypeError) as exc:  # from sqlite3 or json
            raise UnstorableError(
                f"the state file cannot store a value: {type(exc).__name__}: {exc}"
            ) from exc

    def _write_orgs(self, conn: sqlite3.Connection, orgs: Iterable[OrgWrite], now: str) -> None:
        for org in orgs:
            if not org.ok:
                conn.execute(
                    "INSERT INTO orgs (org_id, last_attempt, failing_since, last_error) "
                    "VALUES (?,?,?,?) ON CONFLICT (org_id) DO UPDATE SET "
                    "last_attempt=excluded.last_attempt, "
                    "failing_since=COALESCE(orgs.failing_since, excluded.failing_since), "
                    "last_error=excluded.last_error",
                    (
                        org.org_id,
                        now,
                        now,
                        None if org.error is None else storable(org.error, ERROR_MAX),
                    ),
                )
                continue
            before = self.snapshot(org.org_id)
            if org.upserts:
                conn.executemany(
                    f"INSERT INTO invoices ({_INVOICE_COLUMNS}, first_seen, last_changed) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (source_org_id, id) DO UPDATE SET org_id=excluded.org_id, "
                    "status=excluded.status, "
                    "start_date=excluded.start_date, end_date=excluded.end_date, "
                    "amount_billed_cents=excluded.amount_billed_cents, "
                    "amount_paid_cents=excluded.amount_paid_cents, "
                    "credits_cents=excluded.credits_cents, "
                    "sales_tax_cents=excluded.sales_tax_cents, "
                    "starting_balance_cents=excluded.starting_balance_cents, "
                    "subtotal_cents=excluded.subtotal_cents, created=excluded.created, "
                    "updated=excluded.updated, last_changed=excluded.last_changed",
                    ((*_invoice_row(i), now, now) for i in org.upserts),
                )
                finished = [
                    (i.id,) for i in org.upserts if i.status != "PENDING" and i.id in self._history
                ]
                conn.executemany("DELETE FROM amount_history WHERE invoice_id=?", finished)
            if org.gone:
                conn.executemany(
                    "DELETE FROM invoices WHERE source_org_id=? AND id=?",
                    [(org.org_id, g) for g in org.gone],
                )
                conn.executemany(
                    "DELETE FROM amount_history WHERE invoice_id=?",
                    [(g,) for g in org.gone if not self._listed_elsewhere(org.org_id, g)],
                )
            if org.mirrors:  # only the copies another organization still holds
                conn.executemany(
                    "UPDATE invoices SET org_id=?, status=?, start_date=?, end_date=?, "
                    "amount_billed_cents=?, amount_paid_cents=?, credits_cents=?, "
                    "sales_tax_cents=?, starting_balance_cents=?, subtotal_cents=?, "
                    "created=?, updated=?, last_changed=? WHERE source_org_id=? AND id=?",
                    (
                        (row[1], *row[3:], now, row[2], row[0])
                        for row in map(_invoice_row, org.mirrors)
                    ),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO amount_history VALUES (?,?,?)",
                [(invoice_id, now, cents) for invoice_id, cents in org.observations],
            )
            count = len(before) + sum(1 for i in org.upserts if i.id not in before) - len(org.gone)
            conn.execute(
                "INSERT INTO orgs (org_id, last_attempt, last_success, failing_since, "
                "last_error, invoice_count) VALUES (?,?,?,NULL,NULL,?) "
                "ON CONFLICT (org_id) DO UPDATE SET last_attempt=excluded.last_attempt, "
                "last_success=excluded.last_success, failing_since=NULL, last_error=NULL, "
                "invoice_count=excluded.invoice_count",
                (org.org_id, now, now, count),
            )

    def _listed_elsewhere(self, org_id: str, invoice_id: str) -> bool:
        """Whether another configured organization still lists the invoice (a linked
        invoice, in its payer's listing too): its amount history is theirs as well."""
        assert self._snapshot is not None
        return any(
            invoice_id in snapshot for other, snapshot in self._snapshot.items() if other != org_id
        )

    @staticmethod
    def _write_alerts(
        conn: sqlite3.Connection, transitions: Iterable[Transition]
    ) -> dict[int, str]:
        """The alerts' rows; returns the JSON of each event written, by ``id(event)``
        (an event is stored as its alert's last event and as an outbox message)."""
        written: dict[int, str] = {}

        def rows() -> Iterator[tuple[Any, ...]]:
            for t in transitions:
                state = t.state
                event = state.last_event
                text = None
                if event is not None:
                    text = written[id(event)] = _event_json(event)
                    text = _with_recipients(text, state)
                yield _alert_row(state, text)

        conn.executemany(
            "INSERT OR REPLACE INTO alerts (key, rule, org_id, source_org_id, invoice_id, "
            "firing, firing_since, last_notified, resolved_at, last_event) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            rows(),
        )
        return written

    def _apply(
        self, orgs: Iterable[OrgWrite], transitions: Iterable[Transition], at: datetime
    ) -> None:
        """Bring the caches in line with what was just committed."""
        assert self._snapshot is not None
        for org in orgs:
            before = self._orgs.get(org.org_id) or OrgState(org.org_id)
            if not org.ok:
                self._orgs[org.org_id] = OrgState(
                    org.org_id,
                    last_attempt=at,
                    last_success=before.last_success,
                    failing_since=before.failing_since or at,
                    last_error=org.error,
                    invoice_count=before.invoice_count,
                )
                continue
            current = self._snapshot[org.org_id] = self.snapshot(org.org_id).updated(
                org.upserts, org.gone
            )
            for invoice in org.upserts:
                if invoice.status != "PENDING":
                    self._history.pop(invoice.id, None)
                if invoice.org_id != org.org_id:
                    self._payers[invoice.org_id] = org.org_id
            for mirror in org.mirrors:
                holder = self._snapshot.get(mirror.source_org_id)
                if holder is not None and mirror.id in holder:
                    self._snapshot[mirror.source_org_id] = holder.updated([mirror], ())
            for invoice_id in org.gone:
                if not self._listed_elsewhere(org.org_id, invoice_id):
                    self._history.pop(invoice_id, None)
            for invoice_id, cents in org.observations:
                self._history.setdefault(invoice_id, []).append((at, cents))
            self._orgs[org.org_id] = OrgState(org.org_id, at, at, None, None, len(current))
        for transition in transitions:
            state = transition.state
            if state.firing:
                self._alerts[state.key] = state
            else:
                self._alerts.pop(state.key, None)

    # -- the outbox ------------------------------------------------------------------

    async def due_deliveries(
        self, now: datetime, limit: int = 100, *, exclude: Collection[int] = ()
    ) -> list[Delivery]:
        """The pending messages due at ``now``, oldest first, but for those ``exclude``
        names (by id: messages whose outcome is not recorded yet)."""
        skip = sorted(exclude)
        marks = ",".join("?" * len(skip))

        def query() -> list[Delivery]:
            conn = self._conn
            rows = conn.execute(
                "SELECT id, notifier, events, created_at, attempts, grp, cycle, last_error "
                f"FROM outbox WHERE state='pending' AND next_attempt_at <= ? AND {_MESSAGE} "
                f"AND id NOT IN ({marks}) ORDER BY id LIMIT ?",
                (now.isoformat(), *skip, limit),
            ).fetchall()
            out = []
            for row in rows:
                created = _dt(row[3])
                assert created is not None
                events = events_from_json(row[2])
                part = None
                if row[5] is not None:  # a group: its leader's events, then the others'
                    for (more,) in conn.execute(
                        "SELECT events FROM outbox WHERE grp=? AND id!=? ORDER BY id",
                        (row[0], row[0]),
                    ):
                        events.extend(events_from_json(more))
                    part = _part_of(conn, row[0], row[6], row[1])
                owed = owed_of(row[7])
                out.append(Delivery(row[0], row[1], events, created, row[4], part, row[7], owed))
            return out

        return await self._read(query)

    async def waiting_since(self, limit: int = 10_000) -> list[datetime]:
        """When the messages waiting (held or pending) were created: each distinct time
        once, oldest first, at most ``limit`` of them."""

        def query() -> list[datetime]:
            rows = self._conn.execute(
                "SELECT DISTINCT created_at FROM outbox WHERE state IN ('held', 'pending') "
                f"AND {_MESSAGE} ORDER BY created_at LIMIT ?",
                (limit,),
            )
            return [when for (text,) in rows if (when := _dt(text)) is not None]

        return await self._read(query)

    async def next_attempt_at(self) -> datetime | None:
        def query() -> datetime | None:
            row = self._conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'"
            ).fetchone()
            return _dt(row[0]) if row else None

        return await self._read(query)

    async def bound_schedule(self, now: datetime, latest: datetime) -> int:
        """Make every pending message scheduled after ``latest`` due ``now``: a retry is
        never further away than ``delivery.max_backoff``, so a later one was scheduled by
        a wall clock that has since been set back (an NTP fix, a VM restore), or before a
        reload shortened ``max_backoff``. Returns how many were brought forward."""

        def run() -> int:
            with self._transaction() as conn:
                cursor = conn.execute(
                    "UPDATE outbox SET next_attempt_at=? "
                    "WHERE state='pending' AND next_attempt_at > ?",
                    (now.isoformat(), latest.isoformat()),
                )
                return cursor.rowcount

        try:
            return await self._run(run)
        except sqlite3.Error as exc:
            raise StateError(f"could not update the outbox: {exc}") from None

    async def mark_sent(self, delivery_id: int, now: datetime) -> None:
        await self._update(
            (
                "UPDATE outbox SET state='sent', attempts=attempts+1, done_at=?, "
                "last_error=NULL WHERE id=? OR grp=?",
                (now.isoformat(), delivery_id, delivery_id),
            )
        )

    async def mark_retry(
        self,
        delivery_id: int,
        next_attempt_at: datetime,
        error: str,
        owed: Sequence[str] | None = None,
        *,
        hold: bool = True,
    ) -> None:
        """Schedule the row's next attempt (for the recipients ``owed``, when some got it
        already: :func:`outbox_error`); the same notifier's other pending rows that were
        due earlier wait until then too (``hold``; not when the failure was only some
        recipients')."""
        at = next_attempt_at.isoformat()
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (
                "UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=? "
                "WHERE id=? OR grp=?",
                (at, outbox_error(error, owed), delivery_id, delivery_id),
            )
        ]
        if hold:
            statements.append(
                (
                    "UPDATE outbox SET next_attempt_at=? WHERE state='pending' AND "
                    "notifier=(SELECT notifier FROM outbox WHERE id=?) AND next_attempt_at<?",
                    (at, delivery_id, at),
                )
            )
        await self._update(*statements)

    async def postpone(
        self, delivery_id: int, until: datetime, error: str, owed: Sequence[str] | None = None
    ) -> None:
        """Look at the row again at ``until``, as :meth:`mark_retry` does, but without
        counting an attempt: none was made (its notifier is not configured)."""
        at = until.isoformat()
        await self._update(
            (
                "UPDATE outbox SET next_attempt_at=?, last_error=? WHERE id=? OR grp=?",
                (at, outbox_error(error, owed), delivery_id, delivery_id),
            ),
            (
                "UPDATE outbox SET next_attempt_at=? WHERE state='pending' AND "
                "notifier=(SELECT notifier FROM outbox WHERE id=?) AND next_attempt_at<?",
                (at, delivery_id, at),
            ),
        )

    async def make_due(self, notifiers: Collection[str], now: datetime) -> int:
        """Make every pending message for ``notifiers`` due ``now`` (a notifier configured
        again); returns how many."""
        names = sorted(notifiers)
        marks = ",".join("?" * len(names))

        def run() -> int:
            with self._transaction() as conn:
                return conn.execute(
                    f"UPDATE outbox SET next_attempt_at=? WHERE state='pending' "
                    f"AND notifier IN ({marks})",
                    (now.isoformat(), *names),
                ).rowcount

        try:
            return await self._run(run)
        except sqlite3.Error as exc:
            raise StateError(f"could not update the outbox: {exc}") from None

    async def pending_by_notifier(self) -> dict[str, int]:
        """How many messages are pending, per notifier."""

        def query() -> dict[str, int]:
            rows = self._conn.execute(
                f"SELECT notifier, COUNT(*) FROM outbox WHERE state='pending' AND {_MESSAGE} "
                "GROUP BY notifier"
            )
            return {notifier: count for notifier, count in rows}

        return await self._read(query)

    async def mark_failed(
        self, delivery_id: int, now: datetime, error: str, owed: Sequence[str] | None = None
    ) -> None:
        """Mark the message failed (for the recipients ``owed`` only, when some got it)."""
        await self._update(
            (
                "UPDATE outbox SET state='failed', attempts=attempts+1, done_at=?, "
                "last_error=? WHERE id=? OR grp=?",
                (now.isoformat(), outbox_error(error, owed), delivery_id, delivery_id),
            )
        )

    async def _update(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run outbox updates in one transaction."""

        def run() -> None:
            with self._transaction() as conn:
                for sql, params in statements:
                    conn.execute(sql, params)

        try:
            await self._run(run)
        except sqlite3.Error as exc:
            raise StateError(f"could not update the outbox: {exc}") from None

    async def _read(self, fn: Callable[[], T]) -> T:
        try:
            return await self._run(fn)
        except sqlite3.Error as exc:
            raise StateError(
                f"could not read the outbox of state file {self.path or ':memory:'}: {exc}"
            ) from None

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

        def run() -> int:
            with self._transaction() as conn:
                done = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM outbox WHERE state IN ('sent', 'failed') "
                        f"AND next_attempt_at < ? AND done_at < ? AND {_MESSAGE} LIMIT ?",
                        (cutoff, cutoff, limit),
                    )
                ]
                deleted = 0
                for start in range(0, len(done), 400):
                    chunk = done[start : start + 400]
                    marks = ",".join("?" * len(chunk))
                    deleted += conn.execute(
                        f"DELETE FROM outbox WHERE id IN ({marks}) OR grp IN ({marks})",
                        (*chunk, *chunk),
                    ).rowcount
                deleted += conn.execute(
                    "DELETE FROM alerts WHERE rowid IN (SELECT rowid FROM alerts "
                    "WHERE firing=0 AND resolved_at < ? LIMIT ?)",
                    (cutoff, limit),
                ).rowcount
                deleted += conn.execute(
                    "DELETE FROM cycles WHERE id IN (SELECT id FROM cycles WHERE "
                    "finished_at < ? AND id < (SELECT MAX(id) FROM cycles) ORDER BY id LIMIT ?)",
                    (cutoff, limit),
                ).rowcount
                deleted += conn.execute(
                    "DELETE FROM amount_history WHERE rowid IN (SELECT h.rowid FROM "
                    "amount_history h WHERE h.observed_at < ? AND EXISTS (SELECT 1 FROM "
                    "amount_history n WHERE n.invoice_id = h.invoice_id "
                    "AND n.observed_at > h.observed_at AND n.observed_at < ?) LIMIT ?)",
                    (cutoff, cutoff, limit),
                ).rowcount
                return deleted

        try:
            deleted = await self._run(run)
        except sqlite3.Error as exc:
            raise StateError(f"could not prune the state file: {exc}") from None
        for invoice_id, observed in list(self._history.items()):
            if len(observed) > 1 and observed[1][0] < before:
                kept = [o for o in observed if o[0] >= before]
                older = [o for o in observed if o[0] < before]
                self._history[invoice_id] = [older[-1], *kept]
        return deleted

    # -- reads for operator commands -------------------------------------------------

    async def outbox(self, states: Iterable[str], limit: int = 50) -> list[OutboxRow]:
        wanted = tuple(states)
        marks = ",".join("?" * len(wanted))

        def query() -> list[OutboxRow]:
            rows = self._conn.execute(
                "SELECT id, notifier, summary, created_at, state, attempts, next_attempt_at, "
                f"last_error, done_at FROM outbox WHERE state IN ({marks}) AND {_MESSAGE} "
                "ORDER BY id DESC LIMIT ?",
                (*wanted, limit),
            ).fetchall()
            result = []
            for r in rows:
                created, next_at = _dt(r[3]), _dt(r[6])
                assert created is not None and next_at is not None
                result.append(
                    OutboxRow(r[0], r[1], r[2], created, r[4], r[5], next_at, r[7], _dt(r[8]))
                )
            return result

        return await self._read(query)

    async def outbox_counts(self) -> dict[str, int]:
        def query() -> dict[str, int]:
            rows = self._conn.execute(
                f"SELECT state, COUNT(*) FROM outbox WHERE {_MESSAGE} GROUP BY state"
            )
            return {state: count for state, count in rows}

        return await self._read(query)

    async def last_cycle(self) -> tuple[datetime, int, int] | None:
        """(finished at, orgs ok, orgs failed) of the last committed cycle."""

        def query() -> tuple[datetime, int, int] | None:
            row = self._conn.execute(
                "SELECT finished_at, orgs_ok, orgs_failed FROM cycles ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            finished = _dt(row[0])
            assert finished is not None
            return finished, row[1], row[2]

        return await self._run(query)

    def org_states(self) -> list[OrgState]:
        return sorted(self._orgs.values(), key=lambda o: o.org_id)

    def invoice_count(self) -> int:
        """Invoices in the snapshot (one listed by two configured organizations twice)."""
        assert self._snapshot is not None
        return sum(len(snapshot) for snapshot in self._snapshot.values())


# -- opening the state file: checks before anything is touched ----------------------------

# Files SQLite keeps beside the state file (WAL mode; a rollback journal before it).
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _wal_files(path: Path) -> dict[str, tuple[int, int]]:
    """(st_dev, st_ino) of the ``-wal`` and ``-shm`` beside an open WAL-mode state file
    (SQLite keeps both open and in place until its last connection closes)."""
    found = {}
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(OSError):
            info = os.lstat(f"{path}{suffix}")
            found[suffix] = (info.st_dev, info.st_ino)
    return found


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _reason(exc: OSError) -> str:
    """An OS error in words, with what to do about it when the error says."""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied for {_user(os.geteuid())}: run as the user that owns it"
    if code == errno.ENOSPC:
        return "the disk is full: free some space on it"
    if code == errno.EDQUOT:
        return "the disk quota of this user is exhausted"
    if code == errno.EROFS:
        return "the file system is read-only: point state.path at a writable one"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder: check state.path"
    if code == errno.EEXIST:
        return "a file of that name is in the way of a folder: check state.path"
    if code == errno.ELOOP:
        return "it is a symbolic link, which invoice-watch does not follow"
    return exc.strerror or str(exc)


def _existing(path: Path) -> os.stat_result | None:
    """``lstat`` of a state file (or one beside it): None when there is none; a
    StateError when it cannot be looked at, is a symbolic link (never followed: a link
    would have invoice-watch chmod and write a file elsewhere), or is not a regular
    file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot reach state file {path}: {_reason(exc)}") from None
    if stat.S_ISLNK(info.st_mode):
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        raise StateError(
            f"{path} is a symbolic link{target}: invoice-watch does not follow links to "
            "its state; set state.path to the real file's path (its folder may be a link)"
        )
    if stat.S_ISDIR(info.st_mode):
        raise StateError(
            f"state.path {path} is a folder, not a file: name a file in it, e.g. "
            f"{path / 'state.db'}"
        )
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"{path} is not a regular file: point state.path at a file")
    return info


def _check_owner(path: Path, info: os.stat_result) -> None:
    """The daemon keeps its state private (0600) to the user it runs as; a file of
    another user (root excepted) is refused before anything is changed."""
    me = os.geteuid()
    if me != 0 and info.st_uid != me:
        raise StateError(
            f"{path} belongs to {_user(info.st_uid)}, not to {_user(me)} that runs "
            "invoice-watch (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): the state must be private to the daemon's "
            "user; run invoice-watch as its owner, or move the file aside (a new state "
            "file sends the firing alerts again unless you start with `run --once "
            "--baseline`)"
        )


def _open_for_daemon(path: Path) -> int:
    """The state file opened read-write (created 0600 when missing, with its folder),
    checked before anything is touched: not a link, a regular file, this user's, in a
    folder this user can write (SQLite creates its -wal and -shm there)."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create the state folder {folder}: {_reason(exc)}") from None
    info = _existing(path)
    if info is not None:
        _check_owner(path, info)
    for suffix in _SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if (side_info := _existing(side)) is not None:
            _check_owner(side, side_info)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StateError(
            f"the state folder {folder} is not writable by {_user(os.geteuid())}: SQLite "
            f"creates {path.name}-wal and {path.name}-shm beside the state file; make the "
            "folder this user's, or point state.path elsewhere"
        )
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise StateError(f"cannot create or open state file {path}: {_reason(exc)}") from None
    opened = os.fstat(fd)
    try:
        if not stat.S_ISREG(opened.st_mode):  # swapped since the checks above
            raise StateError(f"{path} is not a regular file: point state.path at a file")
        _check_owner(path, opened)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock(fd: int, path: Path) -> None:
    """The daemon's exclusive lock on its state file (one daemon per file)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StateLockedError(
            f"state file {path} is in use by another invoice-watch daemon; run "
            "one daemon per state file (or point state.path elsewhere)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOLCK:
            raise StateError(
                f"state file {path} is on a file system that cannot lock files (NFS or "
                "CIFS without a lock manager?): invoice-watch locks its state so that one "
                "daemon uses it, and SQLite needs locks too. Keep the state on a local "
                "disk: point state.path there"
            ) from None
        raise StateError(f"cannot lock state file {path}: {_reason(exc)}") from None


def _check_readable(path: Path) -> None:
    """An operator command's checks before reading: the file and its -wal/-shm are no
    links, and this user may read them."""
    if not os.access(path, os.R_OK):
        raise StateError(
            f"cannot read state file {path}: permission denied for "
            f"{_user(os.geteuid())}; run this command as the daemon's user, or with sudo"
        )
    for suffix in _SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if _existing(side) is not None and not os.access(side, os.R_OK):
            raise StateError(
                f"cannot open state file {side} (SQLite's, beside {path.name}, while the "
                f"daemon runs): permission denied for {_user(os.geteuid())}; run this "
                "command as the daemon's user, or with sudo"
            )


def _connect_read_only(path: Path) -> sqlite3.Connection:
    # as_uri() escapes what a URI would misread (?, #, %, spaces); absolute(), not
    # resolve(): the folder may be a link (systemd's DynamicUser), the file is not.
    return sqlite3.connect(
        f"{path.absolute().as_uri()}?mode=ro",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )


def _disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (next to) no space left for this
    user: less than 64 KiB."""
    try:
        info = os.statvfs(path.parent)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < 64 * 1024


def _sqlite_problem(path: Path, exc: sqlite3.Error, *, reader: bool = False) -> str:
    """What an SQLite error on opening the state file means, and what to do (``reader``:
    for an operator command, which only reads it, rather than the daemon)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and _disk_full(path)):
        # (a full disk may also show as an I/O error: growing the -shm file failed)
        return f"cannot write state file {path}: the disk is full; free some space on it"
    if primary == sqlite3.SQLITE_CANTOPEN and reader:
        return (
            f"SQLite cannot open state file {path} or the -wal/-shm files beside it for "
            f"{_user(os.geteuid())}: run this command as the daemon's user, or with sudo"
        )
    if primary == sqlite3.SQLITE_CANTOPEN:
        return (
            f"SQLite cannot open state file {path} or the -wal/-shm files beside it: the "
            "folder must be readable and writable by the daemon's user"
        )
    if primary == sqlite3.SQLITE_READONLY:
        return (
            f"state file {path} (or its -wal/-shm) is read-only for {_user(os.geteuid())}: "
            "run as the file's owner"
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"state file {path} stayed locked by another program for 5 s: try again"
    if primary == sqlite3.SQLITE_IOERR:
        return (
            f"I/O error on state file {path} ({exc}): check that its disk is healthy and "
            "has space (and that no file size limit applies), or, on a network file "
            "system, keep the state on a local disk"
        )
    return (
        f"state file {path} cannot be used: {exc}. If it is not an invoice-watch state "
        "file, point state.path elsewhere; if it is damaged, move it aside (the next run "
        "starts a new snapshot)"
    )


ERROR_MAX = 1000  # characters of a delivery error kept (a receiver's answer can be long)


def _error_text(error: str) -> str:
    """A delivery error as the outbox keeps it: storable whatever a receiver put in it
    (a lone surrogate would make the mark fail, and the message be sent again for
    ever), at most :data:`ERROR_MAX` characters."""
    return storable(error, ERROR_MAX)


# A message that reached some of its notifier's recipients (an email some took and
# another refused for now) is still owed to the others: its ``last_error`` says so first,
# as a JSON list, which is how the outbox remembers them (no column of their own).
_OWED = "still owed to "


def outbox_error(error: str, owed: Sequence[str] | None = None) -> str:
    """The ``last_error`` the outbox stores for ``error``: made storable and bounded
    (:data:`ERROR_MAX`), after ``still owed to ["a@example.com"]: `` when ``owed`` says
    which recipients still need the message (:func:`owed_of` reads them back; the list
    is the configured ``to``'s, so bounded by it, and kept whole)."""
    text = _error_text(error)
    if owed is None:
        return text
    return f"{_OWED}{json.dumps(list(owed))}: {text}"


def owed_of(last_error: str | None) -> tuple[str, ...] | None:
    """The recipients a stored ``last_error`` says are still owed the message, None
    when it names none (all of them are)."""
    if not last_error or not last_error.startswith(_OWED):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(last_error, len(_OWED))
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def unstorable(event: AlertEvent) -> str | None:
    """Why the state file could not store ``event`` (its JSON cannot be made: an amount
    of more than 4,300 digits), or None when it can."""
    try:
        _event_json(event)
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _part_of(
    conn: sqlite3.Connection, leader: int, cycle: int | None, notifier: str
) -> Part | None:
    """Which part the grouped message led by ``leader`` is of its cycle's grouped
    messages to ``notifier`` (None: the only one). A cycle's rows are numbered together
    (cycles commit one after another, and nothing else adds rows), so its parts lie
    between the nearest rows of other cycles: found by rowid, without a scan."""
    before = conn.execute(
        "SELECT id FROM outbox WHERE id < ? AND cycle IS NOT ? ORDER BY id DESC LIMIT 1",
        (leader, cycle),
    ).fetchone()
    after = conn.execute(
        "SELECT id FROM outbox WHERE id > ? AND cycle IS NOT ? ORDER BY id LIMIT 1",
        (leader, cycle),
    ).fetchone()
    leaders = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM outbox WHERE id > ? AND id < ? AND cycle IS ? AND notifier=? "
            "AND grp=id ORDER BY id",
            (before[0] if before else 0, after[0] if after else sys.maxsize, cycle, notifier),
        )
    ]
    if len(leaders) < 2 or leader not in leaders:
        return None
    return Part(leaders.index(leader) + 1, len(leaders))


def _alert_row(state: AlertState, last_event: str | None) -> tuple[Any, ...]:
    return (
        state.key,
        state.rule,
        state.org_id,
        state.source_org_id,
        state.invoice_id,
        int(state.firing),
        state.firing_since.isoformat(),
        _ts(state.last_notified),
        _ts(state.resolved_at),
        last_event,
    )


def _event_json(event: AlertEvent) -> str:
    return json.dumps(event.to_json(), separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def _notifiers_json(notifiers: tuple[str, ...]) -> str:
    return ',"notifiers":' + json.dumps(list(notifiers), separators=(",", ":"))


def _with_recipients(text: str, state: AlertState) -> str:
    """An alert's last event as its row keeps it: the event's JSON (``text``, an object)
    and, beside the event's own keys, the notifiers its messages went to and whether its
    rule sends RESOLVED (which :meth:`AlertEvent.from_json` leaves alone: no schema
    change, and an older invoice-watch reads the row as before)."""
    extra = ""
    if state.notifiers:
        extra += _notifiers_json(state.notifiers)
    if not state.send_resolved:
        extra += ',"send_resolved":false'
    return text[:-1] + extra + "}" if extra else text


def _alert_from_row(row: Sequence[Any], invoice_ids: Mapping[str, Invoice]) -> AlertState:
    """A stored alert; its rule, organizations and times shared with the others', its
    invoice id with the snapshot's (``invoice_ids``: the source organization's)."""
    invoice_id = row[4]
    if invoice_id is not None and (known := invoice_ids.get(invoice_id)) is not None:
        invoice_id = known.id
    last_event = None
    notifiers: tuple[str, ...] = ()
    send_resolved = True
    if row[9]:
        data = json.loads(row[9])
        if data.get("key") == row[0]:
            data["key"] = row[0]
        if invoice_id is not None and data.get("invoice_id") == invoice_id:
            data["invoice_id"] = invoice_id
        last_event = AlertEvent.from_json(data)
        named = data.get("notifiers")
        if isinstance(named, list):
            notifiers = tuple(sys.intern(str(name)) for name in named)
        send_resolved = data.get("send_resolved") is not False
    return AlertState(
        key=row[0],
        rule=sys.intern(row[1]),
        org_id=sys.intern(row[2]),
        source_org_id=sys.intern(row[3]),
        invoice_id=invoice_id,
        firing=bool(row[5]),
        firing_since=instant(row[6]),
        last_notified=instant(row[7]) if row[7] else None,
        resolved_at=instant(row[8]) if row[8] else None,
        last_event=last_event,
        notifiers=notifiers,
        send_resolved=send_resolved,
    )
