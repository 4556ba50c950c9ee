"""Authentication against Atlas: HTTP Digest API keys or an OAuth 2.0 service account.

Digest is aiohttp's own :class:`aiohttp.DigestAuthMiddleware`; a service account's
bearer token comes from :class:`OAuthMiddleware` (RFC 6749 §4.4, client credentials),
fetched lazily, reused until shortly before it expires, registered for redaction as soon
as it is received, and only ever sent to the token URL's origin (RFC 6750 §5.3). A token
endpoint that refuses the service account raises :class:`TokenRefused`; one that gives
no token, :class:`TokenUnavailable`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import deque
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import (
    ClientHandlerType,
    ClientMiddlewareType,
    ClientRequest,
    ClientResponse,
    hdrs,
)
from yarl import URL

from invoice_watch import redact
from invoice_watch.atlas.bounds import INT64_MAX, SMALL_BODY, read_body
from invoice_watch.atlas.errors import ApiError, parse_api_error
from invoice_watch.clock import Clock
from invoice_watch.constants import OAUTH_TOKEN_PATH

if TYPE_CHECKING:
    from invoice_watch.config import AtlasConfig

_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")


def middleware(
    config: AtlasConfig, clock: Clock, proxy: str | None
) -> tuple[ClientMiddlewareType, OAuthMiddleware | None]:
    """The aiohttp client middleware that authenticates every request of ``config``'s
    credentials, and the :class:`OAuthMiddleware` it is (None for Digest), whose tokens
    are forgotten when the session closes."""
    from invoice_watch.config import DigestAuth  # see Transport.__init__

    auth = config.auth
    if isinstance(auth, DigestAuth):
        return aiohttp.DigestAuthMiddleware(auth.public_key, auth.private_key.get()), None
    oauth = OAuthMiddleware(
        config.base_url.rstrip("/") + OAUTH_TOKEN_PATH,
        auth.client_id,
        auth.client_secret.get(),
        clock,
        proxy=proxy,
    )
    return oauth, oauth


class OAuthMiddleware:
    """aiohttp client middleware for Atlas service accounts (OAuth 2.0 client credentials).

    The token is fetched lazily, reused until shortly before it expires, and refreshed
    once when the API answers 401 (revoked or expired early). The token request itself
    bypasses this middleware. The bearer token is only ever added to requests for the
    token URL's origin (RFC 6750 §5.3: a token is sent only where it belongs), so a
    redirect or a link elsewhere never carries it.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        clock: Clock,
        *,
        proxy: str | None = None,
    ) -> None:
        self._token_url = token_url
        self._origin = URL(token_url).origin()
        self._proxy = proxy
        self._basic = aiohttp.encode_basic_auth(client_id, client_secret)
        self._clock = clock
        self._token: str | None = None
        self._expires_at: datetime | None = None
        self._lock = asyncio.Lock()
        # Tokens registered for redaction, newest last: the one in use and the one
        # before it (an answer to a request sent with it may still echo it).
        self._redacted: deque[str] = deque()

    def __repr__(self) -> str:
        return f"OAuthMiddleware(token_url={self._token_url!r}, token=<secret>)"

    def _valid(self) -> bool:
        return (
            self._token is not None
            and self._expires_at is not None
            and self._clock.now() < self._expires_at
        )

    async def _token_for(self, session: aiohttp.ClientSession, stale: str | None) -> str:
        async with self._lock:
            if self._valid() and self._token != stale:
                assert self._token is not None
                return self._token
            async with session.post(
                self._token_url,
                data={"grant_type": "client_credentials"},
                headers={hdrs.AUTHORIZATION: self._basic, hdrs.ACCEPT: "application/json"},
                middlewares=(),
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                body = await read_body(resp, SMALL_BODY, truncate=True)
                content_type = resp.content_type
                if resp.status in (400, 401, 403):
                    raise TokenRefused(
                        resp.status, oauth_error(body), parse_api_error(body), content_type
                    )
                if resp.status != 200:
                    raise TokenUnavailable(
                        resp.status, resp.headers.get(hdrs.RETRY_AFTER), content_type
                    )
            token, lifetime = parse_token(body, content_type)
            self._remember(token)
            # Refresh a minute early (or at 90% of a short lifetime).
            margin = min(60.0, lifetime * 0.1)
            self._token = token
            self._expires_at = self._clock.now() + timedelta(seconds=lifetime - margin)
            return token

    def _remember(self, token: str) -> None:
        """Register ``token`` for redaction as soon as it is received (a server may echo
        it without its ``Bearer`` prefix); forget the one before the last, so that
        hourly refreshes do not grow the set of secrets."""
        if token in self._redacted:
            return
        redact.register(token)
        self._redacted.append(token)
        while len(self._redacted) > 2:
            redact.forget(self._redacted.popleft())

    def forget_tokens(self) -> None:
        """Forget every token this middleware registered (its session is closed)."""
        while self._redacted:
            redact.forget(self._redacted.popleft())

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if request.url.origin() != self._origin:
            return await handler(request)  # never a bearer token for another origin
        token = await self._token_for(request.session, stale=None)
        request.headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        response = await handler(request)
        if response.status != 401:
            return response
        response.release()
        token = await self._token_for(request.session, stale=token)
        request.headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        return await handler(request)


def oauth_error(body: bytes) -> str:
    """The RFC 6749 §5.2 ``error`` code of a token endpoint's refusal, else ``""``."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,40}", code) else ""


def parse_token(body: bytes, content_type: str = "application/json") -> tuple[str, float]:
    """``access_token`` and ``expires_in`` (seconds, within 30 s .. 1 day; a number
    that is not one, or outside int64, reads as an hour) of a token answer (RFC 6749
    §5.1); :class:`TokenUnavailable` for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        # Not chained: a JSONDecodeError keeps the whole answer (`doc`), a token perhaps.
        raise TokenUnavailable(200, None, content_type, not_oauth=True) from None
    token = data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        # Also keeps CR/LF out of a header.
        raise TokenUnavailable(200, None, content_type, not_oauth=True)
    lifetime = data.get("expires_in", 3600)
    if type(lifetime) is int and abs(lifetime) > INT64_MAX:
        lifetime = 3600  # float() of it would overflow
    if type(lifetime) not in (int, float) or not math.isfinite(lifetime):
        lifetime = 3600
    return token, min(max(float(lifetime), 30.0), 86400.0)


class TokenRefused(Exception):
    """The token endpoint answered 400, 401 or 403: its RFC 6749 ``error`` code, the
    Atlas ``ApiError`` it may hold instead, and its media type."""

    def __init__(
        self,
        status: int,
        code: str = "",
        api_error: ApiError | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.code = code
        self.api_error = api_error or ApiError()
        self.content_type = content_type
        super().__init__(f"token endpoint answered {status}")


class TokenUnavailable(Exception):
    """No token: the endpoint answered another status, or a 200 that is not an OAuth
    token answer (``not_oauth``)."""

    def __init__(
        self,
        status: int,
        retry_after: str | None,
        content_type: str = "application/json",
        *,
        not_oauth: bool = False,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.content_type = content_type
        self.not_oauth = not_oauth
        super().__init__(f"token endpoint answered {status}")
