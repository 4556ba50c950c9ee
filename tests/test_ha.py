"""Replicas on one PostgreSQL state (``state.url``): the lease with its fencing token
(leader.py, store/postgres/lease.py). The database's clock decides expiry: a test makes
a lease expire by moving its expiry into the past, not by waiting; each replica's own
view of its lease runs on a FakeClock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import yaml

from invoice_watch import cli, ops
from invoice_watch.app import App
from invoice_watch.cli.commands import _state_copy
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.errors import NotLeaderError, StateError
from invoice_watch.leader import Leadership
from invoice_watch.metrics import Metrics
from invoice_watch.store import StateUrl, open_store
from invoice_watch.store.postgres import PostgresStore
from invoice_watch.store.postgres.lease import Lease
from invoice_watch.types import AlertEvent, Part
from tests.manual_clock import ManualClock
from tests.test_daemon import eventually, serving, until_cycles
from tests.test_store import firing
from tests.world import World

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

        # A standby tries again within a second (it takes over about a second after
        # the lease runs out), the leader renews every third of the TTL.
        assert b.period == min(1.0, TTL.total_seconds() / 3)
        assert a.period == TTL.total_seconds() / 3
        led: list[str] = []
        b.on_lead = lambda: led.append("b")  # the daemon polls at once (PollLoop.run_now)
        expire(postgres_url)  # a paused: it did not renew in time
        assert await b.step() and b.lease.token == 2
        assert led == ["b"]
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


# -- a whole daemon on PostgreSQL, against the simulator -------------------------------


def pg_config(world: World, url: str, **kw: Any) -> Config:
    data = world.config_data(**kw)
    data["state"] = {"url": url}
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


async def pass_time(clock: ManualClock, seconds: float) -> None:
    """``seconds`` pass for a running daemon, in steps no longer than its sleeps (the
    lease is renewed every third of its TTL, as it is when time passes for real)."""
    tasks = len(await clock.sleeping())
    left = seconds
    while left > 0:
        step = min(left, *clock.waits())
        clock.advance(step)
        left -= step
        await clock.sleeping(tasks)


async def test_ha_a_daemon_on_postgresql_delivers_each_firing_once_and_status_names_it_leader(
    world: World, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` on a PostgreSQL state end to end (simulator, Slack, SMTP): it takes the
    lease, polls, delivers each FIRING once over three cycles; `status` names it leader
    with the lease's expiry; `run --once` beside it exits 1 saying a replica leads; once
    stopped, the lease is free."""
    config = pg_config(world, postgres_url, poll={"interval": "10m"})
    clock = ManualClock(world.clock.now())
    async with App(config, clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        assert app.leadership is not None and app.leadership.leading()
        await eventually(lambda: len(world.slack.accepted) == len(world.sink.envelopes) == 2)
        for n in (2, 3):
            await pass_time(clock, 600)
            await until_cycles(app, n)
            assert await app.deliverer.drain(10) == 0
        assert sorted(world.kinds()) == [
            ("FIRING", "failed-charge"),
            ("FIRING", "pending-over-budget"),
        ]
        assert len(world.sink.envelopes) == 2
        ok, why = app.daemon.health()
        assert ok and "leader" in why, why

        capsys.readouterr()
        assert await ops.status(config) == 0
        out = capsys.readouterr().out
        assert f"Lease: leader {app.leadership.lease.holder} (fencing token 1), expires in" in out
        assert "postgres" not in out.replace(postgres_url, "")  # no URL, no password

        # `run --once` beside the daemon: exits 1, saying so, and touches nothing
        assert await world.run_once(config) == 1
        err = capsys.readouterr().err
        assert "another invoice-watch replica holds the lease" in err
        assert "`run --once` runs nothing while a daemon leads" in err
    assert len(world.slack.accepted) == 2
    assert await ops.status(config) == 0
    assert "Lease: free (given up by" in capsys.readouterr().out


async def test_ha_run_once_takes_the_lease_for_its_cycle_and_gives_it_up(
    world: World, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pg_config(world, postgres_url)
    assert await world.run_once(config) == 0
    assert world.kinds().count(("FIRING", "failed-charge")) == 1
    assert await world.run_once(config) == 0  # the lease given up: the next run leads
    assert world.kinds().count(("FIRING", "failed-charge")) == 1  # nothing again
    assert await ops.status(config) == 0
    assert "Lease: free" in capsys.readouterr().out


# -- moving in: state copy --------------------------------------------------------------


async def test_ha_state_copy_moves_an_sqlite_state_in_without_realerting(
    world: World, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon on SQLite alerted; the state is copied; the replicas on PostgreSQL go on
    from there: nothing is sent again, a change is alerted once, the ids go on."""
    sqlite_config = world.config()
    assert await world.run_once(sqlite_config) == 0
    sent = len(world.slack.accepted)
    assert sent == 2
    assert await _state_copy(sqlite_config, postgres_url) == 0
    out = capsys.readouterr().out
    assert "copied" in out and "2 alerts" in out and "4 outbox" in out
    config = pg_config(world, postgres_url)
    assert await world.run_once(config) == 0
    assert len(world.slack.accepted) == sent  # nothing re-sent
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    assert await world.run_once(config) == 0
    assert world.kinds()[sent:] == [("RESOLVED", "failed-charge")]
    # a database that is not empty is refused, and left as it was
    with pytest.raises(StateError, match="is not empty"):
        await _state_copy(sqlite_config, postgres_url)
    # a running daemon's file is refused (its lock)
    async with App(sqlite_config, clock=world.clock):
        with pytest.raises(StateError, match=r"in use|locked|another"):
            await _state_copy(sqlite_config, postgres_url)


def test_ha_check_config_summary_shows_the_state_url_without_its_password(tmp_path):
    from invoice_watch.config import summary

    text = yaml.safe_dump(
        {
            "atlas": {"auth": {"public_key": "pub", "private_key": "priv"}},
            "organizations": [{"id": "5f1e0c0a9b8d7e6f5a4b3c2d"}],
            "state": {"url": "postgresql://iw:${PGPW}@db.example:5432/iw?sslmode=require"},
            "ha": {"lease_ttl": "10s"},
            "notifiers": {"out": {"type": "console"}},
            "rules": [{"name": "failed", "type": "invoice_status", "notify": ["out"]}],
        }
    )
    config = load(text, filename="c.yaml", env={"PGPW": "hunter2-secret"}, base_dir=tmp_path)
    shown = summary(config)
    assert "State: postgresql://iw@db.example:5432/iw?sslmode=require (PostgreSQL" in shown
    assert "lease TTL 10s" in shown
    assert "hunter2" not in shown


# -- a leader paused inside a fenced write transaction (attack-ha 1) ---------------------


async def test_ha_a_leader_paused_inside_a_write_transaction_is_replaced_within_ttl_and_a_bound(
    postgres_url: str, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """A's fenced transaction holds the lease row FOR SHARE and then idles (SIGSTOP, a
    network cut): the server ends it after the bound (a third of the TTL), so B takes
    the expired lease within the TTL plus the bound, not after TCP keepalive gives up
    (hours). Meanwhile B, unable to take an expired lease, is not healthy and says why,
    and `status` does not claim a standby takes it at its next try."""
    import time

    ttl = timedelta(seconds=3)

    async def short_replica() -> Leadership:
        store = await open_store(StateUrl(postgres_url))
        assert isinstance(store, PostgresStore)
        clock = FakeClock()
        return Leadership(
            store, Lease(StateUrl(postgres_url), ttl, clock.monotonic), clock, Metrics(), 5
        )

    a, b = await short_replica(), await short_replica()
    try:
        assert await a.step() and not await b.step()
        assert b.healthy()  # a standby behind a live leader
        expire(postgres_url)  # a's lease ran out on the database's clock...
        # A write transaction that holds the lease row and never ends (a holder without
        # the bound): B cannot take the expired lease; it says so, unhealthy, and so
        # does `status`.
        with psycopg.connect(postgres_url, autocommit=True) as stuck, stuck.transaction():
            stuck.execute("SELECT 1 FROM lease WHERE name='leader' FOR SHARE")
            assert not await b.step()
            assert not b.healthy()
            assert "still holds the lease row" in b.describe(), b.describe()
            config = pg_config(world, postgres_url)
            assert await ops.status(config) == 0
            out = capsys.readouterr().out
            assert "no replica can take it until the database ends" in out, out
            assert "at its next try" not in out
        # A itself opened a fenced write and stopped in it
        db = a.store.database
        paused = db.transaction()
        await db.run(paused.__enter__)
        began = time.monotonic()
        async with asyncio.timeout(3 * ttl.total_seconds()):
            while not await b.step():
                assert not b.healthy()
        took = time.monotonic() - began
        assert took < ttl.total_seconds() / 3 + 2, took  # the bound, and a retry
        assert b.lease.token == 2 and b.healthy()
        # A resumes: its transaction was ended by the server, and it writes nothing
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            await db.run(lambda: paused.__exit__(None, None, None))
        with pytest.raises((NotLeaderError, StateError)):
            await a.store.commit_orgs(a.store.begin_cycle(), FakeClock().now(), [], [], {})
    finally:
        await close(a, b)


async def test_ha_a_standby_that_cannot_reach_the_database_is_unhealthy(
    world: World, postgres_server, postgres_url: str
) -> None:
    """/healthz of a standby: healthy behind a live leader; unhealthy (and saying why)
    when it cannot reach the database, since it could not take over."""
    config = pg_config(world, postgres_url, poll={"interval": "10m"})
    leader = await replica(postgres_url, FakeClock())
    try:
        assert await leader.step()
        async with App(config, clock=ManualClock(world.clock.now())) as app:
            assert app.leadership is not None
            assert not await app.leadership.step()
            ok, why = app.daemon.health()
            assert ok and why.startswith("standby"), why
            postgres_server.stop("fast")
            try:
                assert not await app.leadership.step()
                ok, why = app.daemon.health()
            finally:
                postgres_server.start()
            assert not ok, why
            assert "cannot reach the state database" in why
    finally:
        await close(leader)


# -- the read-only commands on a PostgreSQL state with a password (attack-ha 2, 6) ------


async def test_ha_status_history_invoices_read_the_state_password_file_and_need_no_listen(
    world: World,
    postgres_role: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's recipe: the password in ``state.password_file``, a distinct
    ``http.listen`` per replica through ``${LISTEN}``. The read-only commands (which
    read no other secret) read the state's password, and need no ``${LISTEN}``."""
    (world.tmp / "pgpw").write_text(postgres_role.password + "\n")
    data = world.config_data()
    data["state"] = {"url": postgres_role.url, "password_file": "pgpw"}
    data["http"] = {"listen": "${LISTEN}"}
    path = world.tmp / "ha.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load(
        path.read_text(), filename=str(path), env={"LISTEN": "127.0.0.1:0"}, base_dir=world.tmp
    )
    assert await world.run_once(config) == 0  # the daemon's way: migrates the schema

    monkeypatch.delenv("LISTEN", raising=False)
    for command in (["status"], ["history"], ["invoices"], ["status", "--check"]):
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*command, "-c", str(path)])
        out, err = capsys.readouterr()
        assert code == 0, (command, err)
        assert "password authentication failed" not in err
        assert postgres_role.password not in out + err
    assert "Lease: free" in (await asyncio.to_thread(_status, path, capsys))


