"""The SQLite state file's schema: its versioned migrations, applied in order by
:meth:`~invoice_watch.store.sqlite.database.Database.migrate` (``PRAGMA user_version``
is the number applied; a newer file is refused). Never edit one that shipped: add one.
The tables the PostgreSQL schema has too are spelled once, in
:mod:`invoice_watch.store.sql.tables`.
"""

from __future__ import annotations

from invoice_watch.store.sql import tables

# SQLite's spelling of what the two databases spell differently (see tables).
_INTEGER = "INTEGER"
_GENERATED_ID = "id INTEGER PRIMARY KEY AUTOINCREMENT"

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    f"""
{tables.invoices("invoices", _INTEGER, per_organization=False)}
    CREATE INDEX invoices_by_source ON invoices (source_org_id);
{tables.amount_history(_INTEGER)}
{tables.orgs(_INTEGER)}
{tables.ALERTS}
{tables.outbox(_GENERATED_ID)}
{tables.cycles(_GENERATED_ID, _INTEGER)}
    """,
    # 2: outbox rows written while a cycle runs are held until it ends (then released,
    # one by one or as a group: see 4); ``cycle`` tells which cycle holds them
    """
    ALTER TABLE outbox ADD COLUMN cycle INTEGER;
    """,
    # 3: an invoice is kept once per configured organization that lists it (a linked
    # organization's invoice is in its own listing and in its payer's)
    f"""
{tables.invoices("invoices_v3", _INTEGER, per_organization=True)}
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
    # 5: silences (written by the `silence` commands, also while the daemon runs); an
    # outbox row may be 'silenced' (waits for its silence to end) or 'muted' (never sent)
    f"""
{tables.SILENCES}
    """,
    # 6: the pending invoice's daily line items (``lineItems:search`` or the CSV), kept
    # per organization for this billing period and the one before, with when they were
    # last fetched (a restart does not fetch them early); and when each report was last
    # due (reports go through the outbox once per schedule)
    f"""
{tables.line_items(_INTEGER)}
{tables.LINE_ITEM_READS}
{tables.REPORT_RUNS}
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# The tables of every version: a file at version 0 holding any other is another
# program's.
OUR_TABLES = {
    "invoices",
    "amount_history",
    "orgs",
    "alerts",
    "outbox",
    "cycles",
    "silences",
    "line_items",
    "line_item_reads",
    "report_runs",
}
