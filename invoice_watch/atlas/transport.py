"""One request to Atlas and its retries: the HTTP side of the product.

:class:`Transport` chooses the proxy (:func:`invoice_watch.proxy.proxy_for`) and sends
each request over its :class:`~.connection.Connection` (the aiohttp session and its
authentication, the bound on requests in flight, Atlas's rate limits, the
``Deprecation``/``Sunset`` headers, the bounds of a body). :meth:`Transport.get` sends
one GET, retries it (:func:`invoice_watch.retry.retry_delay`: ``Retry-After``, else
backoff) and returns the body of a 2xx answer, or raises the
:class:`~invoice_watch.errors.FetchError` whose message says what to fix
(:mod:`.errors`). Redirects are never followed: no credential leaves
``atlas.base_url``'s origin. Nothing outside this package sees an aiohttp type.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from invoice_watch.atlas.auth import TokenRefused, TokenUnavailable
from invoice_watch.atlas.bounds import TooLarge
from invoice_watch.atlas.connection import Body, Connection
from invoice_watch.atlas.deprecation import Deprecations
from invoice_watch.atlas.errors import (
    Decision,
    Explainer,
    classify_status,
    explain,
    parse_api_error,
    size_text,
)
from invoice_watch.atlas.pacing import MAX_RETRY_AFTER
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


class Transport:
    """GET requests to one Atlas and their retries, over one :class:`.Connection`.

    The proxy is ``atlas.proxy``, else ``HTTPS_PROXY``/``HTTP_PROXY`` and ``NO_PROXY``
    from ``environ`` (a malformed one fails every read, saying so).
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
        deprecations = Deprecations(self.explain.version, metrics)
        self._connection = Connection(config, clock, self.proxy, deprecations)
        self.deprecations = deprecations

    def open(self) -> aiohttp.ClientSession:
        """The session, opened at the first call; :class:`BadProxy` when the
        environment's proxy URL cannot be used."""
        if self._proxy_error:
            raise BadProxy(self._proxy_error)
        return self._connection.open()

    async def aclose(self) -> None:
        await self._connection.aclose()

    def authenticate_again(self) -> None:
        """With Digest keys, the next request goes alone again (:class:`.Connection`)."""
        self._connection.authenticate_again()

    @property
    def requests_sent(self) -> int:
        return self._connection.requests_sent

    @property
    def last_request_at(self) -> float | None:
        """The monotonic start of the last request (None before the first)."""
        return self._connection.last_request_at

    async def get(
        self,
        org_id: str,
        path: str,
        params: Mapping[str, str],
        *,
        endpoint: str,
        csv_body: bool = False,
        json_body: Body | None = None,
        quiet: bool = False,
    ) -> bytes:
        """GET with retries; returns the body of a 2xx answer or raises FetchError whose
        message says what to fix (:data:`~.errors.FIXES`). ``path`` follows the API's
        prefix; ``endpoint``: its template (``/orgs/{orgId}/invoices``), for
        deprecation warnings. ``json_body``: a request body and its media type (sent as
        ``Content-Type`` and ``Accept``: ``lineItems:search``, a GET with a body).
        ``quiet``: each retry is logged at DEBUG, not WARNING (a caller that logs the
        outcome once while it lasts: the line items stage)."""
        explainer = self.explain
        url = f"{explainer.base}{explainer.prefix}{path}"
        endpoint = explainer.prefix + endpoint
        try:
            self.open()
        except BadProxy as exc:
            raise FetchError(org_id, str(exc)) from exc

        def fields() -> dict[str, str]:  # what a message may name: for a failure only
            return explainer.fields(org_id, URL(url))

        accept = json_body.media_type if json_body is not None else self._accept(csv_body)
        retries = self._config.retries
        cap = self._config.max_backoff.total_seconds()
        fix = evidence = ""
        timed_out = False
        throttled = 0  # 429s in a row
        for attempt in range(retries + 1):
            retry_after: float | None = None
            try:
                answer = await self._connection.send(url, params, accept, endpoint, json_body)
            except TokenRefused as exc:
                refused = explainer.token_refused(
                    exc.status, exc.code, exc.api_error, exc.content_type, fields()
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
                fix, evidence = explain(kind, **{**fields(), **where}), ""
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
                    answer.status,
                    error,
                    answer.content_type,
                    fields(),
                    url=url,
                    throttled=throttled,
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
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
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
