"""Leadership among replicas sharing a PostgreSQL state (``state.url``, ``ha``): only
the holder of the lease (:mod:`invoice_watch.store.postgres.lease`) polls Atlas, writes
and delivers; the others stand by, renewing nothing but trying to take it: healthy while they could
take it over (:meth:`Leadership.healthy`), not when they cannot reach the database or
an expired lease is still locked by its last holder's write transaction.
:meth:`Leadership.run` renews the lease every third of ``ha.lease_ttl``; a standby tries
to take it every :data:`STANDBY_RETRY` seconds (at most), so that it takes over within
about a second of the lease running out, and a replica that takes it over runs its first
cycle at once (:attr:`Leadership.on_lead`): a takeover costs the TTL plus about a
second, not a TTL, a third and a poll interval. Taking it over: the state's caches are
read again (the old leader wrote since), the fencing token is given to the database
(every write transaction checks it), and the messages a cut-short cycle held are
released. Losing it (another replica took it, or the database could not be reached until
the lease ran out): the token is withdrawn, and the replica says why.
:meth:`Leadership.leading` is what the cycle and delivery check before each cycle and
each send: the lease as this process's monotonic clock sees it, so a paused process
(SIGSTOP) sends nothing once it resumes past its TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from invoice_watch.clock import Clock
from invoice_watch.errors import StateError

if TYPE_CHECKING:
    from pathlib import Path

    from invoice_watch.config import Config
    from invoice_watch.metrics import Metrics
    from invoice_watch.store import StateUrl, Store
    from invoice_watch.store.postgres import PostgresStore
    from invoice_watch.store.postgres.lease import Lease

log = logging.getLogger(__name__)

# Seconds between a standby's attempts to take the lease (one short statement each).
STANDBY_RETRY = 1.0


class Leadership:
    """This replica's part in the lease over ``store``."""

    def __init__(
        self,
        store: PostgresStore,
        lease: Lease,
        clock: Clock,
        metrics: Metrics,
        group_over: int,
    ) -> None:
        self.store = store
        self.lease = lease
        self._clock = clock
        self._metrics = metrics
        self.group_over = group_over
        self._token: int | None = None  # the token this replica leads with
        self.why_not: str = "it has not tried to take the lease yet"
        # Called when this replica has taken the lease over (the daemon polls at once).
        self.on_lead: Callable[[], None] | None = None
        # Called when this replica stops leading, or leads anew: what it kept in memory
        # of its outbox is the new leader's (the daemon's Deliverer.drop_unrecorded).
        self.on_step_down: Callable[[], None] | None = None
        # Whether this replica, standing by, could take the lease if it ran out: its
        # last try reached the database and found the lease held (not stuck).
        self.standby_ok = False
        store.database.fenced = True
        store.database.token = None
        store.database.idle_bound = lease.bound
        metrics.leader.set(0)

    def leading(self) -> bool:
        """Whether this replica leads now (holds the lease, by its own clock)."""
        return self._token is not None and self.lease.valid()

    def healthy(self) -> bool:
        """Whether this replica is healthy as far as the lease goes: it leads, or it
        stands by able to take over (its last try reached the database, and the lease
        was held, not expired and stuck). A standby that cannot reach the database, or
        cannot take an expired lease, is not."""
        return self.leading() or self.standby_ok

    def describe(self) -> str:
        if self.leading():
            return f"leader (fencing token {self._token})"
        return f"standby ({self.why_not})"

    @property
    def period(self) -> float:
        """Seconds until the next renewal or attempt: a third of the TTL while this
        replica leads, at most :data:`STANDBY_RETRY` while it stands by."""
        renew = self.lease.ttl.total_seconds() / 3
        return renew if self.leading() else min(renew, STANDBY_RETRY)

    async def step(self) -> bool:
        """Renew or try to take the lease once; returns whether this replica leads."""
        import psycopg

        why = "another replica holds the lease"
        ok = True
        try:
            token = await self.lease.renew()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            token = None
            ok, why = await self._locked()
        except psycopg.Error as exc:
            token, ok = None, False
            reason = self.store.database.reason(exc)
            why = f"cannot reach the state database {self.store.database.name}: {reason}"
        self.standby_ok = ok
        if token is not None and token != self._token:
            await self._take(token)
        elif self._token is not None and not self.lease.valid():
            self._step_down(why)
        elif token is None:
            self.why_not = why
        return self.leading()

    async def _locked(self) -> tuple[bool, str]:
        """The lease row was locked past :attr:`Lease.bound` (a fenced write transaction
        holds it): fine while the lease is held; not when it expired, since no replica
        can take it until the database ends that transaction. (ok, why)"""
        import psycopg

        try:
            now = await self.lease.holder_now()
        except psycopg.Error as exc:
            reason = self.store.database.reason(exc)
            return False, f"cannot reach the state database {self.store.database.name}: {reason}"
        if now is not None and now[2]:
            return True, "another replica holds the lease (it is writing)"
        holder = now[0] if now is not None else "?"
        return False, (
            f"the lease expired, but a write transaction of its last holder ({holder}) "
            "still holds the lease row: no replica can take it until the database ends "
            f"that transaction (invoice-watch has it ended after {self.lease.bound:g}s idle)"
        )

    async def _take(self, token: int) -> None:
        if self.on_step_down is not None:  # (a lease of its own before: not this one)
            self.on_step_down()
        database = self.store.database
        database.token = token
        try:
            await self.store.reload()
            held = await self.store.release_held(self.group_over, self._clock.now())
        except StateError as exc:
            database.token = None
            self._token = None
            self.why_not = f"took the lease but could not read the state: {exc}"
            log.error("%s; trying again", self.why_not)
            return
        self._token = token
        self._metrics.leader.set(1)
        self._metrics.lease_transitions.labels(to="leader").inc()
        log.info(
            "this replica is the leader now (holder %s, fencing token %d)",
            self.lease.holder,
            token,
        )
        if held:
            log.info("released %d message(s) held by a cycle that did not end", held)
        if self.on_lead is not None:
            self.on_lead()

    def _step_down(self, why: str) -> None:
        self.store.database.token = None
        self._token = None
        self.why_not = why
        self._metrics.leader.set(0)
        self._metrics.lease_transitions.labels(to="standby").inc()
        if self.on_step_down is not None:
            self.on_step_down()
        log.warning(
            "this replica is no longer the leader: %s; it polls and delivers nothing until "
            "it holds the lease again",
            why,
        )

    async def run(self) -> None:
        """Renew or take the lease every :attr:`period` seconds, until cancelled."""
        while True:
            try:
                await self.step()
            except Exception:  # never let the renewals die: they are the replica's voice
                log.exception("renewing the lease failed")
            await self._clock.sleep(self.period)

    async def stop(self) -> None:
        """Give the lease up (stopping): a standby takes over at once."""
        if self._token is not None:
            self._step_down("it is stopping")
        await self.lease.release()
        await self.lease.close()


def lease_over(
    store: Store, where: Path | StateUrl, config: Config, clock: Clock, metrics: Metrics
) -> Leadership | None:
    """This replica's part in the lease when the state is a PostgreSQL database
    (``where``: :func:`~invoice_watch.store.location` of ``config.state``; ``store``:
    opened there); None for an SQLite file, which one daemon locks."""
    from invoice_watch.store import StateUrl

    if not isinstance(where, StateUrl):
        return None
    from invoice_watch.store.postgres import PostgresStore
    from invoice_watch.store.postgres.lease import Lease

    assert isinstance(store, PostgresStore)
    lease = Lease(where, config.ha.lease_ttl, clock.monotonic)
    return Leadership(store, lease, clock, metrics, config.delivery.group_over)
