"""Health and metrics: what the daemon tells systemd, containers and Prometheus.

:class:`Metrics` holds the Prometheus series in a private registry (so tests and two
daemons in one process never collide); :func:`health` is the one definition of healthy,
shared by ``/healthz``, ``status --check`` and the systemd watchdog; :class:`HttpEndpoint`
serves ``/healthz`` and ``/metrics`` inside the daemon's own event loop, with bounded
connections and read time (issue 12 §3), so that nothing a client does to it reaches the
poll cycle or delivery.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from invoice_watch import format as fmt
from invoice_watch.errors import ListenError

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


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
        self.http_refused = Counter(
            "invoice_watch_http_connections_refused",
            "Connections to /healthz and /metrics closed at once: http.max_connections were open",
            registry=r,
        )
        self.atlas_deprecations = Counter(
            "invoice_watch_atlas_deprecation_warnings",
            "Cycles in which Atlas marked an endpoint deprecated (Deprecation/Sunset headers)",
            ["endpoint"],
            registry=r,
        )
        self.atlas_sunset = Gauge(
            "invoice_watch_atlas_endpoint_sunset_timestamp_seconds",
            "When Atlas says it will remove a deprecated endpoint (Unix time; 0: no date yet)",
            ["endpoint"],
            registry=r,
        )
        # Messages for a notifier a reload (or an edit) removed or renamed (deliver.py).
        self.outbox_unrouted = Gauge(
            "invoice_watch_outbox_unrouted",
            "Pending notifications whose notifier is no longer configured (kept until max_age)",
            ["notifier"],
            registry=r,
        )
        # A full disk after a send: outcomes kept in memory until the state file takes them.
        self.outbox_unrecorded = Gauge(
            "invoice_watch_outbox_unrecorded",
            "Delivery outcomes the state file could not record yet (kept in memory)",
            registry=r,
        )
        self.outbox_write_errors = Counter(
            "invoice_watch_outbox_write_errors",
            "Writes of a delivery outcome the state file refused",
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


# What a bad client makes aiohttp log (a malformed request line, oversized headers: an
# ERROR with a traceback each) and what the connection cap logs: once per this many
# seconds at most, so a flood cannot fill the disk with logs.
LOG_EVERY_SECONDS = 60.0


class _Throttle(logging.Filter):
    """Lets one record through per :data:`LOG_EVERY_SECONDS`, without its traceback."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        super().__init__()
        self._monotonic = monotonic
        self._last: float | None = None

    def ready(self) -> bool:
        """True at most once per :data:`LOG_EVERY_SECONDS`."""
        now = self._monotonic()
        if self._last is not None and now - self._last < LOG_EVERY_SECONDS:
            return False
        self._last = now
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.ready():
            return False
        record.exc_info, record.exc_text = None, None
        record.msg = f"{record.msg} (HTTP endpoint; more of these are not logged for a minute)"
        return True


class HttpEndpoint:
    """``/healthz`` and ``/metrics`` on ``host:port`` (``http.listen``), bounded:

    - at most ``max_connections`` connections at once: beyond, a new connection is
      closed as soon as it is accepted (so a flood holds at most that many file
      descriptors, and never those the Atlas client, Slack or SMTP need);
    - a connection that has not completed a request within ``idle_timeout`` of its start
      or of its last answer is closed (the slowloris bound: aiohttp's ``keepalive_timeout``
      runs from the connection's start too), and header lines, fields and counts are
      capped (a 400 at once);
    - what a flood makes the server log is throttled to one line a minute.

    It shares nothing with the poll cycle or delivery but the event loop; its handlers
    only read the last cycle's result and the metrics. LIBRARIES.md "aiohttp 3.14.5 ...
    server side" has the measurements behind each bound.
    """

    def __init__(
        self,
        metrics: Metrics,
        probe: HealthProbe,
        host: str,
        port: int,
        *,
        max_connections: int,
        idle_timeout: float,
        monotonic: Callable[[], float],
    ) -> None:
        self.host, self.port = host, port
        self._metrics = metrics
        self._probe = probe
        self._cap = max_connections
        self._idle_timeout = idle_timeout
        self._throttle = _Throttle(monotonic)
        self._refusals = _Throttle(monotonic)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port. Raises :class:`ListenError` (one line naming
        ``http.listen``) when the address cannot be used."""
        from aiohttp import web

        runner = web.AppRunner(
            make_http_app(self._metrics, self._probe),
            access_log=None,
            keepalive_timeout=self._idle_timeout,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=32,
        )
        await runner.setup()
        handler = runner.server
        assert handler is not None
        refused = self._metrics.http_refused

        class Refuse(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                transport.abort()

        def protocol() -> asyncio.BaseProtocol:
            if len(handler.connections) < self._cap:
                return handler()
            refused.inc()
            if self._refusals.ready():
                log.warning(
                    "http.listen: %d connections open (http.max_connections): new ones are "
                    "closed until some end (idle ones are closed after http.idle_timeout); "
                    "the poll cycle and delivery are not affected",
                    self._cap,
                )
            return Refuse()

        logging.getLogger("aiohttp.server").addFilter(self._throttle)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                protocol, self.host, self.port
            )
        except OSError as exc:
            logging.getLogger("aiohttp.server").removeFilter(self._throttle)
            await runner.cleanup()
            raise listen_error(self.host, self.port, exc) from None
        self._runner = runner
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, runner = self._server, self._runner
        self._server = self._runner = None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            await server.wait_closed()
        logging.getLogger("aiohttp.server").removeFilter(self._throttle)


def listen_error(host: str, port: int, exc: OSError) -> ListenError:
    """``http.listen`` cannot be used: one line saying why and what to do."""
    where = f"http.listen: cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"{where}: the port is already in use by another program (9100, for example, "
            "is node_exporter's); choose a free port in http.listen, or stop that program"
        )
    if exc.errno == errno.EACCES:
        return ListenError(
            f"{where}: permission denied (ports below 1024 need privileges); choose a "
            "port from 1024 up in http.listen"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(
            f"{where}: {host} is not an address of this machine; use 127.0.0.1, 0.0.0.0 "
            "or one of its addresses in http.listen"
        )
    return ListenError(f"{where}: {exc.strerror or exc}; check http.listen")
