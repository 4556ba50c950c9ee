"""The SQL repositories both backends share, and what they need of a database.

The repositories, one module each, run the same statements on SQLite and PostgreSQL:
:mod:`.snapshot` (invoices, amount history, organizations' read state, cached),
:mod:`.notification_log` (the state per alert, firing ones cached), :mod:`.outbox`
(messages held, released (grouped), due, marked, pruned), :mod:`.cycles` (the cycles that
ended, the numbers that tag held messages) and :mod:`.silences` (silences, applied as
messages are released). What they need of a database, so that both backends run them:
:class:`SqlConnection` (``sqlite3.Connection`` is one; :mod:`.postgres` wraps psycopg's)
and :class:`SqlDatabase` (its transactions, on the database's own thread; both
backends' run a transaction as :class:`Transactions` does).

The statements are written once, in the SQL both SQLite (3.24 or later) and PostgreSQL
take: ``?`` placeholders (the PostgreSQL connection turns them into ``%s``), upserts as
``INSERT ... ON CONFLICT ... DO UPDATE``, no ``rowid``, no ``IS ?``. Times are ISO 8601
text in both (compared as text, as the SQLite file always did). The one expression the
two spell differently, a field of a JSON column, is :func:`json_text`'s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar

from invoice_watch.errors import StateError, UnstorableError

T = TypeVar("T")
C = TypeVar("C")


class SqlCursor(Protocol):
    """A statement's result."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SqlConnection(Protocol):
    """A connection, as the repositories use it (``?`` placeholders)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> SqlCursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> SqlCursor: ...


def json_text(conn: SqlConnection, column: str, key: str) -> str:
    """The SQL expression for ``column[0][key]`` as text (``column`` holds a JSON array of
    objects, as the outbox's ``events``): SQLite's ``json_extract``, PostgreSQL's
    ``->``/``->>`` (a connection with ``dialect = "postgresql"``)."""
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        return f"(({column})::json -> 0 ->> '{key}')"
    return f"json_extract({column}, '$[0].{key}')"


class SqlDatabase(Protocol):
    """A database the repositories read and write through, one call at a time."""

    @property
    def name(self) -> str:
        """The database as messages name it (never with a password)."""
        ...

    @property
    def kind(self) -> str:
        """What it is, as messages say before :attr:`name`: "state file" (SQLite) or
        "state database" (PostgreSQL)."""
        ...

    async def read(self, fn: Callable[[SqlConnection], T], what: str) -> T:
        """``fn(connection)`` (queries); a database error is a StateError saying it
        could not read ``what``."""
        ...

    async def write(self, fn: Callable[[SqlConnection], T], what: str) -> T:
        """``fn(connection)`` in one transaction; a database error is a StateError
        saying it could not ``what``."""
        ...

    async def commit(self, fn: Callable[[SqlConnection], T]) -> T:
        """A transaction of the cycle: a database error is a StateError, a value it
        cannot take an UnstorableError; either way nothing is written."""
        ...

    async def scratch(self, fn: Callable[[SqlConnection], T], what: str) -> T:
        """``fn(connection)`` in a transaction of its own that writes only the
        connection's temporary tables (:mod:`.staging`): neither fenced nor rolled back
        by a dry run, as it writes nothing of the state. A value it cannot take is an
        UnstorableError, any other database error a StateError saying it could not
        ``what``."""
        ...

    async def close(self) -> None: ...


class Transactions(ABC, Generic[C]):
    """How both backends' databases run a transaction: :meth:`in_transaction`, over
    their own :meth:`transaction` (a connection of type ``C``, committed or rolled back)
    and :meth:`run` (a call on the database's thread, one at a time); and what a
    transaction of the cycle that failed means (:meth:`unstorable`,
    :meth:`not_written`: :meth:`SqlDatabase.commit`)."""

    kind: str  # as messages say it before the name (see SqlDatabase.kind)

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def transaction(self) -> AbstractContextManager[C]: ...

    @abstractmethod
    async def run(self, fn: Callable[[], T]) -> T: ...

    async def in_transaction(self, fn: Callable[[C], T]) -> T:
        """``fn(connection)`` in one transaction, on the database's thread; the
        database's own errors pass (each backend says what they mean)."""

        def run() -> T:
            with self.transaction() as conn:
                return fn(conn)

        return await self.run(run)

    def unstorable(self, reason: str) -> UnstorableError:
        """A value of a read that the database cannot take (``reason``: the error, as
        the backend may show it)."""
        return UnstorableError(f"the {self.kind} cannot store a value: {reason}")

    def not_written(self, reason: str) -> StateError:
        """A transaction of the cycle that the database refused."""
        return StateError(
            f"could not write {self.kind} {self.name}: {reason}; nothing of this cycle "
            "was recorded (it will be evaluated again)"
        )
