"""The daemon around the cycle: the poll schedule on the monotonic clock (wall-clock
steps, reloads, cycles slower than the interval), health judged on the same clock, the
bounded HTTP endpoint, and `http.listen` errors. Time is a ManualClock: the test moves
it; nothing waits for a timer on the wall clock, except the end-to-end runs of the real
command (libfaketime) and aiohttp's own idle timer, each said where it is."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from invoice_watch import daemon as daemon_module
from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.health import health, in_flight_from_reads, progress_limit
from invoice_watch.schedule import PollSchedule
from tests.conftest import ORG_B, base_config, make_config
from tests.hand_atlas import HandAtlas, hand_config
from tests.loopback import LoopbackServer
from tests.manual_clock import ManualClock
from tests.world import World

# -- helpers -------------------------------------------------------------------------


def cycles(app: App) -> int:
    """Cycles the App has run, whatever their outcome."""
    total = 0.0
    for outcome in ("ok", "partial", "failed", "error"):
        value = app.metrics.registry.get_sample_value(
            "invoice_watch_cycles_total", {"outcome": outcome}
        )
        total += value or 0.0
    return int(total)


async def until_cycles(app: App, count: int) -> None:
    async with asyncio.timeout(10):
        while cycles(app) < count:
            app.cycles.done.clear()
            await app.cycles.done.wait()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait for I/O on loopback to bring ``condition`` about (at most 10 s)."""
    async with asyncio.timeout(10):
        # State that the servers on loopback change: there is no event to await.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    daemon = asyncio.create_task(app.serve(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 15)


def late_cycles(app: App) -> int:
    return int(app.metrics.registry.get_sample_value("invoice_watch_cycles_late_total") or 0)


# -- the lifecycle --------------------------------------------------------------------


async def test_daemon_start_and_stop_are_idempotent_and_its_state_says_where_it_is(world: World):
    """A second start is no second poll loop or endpoint, a second stop does nothing,
    and each step is a DaemonState; leaving the App stops a daemon still serving, and a
    stopped daemon does not start again."""
    from invoice_watch.daemon import DaemonState

    def state(app: App) -> DaemonState:
        return app.daemon.state

    stop = asyncio.Event()
    config = world.config(http={"listen": "127.0.0.1:0"})
    async with App(config, clock=ManualClock(world.clock.now())) as app:
        daemon = app.daemon
        assert state(app) is DaemonState.IDLE and not daemon.serving
        await daemon.start(stop)
        assert state(app) is DaemonState.SERVING
        endpoint, port = app.daemon.endpoint.http, app.daemon.endpoint.port
        await daemon.start(stop)  # already serving: nothing more
        assert app.daemon.endpoint.http is endpoint and app.daemon.endpoint.port == port
        await until_cycles(app, 1)
        assert cycles(app) == 1
        await daemon.stop()
        assert state(app) is DaemonState.STOPPED and app.daemon.endpoint.http is None
        await daemon.stop()
        await daemon.start(stop)  # a daemon serves once
        assert state(app) is DaemonState.STOPPED and app.daemon.endpoint.http is None
    async with App(config, clock=ManualClock(world.clock.now())) as app:
        await app.daemon.start(stop)
        await until_cycles(app, 1)
    assert state(app) is DaemonState.STOPPED and app.daemon.endpoint.http is None  # left: stopped
    assert not stop.is_set()


async def test_run_once_prints_nothing_the_cli_says_what_it_did(
    world: World, capsys: pytest.CaptureFixture[str]
):
    """The App's `run --once` returns what happened and prints nothing; the CLI says it
    and turns it into the exit status (an organization unreadable: 1)."""
    from invoice_watch.cli.commands import once_status

    world.sim.scenario.org("Analytics").forbidden = True
    async with App(world.config(), clock=world.clock) as app:
        outcome = await app.run_once()
    assert capsys.readouterr() == ("", "")
    assert outcome.result is not None and len(outcome.result.orgs_failed) == 1
    assert outcome.pending == outcome.failed == outcome.unrecorded == 0
    assert once_status(outcome, app.config) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Analytics: ") and "Organization Billing Viewer" in err


# -- the schedule, alone --------------------------------------------------------------


def test_schedule_waits_at_most_interval_plus_jitter_and_a_reload_counts_from_the_last_start():
    import random

    schedule = PollSchedule(timedelta(minutes=10), timedelta(seconds=30), random.Random(1))
    assert schedule.wait(1000.0) == 0  # the first cycle at once
    schedule.started(1000.0)
    assert 600 <= schedule.wait(1000.0) <= 630
    assert schedule.wait(1700.0) == 0  # late: at once, never skipped
    schedule.configure(timedelta(minutes=1), timedelta(0))
    assert schedule.wait(1006.0) == 54  # the new interval, from the last start
    schedule.configure(timedelta(hours=1), timedelta(0))
    assert schedule.wait(1006.0) == 3594
    schedule.at_once()  # a replica that has just taken the lease over polls at once
    assert schedule.wait(1007.0) == 0


# -- wall-clock steps (issue 12 §2) ---------------------------------------------------


