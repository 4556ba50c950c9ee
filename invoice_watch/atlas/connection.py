"""One request to Atlas over the long-lived connection: the aiohttp session
(authentication: :mod:`.auth`; ``~/.netrc`` never read), the bound on requests in
flight, Atlas's rate limits (:mod:`.pacing`), the ``Deprecation``/``Sunset`` headers
(:mod:`.deprecation`) and the bounds of a body (:mod:`.bounds`).

:meth:`Connection.send` sends one GET and returns its answer, whatever its status;
what the answer means, and whether to send it again, is :mod:`.transport`'s. Redirects
are never followed: no credential leaves ``atlas.base_url``'s origin.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import hdrs
from yarl import URL

from invoice_watch import __version__
from invoice_watch.atlas.auth import OAuthMiddleware, middleware
from invoice_watch.atlas.bounds import SMALL_BODY, read_body
from invoice_watch.atlas.deprecation import Deprecations
from invoice_watch.atlas.pacing import RateLimit, RateLimits
from invoice_watch.clock import Clock

# An answer longer than this (bytes) lets the request waiting for its slot go out before
# it is parsed (about 1 ms a 100 invoices); a shorter one is parsed at once, sparing
# the event loop a turn per request (about 5 % of a steady cycle's CPU).
YIELD_BEFORE_PARSING = 64 * 1024
# Request URLs kept from one cycle to the next (:func:`request_url`): a steady cycle asks
# the same one page of each organization again. Beyond this many, the least recently
# used go (one URL, its parts and what aiohttp asks of it: about 2 KB).
URLS_KEPT = 1024

if TYPE_CHECKING:
    from invoice_watch.config import AtlasConfig


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer: its status, its body (bounded: :mod:`.bounds`) and, of an answer that
    is not a 2xx, the headers the retry loop reads."""

    status: int
    body: bytes
    retry_after: str | None
    location: str | None = None
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Body:
    """A request body (JSON, already encoded) and its media type (``lineItems:search``:
    a GET with a body)."""

    data: bytes
    media_type: str


