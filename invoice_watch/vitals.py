"""The daemon's signs of life, each judged on the monotonic clock (a wall-clock step
cannot make a stale cycle look fresh, nor a live one look stale):

- its health, ``/healthz`` (:meth:`Vitals.health`, judged by :func:`health.health`);
- whether its poll loop is alive, ``/livez`` and systemd's watchdog
  (:meth:`Vitals.liveness`, :meth:`Vitals.watchdog`);
- the progress of the cycle in flight, recorded in the state file every
  :data:`HEARTBEAT_SECONDS` for ``status --check`` (:meth:`Vitals.heartbeats`).

The daemon (:mod:`invoice_watch.daemon`) runs the watchdog and the heartbeats as tasks.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from invoice_watch import sdnotify
from invoice_watch.errors import StateError
from invoice_watch.health import InFlight, health, liveness, progress_limit

if TYPE_CHECKING:
    from invoice_watch.app import App
    from invoice_watch.schedule import PollLoop

log = logging.getLogger(__name__)

# How often a running cycle's progress is recorded in the state file, for `status
# --check` (Vitals.heartbeats): well under health.progress_limit (12 min by default).
HEARTBEAT_SECONDS = 30.0


class Vitals:
    """The signs of life of the daemon of ``app`` whose poll loop is ``poll``; ``since``
    is when it started serving (monotonic seconds: the daemon sets it)."""

    def __init__(self, app: App, poll: PollLoop) -> None:
        self.app = app
        self._poll = poll
        self.since = app.clock.monotonic()

    def _progress(self) -> tuple[float, float] | None:
        """When the scheduled cycle running now began, and its last sign of progress: a
        request to Atlas starting, or its own start (monotonic seconds); None when no
        cycle runs."""
        began = self._poll.started_at
        if began is None or not self.app.started:
            return None
        last = self.app.client.last_request_at
        return began, began if last is None else max(last, began)

    async def heartbeats(self) -> None:
        """While a scheduled cycle runs (this task lives as long as it does), every
        :data:`HEARTBEAT_SECONDS`, record the progress of the cycle in flight (its last
        request to Atlas starting, as :meth:`_progress` sees it) in the state file,
        when there is news: ``status --check`` (the Docker HEALTHCHECK, another process)
        then judges a long cycle that makes progress (429s, a slow first read: reads
        that have written nothing yet) as ``/healthz`` does, healthy, and a stuck one as
        unhealthy (AD-5). A write the state file refuses is left to the cycle's own
        writes to report."""
        app = self.app
        recorded: float | None = None
        while True:
            await app.clock.sleep(HEARTBEAT_SECONDS)
            running = self._progress()
            if running is None:
                continue
            _, progress = running
            if recorded is not None and progress <= recorded:
                continue
            ago = timedelta(seconds=max(0.0, app.clock.monotonic() - progress))
            try:
                await app.store.heartbeat(app.clock.now() - ago)
            except StateError as exc:
                log.debug("the running cycle's progress was not recorded: %s", exc)
                continue
            recorded = progress

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
        last = finished if finished is not None else self.since
        return liveness(
            timedelta(seconds=max(0.0, now - last)), app.config.poll.interval, self._in_flight()
        )

    def _in_flight(self) -> InFlight | None:
        """The scheduled cycle running now, with its last sign of progress: a request to
        Atlas starting (on the monotonic clock), or the cycle's own start."""
        app = self.app
        running = self._progress()
        if running is None:
            return None
        began, progress = running
        now = app.clock.monotonic()
        atlas = app.config.atlas
        return InFlight(
            progress=timedelta(seconds=max(0.0, now - progress)),
            what="the last request to Atlas started",
            limit=progress_limit(atlas.timeout, atlas.max_backoff),
            running=timedelta(seconds=max(0.0, now - began)),
        )

    async def watchdog(self) -> None:
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
