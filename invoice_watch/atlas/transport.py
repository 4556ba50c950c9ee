"""One request to Atlas and its retries: the HTTP side of the product.

:class:`Transport` owns the aiohttp session (authentication: :mod:`.auth`; the proxy:
:func:`invoice_watch.proxy.proxy_for`), the bound on requests in flight, Atlas's rate
limits (:mod:`.pacing`), the ``Deprecation``/``Sunset`` headers (:mod:`.deprecation`)
and the bounds of a body (:mod:`.bounds`). :meth:`Transport.get` sends one GET, retries
it (:func:`invoice_watch.retry.retry_delay`: ``Retry-After``, else backoff) and returns
the body of a 2xx answer, or raises the :class:`~invoice_watch.errors.FetchError` whose
message says what to fix (:mod:`.errors`). Redirects are never followed: no credential
leaves ``atlas.base_url``'s origin. Nothing outside this package sees an aiohttp type.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import hdrs
from yarl import URL

from invoice_watch import __version__
from invoice_watch.atlas.auth import (
    OAuthMiddleware,
    TokenRefused,
    TokenUnavailable,
    middleware,
)
from invoice_watch.atlas.bounds import SMALL_BODY, TooLarge, read_body
from invoice_watch.atlas.deprecation import Deprecations
from invoice_watch.atlas.errors import (
    Decision,
    Explainer,
    classify_status,
    explain,
    parse_api_error,
    size_text,
)
from invoice_watch.atlas.pacing import MAX_RETRY_AFTER, RateLimit, RateLimits
from invoice_watch.clock import Clock
from invoice_watch.constants import V2_CSV_MEDIA_TYPE, V2_MEDIA_TYPE
from invoice_watch.errors import (
    FetchAuthError,
    FetchDataError,
    FetchError,
    FetchStatusError,
    FetchTimeout,
)
from invoice_watch.proxy import proxy_for
from invoice_watch.retry import backoff, parse_retry_after, retry_delay
from invoice_watch.safe_text import server_text

if TYPE_CHECKING:
    from invoice_watch.config import AtlasConfig
    from invoice_watch.metrics import Metrics

log = logging.getLogger(__name__)

_BACKOFF_BASE = 1.0


class BadProxy(Exception):
    """The environment names a proxy URL that cannot be used."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None
    location: str | None = None
    content_type: str = "application/json"