class Connection:
    """GET requests to one Atlas, through one long-lived aiohttp session.

    At most ``max_concurrency`` requests in flight. Until one has been answered without
    a 401/403, requests go one at a time, so that the others reuse its Digest nonce or
    OAuth token instead of each drawing a challenge of its own. ``proxy``: the proxy
    every request goes through (None: directly), as :mod:`.transport` chose it.
    """

    def __init__(
        self,
        config: AtlasConfig,
        clock: Clock,
        proxy: str | None,
        deprecations: Deprecations,
    ) -> None:
        self._config = config
        self._clock = clock
        self.proxy = proxy
        self.deprecations = deprecations
        # Imported here, not at the top: the caller has imported the configuration by
        # now, and importing it from this package (before app.py does) was measured to
        # cost the process some 1.5 MB of memory.
        from invoice_watch.config import DigestAuth

        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._digest = isinstance(config.auth, DigestAuth)
        self._authenticated = False
        self._auth_lock = asyncio.Lock()
        self._answered = asyncio.Event()  # the request sent alone was answered
        self._session: aiohttp.ClientSession | None = None
        self._oauth: OAuthMiddleware | None = None
        max_backoff = config.max_backoff.total_seconds()
        self._rates = RateLimits(clock, config.max_concurrency, max_backoff)
        self.requests_sent = 0
        self.last_request_at: float | None = None  # monotonic start of the last request

    def open(self) -> aiohttp.ClientSession:
        """The session, opened at the first call."""
        if self._session is None:
            auth, self._oauth = middleware(self._config, self._clock, self.proxy)
            seconds = self._config.timeout.total_seconds()
            self._session = aiohttp.ClientSession(
                # `total` bounds the whole request, its body included: a `sock_read` as
                # long could never end one first, and would cost a timer reset per chunk.
                timeout=aiohttp.ClientTimeout(total=seconds, connect=min(10.0, seconds)),
                connector=aiohttp.TCPConnector(
                    limit=self._config.max_concurrency,
                    limit_per_host=self._config.max_concurrency,
                ),
                middlewares=(auth,),
                headers={hdrs.USER_AGENT: f"invoice-watch/{__version__}"},
                trust_env=False,  # no ~/.netrc; proxies come from proxy_for
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._oauth is not None:
            self._oauth.forget_tokens()
            self._oauth = None

    def authenticate_again(self) -> None:
        """With Digest keys, the next request goes alone again: the nonce of the last
        round of requests may have gone stale since, and only one request should learn
        it. (An OAuth token is refreshed by its middleware.)"""
        if self._digest:
            self._authenticated = False

    async def send(
        self,
        url: str,
        params: Mapping[str, str],
        accept: str,
        endpoint: str,
        body: Body | None = None,
    ) -> Answer:
        """Send one request (``body``: its body and media type, sent as
        ``Content-Type``); the first ones go alone until one is authenticated."""
        while not self._authenticated:
            if self._auth_lock.locked():
                # The others wait for its answer all at once, not each for the lock in
                # turn (a loop turn each: a steady cycle 1 % fewer instructions).
                await self._answered.wait()
                continue
            async with self._auth_lock:
                self._answered.clear()
                try:
                    answer = await self._send_once(url, params, accept, endpoint, body)
                    if answer.status not in (401, 403):
                        self._authenticated = True
                    return answer
                finally:
                    self._answered.set()
        return await self._send_once(url, params, accept, endpoint, body)

    async def _send_once(
        self,
        url: str,
        params: Mapping[str, str],
        accept: str,
        endpoint: str,
        body: Body | None = None,
    ) -> Answer:
        session = self.open()
        rate = self._rates.of(url)
        # The rate limit's wait first: a request waiting for its organization's
        # Retry-After holds no slot another organization's request could use.
        async with rate.turn(), self._semaphore:
            answer = await self._exchange(session, url, params, accept, endpoint, rate, body)
        if len(answer.body) > YIELD_BEFORE_PARSING:
            # Let the request waiting for this slot go out before this answer is parsed.
            await asyncio.sleep(0)
        return answer

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        url: str,
        params: Mapping[str, str],
        accept: str,
        endpoint: str,
        rate: RateLimit,
        request_body: Body | None = None,
    ) -> Answer:
        """One request and its answer, its body read within the bounds; what the answer
        says of the rate limit goes to ``rate`` (its scope's)."""
        self.requests_sent += 1
        self.last_request_at = self._clock.monotonic()
        headers = {hdrs.ACCEPT: accept}
        if request_body is not None:
            headers[hdrs.CONTENT_TYPE] = request_body.media_type
        async with session.get(
            request_url(url, tuple(params.items())),
            headers=headers,
            data=request_body.data if request_body is not None else None,
            allow_redirects=False,  # a credential never follows a redirect elsewhere
            proxy=self.proxy,
        ) as resp:
            status = resp.status
            rate.note(status, resp.headers)
            self.deprecations.note(endpoint, resp.headers)
            if 200 <= status < 300:  # only the body: the rest is read for other answers
                return Answer(status, await read_body(resp, self._config.max_response_size), None)
            body = await read_body(resp, SMALL_BODY, truncate=True)
            return Answer(
                status,
                body,
                resp.headers.get(hdrs.RETRY_AFTER),
                resp.headers.get(hdrs.LOCATION),
                resp.content_type,
            )


@functools.lru_cache(maxsize=URLS_KEPT)
def request_url(url: str, query: tuple[tuple[str, str], ...]) -> URL:
    """``url`` with ``query`` added, as aiohttp builds it from a URL string and its ``params``;
    the same object each time it is asked again, as each steady cycle does for every
    organization (yarl's own cache of parsed URLs holds 128: fewer than a cycle's
    organizations). aiohttp encodes the query and works out the host, port and path of a
    new URL object at every request, and keeps them on the object: reused, a steady
    reference cycle costs about 5 % fewer instructions."""
    return URL(url).extend_query(query)
