"""The daemon around the cycle: the poll schedule on the monotonic clock (wall-clock
steps, reloads, cycles slower than the interval), health judged on the same clock, the
bounded HTTP endpoint, and `http.listen` errors. Time is a ManualClock: the test moves
it; nothing waits for a timer on the wall clock, except the end-to-end runs of the real
command (libfaketime) and aiohttp's own idle timer, each said where it is."""

from __future__ import annotations

import asyncio
import glob
import io
import itertools
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.health import health
from invoice_watch.schedule import PollSchedule
from tests.conftest import base_config, make_config
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
            app.cycle_done.clear()
            await app.cycle_done.wait()


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


# -- wall-clock steps (issue 12 §2) ---------------------------------------------------


async def test_poll_keeps_its_interval_when_the_wall_clock_steps_back_and_forth(world: World):
    """The wall clock set back 2 days (an NTP fix, a VM restore), then forward again:
    the next cycle is still due one interval after the last, and /healthz-style health
    stays true while cycles run."""
    clock = ManualClock(world.clock.now())
    async with App(world.config(poll={"interval": "10m"}), clock=clock) as app, serving(app):
        await until_cycles(app, 1)  # the first cycle at start
        # Delivered first: the outbox's own waits are deliver.py's, not this test's.
        await eventually(lambda: len(world.slack.accepted) == len(world.sink.envelopes) == 2)
        for n, step in enumerate((timedelta(days=-2), timedelta(days=2), -timedelta(hours=1))):
            clock.step(step)
            assert await clock.sleeping() == [600.0]  # never the 2 days
            clock.advance(599)
            assert cycles(app) == n + 1
            clock.advance(1)
            await until_cycles(app, n + 2)
            assert app.health()[0], app.health()[1]


async def test_health_judges_the_last_cycle_on_the_monotonic_clock(world: World):
    """A wall clock set back 2 days must not make a stale last cycle look fresh."""
    clock = FakeClock(world.clock.now())
    async with App(world.config(poll={"interval": "10m"}), clock=clock) as app:
        await app.run_cycle()
        assert app.health()[0]
        clock.step(timedelta(days=-2))
        assert app.health()[0]  # it did finish just now
        clock.advance(timedelta(minutes=21))  # and no cycle since: past 2 x interval
        ok, why = app.health()
    assert not ok
    assert why == "last cycle finished 21m ago (limit 20m)"


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
            reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
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
            url = f"http://127.0.0.1:{app.http_port}/healthz"
            async with session.get(url) as resp:
                assert resp.status == 200
        for _, writer in flood:
            writer.close()
        flood_logs = [
            r for r in caplog.records[before:] if r.name.startswith(("aiohttp", "asyncio"))
        ]
        ours = [r for r in caplog.records[before:] if r.name == "invoice_watch.health"]
    assert len(flood_logs) <= 2, [r.getMessage() for r in flood_logs]
    assert len(ours) == 1 and "8 connections open (http.max_connections)" in ours[0].getMessage()


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
