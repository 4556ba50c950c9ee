"""Health: whether the daemon watches, and whether it is alive, as systemd, containers
and ``status --check`` are told. Two judgments, kept apart (issue 14 §1):

- :func:`health`, healthy: the daemon watches (SPEC §8: its last cycle read at least
  one organization, and finished lately or a cycle in flight makes progress; cycles
  that run but cannot be recorded are no progress), shared by ``/healthz`` and
  ``status --check``;
- :func:`liveness`, alive: its poll loop runs (cycles finish, or the one in flight
  makes progress), whatever Atlas answers: the systemd watchdog and ``/livez``. A
  restart cannot mend a revoked key or an Atlas outage, and restarts in a loop would
  keep poll_failure from ever firing.

Pure functions of times and counts; :mod:`invoice_watch.http_endpoint` serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from invoice_watch import format as fmt
from invoice_watch.config.quantities import config_duration

# A last cycle that finished further than this ahead of the wall clock: the clock was
# set back since (an NTP fix, a VM restore), so the time says nothing of the daemon.
FUTURE_TOLERANCE = timedelta(seconds=5)
# The longest wait before a retry the Atlas client makes on its own: Retry-After is
# honoured up to this (atlas.pacing.MAX_RETRY_AFTER); atlas.max_backoff may be longer.
LONGEST_RETRY_AFTER = timedelta(seconds=300)


def cycle_limit(interval: timedelta) -> timedelta:
    """How long after the last cycle finished the daemon is still healthy without a
    cycle in flight: 2 x ``poll.interval``, at least a minute (SPEC §8)."""
    return max(2 * interval, timedelta(seconds=60))


def progress_limit(timeout: timedelta, max_backoff: timedelta) -> timedelta:
    """The longest a working cycle goes without a sign of progress (a request to Atlas
    starting): two requests' ``atlas.timeout`` (one, then the OAuth token's before the
    next), twice the longest wait before a retry (a Retry-After, or ``atlas.max_backoff``),
    and a minute. Longer, the cycle is stuck: nothing it awaits is unbounded but a bug."""
    wait = max(max_backoff, LONGEST_RETRY_AFTER)
    return 2 * timeout + 2 * wait + timedelta(minutes=1)


@dataclass(frozen=True)
class InFlight:
    """A cycle that started and has not finished: how long since its last sign of
    progress (``what``: "the last request to Atlas", "Production read"), the most that
    may pass without one (:func:`progress_limit`), and how long it has been running
    (None when unknown: ``status --check`` sees only what the state file holds)."""

    progress: timedelta
    what: str
    limit: timedelta
    running: timedelta | None = None

    @property
    def stuck(self) -> bool:
        return self.progress > self.limit

    def text(self) -> str:
        running = f" for {config_duration(self.running)}" if self.running is not None else ""
        if self.stuck:
            return (
                f"a cycle has been running{running} with no progress for "
                f"{config_duration(self.progress)} (the last: {self.what}; limit "
                f"{config_duration(self.limit)}, from atlas.timeout and atlas.max_backoff)"
            )
        return (
            f"a cycle has been running{running}, {self.what} {config_duration(self.progress)} ago"
        )


def in_flight_from_reads(
    finished: datetime | None, reads: Iterable[datetime | None], now: datetime, limit: timedelta
) -> InFlight | None:
    """A cycle in flight as another process sees it in the state file (``status
    --check``): an organization's read recorded after the last cycle finished. The
    daemon records a read that changed something, or failed, as soon as it is done;
    one that changed nothing, with the cycle's end; and while a cycle runs, its last
    sign of progress (a request to Atlas starting) every 30 s (``Vitals.heartbeats``), so
    that a long cycle that makes progress is judged as ``/healthz`` judges it."""
    latest = max((at for at in reads if at and (finished is None or at > finished)), default=None)
    if latest is None:
        return None
    return InFlight(
        progress=max(now - latest, timedelta(0)), what="an organization read", limit=limit
    )


def health(
    finished: datetime | None,
    orgs_ok: int,
    orgs_failed: int,
    interval: timedelta,
    now: datetime,
    *,
    age: timedelta | None = None,
    in_flight: InFlight | None = None,
    unrecorded: str | None = None,
) -> tuple[bool, str]:
    """Healthy while the last cycle read at least one organization and finished within
    2 x ``poll.interval`` (at least 60 s; SPEC §8), or a cycle in flight since then
    makes progress (a cycle may outlast the interval: 429s, slow answers).

    ``age``: how long ago the last cycle finished, measured on the monotonic clock: the
    daemon's own view (``/healthz``), which no wall-clock step can fool. Without it
    (``status --check``: another process, reading wall times from the state file) the
    age is ``now - finished``, and a last cycle more than :data:`FUTURE_TOLERANCE` in the
    future is unhealthy: the wall clock was set back since, and the time can no longer
    show that the daemon still polls. ``in_flight``: the cycle running now, if any.

    ``unrecorded``: why the last cycle that ended failed to be recorded (the state file
    refused it: "database is locked", a full disk; or it failed), when one did since the
    last cycle recorded. Cycles that run but are not recorded are no progress: nothing is
    evaluated, committed or delivered. A cycle in flight then does not stand in for the
    recorded one, and 2 x ``poll.interval`` after the last recorded cycle the daemon is
    unhealthy, saying why (the daemon's liveness, :func:`liveness`, stays up: a restart
    mends no locked or full disk).

    Whether Atlas answers is part of health (a daemon that reads nothing watches
    nothing), not of liveness (:func:`liveness`, the watchdog's).
    """
    if in_flight is not None and in_flight.stuck:
        return False, in_flight.text()
    failing = f"; the last cycle ended unrecorded: {unrecorded}" if unrecorded else ""
    if finished is None:
        if in_flight is not None:
            return False, f"no cycle has finished yet: {in_flight.text()}{failing}"
        return False, f"no cycle has finished yet{failing}"
    limit = cycle_limit(interval)
    if age is None:
        age = now - finished
        if age < -FUTURE_TOLERANCE:
            return False, (
                f"the last cycle finished in the future ({fmt.ago(finished, now)}): the wall "
                "clock was set back since; healthy again once a cycle finishes"
            )
    ago = f"{config_duration(max(age, timedelta(0)))} ago"
    if age > limit and (in_flight is None or unrecorded):
        return False, (
            f"the last cycle recorded finished {ago} (the limit is {config_duration(limit)}: "
            f"2 x poll.interval, at least 1m){failing}"
            if unrecorded
            else f"the last cycle finished {ago} (the limit is {config_duration(limit)}: 2 x "
            "poll.interval, at least 1m)"
        )
    if orgs_ok == 0:
        return False, f"the last cycle could read none of {orgs_failed} organization(s)"
    last = f"{orgs_ok} read, {orgs_failed} failed"
    if age > limit and in_flight is not None:
        return True, f"{in_flight.text()}; the last cycle finished {ago}: {last}"
    return True, f"last cycle {ago}: {last}"


def liveness(idle: timedelta, interval: timedelta, in_flight: InFlight | None) -> tuple[bool, str]:
    """Whether the daemon's poll loop is alive (what the systemd watchdog and
    ``/livez`` report): a cycle in flight makes progress, or the last one finished (the
    daemon started, if none has) at most :func:`cycle_limit` ago (``idle``), so the next
    one is due. Whether Atlas answers plays no part: a revoked key or an Atlas outage
    must not get the daemon restarted in a loop, which would keep poll_failure from
    ever firing."""
    if in_flight is not None:
        if in_flight.stuck:
            return False, in_flight.text()
        return True, in_flight.text()
    limit = cycle_limit(interval)
    if idle > limit:
        return False, (
            f"no cycle has run for {config_duration(idle)}, more than "
            f"{config_duration(limit)} (2 x poll.interval, at least 1m): the poll loop is stuck"
        )
    return True, f"the poll loop is alive: the last cycle ended {config_duration(idle)} ago"


HealthProbe = Callable[[], tuple[bool, str]]
