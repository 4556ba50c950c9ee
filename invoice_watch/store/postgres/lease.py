"""The lease replicas share in the PostgreSQL state: one row (``lease``, name
``leader``) with its holder, a fencing token that only grows, and an expiry on the
database's clock. Only the holder polls Atlas and delivers.

:meth:`Lease.renew` is one autocommit statement (``../shared/LIBRARIES.md``, "Lease with
fencing"): it takes the lease when it expired (the token + 1) or renews it for its holder
(the same token); no row back means another replica holds it. The daemon renews every
third of ``ha.lease_ttl``. The holder id is unique per process start (host, pid, a
random part), so a restarted replica never inherits its predecessor's token. The
leader's own view of its lease (:meth:`Lease.valid`) ends before the database's: at the
monotonic time the last successful renewal started, plus the TTL, less a margin. A
paused process (SIGSTOP) whose lease ran out finds :meth:`valid` false the moment it
resumes, before it sends anything; and every write it would still attempt is refused
by the fence (:mod:`.database`).

The lease has its own connection, so that a renewal never waits behind the state's
(only for the lease row, which a fenced write transaction holds ``FOR SHARE``). Both
waits are bounded by :attr:`Lease.bound` (a third of the TTL), on the server: the
renewal's lock wait (``lock_timeout``: a standby tries again, and says why it could not
take an expired lease) and a fenced transaction left idle by a paused or cut-off holder
(``idle_in_transaction_session_timeout`` on the state's session, set by
:class:`~invoice_watch.leader.Leadership`): a takeover costs at most the TTL plus
:attr:`Lease.bound` and a standby's retry.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from invoice_watch.store.postgres.database import CONNECT_TIMEOUT
from invoice_watch.store.postgres.url import StateUrl

ACQUIRE = (
    "INSERT INTO lease AS l (name, holder, token, expires_at) "
    "VALUES ('leader', %(holder)s, 1, now() + %(ttl)s) "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, "
    "token = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at >= now() "
    "THEN l.token ELSE l.token + 1 END, expires_at = EXCLUDED.expires_at "
    "WHERE l.expires_at < now() OR l.holder = EXCLUDED.holder RETURNING token"
)
RELEASE = "UPDATE lease SET expires_at = '-infinity' WHERE name = 'leader' AND holder = %s"
# The application_name of every replica's lease session (``status`` counts them).
LEASE_APPLICATION = "invoice-watch lease"
HOLDER = "SELECT holder, token, expires_at, expires_at > now() FROM lease WHERE name = 'leader'"


def new_holder() -> str:
    """An id for this process start: host/pid/random."""
    return f"{socket.gethostname()[:64]}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


class Lease:
    """This replica's view of the lease (``monotonic``: the clock that bounds it)."""

    def __init__(self, url: StateUrl, ttl: timedelta, monotonic: Callable[[], float]) -> None:
        self.url = url
        self.ttl = ttl
        self.holder = new_holder()
        self.token: int | None = None
        self._monotonic = monotonic
        self._valid_until = 0.0
        self._conn: Any = None  # psycopg.AsyncConnection

    @property
    def bound(self) -> float:
        """Seconds a lease statement waits for the lease row, and a fenced transaction
        may stay idle: a third of the TTL (the TTL is at least 3 s)."""
        return self.ttl.total_seconds() / 3

    @property
    def margin(self) -> float:
        """Seconds the leader's own view ends before the database's expiry."""
        return min(1.0, self.ttl.total_seconds() / 10)

    def valid(self) -> bool:
        """Whether this replica holds the lease now, by its own monotonic clock."""
        return self.token is not None and self._monotonic() < self._valid_until

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url.conninfo(),
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                options=(
                    "-c TimeZone=UTC -c statement_timeout=10000 "
                    f"-c lock_timeout={max(1, round(self.bound * 1000))}"
                ),
                application_name=LEASE_APPLICATION,
            )
        return self._conn

    async def renew(self) -> int | None:
        """Take or renew the lease: its fencing token, or None when another replica
        holds it. A database error (psycopg's) is raised, the connection dropped, and
        :meth:`valid` runs out on its own."""
        import psycopg

        started = self._monotonic()
        try:
            conn = await self._connection()
            cursor = await conn.execute(ACQUIRE, {"holder": self.holder, "ttl": self.ttl})
            row = await cursor.fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            raise  # the row is locked (a fenced transaction): the connection is fine
        except psycopg.Error:
            await self._drop()
            raise
        if row is None:
            self.token = None
            self._valid_until = 0.0
            return None
        self.token = int(row[0])
        self._valid_until = started + self.ttl.total_seconds() - self.margin
        return self.token

    async def holder_now(self) -> tuple[str, int, bool] | None:
        """(holder, token, unexpired) of the lease as the database has it (a plain
        read: it never waits for the row's lock). A database error is raised, the
        connection dropped."""
        import psycopg

        try:
            conn = await self._connection()
            row = await (await conn.execute(HOLDER)).fetchone()
        except psycopg.Error:
            await self._drop()
            raise
        return None if row is None else (str(row[0]), int(row[1]), bool(row[3]))

    async def release(self) -> None:
        """Give the lease up (a standby takes it at its next renewal)."""
        import psycopg

        self.token = None
        self._valid_until = 0.0
        try:
            conn = await self._connection()
            await conn.execute(RELEASE, (self.holder,))
        except psycopg.Error:
            await self._drop()

    async def _drop(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            finally:
                self._conn = None

    async def close(self) -> None:
        await self._drop()