class Transport:
    """GET requests to one Atlas, through one long-lived aiohttp session.

    At most ``max_concurrency`` requests in flight. Until one has been answered without
    a 401/403, requests go one at a time, so that the others reuse its Digest nonce or
    OAuth token instead of each drawing a challenge of its own. ``~/.netrc`` is never
    read; the proxy is ``atlas.proxy``, else ``HTTPS_PROXY``/``HTTP_PROXY`` and
    ``NO_PROXY`` from ``environ``.
    """

    def __init__(
        self,
        config: AtlasConfig,
        clock: Clock,
        rng: random.Random,
        org_names: Mapping[str, str],
        *,
        metrics: Metrics | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng
        self._proxy_error = ""
        configured = config.proxy.url if config.proxy is not None else None
        try:
            self.proxy = proxy_for(config.base_url.rstrip("/"), configured, environ)
        except ValueError as exc:  # a malformed HTTPS_PROXY: every org's read says so
            self.proxy, self._proxy_error = None, f"{exc}; fix or unset it"
        self.explain = Explainer(config, org_names, self.proxy)
        # Imported here, not at the top: the caller has imported the configuration by
        # now, and importing it from this package (before app.py does) was measured to
        # cost the process some 1.5 MB of memory.
        from invoice_watch.config import DigestAuth

        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._digest = isinstance(config.auth, DigestAuth)
        self._authenticated = False
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._oauth: OAuthMiddleware | None = None
        max_backoff = config.max_backoff.total_seconds()
        self._rates = RateLimits(clock, config.max_concurrency, max_backoff)
        self.deprecations = Deprecations(self.explain.version, metrics)
        self.requests_sent = 0
        self.last_request_at: float | None = None  # monotonic start of the last request

    def open(self) -> aiohttp.ClientSession:
        """The session, opened at the first call; :class:`BadProxy` when the
        environment's proxy URL cannot be used."""
        if self._proxy_error:
            raise BadProxy(self._proxy_error)
        if self._session is None:
            auth, self._oauth = middleware(self._config, self._clock, self.proxy)
            seconds = self._config.timeout.total_seconds()
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=seconds, connect=min(10.0, seconds), sock_read=seconds
                ),
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

    async def get(
        self,
        org_id: str,
        path: str,
        params: Mapping[str, str],
        *,
        endpoint: str,
        csv_body: bool = False,
    ) -> bytes:
        """GET with retries; returns the body of a 2xx answer or raises FetchError whose
        message says what to fix (:data:`~.errors.FIXES`). ``path`` follows the API's
        prefix; ``endpoint``: its template (``/orgs/{orgId}/invoices``), for
        deprecation warnings."""
        explainer = self.explain
        url = f"{explainer.base}{explainer.prefix}{path}"
        endpoint = explainer.prefix + endpoint
        try:
            self.open()
        except BadProxy as exc:
            raise FetchError(org_id, str(exc)) from exc
        fields = explainer.fields(org_id, URL(url))
        accept = self._accept(csv_body)
        retries = self._config.retries
        cap = self._config.max_backoff.total_seconds()
        fix = evidence = ""
        timed_out = False
        throttled = 0  # 429s in a row
        for attempt in range(retries + 1):
            retry_after: float | None = None
            try:
                answer = await self._send(url, params, accept, endpoint)
            except TokenRefused as exc:
                refused = explainer.token_refused(
                    exc.status, exc.code, exc.api_error, exc.content_type, fields
                )
                raise FetchAuthError(org_id, f"{path}: {refused}") from exc
            except TokenUnavailable as exc:
                fix = explainer.token_unavailable(exc.content_type, not_oauth=exc.not_oauth)
                evidence = f"HTTP {exc.status}"
                retry_after = parse_retry_after(exc.retry_after, self._clock.now())
            except TooLarge as exc:
                too_large = explain("too_large", limit=size_text(exc.limit))
                raise FetchDataError(org_id, f"{path}: {too_large}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind, where = explainer.transport(exc, URL(url))
                fix, evidence = explain(kind, **{**fields, **where}), ""
                timed_out = kind == "timeout"
            else:
                decision = classify_status(answer.status)
                if decision is Decision.OK:
                    if attempt:
                        label = explainer.org_label(org_id)
                        log.info("%s: %s succeeded after %d retries", label, path, attempt)
                    return answer.body
                timed_out = False
                if 300 <= answer.status < 400:
                    location = server_text(answer.location or "(no Location)", 120)
                    raise FetchStatusError(
                        org_id,
                        answer.status,
                        f"{path}: {explain('redirect', location=location)} (HTTP {answer.status})",
                    )
                throttled = throttled + 1 if answer.status == 429 else 0
                error = parse_api_error(answer.body)
                evidence = error.evidence(answer.status)
                fix = explainer.answer(
                    answer.status, error, answer.content_type, fields, url=url, throttled=throttled
                )
                if decision is Decision.AUTH:
                    raise FetchAuthError(org_id, f"{path}: {fix} ({evidence})")
                if decision is Decision.FAIL:
                    raise FetchStatusError(org_id, answer.status, f"{path}: {fix} ({evidence})")
                if decision is Decision.RETRY_AFTER:
                    retry_after = parse_retry_after(answer.retry_after, self._clock.now())
            if attempt == retries:
                break
            delay = retry_delay(
                attempt,
                retry_after,
                base=_BACKOFF_BASE,
                cap=cap,
                rng=self._rng,
                retry_after_cap=MAX_RETRY_AFTER,
            )
            if throttled > 1:
                # 429s in a row: wait longer than asked, more each time (and spread
                # out), as Atlas's documentation advises.
                more = backoff(throttled - 2, base=_BACKOFF_BASE, cap=cap, rng=self._rng)
                delay = min(delay + more, MAX_RETRY_AFTER)
            log.warning(
                "%s: %s: %s; retry %d of %d in %.1fs",
                explainer.org_label(org_id),
                path,
                f"{fix} ({evidence})" if evidence else fix,
                attempt + 1,
                retries,
                delay,
            )
            await self._clock.sleep(delay)
        attempts = f"gave up after {retries + 1} attempt{'s' if retries else ''}"
        message = f"{path}: {fix} ({f'{evidence}; ' if evidence else ''}{attempts})"
        if timed_out:
            raise FetchTimeout(org_id, message)
        raise FetchError(org_id, message)

    def _accept(self, csv_body: bool) -> str:
        if self._config.api == "v2":
            return V2_CSV_MEDIA_TYPE if csv_body else V2_MEDIA_TYPE
        return "text/csv" if csv_body else "application/json"

    async def _send(
        self, url: str, params: Mapping[str, str], accept: str, endpoint: str
    ) -> _Answer:
        """Send one request; the first ones go alone until one is authenticated."""
        if not self._authenticated:
            async with self._auth_lock:
                if not self._authenticated:  # else another request did it while we waited
                    answer = await self._send_once(url, params, accept, endpoint)
                    if answer.status not in (401, 403):
                        self._authenticated = True
                    return answer
        return await self._send_once(url, params, accept, endpoint)

    async def _send_once(
        self, url: str, params: Mapping[str, str], accept: str, endpoint: str
    ) -> _Answer:
        session = self.open()
        rate = self._rates.of(url)
        # The rate limit's wait first: a request waiting for its organization's
        # Retry-After holds no slot another organization's request could use.
        async with rate.turn(), self._semaphore:
            answer = await self._exchange(session, url, params, accept, endpoint, rate)
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
    ) -> _Answer:
        """One request and its answer, its body read within the bounds; what the answer
        says of the rate limit goes to ``rate`` (its scope's)."""
        self.requests_sent += 1
        self.last_request_at = self._clock.monotonic()
        async with session.get(
            url,
            params=params,
            headers={hdrs.ACCEPT: accept},
            allow_redirects=False,  # a credential never follows a redirect elsewhere
            proxy=self.proxy,
        ) as resp:
            rate.note(resp.status, resp.headers)
            self.deprecations.note(endpoint, resp.headers)
            if 200 <= resp.status < 300:
                body = await read_body(resp, self._config.max_response_size)
            else:
                body = await read_body(resp, SMALL_BODY, truncate=True)
            return _Answer(
                resp.status,
                body,
                resp.headers.get(hdrs.RETRY_AFTER),
                resp.headers.get(hdrs.LOCATION),
                resp.content_type,
            )
