"""The daemon around the poll cycle: start, serve, stop.

:class:`Daemon` runs the cycle on its interval (:class:`~invoice_watch.schedule.PollLoop`,
timed on the injected clock's monotonic time, first one at start), delivery as its own
task, systemd's watchdog (:meth:`Daemon.liveness`), and the HTTP endpoint (``/healthz``,
``/livez``, ``/metrics``). Its state is one :class:`DaemonState`; :meth:`Daemon.start`
and :meth:`Daemon.stop` are idempotent, and what start opened, one exit stack closes in
reverse order within one time bound (:class:`Deadline`, :data:`~invoice_watch.
constants.SHUTDOWN_SECONDS`): no new cycle starts, the cycle in flight finishes (or
stops where it is when it cannot finish in time: the organizations it committed stay
committed), what is due is delivered, then the endpoint closes. It prints nothing and
returns no exit status: that is :mod:`invoice_watch.cli`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from invoice_watch import sdnotify
from invoice_watch.config import HttpConfig
from invoice_watch.config.quantities import config_duration
from invoice_watch.constants import ONCE_DELIVERY_SECONDS, SHUTDOWN_SECONDS
from invoice_watch.cycle import CycleResult
from invoice_watch.errors import ListenError, StateError, StateFileGoneError
from invoice_watch.health import InFlight, health, liveness, progress_limit
from invoice_watch.http_endpoint import HttpEndpoint
from invoice_watch.schedule import PollLoop, PollSchedule

if TYPE_CHECKING:
    from invoice_watch.app import App

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# How often a running cycle's progress is recorded in the state file, for `status
# --check` (Daemon._heartbeats): well under health.progress_limit (12 min by default).
HEARTBEAT_SECONDS = 30.0


class Deadline:
    """The one time bound of a stop: :data:`SHUTDOWN_SECONDS` from :meth:`start`, less
    2 s of margin, on the process's monotonic clock (real time: a stop is bounded
    whatever the injected clock does)."""

    def __init__(self) -> None:
        self._at: float | None = None

    @property
    def started(self) -> bool:
        return self._at is not None

    def start(self) -> None:
        """The stop begins now (once: later calls keep the first time)."""
        if self._at is None:
            self._at = time.monotonic() + SHUTDOWN_SECONDS - 2

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left until the deadline less ``reserve`` (kept for what comes after),
        at least 0.1."""
        assert self._at is not None, "Deadline.start() first"
        return max(0.1, self._at - reserve - time.monotonic())


