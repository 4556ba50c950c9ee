"""Health and metrics: what the daemon tells systemd, containers and Prometheus.

:class:`Metrics` holds the Prometheus series in a private registry (so tests and two
daemons in one process never collide). Two judgments, kept apart (issue 14 §1):

- :func:`health`, healthy: the daemon watches (SPEC §8: its last cycle read at least
  one organization, and finished lately or a cycle in flight makes progress), shared
  by ``/healthz`` and ``status --check``;
- :func:`liveness`, alive: its poll loop runs (cycles finish, or the one in flight
  makes progress), whatever Atlas answers: the systemd watchdog and ``/livez``. A
  restart cannot mend a revoked key or an Atlas outage, and restarts in a loop would
  keep poll_failure from ever firing.

:class:`HttpEndpoint` serves ``/healthz``, ``/livez`` and ``/metrics`` inside the
daemon's own event loop, with bounded connections, read and write time (issue 12 §3), so
that nothing a client does to it reaches the poll cycle or delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from invoice_watch import format as fmt
from invoice_watch.config.quantities import config_duration
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
        self.leader = Gauge(
            "invoice_watch_leader",
            "1 while this replica holds the lease (PostgreSQL state, ha), else 0",
            registry=r,
        )
        self.lease_transitions = Counter(
            "invoice_watch_lease_transitions",
            "Times this replica became the leader or a standby",
            ["to"],
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
        self.http_stalled = Counter(
            "invoice_watch_http_connections_stalled",
            "Connections to /healthz and /metrics closed because the client did not read "
            "its answers for http.idle_timeout",
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
    one that changed nothing, with the cycle's end."""
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

    Whether Atlas answers is part of health (a daemon that reads nothing watches
    nothing), not of liveness (:func:`liveness`, the watchdog's).
    """
    if in_flight is not None and in_flight.stuck:
        return False, in_flight.text()
    if finished is None:
        if in_flight is not None:
            return False, f"no cycle has finished yet: {in_flight.text()}"
        return False, "no cycle has finished yet"
    limit = cycle_limit(interval)
    if age is None:
        age = now - finished
        if age < -FUTURE_TOLERANCE:
            return False, (
                f"the last cycle finished in the future ({fmt.ago(finished, now)}): the wall "
                "clock was set back since; healthy again once a cycle finishes"
            )
    ago = f"{config_duration(max(age, timedelta(0)))} ago"
    if age > limit and in_flight is None:
        return False, (
            f"the last cycle finished {ago} (the limit is {config_duration(limit)}: 2 x "
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


def make_http_app(metrics: Metrics, probe: HealthProbe, live: HealthProbe) -> web.Application:
    """``/healthz`` (``probe``: :func:`health`, SPEC §8), ``/livez`` (``live``:
    :func:`liveness`, for a restart policy such as a Kubernetes liveness probe) and
    ``/metrics``."""
    # Imported here: a daemon without `http:` (and `run --once`) never loads the server
    # side of aiohttp (2 MB).
    from aiohttp import web
    from prometheus_client.aiohttp import make_aiohttp_handler

    def answer(check: HealthProbe) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            ok, reason = check()
            return web.Response(
                status=200 if ok else 503,
                text=json.dumps({"status": "ok" if ok else "unhealthy", "reason": reason}),
                content_type="application/json",
            )

        return handler

    app = web.Application()
    app.router.add_get("/healthz", answer(probe))
    app.router.add_get("/livez", answer(live))
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    return app


# What a bad client makes aiohttp log (a malformed request line, oversized headers: an
# ERROR with a traceback each) and what the connection cap logs: once per this many
# seconds at most, so a flood cannot fill the disk with logs.
LOG_EVERY_SECONDS = 60.0
# How often the endpoint looks for connections whose client does not read (at most).
STALL_CHECK_SECONDS = 1.0


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


class _AcceptThrottle(_Throttle):
    """:class:`_Throttle` for asyncio's "socket.accept() out of system resource" (the
    open files limit reached: logged with a traceback at each retry, every second);
    other asyncio records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        return super().filter(record)


