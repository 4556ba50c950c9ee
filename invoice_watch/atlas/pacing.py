"""Atlas's rate limits, as its answers tell them: when the next request may go.

Atlas keeps a token bucket per endpoint set and *scope* (organization, project, user or
IP address; https://www.mongodb.com/docs/atlas/api/api-rate-limit/), and the invoice
endpoints are scoped by organization: so what an answer says holds for the requests of
its organization (:class:`RateLimits`), and one organization answering 429 delays no
other organization's reads, nor their alerts. Requests outside ``/orgs/{id}`` share one
scope. A 429's ``Retry-After`` (:func:`invoice_watch.retry.parse_retry_after`) holds back
every request of its scope until it has passed. ``RateLimit-Remaining`` (Atlas
documents it on 429 answers only) is a hint about now: while it says fewer requests are
left than may be in flight, requests go one at a time, and after an answer that took the
last token the next one waits a pause first (:data:`PACE_SECONDS`, or as long as the
longest ``Retry-After`` so far: how long the bucket takes to refill, up to
``atlas.max_backoff``). The hint holds until an answer without it, and at most a minute
(the window Atlas counts in) or the 429's ``Retry-After`` when that is longer. Time is
the monotonic clock's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Final

from invoice_watch.clock import Clock
from invoice_watch.retry import parse_retry_after

log = logging.getLogger(__name__)

# Atlas's Retry-After is honoured up to this (beyond atlas.max_backoff: retrying sooner
# than asked only draws another 429).
MAX_RETRY_AFTER: Final = 300.0
# After an answer whose `RateLimit-Remaining` says the token bucket is empty, the next
# request waits this much (at least).
PACE_SECONDS: Final = 1.0
_RATE_WINDOW = 60.0
_COUNT = re.compile(r"[0-9]{1,9}")


class RateLimit:
    """When requests to Atlas may go, from the rate-limit headers of its answers."""

    def __init__(self, clock: Clock, max_concurrency: int, max_backoff: float) -> None:
        self._clock = clock
        self._concurrency = max_concurrency
        self._cap = max_backoff
        # RateLimit-Remaining of the last answer, until when (monotonic) it holds, the
        # pause after an answer that took the last token, when (monotonic) requests may
        # go on.
        self._remaining: int | None = None
        self._remaining_until = 0.0
        self._pause = PACE_SECONDS
        self._resume_at = 0.0
        self._lock = asyncio.Lock()

    def turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A request's turn: once it may go, and alone while the hint says fewer
        requests are left than may be in flight."""
        now = self._clock.monotonic()
        remaining = self._remaining
        if remaining is not None and now >= self._remaining_until:
            remaining = self._remaining = None  # the bucket has refilled since
        alone = remaining is not None and remaining < self._concurrency
        if not alone and now >= self._resume_at:
            return _GO  # most requests: no wait, no lock (and no generator to run)
        return self._turn(alone)

    @contextlib.asynccontextmanager
    async def _turn(self, alone: bool) -> AsyncIterator[None]:
        if alone:
            async with self._lock:  # fewer requests left than may be in flight
                await self._wait()
                yield
        else:
            await self._wait()
            yield

    async def _wait(self) -> None:
        """Wait until requests may go again: the ``Retry-After`` of the last 429, or a
        short pause after an answer said the token bucket is empty."""
        wait = self._resume_at - self._clock.monotonic()
        if wait > 0:
            log.debug("Atlas's rate limit: waiting %.1fs before the next request", wait)
            await self._clock.sleep(wait)

    def note(self, status: int, headers: Mapping[str, str]) -> None:
        """Take what an answer's ``Retry-After`` (of a 429) and ``RateLimit-Remaining``
        say."""
        remaining = headers.get("RateLimit-Remaining")
        if remaining is None and status != 429 and self._remaining is None:
            return  # nothing said, and no hint to drop (most answers)
        now = self._clock.monotonic()
        wait = None
        if status == 429:  # nobody goes before its Retry-After
            wait = parse_retry_after(headers.get("Retry-After"), self._clock.now())
            if wait is not None:
                wait = min(wait, MAX_RETRY_AFTER)
                self._resume_at = max(self._resume_at, now + wait)
                self._pause = min(max(wait, self._pause), self._cap)
        remaining = (remaining or "").strip()
        if _COUNT.fullmatch(remaining):
            self._remaining = int(remaining)
            self._remaining_until = now + max(wait or 0.0, _RATE_WINDOW)
            if self._remaining == 0 and status != 429:
                # That was the last token: slow down rather than draw a 429.
                self._resume_at = max(self._resume_at, now + self._pause)
        elif self._remaining is not None:
            # An answer without the hint: nothing says the bucket is low any more.
            self._remaining = None
            self._pause = PACE_SECONDS


_GO: Final = contextlib.nullcontext()
_ORG_SCOPE = re.compile(r"/orgs/([^/]{1,64})(?:/|$)")
# The path of a URL (RFC 3986 appendix B): what urllib.parse.urlsplit(url).path is, in
# 1 µs instead of 4.6 (measured; urlsplit's cache holds 128 URLs, a cycle has one per
# organization).
_PATH = re.compile(r"(?:[^:/?#]+:)?(?://[^/?#]*)?([^?#]*)")


class RateLimits:
    """A :class:`RateLimit` per rate-limit scope (the module docstring): one per
    organization a request path names (``/orgs/{id}/...``), one for all other paths.
    Bounded: the paths are the client's own, so the scopes are the configured
    organizations (and the orgs they pay for) plus one."""

    def __init__(self, clock: Clock, max_concurrency: int, max_backoff: float) -> None:
        self._args = (clock, max_concurrency, max_backoff)
        self._scopes: dict[str, RateLimit] = {}

    def of(self, url: str) -> RateLimit:
        """The rate limit that holds for a request to ``url``."""
        path = _PATH.match(url)
        match = _ORG_SCOPE.search(path[1]) if path else None
        scope = match[1] if match else ""
        limit = self._scopes.get(scope)
        if limit is None:
            limit = self._scopes[scope] = RateLimit(*self._args)
        return limit
