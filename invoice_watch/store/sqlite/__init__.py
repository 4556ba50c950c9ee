"""The SQLite backend of the state: the embedded default.

- :mod:`.files`: the state file on disk: checks before anything is touched, the lock.
- :mod:`.schema`: the versioned migrations.
- :mod:`.database`: the connection, its thread, transactions, migrating, the file held.
- :mod:`.snapshot`: invoices, amount history, organizations' read state (cached).
- :mod:`.notification_log`: the state per alert (firing ones cached).
- :mod:`.outbox`: messages held, released (grouped), due, marked, pruned.
- :mod:`.cycles`: the cycles that ended, and the numbers that tag held messages.
- :mod:`.silences`: silences, applied as messages are released.
- :mod:`.store`: :class:`~.store.SqliteStore`, the unit of work
  (:class:`~invoice_watch.store.unit_of_work.SqlStore`) on the file.

The repositories' statements run on PostgreSQL too (:mod:`invoice_watch.store.sql`).
Import the store from :mod:`.store` (this package imports nothing, so that the shared
unit of work can import the repositories).
"""
