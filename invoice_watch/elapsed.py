"""How long ago a stored wall time was, whichever way the wall clock steps.

The state file keeps wall times (an organization failing since, an alert last notified,
an amount observed at): a duration measured as ``now - stored`` on the wall clock would
be two days short after the clock is set back two days (an NTP fix, a VM restore), and
``poll_failure`` or a ``repeat`` reminder would wait two days more. :class:`Elapsed`
measures each such duration on the monotonic clock from the moment this process first
knew the time: a time it made itself (:meth:`Elapsed.stamp`) is 0 s old then; a time
read from the state file is as old as the wall clock says when first asked, and a time
in the future counts as now (logged once). From then on only monotonic time counts.

Such a clamped age is a lower bound, not a measure: the rules may wait on it (a new
FIRING comes late) but never decide from it that a condition stopped holding
(:meth:`Elapsed.clamped`; a firing ``poll_failure`` does not resolve as "failing for 0s",
an ``amount_increase`` neither fires nor resolves on growth it cannot place in its
window). :meth:`Elapsed.behind` says the wall clock reads earlier than a stored time,
for a rule that must read the wall clock itself (``forecast``, against Atlas's period).

A second user with a memory of its own (the deliverer keeps a message's age for as long
as it is pending, longer than two cycles) learns a time from the cycle's
(``origin``): a time the cycle stamped is then exact there too.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from invoice_watch.clock import Clock

log = logging.getLogger(__name__)


class Elapsed:
    """Ages of wall times, measured on ``clock``'s monotonic clock (see the module).

    Remembers each time it was asked about or stamped, until :meth:`sweep` finds it
    unused for two sweeps (the cycle calls it once per cycle): bounded by what two
    cycles use. A time it does not know is asked of ``origin`` first, when given."""

    def __init__(self, clock: Clock, *, origin: Elapsed | None = None) -> None:
        self._clock = clock
        self._origin = origin
        # wall time -> (its age when first known, in seconds; monotonic then; last sweep used)
        self._known: dict[datetime, tuple[float, float, int]] = {}
        self._sweeps = 0
        self._warned = False
        self._clamped: set[datetime] = set()  # stored times found in the future
        self._latest_future: datetime | None = None  # the latest of them

    def __call__(self, when: datetime) -> timedelta:
        """:meth:`age`: an Elapsed is an :data:`~invoice_watch.rules.Age`."""
        return self.age(when)

    def clamped(self, when: datetime) -> bool:
        """Whether ``when`` was in the future when first asked about (a restart with the
        wall clock set back): its :meth:`age` counts from then, a lower bound only."""
        if when in self._clamped:
            return True
        return self._origin is not None and self._origin.clamped(when)

    def behind(self) -> bool:
        """Whether the wall clock reads earlier than a stored time found in the future
        (until it catches up): what it says of durations is then not to be trusted."""
        latest = self._latest_future
        if latest is None and self._origin is not None:
            return self._origin.behind()
        return latest is not None and self._clock.now() < latest

    def stamp(self) -> datetime:
        """The wall-clock time now, known from now on to be 0 s old at this monotonic
        instant: what the caller stores with it ages on the monotonic clock."""
        now = self._clock.now()
        self._known[now] = (0.0, self._clock.monotonic(), self._sweeps)
        return now

    def age(self, when: datetime) -> timedelta:
        """How long ago ``when`` was (never negative)."""
        monotonic = self._clock.monotonic()
        known = self._known.get(when)
        if known is None and self._origin is not None:
            known = (self._origin.age(when).total_seconds(), monotonic, self._sweeps)
        if known is None:
            seconds = (self._clock.now() - when).total_seconds()
            if seconds < 0:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "the wall clock reads %s, earlier than %s found in the state file "
                        "(was the clock set back?): durations from such times count from "
                        "now",
                        self._clock.now().isoformat(timespec="seconds"),
                        when.isoformat(timespec="seconds"),
                    )
                seconds = 0.0
                self._clamped.add(when)
                if self._latest_future is None or when > self._latest_future:
                    self._latest_future = when
            known = (seconds, monotonic, self._sweeps)
        self._known[when] = (known[0], known[1], self._sweeps)
        return timedelta(seconds=known[0] + max(0.0, monotonic - known[1]))

    def sweep(self) -> None:
        """Forget the times not stamped or asked about since the sweep before last."""
        self._sweeps += 1
        oldest = self._sweeps - 2
        self._known = {when: known for when, known in self._known.items() if known[2] >= oldest}
        self._clamped &= self._known.keys()