# The listen queue, and so the connections asyncio accepts in one go (up to ``backlog``
# at each readiness) before any is counted, or refused and closed: a burst of new
# connections holds up to about three times this many descriptors for a moment.
ACCEPT_BACKLOG = 32
# File descriptors kept for everything but the HTTP endpoint's held connections: the
# state file (3 with WAL), Atlas connections (up to atlas.max_concurrency, 64), Slack and
# SMTP connections, a reload's files, the log and the event loop's own (128), and a
# burst of connections being accepted.
FD_RESERVE = 128 + 3 * ACCEPT_BACKLOG


def open_fds() -> int:
    """File descriptors this process has open now (0 when it cannot tell)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(folder)) - 1)  # less listdir's own
        except OSError:
            continue
    return 0


def fd_limits() -> tuple[int, int]:
    """RLIMIT_NOFILE: (soft, hard), "unlimited" as a large number."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    big = 1 << 30
    return (big if soft == resource.RLIM_INFINITY else soft), (
        big if hard == resource.RLIM_INFINITY else hard
    )


def connection_cap(requested: int) -> int:
    """``http.max_connections`` as this process can hold it: below its open files limit
    (RLIMIT_NOFILE), less the descriptors open now and :data:`FD_RESERVE`. The soft
    limit is raised toward the hard one first when it is lower than needed (systemd's
    default soft limit is 1024, for programs that use select(); asyncio uses epoll).
    Logs what it did."""
    soft, hard = fd_limits()
    in_use = open_fds()
    needed = requested + in_use + FD_RESERVE
    if needed > soft and hard > soft:
        raised = min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit (RLIMIT_NOFILE) to %d: %s", raised, exc)
        else:
            log.info(
                "raised the open files limit (RLIMIT_NOFILE) from %d to %d for "
                "http.max_connections %d",
                soft,
                raised,
                requested,
            )
            soft = raised
    cap = max(1, min(requested, soft - in_use - FD_RESERVE))
    if cap < requested:
        log.warning(
            "http.max_connections %d is more than this process can hold: its open files "
            "limit (RLIMIT_NOFILE) is %d, %d are open and %d are kept for Atlas, the "
            "notifiers, the state file and connections being accepted, so at most %d "
            "connections are held (beyond, new ones are closed at once); raise "
            "LimitNOFILE= in the systemd unit (or `ulimit -n`), or lower "
            "http.max_connections",
            requested,
            soft,
            in_use,
            FD_RESERVE,
            cap,
        )
    return cap


