"""The staging area: where a long listing's new settled invoices wait for their
organization's commit on the database rather than in memory.

An organization's snapshot changes in one transaction (README, Guarantees), so what its
listing found must wait for that commit somewhere. Held as
:class:`~invoice_watch.types.Invoice` objects (about 375 bytes of memory each), one
organization of 55,000 invoices took the daemon past 80 MB. So the pages after the first
of a listing (:class:`~invoice_watch.atlas.paging.Stage`) write the settled invoices its
snapshot does not hold (most of a first listing) as rows of a temporary table,
``staged_invoices``, as they are parsed, and keep only each one's settled key (what the
snapshot keeps of it anyway); the organization's commit moves those rows into
``invoices`` (:meth:`~invoice_watch.store.sql.snapshot.SqlSnapshot.write`), in its one
transaction with the rest of its part. A payer's listing stages the invoices of its
linked organizations nested in it as well (below): held as invoices, a payer of 70,000
entries, half of them nested, peaked at 98.8 MB on a fresh state; staged, at 79.6 MB
(73.6 restarted; one organization of 100,000 invoices: 79.0, 75.5 restarted;
/tmp/mem_attack.py of issue 16's attack, 2026-12-01).

A temporary table belongs to the database connection that created it: no other
connection sees it (another process, a replica), writing it commits nothing of the
state, and it ends with the connection, so a crash leaves nothing to clean up. What a
cycle staged and did not move (a listing that failed after some pages, a part the
database refused) is deleted by the next cycle's first staging (:meth:`SqlStaging.put`). If the
connection was opened again meanwhile (PostgreSQL, after a lost connection), the move
finds fewer rows than it expects and the organization's part is refused
(:class:`StagedRowsLost`): its read counts as failed and the next cycle reads it again.

Which invoices are staged (:meth:`SqlStaging.stages`): those in a status the snapshot
keeps settled (no rule looks at them), whose id the listing organization's snapshot
does not hold (so that they are added, never compared), that no firing alert is about
(its resolution reads the invoice) and that have no amount history (an upsert of a
settled invoice ends it), listed by an organization not known to be linked to a payer
(whose listing another organization's compares with its own); its own invoices, and
those of its linked organizations nested in its listing (``linkedInvoices``, a payer's)
when that organization is not configured: no other read of the cycle lists or compares
them. A configured linked organization's invoices nested in its payer's listing are
held as invoices until the commit (its own read compares with them): a payer's listing
still grows with those. An id listed again in the same listing is staged once: listed
again alike (the same settled key; a linked invoice is nested under each of its
payer's invoices of its period) it is dropped as staged already, otherwise (the
listing moved while it was paged) it stays an invoice, which the commit writes after
the staged row. What changes for
the rest of the cycle: nothing it decides (the rules never see a settled invoice;
:mod:`invoice_watch.linked` compares only those that can change or are linked to a
configured organization; the payer is known to pay for those it staged,
:attr:`~invoice_watch.atlas.paging.Staged.linked`), only that these invoices reach the
snapshot as keys.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from invoice_watch.atlas.paging import Staged
from invoice_watch.atlas.parse import Page
from invoice_watch.errors import FetchDataError, UnstorableError
from invoice_watch.store.records import AlertState
from invoice_watch.store.sql import SqlConnection, SqlDatabase
from invoice_watch.types import Invoice, Snapshot

log = logging.getLogger(__name__)

_COLUMNS = (
    "id, org_id, source_org_id, status, start_date, end_date, amount_billed_cents, "
    "amount_paid_cents, credits_cents, sales_tax_cents, starting_balance_cents, "
    "subtotal_cents, created, updated"
)

# BIGINT: SQLite reads it as INTEGER (64 bits), as PostgreSQL's schema spells it. No
# key: a listing stages an id once (ListingStage.page), and an index made staging and
# moving cost 40 % more CPU than writing the rows directly (0.59 s against 0.42 per
# 100,000 rows; without it the same).
_CREATE = (
    "CREATE TEMP TABLE IF NOT EXISTS staged_invoices (listing BIGINT NOT NULL, "
    "id TEXT NOT NULL, org_id TEXT NOT NULL, source_org_id TEXT NOT NULL, "
    "status TEXT NOT NULL, start_date TEXT NOT NULL, end_date TEXT NOT NULL, "
    "amount_billed_cents BIGINT NOT NULL, amount_paid_cents BIGINT NOT NULL, "
    "credits_cents BIGINT NOT NULL, sales_tax_cents BIGINT NOT NULL, "
    "starting_balance_cents BIGINT NOT NULL, subtotal_cents BIGINT NOT NULL, "
    "created TEXT, updated TEXT)"
)

_INSERT = (
    f"INSERT INTO staged_invoices (listing, {_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

# Into the snapshot, in the organization's transaction (the WHERE also settles SQLite's
# parsing of an upsert after a SELECT).
MOVE = (
    f"INSERT INTO invoices ({_COLUMNS}, first_seen, last_changed) "
    f"SELECT {_COLUMNS}, ?, ? FROM staged_invoices WHERE listing=? "
    "ON CONFLICT (source_org_id, id) DO UPDATE SET org_id=excluded.org_id, "
    "status=excluded.status, start_date=excluded.start_date, end_date=excluded.end_date, "
    "amount_billed_cents=excluded.amount_billed_cents, "
    "amount_paid_cents=excluded.amount_paid_cents, credits_cents=excluded.credits_cents, "
    "sales_tax_cents=excluded.sales_tax_cents, "
    "starting_balance_cents=excluded.starting_balance_cents, "
    "subtotal_cents=excluded.subtotal_cents, created=excluded.created, "
    "updated=excluded.updated, last_changed=excluded.last_changed"
)


# Pages on their way to the staging area at once (see SqlStaging.turns): as many as the
# reference point's requests in flight, about 0.3 MB each as parsed invoices.
PAGES_AT_ONCE = 8


class StagedRowsLost(UnstorableError):
    """The move of a listing's staged rows found fewer than were staged (the database
    connection was opened again since: its temporary table went with the old one). As a
    value the database cannot take, it is the organization's: its read counts as
    failed (:class:`~invoice_watch.writer.GroupCommit`), the others commit."""


def move(conn: SqlConnection, org_id: str, staged: Staged, now: str) -> None:
    """The staged rows of ``staged`` into ``invoices`` (in the caller's transaction),
    then out of the staging area; :class:`StagedRowsLost` when some are missing (the
    whole area too: a connection opened again since has none, created empty here)."""
    conn.execute(_CREATE)
    moved = conn.execute(MOVE, (now, now, staged.listing)).rowcount
    if moved != staged.rows:
        raise StagedRowsLost(
            f"{staged.rows - moved:,} of the {staged.rows:,} invoices listed and staged "
            "for the commit were no longer there (the database connection was opened "
            "again meanwhile); the organization is read again next cycle"
        )
    conn.execute("DELETE FROM staged_invoices WHERE listing=?", (staged.listing,))


class SqlStaging:
    """The staging area of the state's database (see the module's docstring)."""

    def __init__(
        self,
        db: SqlDatabase,
        firing: Callable[[], Mapping[str, AlertState]],
        history: Callable[[str], Sequence[object]],
    ) -> None:
        self._db = db
        self._firing = firing  # the firing alerts (the notification log's)
        self._history = history  # an invoice's amount history (the snapshot's)
        self._listings = itertools.count(1)
        self._used = False  # rows were staged (some may be left)
        self._empty_first = False  # at the cycle's first put
        # Pages requested, parsed or staged at once, all listings together (Stage.turn):
        # at most about 2 MB of pages on their way to the staging area.
        self.turns = asyncio.Semaphore(PAGES_AT_ONCE)

    def stages(
        self, known: Mapping[str, Snapshot], payers: Mapping[str, str]
    ) -> Callable[[str], ListingStage | None]:
        """Each organization's stage in a cycle, by its id (``known``: the configured
        organizations' snapshots as the cycle began, by id; ``payers``: linked
        organization -> payer): None for one known to be linked to a payer. Called as a
        cycle begins."""

        self._empty_first = self._used  # (see put)
        alerted = frozenset(a.invoice_id for a in self._firing().values() if a.invoice_id)
        configured = known.keys()  # a nested invoice of one of these is never staged

        def stage(org_id: str) -> ListingStage | None:
            if org_id in payers:
                return None
            return ListingStage(
                self,
                next(self._listings),
                org_id,
                known[org_id],
                alerted,
                configured,
                self._history,
            )

        return stage

    async def put(self, listing: int, invoices: list[Invoice]) -> None:
        """Invoices into the staging area, tagged ``listing``, in a transaction of
        their own that writes only the connection's temporary table."""
        # What the cycles before left (a listing that failed after some of its pages, a
        # part the database refused) is deleted at this cycle's first put.
        empty, self._empty_first, self._used = self._empty_first, False, True
        # The row as the snapshot writes it (imported here: that module imports this one).
        from invoice_watch.store.sql import snapshot

        def insert(conn: SqlConnection) -> None:
            conn.execute(_CREATE)
            if empty:
                # PostgreSQL's TRUNCATE gives the table's space back: a DELETE leaves its
                # rows dead, and autovacuum never visits a temporary table (the session's
                # table grew by every row ever staged: 8 MB after 12 cycles of 3,000).
                # SQLite's DELETE without WHERE truncates too.
                pg = getattr(conn, "dialect", "sqlite") == "postgresql"
                conn.execute("TRUNCATE staged_invoices" if pg else "DELETE FROM staged_invoices")
            conn.executemany(_INSERT, ((listing, *snapshot._invoice_row(i)) for i in invoices))

        await self._db.scratch(insert, "stage the invoices listed")


