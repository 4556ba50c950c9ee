"""Time as a dependency: the daemon never calls ``datetime.now``, ``time.monotonic`` or
``asyncio.sleep`` directly, so tests drive time through :class:`FakeClock` instead of
waiting.

Two clocks, as the operating system has them: the wall clock (:meth:`Clock.now`, UTC),
which says what time it is and may jump (an NTP fix, a VM restore), and the monotonic
clock (:meth:`Clock.monotonic`), which only moves forward and times every wait. A wait is
always measured on the monotonic clock, so a wall-clock step can neither stretch it to a
day nor shrink it to nothing.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The wall-clock time, timezone-aware UTC. May step back or forward."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (its origin means nothing)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of monotonic time (cancellable)."""
        ...


class SystemClock:
    """The real clocks."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Clocks that only move when told to; ``sleep`` advances both and returns at once.

    :meth:`advance` is time passing (both clocks move); :meth:`step` is the wall clock
    being set (an NTP fix, a VM restore): only :meth:`now` moves. ``sleeps`` records
    every requested sleep, so tests can assert on backoff.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
        self._monotonic = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, delta: timedelta | float) -> None:
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        if seconds < 0:
            raise ValueError("time does not pass backwards: use step() for a wall-clock step")
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds

    def step(self, delta: timedelta | float) -> None:
        """Set the wall clock ``delta`` away (either way); monotonic time does not move."""
        self._now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)

    def set(self, when: datetime) -> None:
        """Time passes until the wall clock reads ``when`` (a step when it is earlier)."""
        delta = when - self._now
        if delta >= timedelta(0):
            self.advance(delta)
        else:
            self.step(delta)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
