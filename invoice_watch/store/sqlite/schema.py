"""The SQLite state file's schema: its versioned migrations, applied in order by
:meth:`~invoice_watch.store.sqlite.database.Database.migrate` (``PRAGMA user_version``
is the number applied; a newer file is refused). Never edit one that shipped: add one.
"""

from __future__ import annotations

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
    # 5: silences (written by the `silence` commands, also while the daemon runs); an
    # outbox row may be 'silenced' (waits for its silence to end) or 'muted' (never sent)
    """
    CREATE TABLE silences (
        id TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        org_id TEXT,
        invoice_id TEXT,
        starts_at TEXT NOT NULL,
        ends_at TEXT NOT NULL,
        comment TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX silences_ends ON silences (ends_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# The tables of every version: a file at version 0 holding any other is another
# program's.
OUR_TABLES = {"invoices", "amount_history", "orgs", "alerts", "outbox", "cycles", "silences"}
