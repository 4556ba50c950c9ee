"""The PostgreSQL state backend (``state.url``): replicas of invoice-watch share one
database and only the holder of a lease polls and delivers.

- :mod:`.url`: the URL and password, and how messages name the database.
- :mod:`.schema`: the versioned migrations (the SQLite file's tables, and the lease).
- :mod:`.database`: the connection, its thread, transactions and their fence.
- :mod:`.store`: :class:`PostgresStore`, the unit of work over the repositories.
- :mod:`.lease`: the lease with its fencing token.
"""

from invoice_watch.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
