"""The SQLite backend of the state: the embedded default.

- :mod:`.files`: the state file on disk: checks before anything is touched, the lock.
- :mod:`.schema`: the versioned migrations.
- :mod:`.database`: the connection, its thread, transactions, migrating, the file held.
- :mod:`.snapshot`: invoices, amount history, organizations' read state (cached).
- :mod:`.notification_log`: the state per alert (firing ones cached).
- :mod:`.outbox`: messages held, released (grouped), due, marked, pruned.
- :mod:`.cycles`: the cycles that ended, and the numbers that tag held messages.
- :mod:`.store`: :class:`SqliteStore`, the unit of work over all of them.
"""

from invoice_watch.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
