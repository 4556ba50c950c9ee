"""Replicas on one PostgreSQL state (``state.url``): the lease with its fencing token
(leader.py, store/postgres/lease.py). The database's clock decides expiry: a test makes
a lease expire by moving its expiry into the past, not by waiting; each replica's own
view of its lease runs on a FakeClock."""

from __future__ import annotations

import logging
from datetime import timedelta

import psycopg
import pytest

from invoice_watch.clock import FakeClock
from invoice_watch.errors import NotLeaderError
from invoice_watch.health import Metrics
from invoice_watch.leader import Leadership
from invoice_watch.store import StateUrl, open_store
from invoice_watch.store.postgres import PostgresStore
from invoice_watch.store.postgres.lease import Lease
from tests.test_store import firing

TTL = timedelta(seconds=30)


def expire(url: str) -> None:
    """The lease runs out now, on the database's clock."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE lease SET expires_at = now() - interval '1 second'")


async def replica(url: str, clock: FakeClock) -> Leadership:
    store = await open_store(StateUrl(url))
    assert isinstance(store, PostgresStore)
    return Leadership(store, Lease(StateUrl(url), TTL, clock.monotonic), clock, Metrics(), 5)


async def close(*replicas: Leadership) -> None:
    for r in replicas:
        await r.stop()
        await r.store.close()


async def test_ha_one_leader_a_takeover_raises_the_token_and_fences_the_old_one(
    postgres_url, caplog
):
    caplog.set_level(logging.INFO)
    clock_a, clock_b = FakeClock(), FakeClock()
    a, b = await replica(postgres_url, clock_a), await replica(postgres_url, clock_b)
    try:
        assert await a.step() and not await b.step()
        assert a.describe().startswith("leader") and b.describe().startswith("standby")
        assert a.lease.holder != b.lease.holder
        number = a.store.begin_cycle()
        await a.store.commit_orgs(number, clock_a.now(), [], [firing("x")], {"failed": ["c"]})
        assert await a.step()  # a renewal keeps the token
        assert a.lease.token == 1

        expire(postgres_url)  # a paused: it did not renew in time
        assert await b.step() and b.lease.token == 2
        # b read what a wrote, and released the message a's cut-short cycle held
        assert list(b.store.alerts.firing()) == ["x"]
        assert (await b.store.outbox.counts()) == {"pending": 1}
        # a still believes it leads (its own clock has not run out): its writes are
        # refused all the same, by the fence
        assert a.leading()
        with pytest.raises(NotLeaderError, match="another replica took the lease"):
            await a.store.commit_orgs(a.store.begin_cycle(), clock_a.now(), [], [], {})
        [due] = await a.store.outbox.due(clock_a.now())
        with pytest.raises(NotLeaderError):
            await a.store.outbox.mark_sent(due.id, clock_a.now())
        # once its clock passed the TTL it steps down, without a word to the database
        clock_a.advance(TTL.total_seconds())
        assert not a.leading()
        assert not await a.step()
        assert "no longer the leader: another replica holds the lease" in caplog.text
        assert a.store.database.token is None
    finally:
        await close(a, b)


async def test_ha_a_paused_leader_sends_nothing_once_its_ttl_passed(postgres_url):
    """SIGSTOP in a process: the monotonic clock moves on while it is stopped. The
    leader's own view of the lease ends a margin before the database's, so it stops
    sending before a standby can take over."""
    clock = FakeClock()
    a = await replica(postgres_url, clock)
    try:
        assert await a.step()
        clock.advance(TTL.total_seconds() - a.lease.margin)
        assert not a.leading()
    finally:
        await close(a)


async def test_ha_stopping_releases_the_lease_for_a_standby_at_once(postgres_url):
    a, b = await replica(postgres_url, FakeClock()), await replica(postgres_url, FakeClock())
    try:
        assert await a.step() and not await b.step()
        await a.stop()
        assert await b.step() and b.lease.token == 2
    finally:
        await close(a, b)


async def test_ha_a_leader_that_loses_the_database_steps_down_saying_why(
    postgres_server, postgres_url, caplog
):
    clock = FakeClock()
    a = await replica(postgres_url, clock)
    try:
        assert await a.step()
        postgres_server.restart("immediate")
        clock.advance(TTL.total_seconds())
        postgres_server.stop("fast")
        try:
            assert not await a.step()
        finally:
            postgres_server.start()
        assert "no longer the leader: cannot reach the state database" in caplog.text
        assert "postgresql://postgres@127.0.0.1" in caplog.text
        # the database back, it leads again (a new token: the lease had expired)
        expire(postgres_url)
        assert await a.step() and a.lease.token == 2
        number = a.store.begin_cycle()
        await a.store.commit_orgs(number, clock.now(), [], [firing("y")], {"failed": ["c"]})
    finally:
        await close(a)
