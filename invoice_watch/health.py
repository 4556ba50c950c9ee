"""Health and metrics: what the daemon tells systemd, containers and Prometheus.

:class:`Metrics` holds the Prometheus series in a private registry (so tests and two
daemons in one process never collide); :func:`health` is the one definition of healthy,
shared by ``/healthz``, ``status --check`` and the systemd watchdog; :func:`serve_http`
serves ``/healthz`` and ``/metrics`` inside the daemon's own event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from invoice_watch import format as fmt

if TYPE_CHECKING:
    from aiohttp import web


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter("invoice_watch_cycles", "Poll cycles run", ["outcome"], registry=r)
        self.cycle_seconds = Histogram(
            "invoice_watch_cycle_duration_seconds",
            "Wall time of a poll cycle",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.orgs_failing = Gauge(
            "invoice_watch_orgs_failing", "Organizations whose last read failed", registry=r
        )
        self.invoices_seen = Gauge(
            "invoice_watch_invoices_seen", "Invoices in the snapshot", registry=r
        )
        self.alerts_firing = Gauge(
            "invoice_watch_alerts_firing", "Alerts firing now", ["rule"], registry=r
        )
        self.notifications = Counter(
            "invoice_watch_notifications",
            "Delivery attempts by outcome",
            ["notifier", "outcome"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "invoice_watch_outbox_depth", "Notifications waiting or failed", ["state"], registry=r
        )
        self.cycles_late = Counter(
            "invoice_watch_cycles_late",
            "Poll cycles that ran past the start of the next one (longer than poll.interval)",
            registry=r,
        )
        self.last_cycle_finished = Gauge(
            "invoice_watch_last_cycle_timestamp_seconds",
            "When the last cycle finished (Unix time)",
            registry=r,
        )


# A last cycle that finished further than this ahead of the wall clock: the clock was
# set back since (an NTP fix, a VM restore), so the time says nothing of the daemon.
FUTURE_TOLERANCE = timedelta(seconds=5)


def health(
    finished: datetime | None,
    orgs_ok: int,
    orgs_failed: int,
    interval: timedelta,
    now: datetime,
    *,
    age: timedelta | None = None,
) -> tuple[bool, str]:
    """Healthy while the last cycle finished within 2 x ``poll.interval`` (at least 60 s)
    and read at least one organization (SPEC §8).

    ``age``: how long ago the last cycle finished, measured on the monotonic clock: the
    daemon's own view (``/healthz``, the watchdog), which no wall-clock step can fool.
    Without it (``status --check``: another process, reading wall times from the state
    file) the age is ``now - finished``, and a last cycle more than
    :data:`FUTURE_TOLERANCE` in the future is unhealthy: the wall clock was set back since,
    and the time can no longer show that the daemon still polls.
    """
    if finished is None:
        return False, "no cycle has finished yet"
    limit = max(2 * interval, timedelta(seconds=60))
    if age is None:
        age = now - finished
        if age < -FUTURE_TOLERANCE:
            return False, (
                f"the last cycle finished in the future ({fmt.ago(finished, now)}): the wall "
                "clock was set back since; healthy again once a cycle finishes"
            )
    ago = f"{fmt.duration(max(age, timedelta(0)))} ago"
    if age > limit:
        return False, f"last cycle finished {ago} (limit {fmt.duration(limit)})"
    if orgs_ok == 0:
        return False, f"the last cycle could read none of {orgs_failed} organization(s)"
    return True, f"last cycle {ago}: {orgs_ok} read, {orgs_failed} failed"


HealthProbe = Callable[[], tuple[bool, str]]


def make_http_app(metrics: Metrics, probe: HealthProbe) -> web.Application:
    # Imported here: a daemon without `http:` (and `run --once`) never loads the server
    # side of aiohttp (2 MB).
    from aiohttp import web
    from prometheus_client.aiohttp import make_aiohttp_handler

    async def healthz(request: web.Request) -> web.Response:
        ok, reason = probe()
        return web.Response(
            status=200 if ok else 503,
            text=json.dumps({"status": "ok" if ok else "unhealthy", "reason": reason}),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    return app


async def serve_http(
    metrics: Metrics, probe: HealthProbe, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Start the endpoint; returns the runner (to clean up) and the bound port."""
    from aiohttp import web

    runner = web.AppRunner(make_http_app(metrics, probe), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound: int = runner.addresses[0][1]
    return runner, bound
