"""The snapshot in the SQLite state file: the invoices each configured organization
listed (``invoices``, one row per organization that lists it), the pending amounts seen
(``amount_history``), and each organization's read state (``orgs``).

Cached in memory from the opening on, and updated only once a transaction committed
(:meth:`SqlSnapshot.apply`): the cycle reads it per invoice. Of the settled invoices
(final, and watched by no rule) only a key each is kept in memory, the file keeping them
whole (:class:`~invoice_watch.types.Snapshot`); :meth:`SqlSnapshot.stored_copies`
reads those a read needs back, in one read. Each organization's read state is
:class:`OrgReads`'s, which the snapshot writes and applies with its invoices.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.safe_text import storable
from invoice_watch.store.encoding import ERROR_MAX
from invoice_watch.store.records import OrgState, OrgWrite
from invoice_watch.store.sql import SqlConnection, SqlDatabase, staging
from invoice_watch.types import Invoice, Snapshot, instant, settled_key

_INVOICE_COLUMNS = (
    "id, org_id, source_org_id, status, start_date, end_date, amount_billed_cents, "
    "amount_paid_cents, credits_cents, sales_tax_cents, starting_balance_cents, "
    "subtotal_cents, created, updated"
)


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# Invoices share their period bounds as the very same objects (types.instant gives one
# object per text): each is converted once, remembered by identity, the object kept with
# its text (so its id is not reused while remembered); cleared past 4,096. A lookup costs
# a third of one by value and offset (an lru_cache on (value, value.utcoffset()), which
# equality needs: it ignores the offset the text shows): a row 1.7 -> 0.8 us.
_ISO: dict[int, tuple[datetime, str]] = {}


def _iso(value: datetime) -> str:
    known = _ISO.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    if len(_ISO) >= 4096:
        _ISO.clear()
    text = value.isoformat()
    _ISO[id(value)] = (value, text)
    return text


def _invoice_row(invoice: Invoice) -> tuple[Any, ...]:
    created, updated = invoice.created, invoice.updated
    return (
        invoice.id,
        invoice.org_id,
        invoice.source_org_id,
        invoice.status,
        _iso(invoice.start_date),
        _iso(invoice.end_date),
        invoice.amount_billed_cents,
        invoice.amount_paid_cents,
        invoice.credits_cents,
        invoice.sales_tax_cents,
        invoice.starting_balance_cents,
        invoice.subtotal_cents,
        None if created is None else _iso(created),
        None if updated is None else _iso(updated),
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


def _settled_key_of_row(row: Sequence[Any]) -> int:
    """A stored invoice's settled key (:func:`~invoice_watch.types.settled_key`), read
    from its row as :meth:`Invoice.settled_key` reads it from the invoice, without
    building the invoice: a start keeps most of the snapshot so (18,000 rows: 0.12 ->
    0.02 s of CPU)."""
    return settled_key(
        (
            row[0],
            row[1],
            row[3],
            tuple(row[6:12]),
            instant(row[4]),
            instant(row[5]),
            instant(row[12]) if row[12] else None,
            instant(row[13]) if row[13] else None,
        )
    )


def _select(conn: SqlConnection, org_id: str, ids: Sequence[str]) -> list[Invoice]:
    """The invoices ``ids`` of ``org_id``'s listing that the state file holds."""
    found: list[Invoice] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = conn.execute(
            f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE source_org_id=? "
            f"AND id IN ({','.join('?' * len(chunk))})",
            (org_id, *chunk),
        )
        found.extend(_invoice_from_row(row) for row in rows)
    return found


