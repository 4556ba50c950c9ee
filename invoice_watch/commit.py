"""Stage 5, commit: the SQLite state file.

Owns the snapshot of invoices, the history of pending amounts, the per-organization read
state, the alert state and the outbox of notifications. An organization's snapshot
update, its alert-state changes and the notifications they cause are written in ONE
transaction (:meth:`StateStore.commit_orgs`, as soon as the cycle has read it; the
notifications are held until the cycle ends, :meth:`StateStore.finish_cycle`);
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
import fcntl
import functools
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.dedup import AlertState, Transition
from invoice_watch.errors import StateError, StateLockedError
from invoice_watch.types import AlertEvent, Invoice, Snapshot, events_from_json, instant

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
    id: int
    notifier: str
    events: list[AlertEvent]
    created_at: datetime
    attempts: int


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


def summarize(events: Sequence[AlertEvent]) -> str:
    """One line naming a message, for `history` and logs (no secrets in events)."""
    if len(events) == 1:
        e = events[0]
        parts = [str(e.kind), e.rule, e.org_name]
        if e.invoice_id:
            parts.append(e.invoice_id)
        return " ".join(parts)
    return f"{len(events)} alerts (grouped)"


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
        # One thread for every statement: the connection stays on it, and its memory in
        # one malloc arena (asyncio.to_thread would spread it over the pool's threads).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="state-file")

    # -- opening ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: Path | None, *, exclusive: bool = True, settles: frozenset[str] = FINAL_STATUSES
    ) -> StateStore:
        """Open (creating and migrating) the state file; ``exclusive`` takes the lock
        that keeps a second daemon off the same file. ``settles``: the invoice statuses
        the in-memory snapshot keeps settled (:class:`Snapshot`; by default every final
        one: :func:`~invoice_watch.rules.settled_statuses` says which a configuration's
        rules let be)."""
        return await asyncio.to_thread(cls._open_sync, path, exclusive, settles)

    @classmethod
    def open_copy(cls, path: Path, *, settles: frozenset[str] = FINAL_STATUSES) -> StateStore:
        """An in-memory copy of an existing state file (for --dry-run): writes go
        nowhere, and the file itself is only read."""
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        if path.exists():
            try:
                # as_uri() escapes what a URI would misread (?, #, %, spaces)
                source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
                try:
                    source.backup(memory)
                finally:
                    source.close()
            except sqlite3.DatabaseError as exc:
                raise StateError(f"cannot read state file {path}: {exc}") from None
        store = cls(memory, None, None, settles)
        store._migrate()
        store._load()
        return store

    @classmethod
    def _open_sync(cls, path: Path | None, exclusive: bool, settles: frozenset[str]) -> StateStore:
        if path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            store = cls(conn, None, None, settles)
            store._migrate()
            store._load()
            return store
        lock_fd = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot create or open state file {path}: {exc.strerror}; check state.path "
                "and that its folder is writable by this user"
            ) from None
        try:
            if exclusive:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StateLockedError(
                        f"state file {path} is in use by another invoice-watch daemon; run "
                        "one daemon per state file (or point state.path elsewhere)"
                    ) from None
            os.fchmod(lock_fd, 0o600)
            try:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                store = cls(conn, path, lock_fd, settles)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=5000")
                store._migrate()
                store._load()
            except sqlite3.DatabaseError as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                raise StateError(
                    f"state file {path} cannot be used: {exc}. If it is not an invoice-watch "
                    "state file, point state.path elsewhere; if it is damaged, move it aside "
                    "(the next run starts a new snapshot)"
                ) from None
        except BaseException:
            os.close(lock_fd)
            raise
        return store

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

    def _migrate(self) -> None:
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path} has schema version {version}, newer than this "
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
                    f"{self.path} is an SQLite file of another program (tables: "
                    f"{', '.join(sorted(tables)[:5])}); point state.path elsewhere"
                )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
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
    ) -> None:
        """The last transaction of a running cycle: what is left to write (``orgs`` and
        ``transitions``, as in :meth:`commit_orgs`), then every held row is released
        (see :meth:`release_held`) and the cycle is recorded."""
        now = finished_at.isoformat()

        def run() -> None:
            with self._transaction() as conn:
                self._write_part(conn, cycle, orgs, transitions, routes, now)
                events = self._release(conn, group_over, now, cycle)
                conn.execute(
                    "INSERT INTO cycles (started_at, finished_at, orgs_ok, orgs_failed, "
                    "events) VALUES (?,?,?,?,?)",
                    (started_at.isoformat(), now, orgs_ok, orgs_failed, events),
                )

        await self._commit(run)
        self._apply(orgs, transitions, finished_at)

    async def release_held(self, group_over: int, now: datetime) -> int:
        """Release the rows held by cycles that never ended (a crash, a stop, a failed
        commit): per cycle and notifier, one by one, or as one grouped message when
        there are more than ``group_over``. Returns how many rows were held."""

        def run() -> int:
            with self._transaction() as conn:
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
            rows.extend(
                (notifier, events, summary, now, now, cycle) for notifier in routes[event.rule]
            )
        conn.executemany(
            "INSERT INTO outbox (notifier, events, summary, created_at, next_attempt_at, "
            "state, cycle) VALUES (?,?,?,?,?,'held',?)",
            rows,
        )

    @staticmethod
    def _release(
        conn: sqlite3.Connection, group_over: int, now: str, cycle: int | None = None
    ) -> int:
        """Release held rows (of every cycle; ``cycle``'s own count is returned, or all
        of them). More than ``group_over`` of one cycle for one notifier become one
        grouped message: the first row leads it (its summary says so), the others follow
        (``grp``), and they are sent, retried and marked together, in order."""
        counted = 0
        groups = conn.execute(
            "SELECT cycle, notifier, COUNT(*), MIN(id) FROM outbox WHERE state='held' "
            "GROUP BY cycle, notifier"
        ).fetchall()
        for held_by, notifier, count, leader in groups:
            if cycle is None or held_by == cycle:
                counted += count
            where = "state='held' AND cycle IS ? AND notifier=?"
            if not grouped(count, group_over):
                conn.execute(
                    f"UPDATE outbox SET state='pending' WHERE {where}", (held_by, notifier)
                )
                continue
            conn.execute(
                f"UPDATE outbox SET state='pending', grp=?, next_attempt_at=? WHERE {where}",
                (leader, now, held_by, notifier),
            )
            conn.execute(
                "UPDATE outbox SET summary=? WHERE id=?", (f"{count} alerts (grouped)", leader)
            )
        return counted

    async def _commit(self, run: Callable[[], T]) -> T:
        try:
            return await self._run(run)
        except sqlite3.Error as exc:
            raise StateError(
                f"could not write state file {self.path or ':memory:'}: {exc}; nothing of "
                "this cycle was recorded (it will be evaluated again)"
            ) from None

    def _write_orgs(self, conn: sqlite3.Connection, orgs: Iterable[OrgWrite], now: str) -> None:
        for org in orgs:
            if not org.ok:
                conn.execute(
                    "INSERT INTO orgs (org_id, last_attempt, failing_since, last_error) "
                    "VALUES (?,?,?,?) ON CONFLICT (org_id) DO UPDATE SET "
                    "last_attempt=excluded.last_attempt, "
                    "failing_since=COALESCE(orgs.failing_since, excluded.failing_since), "
                    "last_error=excluded.last_error",
                    (org.org_id, now, now, org.error),
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
                event = t.state.last_event
                text = None
                if event is not None:
                    text = written[id(event)] = _event_json(event)
                yield _alert_row(t.state, text)

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

    async def due_deliveries(self, now: datetime, limit: int = 100) -> list[Delivery]:
        def query() -> list[Delivery]:
            conn = self._conn
            rows = conn.execute(
                "SELECT id, notifier, events, created_at, attempts, grp FROM outbox "
                f"WHERE state='pending' AND next_attempt_at <= ? AND {_MESSAGE} "
                "ORDER BY id LIMIT ?",
                (now.isoformat(), limit),
            ).fetchall()
            out = []
            for row in rows:
                created = _dt(row[3])
                assert created is not None
                events = events_from_json(row[2])
                if row[5] is not None:  # a group: its leader's events, then the others'
                    for (more,) in conn.execute(
                        "SELECT events FROM outbox WHERE grp=? AND id!=? ORDER BY id",
                        (row[0], row[0]),
                    ):
                        events.extend(events_from_json(more))
                out.append(Delivery(row[0], row[1], events, created, row[4]))
            return out

        return await self._run(query)

    async def next_attempt_at(self) -> datetime | None:
        def query() -> datetime | None:
            row = self._conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'"
            ).fetchone()
            return _dt(row[0]) if row else None

        return await self._run(query)

    async def mark_sent(self, delivery_id: int, now: datetime) -> None:
        await self._update(
            (
                "UPDATE outbox SET state='sent', attempts=attempts+1, done_at=?, "
                "last_error=NULL WHERE id=? OR grp=?",
                (now.isoformat(), delivery_id, delivery_id),
            )
        )

    async def mark_retry(self, delivery_id: int, next_attempt_at: datetime, error: str) -> None:
        """Schedule the row's next attempt; the same notifier's other pending rows that
        were due earlier wait until then too."""
        at = next_attempt_at.isoformat()
        await self._update(
            (
                "UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=? "
                "WHERE id=? OR grp=?",
                (at, error, delivery_id, delivery_id),
            ),
            (
                "UPDATE outbox SET next_attempt_at=? WHERE state='pending' AND "
                "notifier=(SELECT notifier FROM outbox WHERE id=?) AND next_attempt_at<?",
                (at, delivery_id, at),
            ),
        )

    async def mark_failed(self, delivery_id: int, now: datetime, error: str) -> None:
        await self._update(
            (
                "UPDATE outbox SET state='failed', attempts=attempts+1, done_at=?, "
                "last_error=? WHERE id=? OR grp=?",
                (now.isoformat(), error, delivery_id, delivery_id),
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

        return await self._run(query)

    async def outbox_counts(self) -> dict[str, int]:
        def query() -> dict[str, int]:
            rows = self._conn.execute(
                f"SELECT state, COUNT(*) FROM outbox WHERE {_MESSAGE} GROUP BY state"
            )
            return {state: count for state, count in rows}

        return await self._run(query)

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


def _alert_from_row(row: Sequence[Any], invoice_ids: Mapping[str, Invoice]) -> AlertState:
    """A stored alert; its rule, organizations and times shared with the others', its
    invoice id with the snapshot's (``invoice_ids``: the source organization's)."""
    invoice_id = row[4]
    if invoice_id is not None and (known := invoice_ids.get(invoice_id)) is not None:
        invoice_id = known.id
    last_event = None
    if row[9]:
        data = json.loads(row[9])
        if data.get("key") == row[0]:
            data["key"] = row[0]
        if invoice_id is not None and data.get("invoice_id") == invoice_id:
            data["invoice_id"] = invoice_id
        last_event = AlertEvent.from_json(data)
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
    )