def _reset(transport: asyncio.Transport) -> None:
    """Close a connection at once with a reset (linger 0): its unsent answers are
    dropped, where a plain close would leave the kernel holding them for a client that
    never reads (an orphaned socket, minutes)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class HttpEndpoint:
    """``/healthz``, ``/livez`` and ``/metrics`` on ``host:port`` (``http.listen``),
    bounded:

    - at most ``max_connections`` connections at once (and fewer when the open files
      limit is lower, :func:`connection_cap`): beyond, a new connection is closed as
      soon as it is accepted (so a flood holds at most that many file descriptors, and
      never those the Atlas client, Slack or SMTP need);
    - a connection that has not completed a request within ``idle_timeout`` of its start
      or of its last answer is closed (the slowloris bound: aiohttp's ``keepalive_timeout``
      runs from the connection's start too), and header lines, fields and counts are
      capped (a 400 at once);
    - a connection whose client does not read its answers (the answers wait unsent,
      the server blocked writing) for ``idle_timeout`` is closed: aiohttp's own timer is
      off while a handler writes, so pipelined requests that are never read would hold
      the connection forever;
    - what a flood makes the server log is throttled to one line a minute.

    It shares nothing with the poll cycle or delivery but the event loop; its handlers
    only read the last cycle's result and the metrics. LIBRARIES.md "aiohttp 3.14.5 ...
    server side" has the measurements behind each bound. Times are measured on
    ``monotonic`` (the daemon's clock) and checked every :data:`STALL_CHECK_SECONDS`.
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
        live: HealthProbe | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._metrics = metrics
        self._probe = probe
        self._live = live or probe
        self._requested = max_connections
        self._cap = max_connections
        self._idle_timeout = idle_timeout
        self._monotonic = monotonic
        self._throttle = _Throttle(monotonic)
        self._accept_throttle = _AcceptThrottle(monotonic)
        self._refusals = _Throttle(monotonic)
        self._stalls = _Throttle(monotonic)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self._blocked: dict[asyncio.BaseProtocol, float] = {}  # writing since (monotonic)

    @property
    def max_connections(self) -> int:
        """The connections held at most (``http.max_connections``, or fewer)."""
        return self._cap

    async def start(self) -> int:
        """Listen; returns the bound port. Raises :class:`ListenError` (one line naming
        ``http.listen``) when the address cannot be used."""
        from aiohttp import web

        self._cap = connection_cap(self._requested)
        runner = web.AppRunner(
            make_http_app(self._metrics, self._probe, self._live),
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

        loop = asyncio.get_running_loop()
        # Protocols handed to asyncio whose connection_made has not run yet: asyncio
        # accepts a burst of connections before any is counted in handler.connections.
        starting: set[asyncio.BaseProtocol] = set()

        def protocol() -> asyncio.BaseProtocol:
            if len(handler.connections) + len(starting) < self._cap:
                made = handler()
                starting.add(made)
                # connection_made runs in the loop's next round (the transport schedules
                # it as it is built): forget the protocol the round after.
                loop.call_soon(loop.call_soon, starting.discard, made)
                return made
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
        logging.getLogger("asyncio").addFilter(self._accept_throttle)
        try:
            self._server = await loop.create_server(
                protocol, self.host, self.port, backlog=ACCEPT_BACKLOG
            )
        except OSError as exc:
            logging.getLogger("aiohttp.server").removeFilter(self._throttle)
            logging.getLogger("asyncio").removeFilter(self._accept_throttle)
            await runner.cleanup()
            raise listen_error(self.host, self.port, exc) from None
        self._runner = runner
        self._watch = asyncio.create_task(self._watch_writes(handler), name="http-stalls")
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def _watch_writes(self, handler: web.Server) -> None:
        """Close the connections whose answers have waited unsent for ``idle_timeout``."""
        period = min(STALL_CHECK_SECONDS, max(0.05, self._idle_timeout / 4))
        while True:
            await asyncio.sleep(period)  # the loop's timer, as aiohttp's keep-alive
            self.close_stalled(handler.connections)

    def close_stalled(self, connections: list[web.RequestHandler]) -> int:
        """One check of ``connections``: abort each whose transport has held unsent
        bytes since ``idle_timeout`` ago or longer; returns how many were closed."""
        now = self._monotonic()
        blocked: dict[asyncio.BaseProtocol, float] = {}
        closed = 0
        for connection in connections:
            transport = connection.transport
            if transport is None or transport.is_closing():
                continue
            if transport.get_write_buffer_size() == 0:
                continue
            since = blocked[connection] = self._blocked.get(connection, now)
            if now - since >= self._idle_timeout:
                _reset(transport)
                del blocked[connection]
                closed += 1
        self._blocked = blocked
        if closed:
            self._metrics.http_stalled.inc(closed)
            if self._stalls.ready():
                log.warning(
                    "http.listen: closed %d connection(s) whose client did not read its "
                    "answers for %s (http.idle_timeout)",
                    closed,
                    config_duration(self._idle_timeout),
                )
        return closed

    async def stop(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, runner, watch = self._server, self._runner, self._watch
        self._server = self._runner = self._watch = None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            await server.wait_closed()
        logging.getLogger("aiohttp.server").removeFilter(self._throttle)
        logging.getLogger("asyncio").removeFilter(self._accept_throttle)


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
