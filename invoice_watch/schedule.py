"""When poll cycles run: every ``poll.interval`` (plus up to ``poll.jitter``), timed on
the monotonic clock of the injected :class:`~invoice_watch.clock.Clock`.

A wall-clock step (an NTP fix, a VM restore) changes nothing here: no wait is ever longer
than ``interval + jitter`` (issue 12 §2). The first cycle runs at start; two never run
at once; a cycle that outlasts the interval is followed at once by the next one (never
skipped), with one warning naming its duration and the interval (issue 13 §5); a
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
import logging
import random
from collections.abc import Callable, Coroutine
from datetime import timedelta

from prometheus_client import Counter

from invoice_watch.clock import Clock

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

    def started(self, at: float) -> None:
        self._last_start = at
        self._delay = self._draw()

    def _draw(self) -> float:
        return self._rng.uniform(0.0, self.jitter) if self.jitter > 0 else 0.0


class PollLoop:
    """Runs ``cycle`` on a :class:`PollSchedule` until cancelled.

    Each cycle runs as its own task (:attr:`in_flight`): cancelling the loop stops new
    cycles without touching the one in flight, which the daemon then lets finish within
    its shutdown budget. ``cycle`` must not raise (the daemon logs a failed cycle and
    goes on).
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
        self._late = False  # the last cycle ran past the next one's start
        self.in_flight: asyncio.Task[None] | None = None

    def configure(self, interval: timedelta, jitter: timedelta) -> None:
        """A reload's poll settings: the wait in progress is measured again, from the
        last cycle's start."""
        self.schedule.configure(interval, jitter)
        self._changed.set()

    async def run(self) -> None:
        clock, schedule = self._clock, self.schedule
        while True:
            self._changed.clear()
            wait = schedule.wait(clock.monotonic())
            if wait > 0:
                await self._sleep(wait)
                continue  # due now, or the settings changed: measure again
            began = clock.monotonic()
            schedule.started(began)
            self.in_flight = asyncio.create_task(self._cycle(), name="cycle")
            try:
                # asyncio.wait leaves the cycle running if this loop is cancelled.
                await asyncio.wait({self.in_flight})
            finally:
                if self.in_flight.done():
                    self.in_flight = None
            self._check_late(began, clock.monotonic())

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
        took = ended - began
        interval = _as_configured(self.schedule.interval)
        if due is not None and ended > due:
            if self._late_cycles is not None:
                self._late_cycles.inc()
            if not self._late:
                log.warning(
                    "a poll cycle took %.1fs, longer than poll.interval (%s): the next cycle "
                    "starts now, and cycles run back to back while this lasts (counted in "
                    "invoice_watch_cycles_late_total); set a longer poll.interval, or raise "
                    "atlas.max_concurrency if Atlas answers slowly",
                    took,
                    interval,
                )
            self._late = True
        elif self._late:
            log.info(
                "poll cycles fit in poll.interval (%s) again: the last took %.1fs", interval, took
            )
            self._late = False


def _as_configured(seconds: float) -> str:
    """A duration as the config file writes it: ``90`` -> ``1m30s``, ``900`` -> ``15m``."""
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
