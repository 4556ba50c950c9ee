"""The tables both state backends create, spelled once: the SQLite file's migrations
(:mod:`invoice_watch.store.sqlite.schema`) and the PostgreSQL database's
(:mod:`invoice_watch.store.postgres.schema`) put their statements together from these,
each giving its own spelling of what the two databases spell differently: a 64-bit
integer (``integer``: SQLite's ``INTEGER``, PostgreSQL's ``BIGINT``) and a generated
id column (``generated_id``). Columns that are ``INTEGER`` in both stay so.

Each function returns one statement (or a table and its index) as a migration holds it,
indented by four spaces and without a trailing new line. A migration that shipped never
changes, not even in white space (SQLite keeps each table's text): these produce the
text they always had (``tests/test_store_schema.py`` holds each one's digest).
"""

from __future__ import annotations


def invoices(name: str, integer: str, *, per_organization: bool) -> str:
    """The invoices, one row per configured organization that lists one
    (``per_organization``, keyed by ``source_org_id`` and ``id``; the SQLite file's
    first schema kept each once, keyed by ``id``)."""
    id_column = "id TEXT NOT NULL" if per_organization else "id TEXT PRIMARY KEY"
    key = ",\n        PRIMARY KEY (source_org_id, id)" if per_organization else ""
    return f"""    CREATE TABLE {name} (
        {id_column},
        org_id TEXT NOT NULL,
        source_org_id TEXT NOT NULL,
        status TEXT NOT NULL,
        start_date TEXT NOT NULL,
        end_date TEXT NOT NULL,
        amount_billed_cents {integer} NOT NULL,
        amount_paid_cents {integer} NOT NULL,
        credits_cents {integer} NOT NULL,
        sales_tax_cents {integer} NOT NULL,
        starting_balance_cents {integer} NOT NULL,
        subtotal_cents {integer} NOT NULL,
        created TEXT,
        updated TEXT,
        first_seen TEXT NOT NULL,
        last_changed TEXT NOT NULL{key}
    );"""


def amount_history(integer: str) -> str:
    """The pending amounts seen, per invoice."""
    return f"""    CREATE TABLE amount_history (
        invoice_id TEXT NOT NULL,
        observed_at TEXT NOT NULL,
        amount_cents {integer} NOT NULL,
        PRIMARY KEY (invoice_id, observed_at)
    );"""


def orgs(integer: str) -> str:
    """Each configured organization's read state."""
    return f"""    CREATE TABLE orgs (
        org_id TEXT PRIMARY KEY,
        last_attempt TEXT,
        last_success TEXT,
        failing_since TEXT,
        last_error TEXT,
        invoice_count {integer} NOT NULL DEFAULT 0
    );"""


# The state per alert (the notification log), and its index of the firing ones.
ALERTS = """    CREATE TABLE alerts (
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
    CREATE INDEX alerts_firing ON alerts (firing);"""


def outbox(generated_id: str, *later: str) -> str:
    """The messages to send (``later``: the columns a later SQLite migration added,
    which the PostgreSQL schema had from the start)."""
    added = "".join(f",\n        {column}" for column in later)
    return f"""    CREATE TABLE outbox (
        {generated_id},
        notifier TEXT NOT NULL,
        events TEXT NOT NULL,
        summary TEXT NOT NULL,
        created_at TEXT NOT NULL,
        next_attempt_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT,
        done_at TEXT{added}
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);"""


def cycles(generated_id: str, integer: str) -> str:
    """The cycles that ended."""
    return f"""    CREATE TABLE cycles (
        {generated_id},
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        orgs_ok {integer} NOT NULL,
        orgs_failed {integer} NOT NULL,
        events {integer} NOT NULL
    );"""


# The silences, and their index by end.
SILENCES = """    CREATE TABLE silences (
        id TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        org_id TEXT,
        invoice_id TEXT,
        starts_at TEXT NOT NULL,
        ends_at TEXT NOT NULL,
        comment TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX silences_ends ON silences (ends_at);"""


def line_items(integer: str) -> str:
    """The daily line items of each configured organization's invoices (this billing
    period and the one before), and their index by organization and period."""
    return f"""    CREATE TABLE line_items (
        org_id TEXT NOT NULL,
        invoice_id TEXT NOT NULL,
        period_start TEXT NOT NULL,
        usage_date TEXT,
        project_id TEXT NOT NULL,
        project TEXT NOT NULL,
        cluster TEXT NOT NULL,
        sku TEXT NOT NULL,
        amount_cents {integer} NOT NULL
    );
    CREATE INDEX line_items_by_org ON line_items (org_id, period_start);"""


# When each configured organization's line items were last fetched, or tried.
LINE_ITEM_READS = """    CREATE TABLE line_item_reads (
        org_id TEXT PRIMARY KEY,
        invoice_id TEXT,
        period_start TEXT,
        source TEXT,
        fetched_at TEXT,
        attempted_at TEXT NOT NULL,
        last_error TEXT
    );"""

# When each report (per scope: an organization, or all) was last due.
REPORT_RUNS = """    CREATE TABLE report_runs (
        report TEXT NOT NULL,
        scope TEXT NOT NULL,
        last_due TEXT NOT NULL,
        PRIMARY KEY (report, scope)
    );"""