async def test_poll_keeps_its_interval_when_the_wall_clock_steps_back_and_forth(world: World):
    """The wall clock set back 2 days (an NTP fix, a VM restore), then forward again:
    the next cycle is still due one interval after the last, and /healthz-style health
    stays true while cycles run."""
    clock = ManualClock(world.clock.now())
    async with App(world.config(poll={"interval": "10m"}), clock=clock) as app, serving(app):
        await until_cycles(app, 1)  # the first cycle at start
        # Delivered first: the outbox's own waits are deliver/'s, not this test's.
        await eventually(lambda: len(world.slack.accepted) == len(world.sink.envelopes) == 2)
        for n, step in enumerate((timedelta(days=-2), timedelta(days=2), -timedelta(hours=1))):
            clock.step(step)
            assert await clock.sleeping() == [600.0]  # never the 2 days
            clock.advance(599)
            assert cycles(app) == n + 1
            clock.advance(1)
            await until_cycles(app, n + 2)
            assert app.daemon.health()[0], app.daemon.health()[1]


async def test_health_judges_the_last_cycle_on_the_monotonic_clock(world: World):
    """A wall clock set back 2 days must not make a stale last cycle look fresh."""
    clock = FakeClock(world.clock.now())
    async with App(world.config(poll={"interval": "10m"}), clock=clock) as app:
        await app.run_cycle()
        assert app.daemon.health()[0]
        clock.step(timedelta(days=-2))
        assert app.daemon.health()[0]  # it did finish just now
        clock.advance(timedelta(minutes=21))  # and no cycle since: past 2 x interval
        ok, why = app.daemon.health()
    assert not ok
    assert (
        why == "the last cycle finished 21m ago (the limit is 20m: 2 x poll.interval, at least 1m)"
    )


def test_health_of_a_last_cycle_in_the_future_is_unhealthy():
    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    interval = timedelta(minutes=15)
    ok, why = health(now + timedelta(days=2), 2, 0, interval, now)
    assert not ok and "in the future (in 2d)" in why and "set back" in why
    assert health(now + timedelta(seconds=3), 2, 0, interval, now)[0]  # within tolerance
    assert health(now - timedelta(minutes=5), 2, 0, interval, now)[0]


async def test_status_check_is_unhealthy_when_the_last_cycle_is_in_the_future(world: World):
    """`status --check` (another process: wall times from the state file) after the
    wall clock was set back 2 days."""
    config = world.config()
    async with App(config, clock=FakeClock(datetime.now(UTC) + timedelta(days=2))) as app:
        await app.run_cycle()
    out = io.StringIO()
    assert await ops.status(config, check=True, out=out) == 1
    assert out.getvalue().startswith("unhealthy: the last cycle finished in the future (in 1d")


# -- reloads keep the schedule (issue 12 §2) ------------------------------------------