class OrgReads:
    """Each configured organization's read state (``orgs``: when it was last read,
    last read successfully, failing since, why, its invoice count), cached: part of
    the snapshot, which writes and applies it with the organization's invoices."""

    def __init__(self) -> None:
        self._orgs: dict[str, OrgState] = {}

    def load(self, conn: SqlConnection) -> None:
        self._orgs = {
            row[0]: OrgState(row[0], _dt(row[1]), _dt(row[2]), _dt(row[3]), row[4], row[5])
            for row in conn.execute(
                "SELECT org_id, last_attempt, last_success, failing_since, last_error, "
                "invoice_count FROM orgs"
            )
        }

    def get(self, org_id: str) -> OrgState:
        return self._orgs.get(org_id) or OrgState(org_id)

    def all(self) -> list[OrgState]:
        return sorted(self._orgs.values(), key=lambda o: o.org_id)

    @staticmethod
    def write(conn: SqlConnection, orgs: Sequence[OrgWrite], now: str) -> None:
        """Organizations' reads (a failed one keeps its last success and count): one
        statement for the successful ones, one for the failed ones, not one per
        organization (every cycle writes the read time of every organization)."""
        failed = [org for org in orgs if not org.ok]
        if failed:
            conn.executemany(
                "INSERT INTO orgs (org_id, last_attempt, failing_since, last_error) "
                "VALUES (?,?,?,?) ON CONFLICT (org_id) DO UPDATE SET "
                "last_attempt=excluded.last_attempt, "
                "failing_since=excluded.failing_since, last_error=excluded.last_error",
                [
                    (
                        org.org_id,
                        now,
                        _ts(org.failing_since),
                        None if org.error is None else storable(org.error, ERROR_MAX),
                    )
                    for org in failed
                ],
            )
        if len(failed) < len(orgs):
            conn.executemany(
                "INSERT INTO orgs (org_id, last_attempt, last_success, failing_since, "
                "last_error, invoice_count) VALUES (?,?,?,NULL,NULL,?) "
                "ON CONFLICT (org_id) DO UPDATE SET last_attempt=excluded.last_attempt, "
                "last_success=excluded.last_success, failing_since=NULL, last_error=NULL, "
                "invoice_count=excluded.invoice_count",
                [(org.org_id, now, now, org.invoice_count) for org in orgs if org.ok],
            )

    def apply(self, org: OrgWrite, at: datetime) -> None:
        """Bring the cache in line with :meth:`write`'s commit."""
        if org.ok:
            self._orgs[org.org_id] = OrgState(org.org_id, at, at, None, None, org.invoice_count)
            return
        before = self.get(org.org_id)
        self._orgs[org.org_id] = OrgState(
            org.org_id,
            last_attempt=at,
            last_success=before.last_success,
            failing_since=org.failing_since,
            last_error=org.error,
            invoice_count=before.invoice_count,
        )