class DaemonState(enum.Enum):
    """Where a :class:`Daemon` is: IDLE -> STARTING -> SERVING -> STOPPING -> STOPPED
    (a start that fails goes from STARTING to STOPPED). A daemon serves once."""

    IDLE = "idle"
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Daemon:
    """The daemon of an :class:`~invoice_watch.app.App` (whose store, Atlas client,
    deliverer and cycle runner it drives; a reload may replace them)."""

    def __init__(self, app: App) -> None:
        self.app = app
        config = app.config
        self.state = DaemonState.IDLE
        self.poll = PollLoop(
            app.clock,
            PollSchedule(config.poll.interval, config.poll.jitter, app.rng),
            self._scheduled_cycle,
            app.metrics.cycles_late,
        )
        self.endpoint = Endpoint(self)
        self._started = app.clock.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._deadline = Deadline()
        self._stop: asyncio.Event | None = None
        # An error that stops the daemon (the state file gone): serve() raises it.
        self.fatal: StateFileGoneError | None = None

    @property
    def serving(self) -> bool:
        return self.state is DaemonState.SERVING

    async def serve(self, stop: asyncio.Event) -> None:
        """Run the daemon until ``stop`` is set. Raises :class:`ListenError` (before any
        cycle) when ``http.listen`` cannot be used, and :class:`StateFileGoneError`
        (after stopping) when the state file was deleted or replaced under it."""
        await self.start(stop)
        try:
            await stop.wait()
        finally:
            await self.stop()
        if self.fatal is not None:
            raise self.fatal

    async def start(self, stop: asyncio.Event) -> None:
        """Listen, then start the poll loop, delivery and the watchdog (idempotent: once
        started, or stopped, this does nothing). ``stop``: set when a cycle finds the
        state file gone (:attr:`fatal`)."""
        if self.state is not DaemonState.IDLE:
            return
        app, stack = self.app, self._stack
        self.state, self._stop = DaemonState.STARTING, stop
        try:
            if app.config.http is not None:
                await self.endpoint.open(app.config.http)
            stack.push_async_callback(self.endpoint.close)
            if app.leadership is not None:
                await app.leadership.step()  # the first replica up leads from the start
        except BaseException:
            await self._close()
            raise
        lease = None
        if app.leadership is not None:
            lease = asyncio.create_task(app.leadership.run(), name="lease")
        poll = asyncio.create_task(self.poll.run(), name="poll")
        delivery = asyncio.create_task(app.deliverer.run(), name="deliver")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        # Closed in reverse: the poll loop, the lease's renewals (the lease itself is
        # kept until the App closes, after the last delivery pass), a reload (a parse in
        # its thread is abandoned), the cycle in flight, delivery, the watchdog, the
        # endpoint.
        stack.push_async_callback(_cancel, watchdog)
        stack.push_async_callback(self._deliver_what_is_due, delivery)
        stack.push_async_callback(self._finish_cycle_in_flight)
        stack.push_async_callback(app.reloads.cancel)
        if lease is not None:
            stack.push_async_callback(_cancel, lease)
        stack.push_async_callback(_cancel, poll)
        self.state = DaemonState.SERVING
        self._started = app.clock.monotonic()
        organizations = len(app.config.organizations)
        sdnotify.ready(f"watching {organizations} organization(s)")
        log.info(
            "watching %d organization(s) every %s",
            organizations,
            config_duration(app.config.poll.interval),
        )

    async def stop(self) -> None:
        """No new cycle starts; the one in flight finishes, what is due is delivered,
        the endpoint closes: within :class:`Deadline` (idempotent)."""
        if self.state is not DaemonState.SERVING:
            return
        sdnotify.stopping()
        log.info("stopping: no new cycle starts; finishing the cycle in flight")
        await self._close()
        log.info("stopped")

    async def _close(self) -> None:
        self.state = DaemonState.STOPPING
        self._deadline.start()
        try:
            await self._stack.aclose()
        finally:
            self.state = DaemonState.STOPPED

    async def _finish_cycle_in_flight(self) -> None:
        task = self.poll.in_flight
        if task is None or task.done():
            return
        budget = self._deadline.left(reserve=2)  # 2 s left to deliver what is due
        _, pending = await asyncio.wait({task}, timeout=budget)
        if pending:
            log.warning(
                "the cycle in flight did not finish in %.0fs: stopped; the organizations it "
                "had not committed are read by the next cycle",
                budget,
            )
            task.cancel()
            await asyncio.wait({task}, timeout=2)

    async def _deliver_what_is_due(self, delivery: asyncio.Task[None]) -> None:
        """Deliver what is due in the time left; the rest stays in the outbox."""
        self.app.deliverer.stop()
        await asyncio.wait({delivery}, timeout=self._deadline.left())
        await _cancel(delivery)

    async def _scheduled_cycle(self) -> None:
        leadership = self.app.leadership
        if leadership is not None and not leadership.leading():
            return  # a standby polls nothing
        heartbeat = asyncio.create_task(self._heartbeats(), name="heartbeat")
        try:
            await self.app.run_cycle()
        except StateFileGoneError as exc:
            log.error("%s", exc)
            self.fatal = exc
            if self._stop is not None:
                self._stop.set()
        except StateError as exc:
            log.error("cycle not recorded: %s", exc)
        except Exception:
            log.exception("cycle failed")
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _heartbeats(self) -> None:
        """While a scheduled cycle runs (this task lives as long as it does), every
        :data:`HEARTBEAT_SECONDS`, record the progress of the cycle in flight (its last
        request to Atlas starting, as :meth:`_in_flight` sees it) in the state file,
        when there is news: ``status --check`` (the Docker HEALTHCHECK, another process)
        then judges a long cycle that makes progress (429s, a slow first read: reads
        that have written nothing yet) as ``/healthz`` does, healthy, and a stuck one as
        unhealthy (AD-5). A write the state file refuses is left to the cycle's own
        writes to report."""
        app = self.app
        recorded: float | None = None
        while True:
            await app.clock.sleep(HEARTBEAT_SECONDS)
            began = self.poll.started_at
            if began is None or not app.started:
                continue
            last = app.client.last_request_at
            progress = began if last is None else max(last, began)
            if recorded is not None and progress <= recorded:
                continue
            ago = timedelta(seconds=max(0.0, app.clock.monotonic() - progress))
            try:
                await app.store.heartbeat(app.clock.now() - ago)
            except StateError as exc:
                log.debug("the running cycle's progress was not recorded: %s", exc)
                continue
            recorded = progress

    # -- health ----------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """The daemon's health (``/healthz``), from its last cycle and the one in flight
        (see :func:`health.health`), times measured on the monotonic clock (a wall-clock
        step cannot make a stale cycle look fresh)."""
        app = self.app
        leadership = app.leadership
        if leadership is not None and not leadership.leading():
            # a standby is healthy when it could take over (leader.py)
            return leadership.healthy(), leadership.describe()
        cycles = app.cycles
        last, age = cycles.last, None
        if cycles.finished_at is not None:
            age = timedelta(seconds=app.clock.monotonic() - cycles.finished_at)
        ok, why = health(
            last.finished_at if last else None,
            last.orgs_ok if last else 0,
            len(last.orgs_failed) if last else 0,
            app.config.poll.interval,
            app.clock.now(),
            age=age,
            in_flight=self._in_flight(),
            unrecorded=cycles.unrecorded,
        )
        if leadership is not None:
            why = f"{leadership.describe()}; {why}"
        return ok, why

    def liveness(self) -> tuple[bool, str]:
        """Whether the poll loop is alive (the systemd watchdog, ``/livez``; see
        :func:`health.liveness`): Atlas's answers play no part."""
        app = self.app
        if app.leadership is not None and not app.leadership.leading():
            return True, app.leadership.describe()  # a standby's loop polls nothing
        now = app.clock.monotonic()
        finished = app.cycles.finished_at
        last = finished if finished is not None else self._started
        return liveness(
            timedelta(seconds=max(0.0, now - last)), app.config.poll.interval, self._in_flight()
        )

    def _in_flight(self) -> InFlight | None:
        """The scheduled cycle running now, with its last sign of progress: a request to
        Atlas starting (on the monotonic clock), or the cycle's own start."""
        app = self.app
        began = self.poll.started_at
        if began is None or not app.started:
            return None
        now = app.clock.monotonic()
        last = app.client.last_request_at
        progress = began if last is None else max(last, began)
        atlas = app.config.atlas
        return InFlight(
            progress=timedelta(seconds=max(0.0, now - progress)),
            what="the last request to Atlas started",
            limit=progress_limit(atlas.timeout, atlas.max_backoff),
            running=timedelta(seconds=max(0.0, now - began)),
        )

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the poll loop is alive (:meth:`liveness`):
        cycles finish, or the one in flight makes progress. Not while Atlas answers: a
        revoked key or an Atlas outage would get the daemon killed every WatchdogSec
        until the unit's start limit leaves it failed, and poll_failure would never
        fire (issue 14 §1). Judged on the monotonic clock, so a wall-clock step neither
        stops the pings of a daemon that polls nor keeps pinging for one that stopped."""
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        stopped = False
        while True:
            alive, why = self.liveness()
            if alive:
                sdnotify.watchdog()
                if stopped:
                    log.info("pinging systemd's watchdog again: %s", why)
            elif not stopped:
                log.error(
                    "not pinging systemd's watchdog: %s; systemd restarts the daemon once "
                    "WatchdogSec passes",
                    why,
                )
            stopped = not alive
            await self.app.clock.sleep(interval)


class Endpoint:
    """The HTTP endpoint of a daemon (``/healthz``, ``/livez``, ``/metrics``): the one
    listening (:attr:`http`, on :attr:`port`), started, moved by a reload, closed."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.http: HttpEndpoint | None = None
        self.port: int | None = None  # bound port of /healthz and /metrics

    async def open(self, http: HttpConfig) -> None:
        self.http, self.port = await self.listen(http)

    async def listen(self, http: HttpConfig) -> tuple[HttpEndpoint, int]:
        """An endpoint listening as ``http`` says (:class:`ListenError` when it cannot)."""
        daemon = self._daemon
        app = daemon.app
        endpoint = HttpEndpoint(
            app.metrics,
            daemon.health,
            http.host,
            http.port,
            max_connections=http.max_connections,
            idle_timeout=http.idle_timeout.total_seconds(),
            monotonic=app.clock.monotonic,
            live=daemon.liveness,
        )
        port = await endpoint.start()
        log.info("serving /healthz and /metrics on %s:%d", http.host, port)
        return endpoint, port

    async def move(
        self, http: HttpConfig | None, before: HttpConfig | None
    ) -> tuple[HttpEndpoint | None, int | None]:
        """The endpoint of a reload's ``http`` section, listening (None when the section
        is gone); :meth:`swap` then stops the old one. On the address the old one
        holds, the old one stops first, and starts again if the new one then cannot
        listen (:class:`ListenError`)."""
        if http is None:
            return None, None
        old = self.http
        if old is None or before is None or before.listen != http.listen or not http.port:
            return await self.listen(http)
        await old.stop()
        try:
            return await self.listen(http)
        except ListenError:
            try:
                self.http, self.port = await self.listen(before)
            except ListenError as exc:
                self.http = self.port = None
                log.error("the HTTP endpoint is down until the next reload or restart: %s", exc)
            raise

    async def swap(self, moved: tuple[HttpEndpoint | None, int | None]) -> None:
        """Serve on the endpoint :meth:`move` made; the old one stops."""
        old, (self.http, self.port) = self.http, moved
        if old is not None and old is not self.http:
            await old.stop()

    async def close(self) -> None:
        endpoint, self.http = self.http, None
        if endpoint is not None:
            await endpoint.stop()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@dataclass(frozen=True)
