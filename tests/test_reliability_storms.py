"""No storm, whatever fails; no wait longer than ``delivery.max_backoff``, whatever the
wall clock does (issue 12 §4 and §2, delivery's part).

- A full disk after a send: the message's "sent" mark cannot be written. The outcome is
  kept in memory, the message is not sent again, the write is retried with backoff, the
  operator is told once (a log line, a metric); once the disk has room the marks land,
  and nothing was sent twice. The disk is full for real: a tmpfs of its own that the test
  fills (where a tmpfs can be mounted), and SQLite's own size limit on the state file
  (``PRAGMA max_page_count``), which gives the same SQLITE_FULL anywhere.
- Slack answering 429 with ``Retry-After: 0``, negative, ``nan`` or a day: a bounded
  number of POSTs and of log lines.
- The wall clock set back or forward while a retry is pending: the delivery loop never
  waits longer than ``max_backoff``, and the retry goes out.

The real pipeline against the simulator, the fake Slack and aiosmtpd, and the daemon's
own delivery loop (``Deliverer.run``), its time a FakeClock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.simulator import Simulator
from tests.fakes_slack import FakeSlack, Reply
from tests.fakes_smtp import StartServer
from tests.test_reliability_outages import CountingSink, counting
from tests.world import World, scenario

FIRST_RUN = [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]


@pytest.fixture
async def world(tmp_path: Path, smtp_server: StartServer) -> AsyncIterator[World]:
    sink = CountingSink()  # counts refused mail too
    port = await smtp_server(sink)
    async with Simulator(scenario()) as sim, FakeSlack() as slack:
        yield World(sim, slack, sink, port, tmp_path)


async def run_delivery(
    app: App, clock: FakeClock, seconds: float, until: Callable[[], bool] = lambda: False
) -> None:
    """The daemon's delivery loop for ``seconds`` of FakeClock time (or ``until`` holds).
    The loop moves the FakeClock itself (its sleeps return at once); this only yields to
    it, and the real time it may take is bounded."""
    end = clock.monotonic() + seconds
    task = asyncio.create_task(app.deliverer.run())
    try:
        async with asyncio.timeout(60):
            # Yields to the loop under test (its own sleeps move the FakeClock): no
            # timer of this test's fires, and no event says "the FakeClock moved".
            while clock.monotonic() < end and not until() and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    finally:
        app.deliverer.stop()  # one last pass, as the daemon's stop makes, bounded alike
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()
            await asyncio.wait({task})
            raise AssertionError("the delivery loop did not stop within 10 s")


def metric(app: App, name: str, labels: dict[str, str] | None = None) -> float:
    return app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# -- a full disk ------------------------------------------------------------------------


class Disk(Protocol):
    folder: Path

    def fill(self, state: Path) -> None: ...

    def free(self, state: Path) -> None: ...


class Tmpfs:
    """A tmpfs of its own for the state file's folder; ``fill`` writes a file until the
    file system says ENOSPC."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.filler = folder / "filler"

    def fill(self, state: Path) -> None:
        with open(self.filler, "wb", buffering=0) as out:
            for chunk in (1 << 16, 1 << 12, 1 << 9):
                try:
                    while True:
                        out.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    def free(self, state: Path) -> None:
        self.filler.unlink()


