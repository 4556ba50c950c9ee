"""The daemon around the poll cycle: start, serve, stop.

:class:`Daemon` runs the cycle on its interval (:class:`~invoice_watch.schedule.PollLoop`,
timed on the injected clock's monotonic time, first one at start), delivery as its own
task, systemd's watchdog and the heartbeats of a cycle in flight (its signs of life:
:mod:`invoice_watch.vitals`), and the HTTP endpoint (``/healthz``, ``/livez``,
``/metrics``). Its state is one :class:`DaemonState`; :meth:`Daemon.start`
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
from typing import TYPE_CHECKING, TypeVar

from invoice_watch import sdnotify
from invoice_watch.config import HttpConfig
from invoice_watch.config.quantities import config_duration
from invoice_watch.constants import (
    ONCE_DELIVERY_SECONDS,
    ONCE_LINE_ITEMS_SECONDS,
    SHUTDOWN_SECONDS,
)
from invoice_watch.cycle import CycleResult
from invoice_watch.errors import ListenError, StateError, StateFileGoneError
from invoice_watch.http_endpoint import HttpEndpoint
from invoice_watch.schedule import PollLoop, PollSchedule
from invoice_watch.vitals import Vitals

if TYPE_CHECKING:
    from invoice_watch.app import App

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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
        self.vitals = Vitals(app, self.poll)
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
        watchdog = asyncio.create_task(self.vitals.watchdog(), name="watchdog")
        reports = None
        if app.reporter is not None and not app.dry_run:
            reports = asyncio.create_task(app.reporter.run(), name="reports")
        # Closed in reverse: the line items stage (cancelled: none starts any more), the
        # poll loop, the lease's renewals (the lease itself is
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
        if reports is not None:  # (a report being drawn is made again at the next start)
            stack.push_async_callback(_cancel, reports)
        stack.push_async_callback(app.cycles.cancel_line_items, close=True)
        self.state = DaemonState.SERVING
        self.vitals.since = app.clock.monotonic()
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
        task = self.poll.in_flight
        if task is not None and not task.done():
            log.info("stopping: no new cycle starts; finishing the cycle in flight")
        else:
            log.info("stopping: no new cycle starts (none is in flight)")
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
        heartbeat = asyncio.create_task(self.vitals.heartbeats(), name="heartbeat")
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

    def health(self) -> tuple[bool, str]:
        """The daemon's health, ``/healthz`` (:meth:`.Vitals.health`)."""
        return self.vitals.health()

    def liveness(self) -> tuple[bool, str]:
        """Whether the poll loop is alive, ``/livez`` (:meth:`.Vitals.liveness`)."""
        return self.vitals.liveness()


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
    :data:`~invoice_watch.constants.ONCE_DELIVERY_SECONDS`, while the line items stage
    the cycle started runs beside (then waited for up to
    :data:`~invoice_watch.constants.ONCE_LINE_ITEMS_SECONDS` more, cancelled by a stop:
    never part of the cycle's result).

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

    async def line_items() -> None:
        """The line items stage the cycle started: waited for, bounded; a stop or the
        bound cancels it (a later run reads what it had not)."""
        if not stop.is_set():
            done = await bounded(app.cycles.line_items_done(ONCE_LINE_ITEMS_SECONDS), None)
            if done is False:
                log.warning(
                    "line items: not read within %.0fs; a later run reads them",
                    ONCE_LINE_ITEMS_SECONDS,
                )
        await app.cycles.cancel_line_items()

    if app.dry_run:
        await line_items()
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
    await line_items()
    return OnceOutcome(
        result,
        stopped=stop.is_set(),
        failed=deliverer.totals.failed - failed_before,
        pending=pending,
        unrecorded=deliverer.unrecorded,
    )