class SqlSnapshot:
    """The snapshot (:class:`~invoice_watch.store.protocols.SnapshotRepository`) and its
    cache. ``settles``: the statuses kept settled in memory."""

    def __init__(self, db: SqlDatabase, settles: frozenset[str] = FINAL_STATUSES) -> None:
        self._db = db
        self._settles = settles
        self._snapshot: dict[str, Snapshot] = {}
        self._history: dict[str, list[tuple[datetime, int]]] = {}
        self._reads = OrgReads()
        # Linked organization -> the configured organization whose listing showed its
        # invoices nested (its payer), as the snapshot has ever held them.
        self._payers: dict[str, str] = {}

    # -- loading (in the database's thread) ------------------------------------------

    def load(self, conn: SqlConnection) -> None:
        self._snapshot = self._load_snapshot(conn)
        self._history = {}
        for invoice_id, observed_at, cents in conn.execute(
            "SELECT invoice_id, observed_at, amount_cents FROM amount_history "
            "ORDER BY invoice_id, observed_at"
        ):
            at = _dt(observed_at)
            assert at is not None
            self._history.setdefault(invoice_id, []).append((at, cents))
        self._reads.load(conn)

    def _load_snapshot(self, conn: SqlConnection) -> dict[str, Snapshot]:
        live: dict[str, dict[str, Invoice]] = {}
        settled: dict[str, dict[str, int]] = {}
        payers = self._payers
        for row in conn.execute(f"SELECT {_INVOICE_COLUMNS} FROM invoices"):
            invoice_id, org_id, source_org_id, status = row[:4]
            if org_id != source_org_id:
                payers[org_id] = source_org_id
            if status in self._settles:
                settled.setdefault(source_org_id, {})[invoice_id] = _settled_key_of_row(row)
            else:
                live.setdefault(source_org_id, {})[invoice_id] = _invoice_from_row(row)
        return {
            org_id: Snapshot(live.get(org_id, {}), settled.get(org_id, {}), self._settles)
            for org_id in live.keys() | settled.keys()
        }

    # -- what the cycle reads (cached) -----------------------------------------------

    def get(self, org_id: str) -> Snapshot:
        snapshot = self._snapshot.get(org_id)
        return snapshot if snapshot is not None else Snapshot(settles=self._settles)

    def org_state(self, org_id: str) -> OrgState:
        return self._reads.get(org_id)

    def org_states(self) -> list[OrgState]:
        return self._reads.all()

    def history(self, invoice_id: str) -> list[tuple[datetime, int]]:
        return self._history.get(invoice_id, [])

    def payers(self) -> Mapping[str, str]:
        """Linked organization -> the organization that pays for it: whose listing
        showed its invoices nested (``linkedInvoices``), as the state file held them when
        opened or a read has shown them since (never forgotten while the process runs)."""
        return self._payers

    def invoice_count(self) -> int:
        return sum(len(snapshot) for snapshot in self._snapshot.values())

    async def settle(self, statuses: frozenset[str]) -> None:
        """Keep invoices of these statuses settled from now on (a configuration reload
        changed what the rules watch): the snapshot is read again from the file."""
        if statuses == self._settles:
            return

        def load(conn: SqlConnection) -> dict[str, Snapshot]:
            self._settles = statuses
            return self._load_snapshot(conn)

        self._snapshot = await self._db.read(load, f"{self._db.kind} {self._db.name}")

    async def stored_invoices(
        self, org_id: str | None = None, ids: Sequence[str] | None = None
    ) -> list[Invoice]:
        def query(conn: SqlConnection) -> list[Invoice]:
            sql = f"SELECT {_INVOICE_COLUMNS} FROM invoices"
            if org_id is None:
                return [_invoice_from_row(row) for row in conn.execute(sql)]
            if ids is None:
                rows = conn.execute(f"{sql} WHERE source_org_id=?", (org_id,))
                return [_invoice_from_row(row) for row in rows]
            return _select(conn, org_id, ids)

        return await self._db.read(query, f"{self._db.kind} {self._db.name}")

    async def stored_copies(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, Invoice]]:
        def query(conn: SqlConnection) -> dict[str, dict[str, Invoice]]:
            return {
                org_id: {i.id: i for i in _select(conn, org_id, ids)}
                for org_id, ids in wanted.items()
            }

        return await self._db.read(query, f"{self._db.kind} {self._db.name}")

    # -- writing (in a transaction of the unit of work) ------------------------------

    def write(self, conn: SqlConnection, orgs: Iterable[OrgWrite], now: str) -> None:
        """Organizations' reads: their invoices, amount observations and read state."""
        orgs = list(orgs)
        for org in orgs:
            if org.ok and org.changes_snapshot:  # else nothing of its invoices to write
                self._write_invoices(conn, org, now)
        self._reads.write(conn, orgs, now)

    def _write_invoices(self, conn: SqlConnection, org: OrgWrite, now: str) -> None:
        """A successful read's invoices (those it staged first, moved) and amount
        observations."""
        if org.staged is not None:
            staging.move(conn, org.org_id, org.staged, now)
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
        if org.gone:
            conn.executemany(
                "DELETE FROM invoices WHERE source_org_id=? AND id=?",
                [(org.org_id, g) for g in org.gone],
            )
        conn.executemany(
            "DELETE FROM amount_history WHERE invoice_id=?",
            [(invoice_id,) for invoice_id in self._histories_ended(org)],
        )
        if org.mirrors:  # only the copies another organization still holds
            conn.executemany(
                "UPDATE invoices SET org_id=?, status=?, start_date=?, end_date=?, "
                "amount_billed_cents=?, amount_paid_cents=?, credits_cents=?, "
                "sales_tax_cents=?, starting_balance_cents=?, subtotal_cents=?, "
                "created=?, updated=?, last_changed=? WHERE source_org_id=? AND id=?",
                ((row[1], *row[3:], now, row[2], row[0]) for row in map(_invoice_row, org.mirrors)),
            )
        conn.executemany(
            "INSERT INTO amount_history VALUES (?,?,?) ON CONFLICT (invoice_id, observed_at) "
            "DO UPDATE SET amount_cents=excluded.amount_cents",
            [(invoice_id, now, cents) for invoice_id, cents in org.observations],
        )

    def _histories_ended(self, org: OrgWrite) -> list[str]:
        """The invoices whose amount history ends with this successful read: those that
        left PENDING, and those gone that no other configured organization still lists
        (a linked invoice's history is its payer's as well)."""
        history = self._history
        ended = [i.id for i in org.upserts if i.status != "PENDING" and i.id in history]
        ended += [
            invoice_id
            for invoice_id in org.gone
            if invoice_id in history and not self._listed_elsewhere(org.org_id, invoice_id)
        ]
        return ended

    def _listed_elsewhere(self, org_id: str, invoice_id: str) -> bool:
        """Whether another configured organization still lists the invoice (a linked
        invoice, in its payer's listing too): its amount history is theirs as well."""
        return any(
            invoice_id in snapshot for other, snapshot in self._snapshot.items() if other != org_id
        )

    def apply(self, orgs: Iterable[OrgWrite], at: datetime) -> None:
        """Bring the cache in line with what was just committed."""
        for org in orgs:
            self._reads.apply(org, at)
            if not org.ok:
                continue
            for invoice_id in self._histories_ended(org):
                self._history.pop(invoice_id, None)
            staged = org.staged.keys if org.staged is not None else None
            self._snapshot[org.org_id] = self.get(org.org_id).updated(org.upserts, org.gone, staged)
            if org.staged is not None:  # nested invoices it staged: it pays for theirs
                for linked in org.staged.linked:
                    self._payers[linked] = org.org_id
            for invoice in org.upserts:
                if invoice.org_id != org.org_id:
                    self._payers[invoice.org_id] = org.org_id
            for mirror in org.mirrors:
                holder = self._snapshot.get(mirror.source_org_id)
                if holder is not None and mirror.id in holder:
                    self._snapshot[mirror.source_org_id] = holder.updated([mirror], ())
            for invoice_id, cents in org.observations:
                self._history.setdefault(invoice_id, []).append((at, cents))

    # -- retention -------------------------------------------------------------------

    @staticmethod
    def prune(conn: SqlConnection, cutoff: str, limit: int) -> int:
        """Delete amount observations made before ``cutoff`` but each invoice's newest
        one made before (at most ``limit``); returns how many."""
        return conn.execute(
            "DELETE FROM amount_history WHERE (invoice_id, observed_at) IN (SELECT "
            "h.invoice_id, h.observed_at FROM "
            "amount_history h WHERE h.observed_at < ? AND EXISTS (SELECT 1 FROM "
            "amount_history n WHERE n.invoice_id = h.invoice_id "
            "AND n.observed_at > h.observed_at AND n.observed_at < ?) LIMIT ?)",
            (cutoff, cutoff, limit),
        ).rowcount

    def pruned(self, before: datetime) -> None:
        """Bring the cache in line with :meth:`prune`'s commit."""
        for invoice_id, observed in list(self._history.items()):
            if len(observed) > 1 and observed[1][0] < before:
                kept = [o for o in observed if o[0] >= before]
                older = [o for o in observed if o[0] < before]
                self._history[invoice_id] = [older[-1], *kept]