async def test_sighup_storm_does_not_postpone_cycles(world: World):
    """A SIGHUP every 6 s with a 10 s interval: cycles still run about every 10 s (the
    old scheduler restarted the interval at each reload: 0 cycles in 60 s)."""
    path = world.write_config(poll={"interval": "10s"})
    from invoice_watch.config import load_file

    clock = ManualClock(world.clock.now())
    async with App(load_file(path), clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        for _ in range(10):  # 60 s
            # Time moves only between cycles: a cycle's I/O on loopback takes real time,
            # and its heartbeat sleeps while it runs (moving the clock then made a cycle
            # overrun its interval, a late cycle: fewer than 6 in 60 s).
            await clock.sleeping()  # a cycle due has started
            await eventually(lambda: app.daemon.poll.in_flight is None)
            await clock.sleeping()
            clock.advance(6)
            await app.request_reload()  # the SIGHUP handler's call
        # A cycle runs as a task of its own: the loop may sleep before it ends.
        await until_cycles(app, 6)


async def test_a_reloaded_interval_counts_from_the_last_cycle_start(world: World):
    clock = ManualClock(world.clock.now())
    async with App(world.config(poll={"interval": "10m"}), clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        await clock.sleeping()
        clock.advance(120)
        assert await app.reload(world.config(poll={"interval": "1h"}))
        await eventually(lambda: clock.waits() == [3480.0])  # 1 h after the last start
        assert await app.reload(world.config(poll={"interval": "1m"}))
        await until_cycles(app, 2)  # overdue: at once


# -- a cycle slower than the interval (issue 13 §5) -----------------------------------

SLOW_ORG = "abcdefabcdefabcdefabcdef"


class SlowAtlas(LoopbackServer):
    """One organization with no invoices, whose listing takes ``seconds`` of the test's
    clock (the clock moves while Atlas "thinks")."""

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds
        self.listed_at: list[float] = []
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        self.listed_at.append(self.clock.monotonic())
        self.clock.advance(self.seconds)
        return web.json_response({"results": [], "links": [], "totalCount": 0})


LATE_WARNING = (
    "a poll cycle is still running at the start of the next one (poll.interval 2s): the "
    "next cycle starts as soon as it ends, and cycles run back to back while this lasts "
    "(counted in invoice_watch_cycles_late_total); set a longer poll.interval, or raise "
    "atlas.max_concurrency if Atlas answers slowly"
)


async def test_a_cycle_slower_than_the_interval_is_explained_once_and_the_next_starts_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    async with SlowAtlas(clock, 2.5) as atlas:
        data = base_config(
            atlas={**base_config()["atlas"], "base_url": atlas.url},
            organizations=[{"id": SLOW_ORG}],
            poll={"interval": "2s"},
        )
        config = make_config(tmp_path, data)
        async with App(config, clock=clock) as app, serving(app):
            await until_cycles(app, 4)
            atlas.seconds = 0.5  # Atlas is quick again
            await until_cycles(app, 5)
            assert await clock.sleeping() == [1.5]  # back on the 2 s schedule
            starts = atlas.listed_at[:5]
            late = late_cycles(app)
    # Back to back: each cycle started as the one before ended, none was skipped.
    assert [b - a for a, b in itertools.pairwise(starts)] == [2.5, 2.5, 2.5, 2.5]
    assert late == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [LATE_WARNING]
    assert "the late poll cycle took 2.5s (poll.interval 2s)" in caplog.messages
    assert "poll cycles fit in poll.interval (2s) again: the last took 0.5s" in caplog.messages
    assert not any("maximum number of running instances" in m for m in caplog.messages)


async def test_a_cycle_stopped_by_a_stop_past_its_interval_is_not_late(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A stop (SIGTERM) while a cycle hangs: the cycle is stopped once the stop's budget
    is spent (real time: 0.1 s here), after its interval passed on the clock. No next
    cycle starts, so it is not late: no late-cycle warning, no "the late poll cycle
    took" line, invoice_watch_cycles_late_total stays 0 (all three came before)."""
    monkeypatch.setattr(daemon_module, "SHUTDOWN_SECONDS", 4.0)  # the cycle's budget: 0.1 s
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    async with HandAtlas() as atlas:
        atlas.gates[ORG_B] = asyncio.Event()  # never set: B's listing hangs
        config = hand_config(tmp_path, atlas.url, poll={"interval": "2s"})
        async with App(config, clock=clock) as app:
            stop = asyncio.Event()
            daemon = asyncio.create_task(app.serve(stop))
            await eventually(lambda: any(org == ORG_B for org, _ in atlas.asked))
            (poll,) = [t for t in asyncio.all_tasks() if t.get_name() == "poll"]
            stop.set()
            await eventually(poll.done)  # no next cycle starts ...
            clock.advance(3)  # ... when the hanging one's interval has passed
            await asyncio.wait_for(daemon, 15)
            late = late_cycles(app)
        atlas.gates[ORG_B].set()  # the server closes without waiting for the listing
    assert any("did not finish in" in m for m in caplog.messages)
    assert not any("still running at the start of the next" in m for m in caplog.messages)
    assert not any("the late poll cycle took" in m for m in caplog.messages)
    assert late == 0


async def test_a_stop_between_cycles_says_none_is_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A stop while no cycle runs (between two, or while line items or a chart are
    being made) does not say it finishes "the cycle in flight" (re-attack of issue 19)."""
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    async with HandAtlas() as atlas:
        config = hand_config(tmp_path, atlas.url)
        async with App(config, clock=clock) as app:
            stop = asyncio.Event()
            daemon = asyncio.create_task(app.serve(stop))
            # Between cycles: the first one recorded and its task ended (its epilogue,
            # the outbox gauge and the heartbeat's end, runs after it is recorded).
            await eventually(
                lambda: app.cycles.last is not None and app.daemon.poll.in_flight is None
            )
            stop.set()
            await asyncio.wait_for(daemon, 15)
    stopping = [m for m in caplog.messages if m.startswith("stopping:")]
    assert stopping == ["stopping: no new cycle starts (none is in flight)"]


# -- the HTTP endpoint: bounded, and apart from the cycle (issue 12 §3) ---------------


async def test_http_flood_is_bounded_and_the_cycle_and_delivery_go_on(
    world: World, caplog: pytest.LogCaptureFixture
):
    """200 connections, half idle, half sending headers that never end (slowloris),
    against /healthz with max_connections 8: at most 8 are held, the others are closed
    at once; the next cycle runs and Slack gets its message; the held ones are closed
    after idle_timeout (aiohttp's timer: 1 s of real time), then /healthz answers; the
    flood left a bounded number of log lines."""
    caplog.set_level(logging.DEBUG)
    clock = ManualClock(world.clock.now())
    http = {"listen": "127.0.0.1:0", "max_connections": 8, "idle_timeout": "1s"}
    config = world.config(http=http, poll={"interval": "10m"})
    async with App(config, clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        await eventually(lambda: len(world.slack.accepted) == 2)
        before = len(caplog.records)
        flood = []
        for n in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", app.daemon.endpoint.port)
            if n % 2:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            flood.append((reader, writer))
        await eventually(lambda: app.metrics.http_refused._value.get() >= 192)
        # The cycle and delivery do not notice.
        world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
        await clock.sleeping()
        clock.advance(600)
        await until_cycles(app, 2)
        await eventually(lambda: len(world.slack.accepted) == 3)
        assert world.kinds()[-1] == ("RESOLVED", "failed-charge")
        # Every connection of the flood ends: closed at once, or after idle_timeout.
        async with asyncio.timeout(10):
            ends = await asyncio.gather(
                *(reader.read() for reader, _ in flood), return_exceptions=True
            )
        assert all(end == b"" or isinstance(end, ConnectionError) for end in ends)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{app.daemon.endpoint.port}/healthz"
            async with session.get(url) as resp:
                assert resp.status == 200
        for _, writer in flood:
            writer.close()
        flood_logs = [
            r for r in caplog.records[before:] if r.name.startswith(("aiohttp", "asyncio"))
        ]
        ours = [r for r in caplog.records[before:] if r.name == "invoice_watch.http_endpoint"]
    assert len(flood_logs) <= 2, [r.getMessage() for r in flood_logs]
    assert len(ours) == 1 and "8 connections open (http.max_connections)" in ours[0].getMessage()


async def keep_alive_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> int:
    """One GET on a kept-alive connection, its answer read whole; returns its status."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def test_keep_alive_clients_filling_the_cap_never_keep_the_probes_out():
    """AD-3: ordinary keep-alive clients (scrapers: a GET /metrics now and then, each
    answer read) hold every one of http.max_connections, and never idle for
    idle_timeout: /healthz and /livez were refused for as long as they ran. A new
    connection now closes the one idle the longest; that client reconnects. A client in
    the middle of a request is not closed, nor one that never completed a request (a
    flood: those hold the cap until idle_timeout, as before)."""
    from invoice_watch.http_endpoint import HttpEndpoint
    from invoice_watch.metrics import Metrics

    now = [0.0]
    metrics = Metrics()
    endpoint = HttpEndpoint(
        metrics, lambda: (True, "ok"), "127.0.0.1", 0,
        max_connections=4, idle_timeout=600.0, monotonic=lambda: now[0],
        live=lambda: (True, "alive"),
    )  # fmt: skip
    port = await endpoint.start()
    clients = []
    try:
        for n in range(4):
            now[0] = float(n)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await keep_alive_get(reader, writer, "/metrics") == 200
            clients.append((reader, writer))
        now[0] = 10.0
        assert await keep_alive_get(*clients[0], "/metrics") == 200  # used lately
        statuses = []
        for path in ("/healthz", "/livez"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            statuses.append(await keep_alive_get(reader, writer, path))
            clients.append((reader, writer))
        async with asyncio.timeout(5):  # the two idle the longest were closed
            assert await clients[1][0].read() == b""
            assert await clients[2][0].read() == b""
        assert await keep_alive_get(*clients[0], "/metrics") == 200
        assert await keep_alive_get(*clients[3], "/metrics") == 200
        # Connections that complete no request (a flood) are not idle keep-alive ones:
        # once they hold the cap, a new one is refused at once (until idle_timeout).
        for _, writer in clients:
            writer.close()
        assert endpoint._runner is not None and endpoint._runner.server is not None
        server = endpoint._runner.server
        await eventually(lambda: not server.connections)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        async with asyncio.timeout(5):
            assert await clients[4][0].read() == b""
        assert len(server.connections) == 4
    finally:
        for _, writer in clients:
            writer.close()
        await endpoint.stop()
    assert statuses == [200, 200]
    assert metrics.registry.get_sample_value("invoice_watch_http_connections_evicted_total") == 2


# -- http.listen errors (issue 14 §1) --------------------------------------------------


async def test_run_on_a_port_in_use_is_one_line_naming_http_listen(world: World):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = world.write_config(http={"listen": f"127.0.0.1:{port}"})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "invoice_watch", "run", "-c", str(path),
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 1
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last == (
        f"invoice-watch: http.listen: cannot listen on 127.0.0.1:{port}: the port is already "
        "in use by another program (9100, for example, is node_exporter's); choose a free "
        "port in http.listen, or stop that program"
    )
    assert world.slack.received == []  # it stopped before any cycle


# -- end to end under libfaketime (issue 12 §2) ----------------------------------------

LIBFAKETIME = next(
    iter(
        sorted(
            glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
            + glob.glob("/usr/lib/faketime/libfaketime.so.1")
        )
    ),
    None,
)


@pytest.mark.slow
@pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is not installed (Debian package `faketime`; .ci/run installs it)",
)
async def test_e2e_daemon_keeps_polling_when_its_wall_clock_is_set_back_two_days(
    world: World, tmp_path: Path
):
    """A real `invoice-watch run` whose wall clock (CLOCK_REALTIME, through libfaketime)
    is set 2 days back while it runs, then forward again; CLOCK_MONOTONIC is left
    alone, as an NTP step leaves it. Real time passes here: the interval is 1 s."""
    assert LIBFAKETIME is not None
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    path = world.write_config(poll={"interval": "1s"})
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "invoice_watch", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    stderr = daemon.stderr
    assert stderr is not None
    seen: list[str] = []

    async def cycles_logged(count: int) -> None:
        async with asyncio.timeout(20):
            done = 0
            while done < count:
                line = (await stderr.readline()).decode()
                assert line, f"the daemon exited: {''.join(seen[-20:])}"
                seen.append(line)
                done += " cycle: " in line

    def listings() -> int:
        return sum(1 for r in world.sim.requests if r.path.endswith("/invoices"))

    try:
        await cycles_logged(1)
        offset.write_text("-2d\n")  # the wall clock is set 2 days back
        before = listings()
        await cycles_logged(3)
        assert listings() >= before + 3  # it polled Atlas, 2 days "in the past"
        offset.write_text("+0\n")  # and set right again
        await cycles_logged(2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(daemon.wait(), 15)
    assert code == 0
    assert not any("Traceback" in line for line in seen)


# -- the watchdog means "the poll loop is alive", not "Atlas answers" (issue 14 §1) ------


class NotifySocket:
    """systemd's notify socket: a datagram socket in tmp_path (tests/test_sdnotify.py)."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def pings(self) -> int:
        return self.read().count("WATCHDOG=1")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")  # WatchdogSec=20s: a ping every 10 s
    try:
        yield sock
    finally:
        sock.close()


async def test_a_revoked_key_keeps_the_watchdog_fed_and_poll_failure_fires(
    world: World, notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
):
    """Atlas refuses the key at every cycle: /healthz says so (503), but the watchdog
    keeps getting pinged (the daemon works: restarting it cannot mend the key), so the
    poll_failure rule gets its `after` and fires. Before, the pings stopped with the
    first cycle that read no organization: systemd killed the daemon every ~71 s until
    the start limit left the unit failed, and poll_failure never fired."""
    data = world.config_data(
        poll={"interval": "1m"},
        rules=[{"name": "atlas-down", "type": "poll_failure", "after": "3m", "notify": ["slack"]}],
    )
    data["atlas"]["auth"]["private_key"] = "revoked-key"
    from tests.conftest import make_config

    clock = ManualClock(world.clock.now())
    async with App(make_config(world.tmp, data), clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        pings = 0
        for _ in range(30):  # 5 minutes, in the watchdog's 10 s steps
            await clock.sleeping()
            pings = notify_socket.pings()  # read as systemd does (its queue holds 10)
            clock.advance(10)
        await eventually(lambda: ("FIRING", "atlas-down") in world.kinds())
        healthy, why = app.daemon.health()
        alive, _ = app.daemon.liveness()
    assert not healthy and why == "the last cycle could read none of 2 organization(s)"
    assert alive
    assert pings >= 30
    assert not any("not pinging systemd's watchdog" in m for m in caplog.messages)


class HeldAtlas(LoopbackServer):
    """One organization with no invoices. From the ``hold_from``-th listing on, a
    listing moves the test's clock by ``seconds`` (Atlas "thinks") and then waits for
    :attr:`release` before it answers."""

    def __init__(self, clock: ManualClock, seconds: float, hold_from: int = 2) -> None:
        self.clock, self.seconds, self.hold_from = clock, seconds, hold_from
        self.listings = 0
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        self.listings += 1
        if self.listings >= self.hold_from:
            self.clock.advance(self.seconds)
            self.holding.set()
            await self.release.wait()
        return web.json_response({"results": [], "links": [], "totalCount": 0})


@asynccontextmanager
async def held_daemon(
    tmp_path: Path, seconds: float, **sections: Any
) -> AsyncIterator[tuple[App, HeldAtlas, ManualClock]]:
    """A daemon polling every 2 s whose second cycle is held ``seconds`` into it."""
    clock = ManualClock()
    async with HeldAtlas(clock, seconds) as atlas:
        data = base_config(
            atlas={**base_config()["atlas"], "base_url": atlas.url},
            organizations=[{"id": SLOW_ORG}],
            poll={"interval": "2s"},
            **sections,
        )
        async with App(make_config(tmp_path, data), clock=clock) as app, serving(app):
            await until_cycles(app, 1)
            await clock.sleeping()
            clock.advance(2)
            async with asyncio.timeout(10):
                await atlas.holding.wait()
            try:
                yield app, atlas, clock
            finally:
                atlas.release.set()


async def test_a_long_cycle_in_flight_is_healthy_alive_and_warned_about_while_it_runs(
    tmp_path: Path, notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
):
    """70 s into a cycle, with a 2 s interval (issue 13 §4): /healthz 200 (it said 503
    "last cycle finished 1m ago (limit 1m)"), the watchdog pinged, and the late-cycle
    warning logged already, not only when the cycle ends."""
    caplog.set_level(logging.INFO)
    http = {"listen": "127.0.0.1:0"}
    async with held_daemon(tmp_path, 70, http=http) as (app, _, clock):
        await clock.sleeping()  # the watchdog, woken by the 70 s, pinged and sleeps
        healthy, why = app.daemon.health()
        alive, _ = app.daemon.liveness()
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{app.daemon.endpoint.port}"
            async with session.get(f"{url}/healthz") as resp:
                healthz = resp.status, await resp.json()
            async with session.get(f"{url}/livez") as resp:
                livez = resp.status
        warned = [m for m in caplog.messages if "still running at the start of the next" in m]
    assert healthy and alive
    assert why == (
        "a cycle has been running for 1m10s, the last request to Atlas started 1m10s ago; "
        "the last cycle finished 1m12s ago: 1 read, 0 failed"
    )
    assert healthz == (200, {"status": "ok", "reason": why}) and livez == 200
    assert warned == [LATE_WARNING]
    assert notify_socket.pings() >= 2
    assert "watching 1 organization(s) every 2s" in caplog.messages  # was "every 0:00:02"


async def test_status_check_judges_a_long_cycle_in_flight_as_healthz_does(
    tmp_path: Path, notify_socket: NotifySocket
):
    """AD-5: 70 s into a cycle whose read has written nothing yet (Atlas slow, or 429s
    retried), with a 2 s interval: /healthz said healthy, `status --check` (the Docker
    HEALTHCHECK, another process reading the state file) "the last cycle finished 1m12s
    ago (the limit is 1m)", exit 1. The daemon records the cycle's progress in the state
    file while it runs: both say healthy, by the same last request to Atlas."""
    import io

    async with held_daemon(tmp_path, 70) as (app, _, clock):
        await clock.sleeping(2)  # the heartbeat and watchdog, woken by the 70 s, sleep again
        healthy, _ = app.daemon.health()
        out = io.StringIO()
        code = await ops.status(app.config, check=True, out=out, now=clock.now())
    assert healthy
    assert (code, out.getvalue()) == (
        0,
        "healthy: a cycle has been running, an organization read 1m10s ago; the last "
        "cycle finished 1m12s ago: 1 read, 0 failed\n",
    )


async def test_a_cycle_that_makes_no_progress_is_unhealthy_and_the_watchdog_stops(
    tmp_path: Path, notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
):
    """No request to Atlas for longer than two timeouts and two of the longest retry
    waits (2 x 30s + 2 x 300s + 1m = 12m): the cycle is stuck (a bug), and systemd
    restarts the daemon."""
    async with held_daemon(tmp_path, 12 * 60 + 1) as (app, _, clock):
        await clock.sleeping()
        healthy, why = app.daemon.health()
        alive, _ = app.daemon.liveness()
        pings = notify_socket.pings()
        clock.advance(10)
        await clock.sleeping()
        assert notify_socket.pings() == pings  # no ping since
    assert not healthy and not alive
    assert why == (
        "a cycle has been running for 12m1s with no progress for 12m1s (the last: the last "
        "request to Atlas started; limit 12m, from atlas.timeout and atlas.max_backoff)"
    )
    stopped = [m for m in caplog.messages if m.startswith("not pinging systemd's watchdog")]
    assert stopped == [
        f"not pinging systemd's watchdog: {why}; systemd restarts the daemon once "
        "WatchdogSec passes"
    ]


async def test_cycles_that_run_but_are_not_recorded_are_no_progress_for_healthz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """AD-2: the state file refuses the cycle's writes ("database is locked": another
    process holds its write lock), and the next cycle is in flight: /healthz said 200
    "a cycle has been running..." for as long as cycles kept failing. 2 x interval after
    the last recorded cycle it is 503, saying why; /livez (the loop runs) stays 200.
    The store's write raises the StateError a held lock gives (a real lock costs three
    of SQLite's 5 s busy_timeout per cycle, in real time)."""
    from invoice_watch.errors import StateError

    clock = ManualClock()
    async with HeldAtlas(clock, 70, hold_from=3) as atlas:
        data = base_config(
            atlas={**base_config()["atlas"], "base_url": atlas.url},
            organizations=[{"id": SLOW_ORG}],
            poll={"interval": "2s"},
            http={"listen": "127.0.0.1:0"},
        )
        async with App(make_config(tmp_path, data), clock=clock) as app, serving(app):
            await until_cycles(app, 1)
            finish = app.store.finish_cycle

            refused = asyncio.Event()

            async def locked(*args: Any, **kwargs: Any) -> None:
                refused.set()
                raise StateError("could not write state file state.db: database is locked")

            monkeypatch.setattr(app.store, "finish_cycle", locked)
            await clock.sleeping()
            clock.advance(2)
            async with asyncio.timeout(10):
                await refused.wait()  # the second cycle fails: not recorded
            monkeypatch.setattr(app.store, "finish_cycle", finish)
            await clock.sleeping()
            clock.advance(2)  # the third starts, and is held 70 s into it
            async with asyncio.timeout(10):
                await atlas.holding.wait()
            try:
                async with aiohttp.ClientSession() as session:
                    url = f"http://127.0.0.1:{app.daemon.endpoint.port}"
                    async with session.get(f"{url}/healthz") as resp:
                        healthz = resp.status, (await resp.json())["reason"]
                    async with session.get(f"{url}/livez") as resp:
                        livez = resp.status
            finally:
                atlas.release.set()
            await until_cycles(app, 3)
            recovered = app.daemon.health()
    assert (healthz, livez) == (
        (
            503,
            "the last cycle recorded finished 1m14s ago (the limit is 1m: 2 x poll.interval, "
            "at least 1m); the last cycle ended unrecorded: could not write state file "
            "state.db: database is locked",
        ),
        200,
    )
    assert recovered[0], recovered


def test_status_check_sees_a_cycle_in_flight_by_the_reads_it_recorded():
    """`status --check` (another process) reads the state file: a read recorded after
    the last cycle finished is a cycle in flight, healthy while recent."""
    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    finished = now - timedelta(minutes=40)
    interval, limit = timedelta(minutes=15), progress_limit(timedelta(seconds=30), timedelta(0))
    reads = [finished - timedelta(seconds=5), now - timedelta(seconds=20)]

    in_flight = in_flight_from_reads(finished, reads, now, limit)
    ok, why = health(finished, 2, 0, interval, now, in_flight=in_flight)
    stale = in_flight_from_reads(finished, reads, now + limit, limit)
    none = in_flight_from_reads(finished, reads[:1], now, limit)

    assert ok and why == (
        "a cycle has been running, an organization read 20s ago; the last cycle finished "
        "40m ago: 2 read, 0 failed"
    )
    assert stale is not None and not health(finished, 2, 0, interval, now, in_flight=stale)[0]
    assert none is None
    assert health(finished, 2, 0, interval, now) == (
        False,
        "the last cycle finished 40m ago (the limit is 30m: 2 x poll.interval, at least 1m)",
    )


def test_the_progress_limit_counts_the_atlas_clients_longest_retry_wait():
    from invoice_watch.atlas.pacing import MAX_RETRY_AFTER
    from invoice_watch.health import LONGEST_RETRY_AFTER

    assert LONGEST_RETRY_AFTER.total_seconds() == MAX_RETRY_AFTER


# -- clients that never read their answers (issue 12 §A12-8) ----------------------------


def slow_reader(port: int, requests: int) -> socket.socket:
    """The attack's slowread.py: pipelined GET /metrics, a 4 KB receive buffer, never
    a byte read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    data = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * requests
    sent, deadline = 0, time.monotonic() + 2
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (FIN) or reset the connection, from the TCP state
    (Linux's TCP_INFO): reading would take answers and unblock the server, and the
    answers still queued hide a reset from a peek."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] != 1  # TCP_ESTABLISHED


async def test_clients_that_never_read_their_answers_are_closed_after_idle_timeout(
    world: World, caplog: pytest.LogCaptureFixture
):
    """Connections filling the cap (2 here; the attack's 64 with the default cap), each
    pipelining 3,000 GET /metrics and reading nothing: the server ends up blocked
    writing, where aiohttp's keep-alive timer is off, so they held /healthz forever.
    Once idle_timeout passes on the daemon's clock, they are closed (checked every
    second of real time, as aiohttp checks its own timer)."""
    clock = ManualClock(world.clock.now())
    http = {"listen": "127.0.0.1:0", "max_connections": 2, "idle_timeout": "10s"}
    config = world.config(http=http, poll={"interval": "10m"})
    async with App(config, clock=clock) as app, serving(app):
        await until_cycles(app, 1)
        port, endpoint = app.daemon.endpoint.port, app.daemon.endpoint.http
        assert port is not None and endpoint is not None and endpoint._runner is not None
        server = endpoint._runner.server
        assert server is not None
        readers = await asyncio.gather(*(asyncio.to_thread(slow_reader, port, 3000) for _ in "ab"))
        try:
            # The answers fill the kernel's buffers (a few seconds of /metrics), then
            # wait unsent in the server's: it is blocked writing.
            async with asyncio.timeout(60):
                while not (  # noqa: ASYNC110 (no event says a buffer filled)
                    len(server.connections) == 2
                    and all(
                        c.transport is not None and c.transport.get_write_buffer_size() > 0
                        for c in server.connections
                    )
                ):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # a check or two: still held before idle_timeout
            assert not any(closed_by_server(r) for r in readers)
            with pytest.raises(aiohttp.ServerDisconnectedError):  # the cap is full
                async with aiohttp.ClientSession() as session:
                    await session.get(f"http://127.0.0.1:{port}/healthz")
            clock.advance(11)
            await eventually(lambda: all(closed_by_server(r) for r in readers))
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as resp,
            ):
                assert resp.status == 200
        finally:
            for reader in readers:
                reader.close()
        stalled = app.metrics.registry.get_sample_value(
            "invoice_watch_http_connections_stalled_total"
        )
    assert stalled == 2
    assert (
        "http.listen: closed 2 connection(s) whose client did not read its answers for 10s "
        "(http.idle_timeout)"
    ) in caplog.messages


# -- http.max_connections and the open files limit (issue 12 §A12-9) ---------------------

ENDPOINT = """
import asyncio, logging, sys, resource
from invoice_watch.http_endpoint import HttpEndpoint
from invoice_watch.metrics import Metrics
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

async def main():
    metrics = Metrics()
    endpoint = HttpEndpoint(
        metrics, lambda: (True, "ok"), "127.0.0.1", 0, max_connections=int(sys.argv[1]),
        idle_timeout=60.0, monotonic=asyncio.get_running_loop().time,
    )
    port = await endpoint.start()
    print(port, endpoint.max_connections, flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line == "hold\\n":  # the event loop stops until the next line
            print("holding", flush=True)
            sys.stdin.readline()
            continue
        held = len(endpoint._runner.server.connections)  # any other line: the counts
        closed = metrics.http_refused._value.get() + metrics.http_evicted._value.get()
        print(held, int(closed), flush=True)
    await endpoint.stop()

asyncio.run(main())
"""


class EndpointProcess:
    """HttpEndpoint alone in a process allowed 512 open files (:data:`ENDPOINT`),
    driven through its stdin: its port, its connection cap, its log once it ended."""

    def __init__(self, max_connections: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", ENDPOINT, str(max_connections)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        self.port, self.cap = map(int, self._line().split())
        self.log = ""

    def counts(self) -> tuple[int, int]:
        """Connections held now, and closed so far to stay at the cap (refused, or an
        idle one evicted for a new one)."""
        self._send("\n")
        held, refused = map(int, self._line().split())
        return held, refused

    def hold(self) -> None:
        """Stop the server's event loop (it accepts nothing) until :meth:`release`."""
        self._send("hold\n")
        assert self._line() == "holding\n"

    def release(self) -> None:
        self._send("\n")

    def end(self) -> None:
        """Stop it (it must exit 0) and keep its log."""
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.close()
        try:
            assert self.process.wait(20) == 0
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log = self.process.stderr.read()
            self.process.__exit__(None, None, None)

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        self.process.stdin.flush()

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline()


@contextlib.contextmanager
def endpoint_process(max_connections: int) -> Iterator[EndpointProcess]:
    endpoint = EndpointProcess(max_connections)
    try:
        yield endpoint
    finally:
        endpoint.end()


def test_max_connections_above_the_open_files_limit_is_capped_below_it():
    """A daemon allowed 512 open files (soft and hard) and `max_connections: 5000`, as
    the attack's `ulimit -n 1024` with 1,100 connections: the cap is lowered below the
    limit (and said), and of 600 connections kept open (each answered once, so that the
    server has taken it before the next comes) `cap` are held and the rest closed (each
    new one past the cap closes the one idle the longest), never an `accept() out of
    system resource` storm (the cap did not count the descriptors the rest of the daemon
    needs)."""
    clients: list[socket.socket] = []
    held = closed = 0
    try:
        with endpoint_process(5000) as endpoint:
            cap = endpoint.cap
            assert 64 < cap < 512 - 128
            for _ in range(600):
                sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
                clients.append(sock)
                try:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = sock.recv(4096)
                except ConnectionError:
                    answer = b""
                if answer.startswith(b"HTTP/1.1 200"):
                    held += 1  # kept alive: the connection stays open
                else:
                    assert answer == b""
                    closed += 1
            assert endpoint.counts() == (cap, 600 - cap)
    finally:
        for sock in clients:
            sock.close()
    assert (held, closed) == (600, 0)  # the idle ones made room for each new one
    assert "http.max_connections 5000 is more than this process can hold" in endpoint.log
    assert f"so at most {cap} connections are held" in endpoint.log
    assert "out of system resource" not in endpoint.log
    assert "Too many open files" not in endpoint.log


def test_a_burst_of_connections_is_held_to_the_cap():
    """90 connections held, then 30 more arriving at once, with a cap of 100: asyncio
    accepts a batch before any of it counts as open, so the cap was overshot by up to a
    batch (120 held; and up to 100 descriptors more than the cap: the listen backlog).
    The 30 new ones now close the 20 idle the longest to make room (AD-3)."""
    clients: list[socket.socket] = []
    try:
        with endpoint_process(100) as endpoint:
            for _ in range(90):
                sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
                clients.append(sock)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            endpoint.hold()
            for _ in range(30):  # queued by the kernel: accepted together once released
                clients.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=5))
            endpoint.release()
            deadline = time.monotonic() + 10
            # The server's accepts: no event of theirs reaches this process. An idle
            # connection closed for a new one is gone in the loop's next round.
            while (counts := endpoint.counts()) != (100, 20) and time.monotonic() < deadline:
                pass
            assert endpoint.cap == 100 and counts == (100, 20)
    finally:
        for sock in clients:
            sock.close()
    assert "out of system resource" not in endpoint.log


async def test_accepts_out_of_open_files_are_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
):
    """Should the rest of the daemon use up the open files anyway, asyncio logs
    "socket.accept() out of system resource" with a traceback at each retry (every
    second: the attack's 94,186 tracebacks, 51 MB of log in 30 s): one a minute."""
    from invoice_watch.http_endpoint import HttpEndpoint
    from invoice_watch.metrics import Metrics

    now = [0.0]
    endpoint = HttpEndpoint(
        Metrics(), lambda: (True, "ok"), "127.0.0.1", 0,
        max_connections=8, idle_timeout=10.0, monotonic=lambda: now[0],
    )  # fmt: skip
    await endpoint.start()
    loop = asyncio.get_running_loop()
    error = OSError(24, "Too many open files")
    try:
        for second in range(120):
            now[0] = float(second)
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": error}
            )
        loop.call_exception_handler({"message": "another asyncio error"})
    finally:
        await endpoint.stop()
    loop.call_exception_handler({"message": "socket.accept() out of system resource"})
    logged = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.getMessage() for r in logged] == [
        "socket.accept() out of system resource (HTTP endpoint; more of these are not "
        "logged for a minute)",
        "socket.accept() out of system resource (HTTP endpoint; more of these are not "
        "logged for a minute)",
        "another asyncio error",
        "socket.accept() out of system resource",  # the endpoint stopped: not its own
    ]
    assert [r.exc_info for r in logged[:2]] == [None, None]