class FileSizeLimit:
    """The process may not write its files past the state file's write-ahead log as it
    stands (RLIMIT_FSIZE, as ``ulimit -f`` sets it, SIGXFSZ ignored): the next commit's
    write is cut short and then refused by the kernel (EFBIG), and SQLite reports a
    disk I/O error. Needs no privilege; a real refusal of a real write all the same."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._signal: Any = None

    def fill(self, state: Path) -> None:
        log_size = os.path.getsize(f"{state}-wal")
        self._signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (log_size + 100, self._limit[1]))

    def free(self, state: Path) -> None:
        self.free_if_filled()

    def free_if_filled(self) -> None:
        if self._signal is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            signal.signal(signal.SIGXFSZ, self._signal)
            self._signal = None


@pytest.fixture(params=["tmpfs", "file-size-limit"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "file-size-limit":
        limit = FileSizeLimit(folder)
        try:
            yield limit
        finally:
            limit.free_if_filled()
        return
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip("no tmpfs can be mounted here (needs root with CAP_SYS_ADMIN)")
    try:
        yield Tmpfs(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


async def test_storm_disk_full_after_a_send_sends_nothing_twice(
    world: World, disk: Disk, caplog: pytest.LogCaptureFixture
):
    """Issue 12 §4: the same FIRING reached Slack 7 times, every ~5 s."""
    config = world.config(state={"path": str(disk.folder / "state.db")})
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()  # two alerts, for Slack and email: four messages
        disk.fill(app.config.state.path)
        await run_delivery(app, world.clock, seconds=600)

        assert len(world.slack.received) == 2 and len(world.sink.envelopes) == 2
        assert sorted(world.kinds()) == FIRST_RUN
        assert metric(app, "invoice_watch_outbox_unrecorded") == 4
        writes = metric(app, "invoice_watch_outbox_write_errors_total")
        assert 3 <= writes <= 30  # retried with backoff, not once a pass
        told = [r for r in caplog.records if "state file cannot record" in r.getMessage()]
        assert len(told) == 1 and told[0].levelno == logging.ERROR
        assert "database or disk is full" in told[0].getMessage() or (
            "disk I/O error" in told[0].getMessage()
        )
        assert "stopping with 4 delivery outcome(s) the state file could not record" in (
            caplog.text
        )

        disk.free(app.config.state.path)
        assert await app.deliverer.drain(120) == 0
        assert metric(app, "invoice_watch_outbox_unrecorded") == 0
        counts = await app.store.outbox.counts()
        assert counts["sent"] == 4 and "pending" not in counts
        assert "the state file is writable again: recorded 4" in caplog.text
    assert len(world.slack.received) == 2 and len(world.sink.envelopes) == 2


async def test_storm_disk_full_run_once_delivers_once_and_says_what_it_kept(
    world: World, disk: Disk
):
    """``run --once`` (drain): every message goes out once; the outcomes the state file
    refused are counted apart from the undelivered ones (run_once says so, exit 1)."""
    config = world.config(state={"path": str(disk.folder / "state.db")})
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        disk.fill(app.config.state.path)
        assert await app.deliverer.drain(60) == 0  # nothing is left undelivered
        assert app.deliverer.unrecorded == 4
        disk.free(app.config.state.path)
        assert await app.deliverer.drain(60) == 0 and app.deliverer.unrecorded == 0
        assert await app.store.outbox.counts() == {"sent": 4}
    assert len(world.slack.received) == 2 and counting(world).attempts == 2


async def test_storm_disk_full_keeps_a_retry_and_a_failure_in_memory_too(world: World, disk: Disk):
    """Failed and retry marks the state file cannot write are kept the same way: the
    message that failed for good is not tried again, the one to retry waits for the
    disk, and their marks land once it has room."""
    world.slack.script_webhook(Reply(404, "no_service"), *[Reply(503)] * 3)
    world.sink.reply = "451 4.3.0 Try again later"
    config = world.config(state={"path": str(disk.folder / "state.db")})
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        disk.fill(app.config.state.path)
        await run_delivery(app, world.clock, seconds=600)
        # Slack: one failed for good, one 503 whose retry waits for the disk; email: one
        # 451, the other waiting behind it.
        assert len(world.slack.received) == 2 and counting(world).attempts == 1
        assert metric(app, "invoice_watch_outbox_unrecorded") == 3
        disk.free(app.config.state.path)
        world.sink.reply = "250 OK"
        world.slack.clear_scripts()
        assert await app.deliverer.drain(600) == 0
        counts = await app.store.outbox.counts()
        assert counts == {"sent": 3, "failed": 1}
    assert len(world.slack.accepted) == 1 and len(world.sink.envelopes) == 2
    assert len(world.slack.received) == 3 and counting(world).attempts == 3


# -- Slack 429 with a hostile Retry-After -----------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "gap"),
    # The least seconds between two POSTs: Retry-After floored at 1 s; a junk one means
    # backoff (from 1-2 s, growing); a day capped at max_backoff (60 s).
    [("0", 1), ("-1", 1), ("nan", 1), ("", 1), ("86400", 60)],
    ids=["zero", "negative", "nan", "empty", "a day"],
)
async def test_storm_slack_429_with_any_retry_after_is_bounded(
    world: World, caplog: pytest.LogCaptureFixture, retry_after: str, gap: float
):
    """Issue 12 §4: 800-1,500 POSTs in 10 s and a log line each. Now one POST per ``gap``
    at most, for as long as the 429s last, and one warning per message."""
    reply = Reply(429, "ratelimited", headers={"Retry-After": retry_after})
    world.slack.script_webhook(*[reply] * 1000)
    async with App(world.config(), clock=world.clock) as app:
        await app.run_cycle()
        began = world.clock.monotonic()
        await run_delivery(app, world.clock, seconds=10)
        elapsed = world.clock.monotonic() - began
    posts = len(world.slack.received)
    assert elapsed >= 10 and 1 <= posts <= elapsed / gap + 2  # + the one as the loop stops
    waits = [s for s in world.clock.sleeps if s > 0]
    assert min(waits) >= gap and max(waits) <= 60
    warnings = [
        r
        for r in caplog.records
        if r.name == "invoice_watch.deliver" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and "HTTP 429 ratelimited" in warnings[0].getMessage()


# -- the wall clock steps ---------------------------------------------------------------


@pytest.mark.parametrize("step", [-2, 2], ids=["set back 2 days", "set forward 2 days"])
async def test_storm_wall_clock_step_never_stretches_a_retry(world: World, step: int):
    """Issue 12 §2: a pending Slack retry waited a day when the wall clock was set back.
    Whichever way it steps, the delivery loop never sleeps longer than max_backoff and the
    retry goes out within it."""
    world.slack.script_webhook(Reply(503))
    config = world.config(delivery={"max_backoff": "60s"})
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()  # Slack: 503, retried in a few seconds
        assert len(world.slack.received) == 1
        world.clock.step(timedelta(days=step))
        world.clock.sleeps.clear()
        began = world.clock.monotonic()
        await run_delivery(
            app, world.clock, seconds=3600, until=lambda: len(world.slack.accepted) == 2
        )
        assert sorted(world.kinds()) == FIRST_RUN
        assert world.clock.monotonic() - began <= 60
        assert all(s <= 60 for s in world.clock.sleeps)
        assert await app.store.outbox.counts() == {"sent": 4}


async def test_storm_wall_clock_set_back_does_not_stall_run_once(world: World):
    """``run --once`` (drain): a retry scheduled before the wall clock went back 2 days
    is due within its budget, not after it."""
    world.slack.script_webhook(Reply(503))
    async with App(world.config(), clock=world.clock) as app:
        await app.run_cycle()
        await app.deliverer.deliver_due()
        world.clock.step(timedelta(days=-2))
        began = world.clock.monotonic()
        assert await app.deliverer.drain(60) == 0
        assert world.clock.monotonic() - began <= 60
    assert sorted(world.kinds()) == FIRST_RUN