def _status(path: Any, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    cli.main(["status", "-c", str(path)])
    return capsys.readouterr().out


# -- a password with URL characters in ${VAR} inside state.url (attack-ha 3) -----------


async def test_ha_a_password_with_url_characters_in_a_variable_is_percent_encoded_and_never_shown(
    world: World, postgres_role: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``state.url: postgresql://user:${PGPW}@host/db`` with a password a password
    manager gives (``@ / # % : ? +``): the value is percent-encoded into the URL, so
    the daemon connects; no part of it shows in the summary or in an error."""
    from invoice_watch.config import summary
    from invoice_watch.errors import ConfigError

    password = postgres_role.password
    assert all(c in password for c in "@/#%:?+")
    template = postgres_role.url.replace("@", ":${PGPW}@", 1)
    data = world.config_data()
    data["state"] = {"url": template}
    text = yaml.safe_dump(data)
    config = load(text, filename="ha.yaml", env={"PGPW": password}, base_dir=world.tmp)
    shown = summary(config)
    assert f"State: {postgres_role.url} (PostgreSQL" in shown, shown
    assert await world.run_once(config) == 0  # it connected with the right password
    assert await ops.status(config) == 0

    # the wrong password (same characters): a clear error that shows none of it
    wrong = load(text, filename="ha.yaml", env={"PGPW": password + "@x"}, base_dir=world.tmp)
    with pytest.raises(StateError) as caught:
        await open_store(StateUrl(wrong.state.url.get() if wrong.state.url else ""))
    message = str(caught.value)
    assert "password authentication failed" in message, message
    for piece in ("S3cr3t", "ss/wo", "rd%", "wo#rd", "@x@"):
        assert piece not in message and piece not in caplog.text

    # a URL written with the raw password: refused, saying how, and showing none of it
    raw = world.config_data()
    for bad in (
        postgres_role.url.replace("@", ":Hunter2@Vault@", 1),
        postgres_role.url.replace("@", ":S3cr3t-P@ss/word@", 1),
        postgres_role.url.replace("@", ":pa#ss%word@", 1),
        postgres_role.url.replace("@", ":pa:ss?wd@", 1),
    ):
        raw["state"] = {"url": bad}
        with pytest.raises(ConfigError) as refused:
            load(yaml.safe_dump(raw), filename="ha.yaml", env={}, base_dir=world.tmp)
        said = str(refused.value)
        assert "percent-encode" in said and "state.password_file" in said, said
        for piece in ("Vault", "Hunter2", "ss/word", "S3cr3t", "pa#ss", "ss?wd"):
            assert piece not in said, said


# -- a deposed leader's send in flight (attack-ha 5) ------------------------------------


class _Hook:
    """A notifier that runs ``during`` while it sends (the lease taken, the database
    stopped), and takes every message."""

    name = "c"

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.during: Any = None

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None:
        self.sent.append(events)
        if self.during is not None:
            during, self.during = self.during, None
            await during()

    async def aclose(self) -> None:
        pass


async def test_ha_a_send_in_flight_when_the_leader_is_deposed_says_so_once_and_keeps_no_mark(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A's send is in flight when B takes the lease: its mark is refused by the fence;
    one WARNING says the new leader may send it a second time (no "state file", no
    "fencing token None", no retry promised), and nothing is kept as unrecorded. B's own
    mark that the database refused (its connection cut) is kept, then dropped when B steps
    down: the unrecorded gauge goes back to 0, said once."""
    from invoice_watch.deliver.deliverer import Deliverer

    caplog.set_level(logging.INFO)
    clock_a, clock_b = FakeClock(), FakeClock()
    a, b = await replica(postgres_url, clock_a), await replica(postgres_url, clock_b)
    hook_a, hook_b = _Hook(), _Hook()
    metrics_a, metrics_b = Metrics(), Metrics()

    def deliverer(r: Leadership, hook: _Hook, clock: FakeClock, metrics: Metrics) -> Deliverer:
        d = Deliverer(
            r.store,
            {"c": hook},
            clock=clock,
            max_age=timedelta(days=1),
            max_backoff=timedelta(minutes=5),
            metrics=metrics,
        )
        d.may_send = r.leading
        r.on_step_down = d.drop_unrecorded
        return d

    deliver_a = deliverer(a, hook_a, clock_a, metrics_a)
    deliver_b = deliverer(b, hook_b, clock_b, metrics_b)
    try:
        assert await a.step() and not await b.step()
        number = a.store.begin_cycle()
        await a.store.commit_orgs(number, clock_a.now(), [], [firing("x")], {"failed": ["c"]})
        assert await a.store.release_held(5, clock_a.now()) == 1

        async def b_takes_over() -> None:
            expire(postgres_url)
            assert await b.step()

        hook_a.during = b_takes_over
        caplog.clear()
        await deliver_a.deliver_due()
        assert len(hook_a.sent) == 1
        said = [r for r in caplog.records if "cannot record it" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING, caplog.text
        message = said[0].getMessage()
        assert "no longer the leader" in message and "a second time" in message, message
        for wrong in ("state file", "token None", "retried with backoff", "only a stop"):
            assert wrong not in caplog.text, caplog.text
        assert deliver_a.unrecorded == 0
        assert metrics_a.outbox_unrecorded._value.get() == 0

        # B sends it again (the failover's duplicate); its connection is cut under the mark
        def cut() -> None:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'invoice-watch'"
                )

        async def connection_cut() -> None:
            await asyncio.to_thread(cut)

        hook_b.during = connection_cut
        caplog.clear()
        await deliver_b.deliver_due()
        assert len(hook_b.sent) == 1
        assert deliver_b.unrecorded == 1 and metrics_b.outbox_unrecorded._value.get() == 1
        assert "the state database cannot record it" in caplog.text, caplog.text
        assert "state file" not in caplog.text
        # A takes the lease back; B steps down: its kept mark is the new leader's
        expire(postgres_url)
        assert await a.step()
        clock_b.advance(TTL.total_seconds())
        caplog.clear()
        assert not await b.step()
        assert deliver_b.unrecorded == 0 and metrics_b.outbox_unrecorded._value.get() == 0
        assert caplog.text.count("could not record are dropped") == 1, caplog.text
    finally:
        await close(a, b)


# -- smaller things (attack-ha 6) -------------------------------------------------------


async def test_ha_libpq_errors_are_one_line_and_a_standby_prunes_nothing_silently(
    postgres_server, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq's errors span lines (``Connection refused`` then ``Is the server running
    ...``): every message that carries one is one line. A standby's delivery pass
    prunes nothing and says nothing about it."""
    from invoice_watch.deliver.deliverer import Deliverer
    from tests.postgres import free_port

    with pytest.raises(StateError) as caught:
        await open_store(StateUrl(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    assert "Connection refused" in str(caught.value)
    assert "\n" not in str(caught.value), str(caught.value)

    caplog.set_level(logging.INFO)
    a, b = await replica(postgres_url, FakeClock()), await replica(postgres_url, FakeClock())
    try:
        assert await a.step() and not await b.step()
        standby = Deliverer(
            b.store,
            {"c": _Hook()},
            clock=FakeClock(),
            max_age=timedelta(days=1),
            max_backoff=timedelta(minutes=5),
        )
        standby.may_send = b.leading
        caplog.clear()
        await standby.deliver_due()
        assert "prune" not in caplog.text and "state file" not in caplog.text, caplog.text
        postgres_server.stop("fast")
        try:
            assert not await b.step()  # (a stale connection first: AdminShutdown)
            assert not await b.step()
        finally:
            postgres_server.start()
        assert "\n" not in b.describe() and "Is the server running" in b.describe()
    finally:
        await close(a, b)


async def test_ha_state_copy_warns_of_a_password_in_the_url_on_the_command_line(
    world: World, postgres_role: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from urllib.parse import quote

    sqlite_config = world.config()
    assert await world.run_once(sqlite_config) == 0
    capsys.readouterr()
    url = postgres_role.url.replace("@", f":{quote(postgres_role.password, safe='')}@", 1)
    assert await _state_copy(sqlite_config, url) == 0
    out, err = capsys.readouterr()
    assert "`ps` shows" in err and "PGPASSWORD" in err, err
    assert postgres_role.password not in out + err
    assert quote(postgres_role.password, safe="") not in out + err


async def test_ha_a_standby_exports_no_billing_gauges(world: World, postgres_url: str) -> None:
    """Only the replica holding the lease exports the billing gauges: a standby's
    snapshot is not kept up to date (it once exported a stale pending amount and a
    frozen last read, firing `time() - ..._last_successful_read... > 7200` for a healthy
    standby and doubling a dashboard's sums)."""
    from prometheus_client import generate_latest

    config = pg_config(world, postgres_url)
    async with App(config, clock=FakeClock(world.clock.now())) as leader:
        assert leader.leadership is not None and await leader.leadership.step()
        await leader.run_cycle()
        async with App(config, clock=FakeClock(world.clock.now())) as standby:
            assert standby.leadership is not None and not await standby.leadership.step()
            served = generate_latest(standby.metrics.registry).decode()
            assert "invoice_watch_pending_amount_usd{" not in served
            assert "invoice_watch_last_successful_read_timestamp_seconds{" not in served
            led = generate_latest(leader.metrics.registry).decode()
            assert "invoice_watch_pending_amount_usd{" in led
            assert "invoice_watch_last_successful_read_timestamp_seconds{" in led
