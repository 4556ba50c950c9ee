"""The line items in the state (``line_items``, ``line_item_reads``): each configured
organization's daily usage, as its pending invoice's ``lineItems:search`` (or CSV)
last gave it, for this billing period and the one before, and when it was last fetched
(issue 19: at most once per ``usage.refresh``; the time survives a restart).

Cached in memory: only the small part every cycle or scrape reads (each organization's
:class:`~invoice_watch.store.records.UsageRead` and the current period's cents per
project, for ``/metrics``). The line items themselves are read from the database when
asked for (:meth:`SqlUsage.periods`): a month of them may be 100,000 rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from invoice_watch.constants import LINE_ITEM_MAX_CENTS
from invoice_watch.safe_text import storable
from invoice_watch.store.encoding import ERROR_MAX
from invoice_watch.store.records import PeriodUsage, UsageRead
from invoice_watch.store.sql import SqlConnection, SqlDatabase
from invoice_watch.types import LineItem

# Billing periods kept per organization: this one and the one before (a report's
# "same point last month", a baseline that reaches back over the period's start).
KEEP_PERIODS = 2
# Line items one period may hold (a month of daily line items of 1,000 clusters with 5
# SKUs each): more are refused, not stored.
MAX_ITEMS = 160_000
# The most one line item held may amount to, either sign (the fetch's bound too):
# MAX_ITEMS of them sum far below an int64, so that the SUM below never overflows (SQLite
# raises on it). Rows over it (a state written before the bound) are left out of the sums.
MAX_ITEM_CENTS = LINE_ITEM_MAX_CENTS
_LABEL = 200  # characters of a project, cluster or SKU name kept

ProjectTotals = Mapping[tuple[str, str], int]  # (project id, project name) -> cents


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _read_from_row(row: Sequence[Any]) -> UsageRead:
    return UsageRead(
        org_id=row[0],
        attempted_at=datetime.fromisoformat(row[1]),
        fetched_at=_dt(row[2]),
        invoice_id=row[3],
        period_start=row[4],
        source=row[5],
        last_error=row[6],
    )


def _item_from_row(row: Sequence[Any]) -> LineItem:
    return LineItem(
        project=row[0],
        sku=row[1],
        cluster=row[2],
        amount_cents=row[3],
        project_id=row[4],
        usage_date=date.fromisoformat(row[5]) if row[5] else None,
    )


def _merged(rows: Sequence[tuple[str, str, str | None, int]]) -> dict[tuple[str, str], int]:
    """(project id, name, usage day, cents) -> cents per project, one entry per project
    id (the name of its latest day: a project renamed mid-period is one project); a
    line item without a project id is a project of its name."""
    cents: dict[str, int] = {}
    named: dict[str, tuple[str, str]] = {}  # id -> (day, name)
    for project_id, project, day, amount in rows:
        key = project_id or f"name:{project}"
        cents[key] = cents.get(key, 0) + amount
        if key not in named or (day or "") >= named[key][0]:
            named[key] = (day or "", project)
    return {
        (key if not key.startswith("name:") else "", named[key][1]): total
        for key, total in cents.items()
    }


def _totals(items: Sequence[LineItem]) -> dict[tuple[str, str], int]:
    return _merged(
        [
            (
                item.project_id,
                item.project,
                item.usage_date.isoformat() if item.usage_date else None,
                item.amount_cents,
            )
            for item in items
        ]
    )


class SqlUsage:
    """The line items held (:class:`~invoice_watch.store.protocols.UsageRepository`)."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db
        self._reads: dict[str, UsageRead] = {}
        self._totals: dict[str, dict[tuple[str, str], int]] = {}

    def load(self, conn: SqlConnection) -> None:
        """Fill the caches (on the database's thread)."""
        self._reads = {
            row[0]: _read_from_row(row)
            for row in conn.execute(
                "SELECT org_id, attempted_at, fetched_at, invoice_id, period_start, source, "
                "last_error FROM line_item_reads"
            )
        }
        rows: dict[str, list[tuple[str, str, str | None, int]]] = {}
        for org_id, project_id, project, day, cents in conn.execute(
            "SELECT l.org_id, l.project_id, l.project, MAX(l.usage_date), "
            "SUM(l.amount_cents) FROM line_items l "
            "JOIN line_item_reads r ON r.org_id = l.org_id AND r.invoice_id = l.invoice_id "
            "WHERE l.amount_cents BETWEEN ? AND ? "
            "GROUP BY l.org_id, l.project_id, l.project",
            (-MAX_ITEM_CENTS, MAX_ITEM_CENTS),
        ):
            rows.setdefault(org_id, []).append((project_id, project, day, int(cents)))
        self._totals = {org_id: _merged(found) for org_id, found in rows.items()}

    # -- cached reads ------------------------------------------------------------------

    def read_state(self, org_id: str) -> UsageRead | None:
        """When the organization's line items were last fetched or tried (None:
        never)."""
        return self._reads.get(org_id)

    def project_totals(self, org_id: str) -> ProjectTotals:
        """The cents per project of the line items last fetched (the period of
        :attr:`UsageRead.invoice_id`): month to date per project. Empty when none are
        held."""
        return self._totals.get(org_id, {})

    # -- reads from the database -------------------------------------------------------

    async def periods(self, org_id: str, count: int = KEEP_PERIODS) -> list[PeriodUsage]:
        """The line items held of the organization's last ``count`` billing periods,
        the newest first (this one, then the one before), each oldest day first."""

        def query(conn: SqlConnection) -> list[PeriodUsage]:
            found = conn.execute(
                "SELECT DISTINCT period_start, invoice_id FROM line_items WHERE org_id=? "
                "ORDER BY period_start DESC",
                (org_id,),
            ).fetchall()
            result = []
            for period_start, invoice_id in found[: max(count, 0)]:
                rows = conn.execute(
                    "SELECT project, sku, cluster, amount_cents, project_id, usage_date "
                    "FROM line_items WHERE org_id=? AND invoice_id=? AND period_start=? "
                    "ORDER BY usage_date, project_id, cluster, sku",
                    (org_id, invoice_id, period_start),
                ).fetchall()
                items = tuple(_item_from_row(row) for row in rows)
                result.append(PeriodUsage(org_id, invoice_id, period_start, items))
            return result

        return await self._db.read(query, f"the line items in {self._db.kind} {self._db.name}")

    # -- writes ------------------------------------------------------------------------

    async def record(
        self,
        org_id: str,
        invoice_id: str,
        period_start: date,
        items: Sequence[LineItem],
        source: str,
        at: datetime,
        *,
        current: bool = True,
    ) -> None:
        """The line items of one invoice of the organization, fetched ``at`` by
        ``source``: they replace those held of that invoice and of any other invoice of
        the same billing period (a pending invoice re-issued), in one transaction, and
        periods older than :data:`KEEP_PERIODS` are forgotten. ``current``: the pending
        invoice's (the fetch time and the cached totals move); otherwise a past
        period's, read once. ValueError for more than :data:`MAX_ITEMS` items, or one
        over :data:`MAX_ITEM_CENTS` (either sign)."""
        if len(items) > MAX_ITEMS:
            raise ValueError(f"{len(items)} line items, more than the {MAX_ITEMS} kept")
        if any(abs(item.amount_cents) > MAX_ITEM_CENTS for item in items):
            raise ValueError(
                f"a line item amounts to more than USD {MAX_ITEM_CENTS // 100:,}; not kept"
            )
        start = period_start.isoformat()
        stamp = at.isoformat()
        rows = [
            (
                org_id,
                invoice_id,
                start,
                item.usage_date.isoformat() if item.usage_date is not None else None,
                item.project_id,
                storable(item.project, _LABEL),
                storable(item.cluster, _LABEL),
                storable(item.sku, _LABEL),
                item.amount_cents,
            )
            for item in items
        ]

        def run(conn: SqlConnection) -> None:
            conn.execute(  # and another invoice's of the same period: a re-issued one
                "DELETE FROM line_items WHERE org_id=? AND (invoice_id=? OR period_start=?)",
                (org_id, invoice_id, start),
            )
            conn.executemany(
                "INSERT INTO line_items (org_id, invoice_id, period_start, usage_date, "
                "project_id, project, cluster, sku, amount_cents) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
            kept = [
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT period_start FROM line_items WHERE org_id=? "
                    "ORDER BY period_start DESC",
                    (org_id,),
                ).fetchall()
            ][:KEEP_PERIODS]
            if kept:
                conn.execute(
                    "DELETE FROM line_items WHERE org_id=? AND period_start < ?",
                    (org_id, min(kept)),
                )
            if current:
                conn.execute(
                    "INSERT INTO line_item_reads (org_id, invoice_id, period_start, source, "
                    "fetched_at, attempted_at, last_error) VALUES (?,?,?,?,?,?,NULL) "
                    "ON CONFLICT (org_id) DO UPDATE SET invoice_id=excluded.invoice_id, "
                    "period_start=excluded.period_start, source=excluded.source, "
                    "fetched_at=excluded.fetched_at, attempted_at=excluded.attempted_at, "
                    "last_error=NULL",
                    (org_id, invoice_id, start, source, stamp, stamp),
                )

        await self._db.write(run, f"record the line items of organization {org_id}")
        if current:
            self._reads[org_id] = UsageRead(org_id, at, at, invoice_id, start, source)
            self._totals[org_id] = _totals(items)

    async def record_failure(self, org_id: str, at: datetime, error: str) -> None:
        """A fetch of the organization's line items failed ``at``: what is held stays,
        the attempt and its error are recorded (the next is due as the fetch stage
        says)."""
        stamp, text = at.isoformat(), storable(error, ERROR_MAX)

        def run(conn: SqlConnection) -> None:
            conn.execute(
                "INSERT INTO line_item_reads (org_id, attempted_at, last_error) VALUES (?,?,?) "
                "ON CONFLICT (org_id) DO UPDATE SET attempted_at=excluded.attempted_at, "
                "last_error=excluded.last_error",
                (org_id, stamp, text),
            )

        await self._db.write(run, f"record a failed line item fetch of organization {org_id}")
        before = self._reads.get(org_id)
        if before is None:
            self._reads[org_id] = UsageRead(org_id, at, last_error=text)
        else:
            self._reads[org_id] = UsageRead(
                org_id,
                at,
                before.fetched_at,
                before.invoice_id,
                before.period_start,
                before.source,
                text,
            )
