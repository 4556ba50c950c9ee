"""The daemon's HTTP endpoint: :class:`HttpEndpoint` serves ``/healthz``, ``/livez``
(:mod:`invoice_watch.health`) and ``/metrics`` (:mod:`invoice_watch.metrics`) inside the
daemon's own event loop, with bounded connections, read and write time (issue 12 §3), so
that nothing a client does to it reaches the poll cycle or delivery; and the bounds it
keeps: the connections this process can hold below its open files limit
(:func:`connection_cap`), the throttled logs of a flood.
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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from invoice_watch.config.quantities import config_duration
from invoice_watch.errors import ListenError
from invoice_watch.health import HealthProbe
from invoice_watch.metrics import Metrics

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


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
      limit is lower, :func:`connection_cap`): beyond, the keep-alive connection idle
      the longest (it was answered, and waits for its client's next request) is closed
      to make room for the new one, so that ordinary keep-alive clients (scrapers) can
      never keep ``/healthz`` and ``/livez`` out (AD-3; a keep-alive client reconnects
      when its idle connection is closed, RFC 9112 §9.6). With none idle (every
      connection is in a request, or has not completed one: a flood, slowloris), the
      new connection is closed as soon as it is accepted (so a flood holds at most that
      many file descriptors, and never those the Atlas client, Slack or SMTP need);
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
        # Connections that completed a request: when the last one ended (monotonic), and
        # how many of their requests are being handled now.
        self._answered: dict[object, float] = {}
        self._busy: dict[object, int] = {}

    @property
    def max_connections(self) -> int:
        """The connections held at most (``http.max_connections``, or fewer)."""
        return self._cap

    async def start(self) -> int:
        """Listen; returns the bound port. Raises :class:`ListenError` (one line naming
        ``http.listen``) when the address cannot be used."""
        from aiohttp import web

        self._cap = connection_cap(self._requested)
        app = make_http_app(self._metrics, self._probe, self._live)
        app.middlewares.append(self._tracker())
        runner = web.AppRunner(
            app,
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
            # A protocol stays in `starting` a round after its connection_made put it in
            # handler.connections: counted once (counted twice, a second client arriving
            # in that round was refused below the cap).
            opening = sum(1 for made in starting if made not in handler.connections)
            if len(handler.connections) + opening < self._cap or self._evict(handler.connections):
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
            raise listen_error(self.host, self.port, exc) from exc
        self._runner = runner
        self._watch = asyncio.create_task(self._watch_writes(handler), name="http-stalls")
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def _tracker(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """A middleware that notes, per connection, the requests being handled and when
        the last one ended: what :meth:`_evict` needs to tell an idle connection."""
        from aiohttp import web

        busy, answered, monotonic = self._busy, self._answered, self._monotonic

        @web.middleware
        async def track(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            connection = request.protocol
            busy[connection] = busy.get(connection, 0) + 1
            try:
                return await handler(request)
            finally:
                left = busy.pop(connection) - 1
                if left:
                    busy[connection] = left
                answered[connection] = monotonic()

        return track

    def _evict(self, connections: list[web.RequestHandler]) -> bool:
        """Close the connection idle the longest among ``connections`` that were
        answered and wait for their next request (none in hand, nothing left to send),
        to make room for a new one; False when none is idle."""
        oldest: web.RequestHandler | None = None
        since = 0.0
        for connection in connections:
            ended = self._answered.get(connection)
            transport = connection.transport
            if (
                ended is None
                or connection in self._busy
                or transport is None
                or transport.is_closing()
                or transport.get_write_buffer_size()
            ):
                continue
            if oldest is None or ended < since:
                oldest, since = connection, ended
        if oldest is None:
            return False
        self._answered.pop(oldest, None)
        oldest.force_close()
        self._metrics.http_evicted.inc()
        if self._refusals.ready():
            log.warning(
                "http.listen: %d connections open (http.max_connections): the keep-alive "
                "connection idle the longest is closed for each new one (its client "
                "reconnects); the poll cycle and delivery are not affected",
                self._cap,
            )
        return True

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
        if len(self._answered) > len(connections):  # forget the connections gone
            alive = set(connections)
            for gone in [c for c in self._answered if c not in alive]:
                del self._answered[gone]
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