class OnceOutcome:
    """What ``run --once`` did (:func:`run_once`), for the CLI to say and to turn into
    an exit status."""

    result: CycleResult | None  # None: the cycle was stopped before it ended, or none ran
    # A standby replica (PostgreSQL): another one holds the lease; nothing ran.
    standby: str | None = None
    stopped: bool = False  # a stop (SIGTERM, Ctrl-C, SIGHUP) came during the run
    dry_run: bool = False  # nothing was sent or written (no delivery figures then)
    failed: int = 0  # notifications that failed for good during the run
    pending: int = 0  # notifications still waiting in the outbox
    unrecorded: int = 0  # notifications whose outcome the state file could not record


async def run_once(
    app: App, *, baseline: bool = False, stop: asyncio.Event | None = None
) -> OnceOutcome:
    """``run --once``: one cycle, then deliver for up to
    :data:`~invoice_watch.constants.ONCE_DELIVERY_SECONDS`.

    ``stop`` (SIGTERM, Ctrl-C or SIGHUP) ends it as the daemon's stop does: the cycle
    in flight finishes or is cut short (what it committed stays committed), and what is
    due is delivered, all within one :class:`Deadline`."""
    stop = stop if stop is not None else asyncio.Event()
    deadline = Deadline()

    async def bounded(work: Awaitable[_T], reserve: float | None) -> _T | None:
        """``work``'s result, or None when it was cut short: once ``stop`` is set, it
        has until ``reserve`` seconds before the deadline (None: it ends at once)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():
            if not deadline.started:
                deadline.start()
                log.info("stopping: finishing the cycle in flight, delivering what is due")
            if reserve is not None:
                await asyncio.wait({task}, timeout=deadline.left(reserve))
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
        return task.result()

    if app.leadership is not None and not await app.leadership.step():
        return OnceOutcome(None, standby=app.leadership.describe())
    result = None
    if not stop.is_set():
        result = await bounded(app.run_cycle(baseline=baseline), reserve=2)
        if result is None:
            log.warning(
                "the cycle was stopped before it ended; the organizations it had not "
                "committed are read by the next run"
            )
    if app.dry_run:
        return OnceOutcome(result, stopped=stop.is_set(), dry_run=True)
    deliverer = app.deliverer
    failed_before = deliverer.totals.failed
    pending: int | None = None
    if not stop.is_set():
        pending = await bounded(deliverer.drain(ONCE_DELIVERY_SECONDS), None)
    if stop.is_set():  # one last pass over what is due, in the time left
        deadline.start()
        pending = await bounded(deliverer.drain(0), reserve=0)  # stop is set
        if pending is None:
            pending = (await app.store.outbox.counts()).get("pending", 0)
    assert pending is not None
    return OnceOutcome(
        result,
        stopped=stop.is_set(),
        failed=deliverer.totals.failed - failed_before,
        pending=pending,
        unrecorded=deliverer.unrecorded,
    )
