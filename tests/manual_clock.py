"""A FakeClock for the daemon: its ``sleep`` waits until the test moves time past the
sleep's end (:meth:`ManualClock.advance`, ``set``), instead of moving time itself.

The daemon sleeps in several tasks at once (the poll schedule, delivery, the watchdog):
with :class:`~invoice_watch.clock.FakeClock` each sleep would move time for all of them
and the poll loop would run cycle after cycle at once. Here the test decides when time
passes, and :meth:`ManualClock.sleeping` tells it when a task waits for time to pass.
``step`` moves the wall clock alone, and wakes no one (as an NTP fix).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from invoice_watch.clock import FakeClock


class ManualClock(FakeClock):
    def __init__(self, start: datetime | None = None) -> None:
        super().__init__(start)
        self._sleepers: list[_Sleeper] = []
        self._changed: asyncio.Event | None = None

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        end = self.monotonic() + max(0.0, seconds)
        if end <= self.monotonic():
            await asyncio.sleep(0)
            return
        task = asyncio.current_task()
        assert task is not None
        sleeper = _Sleeper(end, asyncio.get_running_loop().create_future(), task)
        self._sleepers.append(sleeper)
        self._signal()
        try:
            await sleeper.future
        finally:
            self._sleepers.remove(sleeper)
            self._signal()

    def advance(self, delta: timedelta | float) -> None:
        super().advance(delta)
        for sleeper in self._sleepers:
            if sleeper.end <= self.monotonic() and not sleeper.future.done():
                sleeper.future.set_result(None)

    def waits(self) -> list[float]:
        """Seconds left of each sleep in progress, shortest first (not those that are
        over, or cancelled, but whose task has not run since)."""
        return sorted(s.end - self.monotonic() for s in self._sleepers if s.waiting)

    def waits_of(self, task_name: str) -> list[float]:
        """:meth:`waits` of the tasks named ``task_name`` alone (several tasks may sleep
        as long: the release of held messages and a cycle's heartbeat both wait 30 s)."""
        return sorted(
            s.end - self.monotonic()
            for s in self._sleepers
            if s.waiting and s.task.get_name() == task_name
        )

    async def sleeping(self, count: int = 1) -> list[float]:
        """Let the other tasks run until at least ``count`` of them sleep and every sleep
        that is over has returned (at most 10 s of real time: a test that waits longer
        has failed); returns :meth:`waits`."""
        async with asyncio.timeout(10):
            await asyncio.sleep(0)
            while len(self.waits()) < count or not all(s.waiting for s in self._sleepers):
                if self._changed is None:
                    self._changed = asyncio.Event()
                self._changed.clear()
                await self._changed.wait()
        return self.waits()

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()


@dataclass(frozen=True)
class _Sleeper:
    end: float
    future: asyncio.Future[None]
    task: asyncio.Task[object]

    @property
    def waiting(self) -> bool:
        """Still sleeping: not woken, and its task not being cancelled."""
        return not self.future.done() and not self.task.cancelling()