class ListingStage:
    """One listing's :class:`~invoice_watch.atlas.paging.Stage`: what it staged, and
    each staged invoice's settled key."""

    def __init__(
        self,
        staging: SqlStaging,
        listing: int,
        org_id: str,
        known: Snapshot,
        alerted: Collection[str],
        configured: Collection[str],
        history: Callable[[str], Sequence[object]],
    ) -> None:
        self._staging = staging
        self._listing = listing
        self._org_id = org_id
        self._known = known
        self._alerted = alerted  # invoices with a firing alert: a resolution reads them
        self._configured = configured  # the configured organizations
        self._history = history  # an invoice's amount history: an upsert may end it
        self._keys: dict[str, int] = {}
        self._linked: set[str] = set()  # the organizations whose nested invoices it staged

    def turn(self) -> asyncio.Semaphore:
        return self._staging.turns

    async def page(self, page: Page) -> Page:
        org_id, known, settles, keys = self._org_id, self._known, self._known.settles, self._keys
        alerted, configured, history = self._alerted, self._configured, self._history
        staged, kept, again = [], [], []
        for invoice in page.invoices:
            # An id listed twice is staged once: listed again as staged (the same
            # settled key: every field alike), it is dropped as staged already (a linked
            # invoice is nested under each of its payer's invoices of its period);
            # listed otherwise (the listing moved while it was paged), it stays an
            # invoice, which the commit writes after. A linked organization's invoice
            # nested in this listing is staged when that organization is not configured
            # (no other read lists or compares it).
            if invoice.id in keys:
                if keys[invoice.id] == invoice.settled_key():
                    again.append(invoice.id)
                else:
                    kept.append(invoice)
                continue
            owner = invoice.org_id
            if (
                invoice.status in settles
                and invoice.id not in known
                and invoice.id not in alerted
                and (owner == org_id or owner not in configured)
                and not history(invoice.id)
            ):
                keys[invoice.id] = invoice.settled_key()
                staged.append(invoice)
                if owner != org_id:
                    self._linked.add(owner)
            else:
                kept.append(invoice)
        if not staged and not again:
            return page
        if staged:
            try:
                await self._staging.put(self._listing, staged)
            except UnstorableError as exc:  # what its data holds: this organization's read
                raise FetchDataError(
                    org_id, f"what Atlas listed could not be recorded: {exc}"
                ) from exc
            log.debug("%s: %d invoices listed staged until its commit", org_id, len(staged))
        ids = (*(i.id for i in staged), *again)
        return replace(page, invoices=tuple(kept), staged=ids)

    def done(self, kept: Collection[str]) -> Staged | None:
        keys = self._keys
        if not keys:
            return None
        rows = len(keys)
        for invoice_id in kept:  # listed twice, the second time kept whole: that one
            keys.pop(invoice_id, None)
        return Staged(self._listing, keys, rows, frozenset(self._linked))
