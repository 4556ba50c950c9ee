"""When poll cycles run: every ``poll.interval`` (plus up to ``poll.jitter``), timed on
the monotonic clock of the injected :class:`~invoice_watch.clock.Clock`.

A wall-clock step (an NTP fix, a VM restore) changes nothing here: no wait is ever longer
than ``interval + jitter`` (issue 12 §2). The first cycle runs at start; two never run
at once; a cycle that outlasts the interval is followed at once by the next one (never
skipped), with one warning when it runs past the next one's start, while it runs (issue
13 §5, issue 13 §4), and a line naming its duration when it ends; a
reload's new interval counts from the last cycle's start (a SIGHUP never postpones a
cycle).

APScheduler 3, used before, computes its waits from ``datetime.now()`` (``next_run_time``
minus the wall clock, then ``loop.call_later``): a clock set back two days armed a
two-day wait, it cannot be driven by a FakeClock, and its reschedule on reload restarted
the interval from the moment of the SIGHUP. An interval on the monotonic clock is this
module's few lines.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Coroutine
from datetime import timedelta

from prometheus_client import Counter

from invoice_watch.clock import Clock
from invoice_watch.config.quantities import config_duration

log = logging.getLogger(__name__)


class PollSchedule:
    """The start of the next cycle, in seconds on the monotonic clock. Pure: times in,
    times out.

    Each cycle is due ``interval`` after the previous one started, plus a random delay
    of up to ``jitter`` drawn when that one started; the first is due at once.
    """

    def __init__(self, interval: timedelta, jitter: timedelta, rng: random.Random) -> None:
        self._rng = rng
        self.interval = self.jitter = 0.0
        self._last_start: float | None = None
        self._delay = 0.0
        self.configure(interval, jitter)

    def configure(self, interval: timedelta, jitter: timedelta) -> None:
        """New settings (a reload); they count from the last cycle's start."""
        self.interval = interval.total_seconds()
        self.jitter = jitter.total_seconds()
        if self._delay > self.jitter:
            self._delay = self._draw()

    def due(self) -> float | None:
        """When the next cycle is due; None: at once (no cycle has started yet)."""
        if self._last_start is None:
            return None
        return self._last_start + self.interval + self._delay

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the next cycle is due: 0 when it is, and never
        more than ``interval + jitter`` (``now`` is never before the last start)."""
        due = self.due()
        if due is None:
            return 0.0
        return min(max(0.0, due - now), self.interval + self.jitter)

    def at_once(self) -> None:
        """The next cycle is due at once (a replica that has just taken the lease)."""
        self._last_start = None

    def started(self, at: float) -> None:
        self._last_start = at
        self._delay = self._draw()

    def _draw(self) -> float:
        return self._rng.uniform(0.0, self.jitter) if self.jitter > 0 else 0.0


class PollLoop:
    """Runs ``cycle`` on a :class:`PollSchedule` until cancelled.

    Each cycle runs as its own task (:attr:`in_flight`, started at :attr:`started_at`
    on the monotonic clock): cancelling the loop stops new cycles without touching the
    one in flight, which the daemon then lets finish within its shutdown budget.
    ``cycle`` must not raise (the daemon logs a failed cycle and goes on). A cycle
    still running when the next one is due is warned about then, once while cycles run
    late (not only when it ends: it may run for hours).
    """

    def __init__(
        self,
        clock: Clock,
        schedule: PollSchedule,
        cycle: Callable[[], Coroutine[object, object, None]],
        late_cycles: Counter | None = None,
    ) -> None:
        self._clock = clock
        self.schedule = schedule
        self._cycle = cycle
        self._late_cycles = late_cycles
        self._changed = asyncio.Event()
        self._late = False  # cycles run late: warned about
        self._warned_during = False  # ... during the cycle in flight
        self._stopped = False  # run() has ended (cancelled: the daemon stops)
        self.in_flight: asyncio.Task[None] | None = None
        self.started_at: float | None = None  # monotonic start of the cycle in flight

    def configure(self, interval: timedelta, jitter: timedelta) -> None:
        """A reload's poll settings: the wait in progress is measured again, from the
        last cycle's start."""
        self.schedule.configure(interval, jitter)
        self._changed.set()

    def run_now(self) -> None:
        """Start the next cycle at once (after the one in flight, if any)."""
        self.schedule.at_once()
        self._changed.set()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._stopped = True  # no next cycle starts: the one in flight is not late

    async def _run(self) -> None:
        clock, schedule = self._clock, self.schedule
        while True:
            self._changed.clear()
            wait = schedule.wait(clock.monotonic())
            if wait > 0:
                # Also while a cycle runs: the next one is due on time, whatever it does.
                await self._sleep(wait)
                continue  # due now, or the settings changed: measure again
            cycle = self.in_flight
            if cycle is not None:  # due, and the last one still runs
                self._warn_late()
                # asyncio.wait leaves the cycle running if this loop is cancelled.
                await asyncio.wait({cycle})
                continue  # _ended has run: its done callback was added first
            began = clock.monotonic()
            schedule.started(began)
            self.started_at = began
            self.in_flight = asyncio.create_task(self._cycle(), name="cycle")
            self.in_flight.add_done_callback(functools.partial(self._ended, began))

    def _ended(self, began: float, task: asyncio.Task[None]) -> None:
        """The cycle in flight ended (its task's done callback)."""
        self.in_flight = self.started_at = None
        if task.cancelled() or self._stopped:
            return  # a stop: no next cycle starts, so this one is not late
        self._check_late(began, self._clock.monotonic())

    def _warn_late(self) -> None:
        if self._late:
            return
        self._late = self._warned_during = True
        log.warning(
            "a poll cycle is still running at the start of the next one (poll.interval "
            "%s): the next cycle starts as soon as it ends, and cycles run back to back "
            "while this lasts (counted in invoice_watch_cycles_late_total); set a longer "
            "poll.interval, or raise atlas.max_concurrency if Atlas answers slowly",
            config_duration(self.schedule.interval),
        )

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` on the clock, or until :meth:`configure` is called."""
        sleep = asyncio.ensure_future(self._clock.sleep(seconds))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({sleep, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleep, changed):
                task.cancel()
            await asyncio.gather(sleep, changed, return_exceptions=True)

    def _check_late(self, began: float, ended: float) -> None:
        due = self.schedule.due()
        seconds = ended - began
        took = f"{seconds:.1f}s" if seconds < 60 else config_duration(seconds)
        interval = config_duration(self.schedule.interval)
        if due is not None and ended > due:
            if self._late_cycles is not None:
                self._late_cycles.inc()
            if not self._late:  # the wait for it missed the due time (a reload?)
                self._warn_late()
            if self._warned_during:
                log.info("the late poll cycle took %s (poll.interval %s)", took, interval)
        elif self._late:
            log.info(
                "poll cycles fit in poll.interval (%s) again: the last took %s", interval, took
            )
            self._late = False
        self._warned_during = False
