"""The PostgreSQL state backend (``state.url``): replicas of invoice-watch share one
database and only the holder of a lease polls and delivers.

- :mod:`.url`: the URL and password, and how messages name the database.
- :mod:`.schema`: the versioned migrations (the SQLite file's tables, and the lease).
- :mod:`.database`: the connection, its thread, transactions and their fence.
- :mod:`.store`: :class:`PostgresStore`, the unit of work over the repositories.
- :mod:`.lease`: the lease with its fencing token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from invoice_watch.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]


def __getattr__(name: str) -> Any:
    """``PostgresStore`` (and psycopg with it) is loaded when first used: importing
    :mod:`.url`, as the config and the store do, loads this package, and an SQLite
    state file needs no psycopg (PEP 562)."""
    if name == "PostgresStore":
        from invoice_watch.store.postgres.store import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
