"""The SQLite backend of the state: the embedded default.

- :mod:`.files`: the state file on disk: checks before anything is touched, the lock.
- :mod:`.schema`: the versioned migrations.
- :mod:`.database`: the connection, its thread, transactions, migrating, the file held.
- :mod:`.store`: :class:`~.store.SqliteStore`, the unit of work
  (:class:`~invoice_watch.store.unit_of_work.SqlStore`) on the file.

The repositories it opens are the shared SQL ones (:mod:`invoice_watch.store.sql`).
Import the store from :mod:`.store` (this package imports nothing).
"""
