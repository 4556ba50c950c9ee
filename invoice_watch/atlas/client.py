"""Stage 1, fetch: read invoices from the Atlas Administration API.

Owns the HTTP side of the product: the aiohttp session, authentication (HTTP Digest API
keys or an OAuth service account), the three API flavors, paging, bounded concurrency,
retries with backoff, and turning every failure into a :class:`FetchError` for the one
organization it hit. Nothing outside this module sees an aiohttp type.

Containment and bounds (SPEC §10 "Bounds"): whatever one organization's answers hold, its
read ends as an :class:`OrgRead`, ok or failed, and never cancels another org's read
(an exception no check foresaw included: it is logged with its traceback). Every answer's
decoded body is capped (``atlas.max_response_size``), and so is the number of JSON values
it may hold before it is parsed (memory, not only bytes; a large one is parsed in a
worker thread); a listing stops at a repeated page and at a page cap, redirects are
never followed (no credential leaves ``atlas.base_url``'s origin).

What a server sends leaves this module storable and printable, or not at all: ids and
``statusName`` have a grammar (an invoice that breaks it is refused as malformed),
numbers are int64 (else refused), line item names are escaped, and every other text
(an error's ``detail``, a header) is redacted and escaped
(:func:`invoice_watch.redact.redact`: no secret, no control character, bidi override or
lone surrogate), put on one line and shortened before it is logged or stored. What each
Atlas answer means for the operator is in one table, :data:`FIXES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import enum
import hashlib
import io
import ipaddress
import json
import logging
import math
import random
import re
import sys
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs
from yarl import URL

from invoice_watch import __version__, redact
from invoice_watch.clock import Clock, SystemClock
from invoice_watch.constants import (
    API_PREFIXES,
    INVOICE_STATUSES,
    ITEMS_PER_PAGE,
    LINKED_INVOICES_ROLES,
    MAX_PAGES,
    MAX_RESPONSE_SIZE,
    OAUTH_TOKEN_PATH,
    REQUIRED_ROLE,
    V2_API_VERSION,
    V2_CSV_MEDIA_TYPE,
    V2_MEDIA_TYPE,
)
from invoice_watch.errors import (
    FetchAuthError,
    FetchDataError,
    FetchError,
    FetchStatusError,
    FetchTimeout,
)
from invoice_watch.proxy import masked, proxy_for
from invoice_watch.redact import printable
from invoice_watch.retry import backoff, parse_retry_after, retry_delay
from invoice_watch.types import (
    AMOUNT_ATTRS,
    Invoice,
    LineItem,
    OrgRead,
    Snapshot,
    instant,
    settled_key,
)

if TYPE_CHECKING:
    from invoice_watch.config import AtlasConfig
    from invoice_watch.health import Metrics

log = logging.getLogger(__name__)

_HEX24 = re.compile(r"[a-f0-9]{24}")  # fullmatch: `$` would let a trailing newline in
# Atlas's statusName values (PENDING, CLOSED, FORGIVEN, ...): a status it adds later is
# kept as is, provided it is one of these words.
_STATUS = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_KNOWN_STATUSES = frozenset(INVOICE_STATUSES)  # the usual ones need no regex
_INT64_MAX = 2**63 - 1
_INT64_DOLLARS = Decimal(_INT64_MAX).scaleb(-2)  # int64 cents, in dollars
# A line item's project, SKU or cluster name is cut to this length (Atlas allows 64).
_LABEL = 120
_BACKOFF_BASE = 1.0
# Atlas's Retry-After is honoured up to this (beyond atlas.max_backoff: retrying sooner
# than asked only draws another 429).
_MAX_RETRY_AFTER = 300.0
# At most this many pages are requested together on the strength of `totalCount` (an
# estimate: a wild one must not turn into thousands of requests); paging goes on past it.
_PAGES_AT_ONCE = 100
# Bodies that are only read for a message (error answers, the OAuth token) are read up
# to this much; the rest is dropped.
_SMALL_BODY = 64 * 1024
_CHUNK = 64 * 1024
# Memory, not only bytes: an answer of empty arrays (`[],[],...`, 3 bytes each) takes
# some 40 times its size once parsed (about 120 bytes a value), where Atlas's answers
# hold one JSON value per 26 bytes or so (a listing page of 500 invoices: about 260 KB,
# 10,000 values). An answer with more than one value per this many bytes of
# atlas.max_response_size is refused before it is parsed: with the default of 16 MiB,
# at most 838,860 values (about 100 MB once parsed, in well under a second).
_BYTES_PER_VALUE = 20
_MAX_VALUES = MAX_RESPONSE_SIZE // _BYTES_PER_VALUE
# Answers larger than this are parsed in a worker thread, so that the event loop
# (health checks, signals, other organizations' reads) goes on meanwhile; smaller ones,
# every real listing page among them, are parsed on the loop.
_PARSE_INLINE = 2**20
# Text taken from a server (an error's `detail`, a Location) is cut to this length.
_SERVER_TEXT = 300
# Atlas nests linked invoices one level deep; a deeper nesting is refused.
_MAX_LINK_DEPTH = 8
# After an answer whose `RateLimit-Remaining` says the token bucket is empty, the next
# request waits this much, or as long as the longest Retry-After of a 429 so far (how
# long the bucket takes to refill), up to atlas.max_backoff.
_PACE_SECONDS = 1.0
# `RateLimit-Remaining` (Atlas documents it on 429 answers only) is a hint about now: it
# holds until the next answer (one without it clears it), and at most until the window
# it counts has passed (Atlas's limits are per minute), or the 429's Retry-After when
# that is longer.
_COUNT = re.compile(r"[0-9]{1,9}")
_RATE_WINDOW = 60.0
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_IP_CANDIDATE = re.compile(r"[0-9A-Fa-f:.]{3,45}")
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")


class Decision(enum.Enum):
    """What to do with an HTTP status: the one place retry-or-give-up is decided."""

    OK = "ok"
    RETRY_AFTER = "retry-after"  # honour Retry-After when given, else back off
    BACKOFF = "backoff"  # exponential backoff with jitter
    AUTH = "auth"  # 401/403: credentials or role; never retried
    FAIL = "fail"  # retrying cannot help (a redirect, 404, 410, ...)


def classify_status(status: int) -> Decision:
    if 200 <= status < 300:
        return Decision.OK
    if status in (429, 503):
        return Decision.RETRY_AFTER
    if status in (401, 403):
        return Decision.AUTH
    if status >= 500 or status == 408:
        return Decision.BACKOFF
    return Decision.FAIL


# -- what Atlas's answers mean: the one table of fixes ---------------------------------

# (HTTP status, Atlas `errorCode`) -> what is wrong and what to do about it. A status
# without a row of its own uses (status, None), then its class, (400, None) or (500, None).
# Rows whose key is a word are the answers that are not an HTTP status: the transport
# (connection refused, DNS, TLS, timeout, proxy), the OAuth token endpoint, redirects and
# the bounds of this module. Fields: {org} ("Name (id)"), {org_id}, {credentials} (API
# key or service account), {where} (its config keys), {role}, {linked_roles}, {ip}
# (" 203.0.113.5" when Atlas named it), {version}, {host}, {port}, {cause}, {timeout},
# {via} (", through the proxy ..."), {proxy}, {location}, {limit}, {page}, {cap}.
FIXES: Final[dict[tuple[int | str, str | None], str]] = {
    (401, None): (
        "Atlas refused the credentials: the {credentials} is wrong or was revoked, its "
        "secret is wrong, or it expired; check {where}"
    ),
    ("token", None): (
        "the OAuth token endpoint refused the service account: its client_id or "
        "client_secret is wrong, or the service account was deleted or its secret expired; "
        "check {where}"
    ),
    ("token_not_oauth", None): (
        "the OAuth token endpoint {url} answered with something that is not an OAuth "
        "token ({content_type}): a proxy or a captive portal may be answering in Atlas's "
        "place, or atlas.base_url may name another server"
    ),
    ("not_atlas", None): (
        "{what} is not Atlas's ({content_type}, not an Atlas error): something between "
        "this machine and Atlas answered instead (a proxy, a firewall or a captive "
        "portal); check atlas.base_url and the proxy (atlas.proxy, or "
        "HTTPS_PROXY/HTTP_PROXY and NO_PROXY)"
    ),
    ("base_path", None): (
        "Atlas has no {url}: atlas.base_url ({base_url}) has a path, and invoice-watch "
        "adds the API's ({prefix}) itself; set atlas.base_url to {origin}"
    ),
    (403, "IP_ADDRESS_NOT_ON_ACCESS_LIST"): (
        "Atlas refused requests from this machine's IP address{ip}: add it to the API "
        "access list of the {credentials} (Atlas: Organization Access Manager > "
        "Applications > the API key or service account > API Access List)"
    ),
    (403, "ORG_REQUIRES_ACCESS_LIST"): (
        "{org} requires an API access list and the {credentials} has none: add this "
        "machine's IP address{ip} to its API access list"
    ),
    (403, None): (
        "the {credentials} may not read the invoices of {org}: grant it the {role} role on "
        "this organization ({linked_roles} to see its linked invoices too)"
    ),
    (404, "INVOICE_NOT_FOUND"): "Atlas no longer knows this invoice of {org}",
    (404, None): (
        "Atlas knows no organization {org_id} that the {credentials} can see: check "
        "organizations[].id in the configuration against the id in the organization's "
        "settings, and that the {credentials} belongs to that organization"
    ),
    (407, None): (
        "the proxy {proxy} wants credentials it was not given or refused them: check the "
        "user and password in its URL (atlas.proxy, or HTTPS_PROXY/HTTP_PROXY)"
    ),
    (406, None): (
        "Atlas does not accept the API version this release of invoice-watch speaks "
        "({version}): upgrade invoice-watch"
    ),
    (410, None): (
        "Atlas retired the API version this release of invoice-watch speaks ({version}): "
        "upgrade invoice-watch"
    ),
    (429, None): (
        "Atlas kept rate-limiting the requests: lower atlas.max_concurrency or poll less "
        "often, or share the {credentials} with fewer clients"
    ),
    ("rate_limited", None): (
        "Atlas is rate-limiting the requests (should it go on: lower "
        "atlas.max_concurrency or poll less often, or share the {credentials} with fewer "
        "clients)"
    ),
    (400, None): (
        "Atlas refused the request: this release may not speak this Atlas (upgrade "
        "invoice-watch) or it is a bug (please report it with this message)"
    ),
    (500, None): "Atlas failed to answer (an error on its side)",
    ("redirect", None): (
        "Atlas answered with a redirect to {location}, which invoice-watch does not follow "
        "(credentials never leave atlas.base_url): if the API lives there, set "
        "atlas.base_url to it"
    ),
    ("refused", None): (
        "cannot connect to {host}:{port}{via}: connection refused (nothing listens "
        "there); check atlas.base_url"
    ),
    ("dns", None): (
        "the host name {host} does not resolve ({cause}); check atlas.base_url and this "
        "machine's DNS"
    ),
    ("tls", None): (
        "TLS with {host}:{port} failed ({cause}); check atlas.base_url, and behind a "
        "TLS-inspecting proxy add its CA to the system's trust store (or SSL_CERT_FILE)"
    ),
    ("timeout", None): "no answer within {timeout} (atlas.timeout) from {host}:{port}{via}",
    ("unreachable", None): (
        "cannot connect to {host}:{port}{via} ({cause}); check the network route and firewalls"
    ),
    ("broken", None): "the connection to {host}:{port}{via} broke off ({cause})",
    ("proxy", None): (
        "cannot go through the proxy {proxy} ({cause}); check atlas.proxy, or "
        "HTTPS_PROXY/HTTP_PROXY and NO_PROXY"
    ),
    ("proxy_plain", None): (
        "TLS with the proxy {proxy} failed ({cause}): it speaks plain HTTP; write its URL "
        "with http:// (atlas.proxy, or HTTPS_PROXY/HTTP_PROXY), as is usual even for "
        "https:// requests, which go through it encrypted all the same"
    ),
    ("proxy_auth", None): (
        "the proxy {proxy} refused the request ({cause}); check the user and password in "
        "its URL (atlas.proxy, or HTTPS_PROXY/HTTP_PROXY)"
    ),
    ("too_large", None): (
        "the answer is larger than {limit} (atlas.max_response_size) and was dropped: a "
        "page of Atlas's listing is far smaller, so something else may be answering (a "
        "proxy, a captive portal); raise atlas.max_response_size if it really is Atlas"
    ),
    ("too_many_values", None): (
        "the answer holds up to {values} JSON values, more than the {cap} allowed (one per "
        "{per} bytes of atlas.max_response_size), and was dropped unparsed: Atlas's "
        "answers hold far fewer, so something else may be answering; raise "
        "atlas.max_response_size if it really is Atlas"
    ),
    ("repeated_page", None): (
        "page {page} of the listing repeats invoices of earlier pages only: the server "
        "ignores pageNum; the listing was stopped"
    ),
    ("page_cap", None): "the listing did not end within {cap} pages; it was stopped",
    ("unexpected", None): (
        "reading or parsing the answer failed unexpectedly ({cause}); the traceback is in the log"
    ),
}


class _Fields(dict[str, str]):
    """Format fields; one a message does not know reads as ``?``."""

    def __missing__(self, key: str) -> str:
        return "?"


def explain(status: int | str, error_code: str | None = None, **fields: str) -> str:
    """What to fix for an Atlas answer (``status`` and ``errorCode``) or for one of the
    word-keyed rows of :data:`FIXES`, with ``fields`` filled in."""
    for key in (
        (status, error_code),
        (status, None),
        ((status // 100) * 100 if isinstance(status, int) else status, None),
    ):
        template = FIXES.get(key)
        if template is not None:
            return template.format_map(_Fields(fields))
    return f"Atlas answered HTTP {status}"


def server_text(value: object, limit: int = _SERVER_TEXT) -> str:
    """Text taken from a server, fit for a log line, the state file and a terminal:
    redacted (no secret, no HTTP credential) and escaped (no control character, bidi
    override or lone surrogate: :func:`invoice_watch.redact.redact`), on one line, at
    most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * limit:
        text = text[: 4 * limit]
    text = redact.redact(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class ApiError:
    """What an error answer's ``ApiError`` body says (all optional)."""

    code: str | None = None
    detail: str = ""  # through server_text
    parameters: tuple[str, ...] = ()  # through server_text

    def evidence(self, status: int) -> str:
        """``HTTP 403 IP_ADDRESS_NOT_ON_ACCESS_LIST: <detail>``."""
        text = f"HTTP {status}"
        if self.code:
            text += f" {self.code}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def ip(self) -> str:
        """The first IP address named by the detail or the parameters, else ``""``."""
        for text in (self.detail, *self.parameters):
            for candidate in _IP_CANDIDATE.findall(text):
                try:
                    return str(ipaddress.ip_address(candidate.strip(".:")))
                except ValueError:
                    continue
        return ""


def parse_api_error(body: bytes) -> ApiError:
    """An error answer's ``ApiError`` (``errorCode``, ``detail``, ``parameters``: Atlas
    sends strings and numbers there, the spec says objects); empty when the body is not
    one. Never raises."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ApiError()
    if not isinstance(data, dict):
        return ApiError()
    code = data.get("errorCode")
    detail = data.get("detail")
    if not isinstance(detail, str):
        detail = data.get("reason") if isinstance(data.get("reason"), str) else ""
    raw = data.get("parameters")
    parameters = (
        [p for p in raw[:10] if type(p) is str or (type(p) is int and abs(p) <= _INT64_MAX)]
        if isinstance(raw, list)
        else []
    )
    return ApiError(
        code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None,
        server_text(detail),
        tuple(server_text(str(p), 60) for p in parameters),
    )


def _foreign(content_type: str) -> bool:
    """Whether an error answer's media type says a web page or text, not the JSON of an
    Atlas (or OAuth) error: a proxy's, a firewall's or a captive portal's answer."""
    media = content_type.lower()
    return media.startswith("text/") or "html" in media


def _size(limit: int) -> str:
    return f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit / 2**10:g} KiB"


class _BadProxy(Exception):
    """The environment names a proxy URL that cannot be used."""


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the answer is larger than {limit} bytes")


async def _read_body(resp: ClientResponse, limit: int, *, truncate: bool = False) -> bytes:
    """The decoded body, read in chunks: at most ``limit`` bytes. Beyond it the
    connection is closed and :class:`_TooLarge` raised, or with ``truncate`` the first
    ``limit`` bytes are returned. (``read()`` has no cap: aiohttp's notes in
    LIBRARIES.md; the chunks are already decompressed, so a gzip bomb stops here.)"""
    length = resp.content_length
    # With a Content-Encoding, the wire size says little about the decoded one.
    plain = hdrs.CONTENT_ENCODING not in resp.headers
    if length is not None and length > limit and plain and not truncate:
        resp.close()
        raise _TooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            resp.close()
            if not truncate:
                raise _TooLarge(limit)
            chunks.append(chunk[: limit - (size - len(chunk))])
            break
        chunks.append(chunk)
    return b"".join(chunks)


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
        self.token_requests = 0

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
            self.token_requests += 1
            async with session.post(
                self._token_url,
                data={"grant_type": "client_credentials"},
                headers={hdrs.AUTHORIZATION: self._basic, hdrs.ACCEPT: "application/json"},
                middlewares=(),
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                body = await _read_body(resp, _SMALL_BODY, truncate=True)
                content_type = resp.content_type
                if resp.status in (400, 401, 403):
                    raise _TokenRefused(
                        resp.status, _oauth_error(body), parse_api_error(body), content_type
                    )
                if resp.status != 200:
                    raise _TokenUnavailable(
                        resp.status, resp.headers.get(hdrs.RETRY_AFTER), content_type
                    )
            token, lifetime = _parse_token(body, content_type)
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


def _oauth_error(body: bytes) -> str:
    """The RFC 6749 §5.2 ``error`` code of a token endpoint's refusal, else ``""``."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,40}", code) else ""


def _parse_token(body: bytes, content_type: str = "application/json") -> tuple[str, float]:
    """``access_token`` and ``expires_in`` (seconds, within 30 s .. 1 day; a number
    that is not one, or outside int64, reads as an hour) of a token answer (RFC 6749
    §5.1); :class:`_TokenUnavailable` for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _TokenUnavailable(200, None, content_type, not_oauth=True) from None
    token = data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        # Also keeps CR/LF out of a header.
        raise _TokenUnavailable(200, None, content_type, not_oauth=True)
    lifetime = data.get("expires_in", 3600)
    if type(lifetime) is int and abs(lifetime) > _INT64_MAX:
        lifetime = 3600  # float() of it would overflow
    if type(lifetime) not in (int, float) or not math.isfinite(lifetime):
        lifetime = 3600
    return token, min(max(float(lifetime), 30.0), 86400.0)


class _TokenRefused(Exception):
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


class _TokenUnavailable(Exception):
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


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None
    location: str | None = None
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Page:
    """One page of an invoice listing, parsed."""

    size: int  # entries in `results` (linked invoices not counted)
    total: int | None  # `totalCount`, an estimate, when the API gave one
    invoices: tuple[Invoice, ...]  # linked invoices flattened in, settled ones excepted
    settled: tuple[int, ...] = ()  # keys of the snapshot's settled invoices listed unchanged

    @property
    def full(self) -> bool:
        return self.size >= ITEMS_PER_PAGE

    def identity(self) -> frozenset[str | int]:
        """What the page lists: its invoices' ids and its settled keys."""
        return frozenset([*(i.id for i in self.invoices), *self.settled])


# A parsed page with the SHA-256 of the body it came from.
_Seen = tuple[bytes, Page]


def page_cap(total: int | None) -> int:
    """The most pages a listing may take: what ``totalCount`` promises (one page more
    for an invoice created while paging) plus a quarter, at least 3 more; at most
    :data:`~invoice_watch.constants.MAX_PAGES`, which is also the cap when page 1 gave
    no usable estimate."""
    if total is None or total < ITEMS_PER_PAGE:  # none, or contradicted by a full page 1
        return MAX_PAGES
    promised = total // ITEMS_PER_PAGE + 1
    return min(MAX_PAGES, promised + max(3, promised // 4))


@dataclass
class _Deprecation:
    """``Deprecation`` / ``Sunset`` headers seen on one endpoint (RFC 9745, RFC 8594):
    their dates, or their text (printable, shortened) when it is not a date."""

    deprecated_at: datetime | None = None
    deprecated_text: str = ""  # a Deprecation header that is neither a date nor `true`
    sunset: datetime | None = None
    sunset_text: str = ""  # a Sunset header that is not a date


_SF_DATE = re.compile(r"@(-?[0-9]{1,15})")
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def header_date(value: str) -> datetime | None:
    """The date a ``Deprecation`` or ``Sunset`` header gives, else None: an RFC 9651
    structured-field date (``@1688169599``, RFC 9745's form), an HTTP-date (RFC 9110
    §5.6.7, RFC 8594's form and the older Deprecation drafts'), or an ISO 8601 date or
    timestamp (``2027-10-01``, ``2027-10-01T00:00:00Z``: not what the RFCs say, but
    unambiguous; one without a timezone is read as UTC)."""
    text = value.strip()
    try:
        if m := _SF_DATE.fullmatch(text):
            return datetime.fromtimestamp(int(m[1]), UTC)
        iso = _ISO_DAY.match(text)
        when = datetime.fromisoformat(text) if iso else parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _deprecation_text(dep: _Deprecation, now: datetime) -> str:
    """``deprecated since 2026-10-01; Atlas will remove it on 2027-10-01: upgrade
    invoice-watch before then`` and its variants (a date to come or gone, none, a header
    that is not a date)."""
    text = "deprecated"
    if dep.deprecated_at is not None:
        text += f" {'since' if dep.deprecated_at <= now else 'from'} {dep.deprecated_at:%Y-%m-%d}"
    elif dep.deprecated_text:
        text += f" (its Deprecation header is not a date: {dep.deprecated_text!r})"
    if dep.sunset is None and dep.sunset_text:
        return text + (
            f"; its Sunset header is not a date ({dep.sunset_text!r}): upgrade invoice-watch"
        )
    if dep.sunset is None:
        return text + "; no removal date yet: upgrade invoice-watch"
    if dep.sunset <= now:
        return text + (
            f"; Atlas was to remove it on {dep.sunset:%Y-%m-%d}, which has passed: "
            "upgrade invoice-watch now"
        )
    return (
        text + f"; Atlas will remove it on {dep.sunset:%Y-%m-%d}: upgrade invoice-watch before then"
    )


class AtlasClient:
    """Lists invoices of Atlas (or Cloud Manager) organizations.

    One long-lived aiohttp session; at most ``max_concurrency`` requests in flight; with
    Digest keys, the first request authenticates alone so the others reuse its nonce
    instead of each drawing its own 401 challenge. Requests go through the proxy that
    :func:`invoice_watch.proxy.proxy_for` names (``atlas.proxy``, else ``HTTPS_PROXY``/
    ``HTTP_PROXY`` and ``NO_PROXY`` from ``environ``); ``~/.netrc`` is never read.

    Rate limits: a 429 waits for its ``Retry-After``, and longer when 429s repeat; while
    ``RateLimit-Remaining`` says fewer requests are left than may be in flight, requests
    go one at a time, waiting first when none is left. That hint lasts until an answer
    without it (Atlas documents it on 429s only), at most a minute (its window) or the
    429's ``Retry-After``. An OAuth access token is registered for redaction as soon as
    it is received. ``Deprecation``/``Sunset``
    headers are warned about once per :meth:`read_orgs`, and counted in ``metrics``.
    """

    def __init__(
        self,
        config: AtlasConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        org_names: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._org_names = dict(org_names or {})
        self._metrics = metrics
        self._environ = environ
        self._base = config.base_url.rstrip("/")
        self._prefix = API_PREFIXES[config.api]
        from invoice_watch.config import DigestAuth

        self._digest = isinstance(config.auth, DigestAuth)
        self._credentials = "API key" if self._digest else "service account"
        self._where = (
            "atlas.auth.public_key and private_key (or private_key_file)"
            if self._digest
            else "atlas.auth.client_id and client_secret (or client_secret_file)"
        )
        self._version = V2_API_VERSION if config.api == "v2" else f"{config.api} (v1.0)"
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._max_values = config.max_response_size // _BYTES_PER_VALUE
        self._authenticated = False
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._oauth: OAuthMiddleware | None = None
        self._proxy: str | None = None
        # Each org's listing pages of the last successful read, by page number: a page
        # whose body comes back byte for byte the same is not parsed again.
        self._seen: dict[str, dict[int, _Seen]] = {}
        # Rate limits: RateLimit-Remaining of the last answer, until when (monotonic) it
        # holds, the pause after an answer that took the last token, when (monotonic)
        # requests may go on.
        self._remaining: int | None = None
        self._remaining_until = 0.0
        self._pause = _PACE_SECONDS
        self._resume_at = 0.0
        self._pace_lock = asyncio.Lock()
        self._deprecations: dict[str, _Deprecation] = {}
        self.requests_sent = 0
        self.last_request_at: float | None = None  # monotonic start of the last request

    def __repr__(self) -> str:
        return f"AtlasClient(base_url={self._base!r}, api={self._config.api!r})"

    # -- lifecycle -------------------------------------------------------------------

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            from invoice_watch.config import DigestAuth

            configured = self._config.proxy.url if self._config.proxy is not None else None
            try:
                self._proxy = proxy_for(self._base, configured, self._environ)
            except ValueError as exc:  # a malformed HTTPS_PROXY: every org's read says so
                raise _BadProxy(f"{exc}; fix or unset it") from None
            auth = self._config.auth
            middleware: Any
            if isinstance(auth, DigestAuth):
                middleware = aiohttp.DigestAuthMiddleware(auth.public_key, auth.private_key.get())
            else:
                middleware = self._oauth = OAuthMiddleware(
                    self._base + OAUTH_TOKEN_PATH,
                    auth.client_id,
                    auth.client_secret.get(),
                    self._clock,
                    proxy=self._proxy,
                )
            seconds = self._config.timeout.total_seconds()
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=seconds, connect=min(10.0, seconds), sock_read=seconds
                ),
                connector=aiohttp.TCPConnector(
                    limit=self._config.max_concurrency,
                    limit_per_host=self._config.max_concurrency,
                ),
                middlewares=(middleware,),
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

    async def __aenter__(self) -> AtlasClient:
        with contextlib.suppress(_BadProxy):  # each read reports it
            self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- requests --------------------------------------------------------------------

    def _org_label(self, org_id: str) -> str:
        name = self._org_names.get(org_id)
        return f"{name} ({org_id})" if name and name != org_id else org_id

    def _accept(self, csv_body: bool = False) -> str:
        if self._config.api == "v2":
            return V2_CSV_MEDIA_TYPE if csv_body else V2_MEDIA_TYPE
        return "text/csv" if csv_body else "application/json"

    def _fields(self, org_id: str, url: URL) -> dict[str, str]:
        """What :func:`explain` may name about a request of ``org_id`` to ``url``."""
        return {
            "org": self._org_label(org_id),
            "org_id": org_id,
            "credentials": self._credentials,
            "where": self._where,
            "role": REQUIRED_ROLE,
            "linked_roles": LINKED_INVOICES_ROLES,
            "version": self._version,
            "host": url.host or "?",
            "port": str(url.port),
            "timeout": f"{self._config.timeout.total_seconds():g}s",
            "via": f", through the proxy {masked(self._proxy)}" if self._proxy else "",
            "proxy": masked(self._proxy) if self._proxy else "?",
            "ip": "",
        }

    async def _pace(self) -> None:
        """Wait until requests may go again: the ``Retry-After`` of the last 429, or a
        short pause after an answer said the token bucket is empty."""
        wait = self._resume_at - self._clock.monotonic()
        if wait > 0:
            log.debug("Atlas's rate limit: waiting %.1fs before the next request", wait)
            await self._clock.sleep(wait)

    async def _send_once(
        self, url: str, params: Mapping[str, str], accept: str, endpoint: str
    ) -> _Answer:
        session = self._open()
        async with self._semaphore:
            remaining = self._remaining
            if remaining is not None and self._clock.monotonic() >= self._remaining_until:
                remaining = self._remaining = None  # the bucket has refilled since
            if remaining is not None and remaining < self._config.max_concurrency:
                async with self._pace_lock:  # fewer requests left than may be in flight
                    await self._pace()
                    answer = await self._exchange(session, url, params, accept, endpoint)
            else:
                await self._pace()
                answer = await self._exchange(session, url, params, accept, endpoint)
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
    ) -> _Answer:
        """One request and its answer, its body read within the bounds."""
        self.requests_sent += 1
        self.last_request_at = self._clock.monotonic()
        async with session.get(
            url,
            params=params,
            headers={hdrs.ACCEPT: accept},
            allow_redirects=False,  # a credential never follows a redirect elsewhere
            proxy=self._proxy,
        ) as resp:
            self._note_headers(resp, endpoint)
            if 200 <= resp.status < 300:
                body = await _read_body(resp, self._config.max_response_size)
            else:
                body = await _read_body(resp, _SMALL_BODY, truncate=True)
            return _Answer(
                resp.status,
                body,
                resp.headers.get(hdrs.RETRY_AFTER),
                resp.headers.get(hdrs.LOCATION),
                resp.content_type,
            )

    def _note_headers(self, resp: ClientResponse, endpoint: str) -> None:
        """Take what the answer's headers say about rate limits and deprecation."""
        now = self._clock.monotonic()
        wait = None
        if resp.status == 429:  # nobody goes before its Retry-After
            wait = parse_retry_after(resp.headers.get(hdrs.RETRY_AFTER), self._clock.now())
            if wait is not None:
                wait = min(wait, _MAX_RETRY_AFTER)
                self._resume_at = max(self._resume_at, now + wait)
                cap = self._config.max_backoff.total_seconds()
                self._pause = min(max(wait, self._pause), cap)
        remaining = resp.headers.get("RateLimit-Remaining", "").strip()
        if _COUNT.fullmatch(remaining):
            self._remaining = int(remaining)
            self._remaining_until = now + max(wait or 0.0, _RATE_WINDOW)
            if self._remaining == 0 and resp.status != 429:
                # That was the last token: slow down rather than draw a 429.
                self._resume_at = max(self._resume_at, now + self._pause)
        elif self._remaining is not None:
            # An answer without the hint: nothing says the bucket is low any more.
            self._remaining = None
            self._pause = _PACE_SECONDS
        deprecation = resp.headers.get("Deprecation")
        sunset = resp.headers.get("Sunset")
        if deprecation is None and sunset is None:
            return
        seen = self._deprecations.setdefault(endpoint, _Deprecation())
        if deprecation is not None:
            seen.deprecated_at = header_date(deprecation)
            # RFC 9745 is a date; drafts before it also allowed `true` (`?1`: a
            # structured-field boolean).
            flag = deprecation.strip().lower() in ("true", "?1")
            malformed = seen.deprecated_at is None and not flag
            seen.deprecated_text = server_text(deprecation, 40) if malformed else ""
        if sunset is not None:
            seen.sunset = header_date(sunset)
            seen.sunset_text = "" if seen.sunset else server_text(sunset, 40)

    def _report_deprecations(self) -> None:
        """One warning per deprecated endpoint seen since the last report, and the
        metrics (``invoice_watch_atlas_deprecated_endpoint_sunset_timestamp_seconds``)."""
        seen, self._deprecations = self._deprecations, {}
        now = self._clock.now()
        for endpoint, dep in sorted(seen.items()):
            log.warning(
                "Atlas marks %s (API version %s) as %s",
                endpoint,
                self._version,
                _deprecation_text(dep, now),
            )
            if self._metrics is not None:
                self._metrics.atlas_deprecations.labels(endpoint=endpoint).inc()
                if not dep.sunset_text:  # a malformed Sunset is said, not exported as 0
                    self._metrics.atlas_sunset.labels(endpoint=endpoint).set(
                        dep.sunset.timestamp() if dep.sunset else 0
                    )

    async def _send(
        self, url: str, params: Mapping[str, str], accept: str, endpoint: str
    ) -> _Answer:
        """Send one request. Until one has been answered without a 401/403, requests go
        one at a time, so that the others reuse its Digest nonce or OAuth token instead
        of each drawing a challenge of its own."""
        if not self._authenticated:
            async with self._auth_lock:
                if not self._authenticated:  # else another request did it while we waited
                    answer = await self._send_once(url, params, accept, endpoint)
                    if answer.status not in (401, 403):
                        self._authenticated = True
                    return answer
        return await self._send_once(url, params, accept, endpoint)

    def _transport(self, exc: BaseException, url: URL) -> tuple[str, dict[str, str]]:
        """The :data:`FIXES` row of a request that got no usable answer, and its fields:
        host and port (of the proxy when it is the one that failed) and the cause."""
        host, port = url.host or "?", url.port
        if isinstance(exc, aiohttp.ClientConnectorError):
            host, port = exc.host, exc.port
        os_error = getattr(exc, "os_error", None)
        strerror = getattr(os_error, "strerror", None) or str(os_error or exc)
        fields = {"host": host, "port": str(port), "cause": server_text(strerror, 120)}
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            fields["cause"] = f"HTTP {exc.status}"
            return ("proxy_auth" if exc.status == 407 else "proxy"), fields
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return "proxy", fields
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return "dns", fields
        proxy = URL(self._proxy) if self._proxy else None
        if isinstance(exc, aiohttp.ClientSSLError):
            if proxy is not None and (host, port) == (proxy.host, proxy.port):
                # TLS with the proxy itself (an https:// proxy URL) failed.
                plain = getattr(os_error, "reason", None) == "WRONG_VERSION_NUMBER"
                return ("proxy_plain" if plain else "proxy"), fields
            return "tls", fields
        if isinstance(exc, TimeoutError):
            if proxy is not None and proxy.scheme == "https":
                fields["via"] = (
                    f", through the proxy {masked(self._proxy or '')} (its URL says "
                    "https://, but most proxies speak plain HTTP: then write http://)"
                )
            return "timeout", fields
        if isinstance(exc, aiohttp.ClientConnectorError):
            if isinstance(os_error, ConnectionRefusedError):
                return "refused", fields
            return "unreachable", fields
        if isinstance(exc, aiohttp.ClientPayloadError):
            fields["cause"] = "the answer was cut short"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            fields["cause"] = "the server closed the connection"
        elif not isinstance(exc, aiohttp.ClientOSError):
            fields["cause"] = type(exc).__name__
        return "broken", fields

    async def _get(
        self,
        org_id: str,
        path: str,
        params: Mapping[str, str],
        *,
        endpoint: str,
        csv_body: bool = False,
    ) -> bytes:
        """GET with retries; returns the body of a 2xx answer or raises FetchError whose
        message says what to fix (:data:`FIXES`). ``endpoint``: the path's template
        (``/orgs/{orgId}/invoices``), for deprecation warnings."""
        url = f"{self._base}{self._prefix}{path}"
        endpoint = self._prefix + endpoint
        try:
            self._open()  # so that the proxy is known to the messages below
        except _BadProxy as exc:
            raise FetchError(org_id, str(exc)) from None
        fields = self._fields(org_id, URL(url))
        accept = self._accept(csv_body)
        label = self._org_label(org_id)
        retries = self._config.retries
        cap = self._config.max_backoff.total_seconds()
        fix = evidence = ""
        timed_out = False
        throttled = 0  # 429s in a row
        for attempt in range(retries + 1):
            retry_after: float | None = None
            try:
                answer = await self._send(url, params, accept, endpoint)
            except _TokenRefused as exc:
                raise FetchAuthError(
                    org_id, f"{path}: {self._token_refused(exc, fields)}"
                ) from None
            except _TokenUnavailable as exc:
                if exc.not_oauth:
                    fix = explain(
                        "token_not_oauth",
                        url=self._base + OAUTH_TOKEN_PATH,
                        content_type=server_text(exc.content_type, 60),
                    )
                else:
                    fix = "the OAuth token endpoint failed"
                evidence = f"HTTP {exc.status}"
                retry_after = parse_retry_after(exc.retry_after, self._clock.now())
            except _TooLarge as exc:
                raise FetchDataError(
                    org_id, f"{path}: {explain('too_large', limit=_size(exc.limit))}"
                ) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind, where = self._transport(exc, URL(url))
                fix, evidence = explain(kind, **{**fields, **where}), ""
                timed_out = kind == "timeout"
            else:
                decision = classify_status(answer.status)
                if decision is Decision.OK:
                    if attempt:
                        log.info("%s: %s succeeded after %d retries", label, path, attempt)
                    return answer.body
                timed_out = False
                error = parse_api_error(answer.body)
                evidence = error.evidence(answer.status)
                if 300 <= answer.status < 400:
                    location = server_text(answer.location or "(no Location)", 120)
                    raise FetchStatusError(
                        org_id,
                        answer.status,
                        f"{path}: {explain('redirect', location=location)} (HTTP {answer.status})",
                    )
                ip = error.ip()
                fix = explain(answer.status, error.code, **{**fields, "ip": f" {ip}" if ip else ""})
                throttled = throttled + 1 if answer.status == 429 else 0
                if throttled == 1:  # not "kept rate-limiting" yet
                    fix = explain("rate_limited", **fields)
                if answer.status == 404 and URL(self._base).path not in ("", "/"):
                    fix = explain(
                        "base_path",
                        url=url,
                        base_url=self._base,
                        prefix=self._prefix,
                        origin=str(URL(self._base).origin()),
                    )
                elif (
                    decision in (Decision.AUTH, Decision.FAIL)
                    and answer.status != 407
                    and error.code is None
                    and _foreign(answer.content_type)
                ):
                    fix = explain(
                        "not_atlas",
                        what="the answer",
                        content_type=server_text(answer.content_type, 60),
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
                retry_after_cap=_MAX_RETRY_AFTER,
            )
            if throttled > 1:
                # 429s in a row: wait longer than asked, more each time (and spread
                # out), as Atlas's documentation advises.
                more = backoff(throttled - 2, base=_BACKOFF_BASE, cap=cap, rng=self._rng)
                delay = min(delay + more, _MAX_RETRY_AFTER)
            log.warning(
                "%s: %s: %s; retry %d of %d in %.1fs",
                label,
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

    def _token_refused(self, exc: _TokenRefused, fields: dict[str, str]) -> str:
        """What to fix when the OAuth token endpoint refused the token request: what
        its Atlas ``errorCode`` means when :data:`FIXES` has a row for it (an API access
        list, say), a word that the answer is not Atlas's (a proxy's or a firewall's
        page), else that the service account was refused; with the evidence."""
        api = exc.api_error
        if api.code and (exc.status, api.code) in FIXES:
            ip = api.ip()
            fix = explain(exc.status, api.code, **{**fields, "ip": f" {ip}" if ip else ""})
            return f"{fix} (the OAuth token endpoint: {api.evidence(exc.status)})"
        if not exc.code and not api.code and _foreign(exc.content_type):
            fix = explain(
                "not_atlas",
                what="the OAuth token endpoint's answer",
                content_type=server_text(exc.content_type, 60),
            )
            return f"{fix} (HTTP {exc.status})"
        cause = f"HTTP {exc.status}" + (f" {exc.code}" if exc.code else "")
        return f"{explain('token', **fields)} ({cause})"

    def _unexpected(self, org_id: str, doing: str, exc: BaseException) -> FetchError:
        """An exception no check foresaw, while ``doing`` something for ``org_id``:
        logged with its traceback (redacted), returned as that org's FetchError."""
        lines = traceback.format_exception(exc)
        text = redact.redact(
            "".join(line if len(line) < 2000 else line[:2000] + "…\n" for line in lines)
        )
        if len(text) > 20_000:
            text = text[:10_000] + "\n[…]\n" + text[-10_000:]
        log.error(
            "%s: %s failed unexpectedly; this organization's read counts as failed:\n%s",
            self._org_label(org_id),
            doing,
            text.rstrip(),
        )
        cause = server_text(f"{type(exc).__name__}: {exc}", 200)
        return FetchDataError(org_id, explain("unexpected", cause=cause))

    # -- operations ------------------------------------------------------------------

    async def list_invoices(self, org_id: str, from_date: date | None = None) -> list[Invoice]:
        """Every invoice of the organization (and of its linked organizations)."""
        invoices, _, _ = await self._list(org_id, from_date, Snapshot())
        return invoices

    async def _list(
        self, org_id: str, from_date: date | None, known: Snapshot
    ) -> tuple[list[Invoice], frozenset[int], int]:
        """The organization's listing: its invoices (linked ones included), but those of
        ``known``'s settled invoices that are listed unchanged: their keys; and how many
        entries were nested in another's ``linkedInvoices``.

        Pages of ``itemsPerPage=500`` sorted by start date ascending (new invoices land on
        the last page, so an invoice created while paging cannot shift another one out of
        view), until a page comes back shorter than asked. Page 1 asks for
        ``totalCount``; when that estimate promises more pages, they are requested
        together (each within the concurrency bound), then paging goes on one page at a
        time for as long as the estimate fell short.

        Bounded: a full page that lists nothing new (a server repeating page 1) ends the
        listing as a failed read, and so does going past :func:`page_cap` pages.

        ``known``: the invoices as last stored; a live one listed unchanged comes back as
        that very object, so that it is kept in memory once. A page is parsed again only
        when its body changed, or when it held an invoice that the snapshot is about to
        keep settled (so that it is not kept in memory as an object until then).
        """
        seen = {1: await self._page(org_id, 1, from_date, known)}
        first = seen[1][1]
        cap = page_cap(first.total)
        if first.full and first.total:
            promised = min(first.total // ITEMS_PER_PAGE + 1, _PAGES_AT_ONCE, cap)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = {
                        number: group.create_task(self._page(org_id, number, from_date, known))
                        for number in range(2, promised + 1)
                    }
            except* Exception as errors:
                failures = errors.exceptions
                first_error = next((e for e in failures if isinstance(e, FetchError)), None)
                raise first_error or failures[0] from None
            seen.update((number, task.result()) for number, task in tasks.items())
        listed: set[str | int] = set(first.identity())
        number = 1
        while seen[number][1].full:
            number += 1
            if number > cap:
                raise FetchDataError(org_id, explain("page_cap", cap=str(cap)))
            if number not in seen:
                seen[number] = await self._page(org_id, number, from_date, known)
            identity = seen[number][1].identity()
            if seen[number][1].full and identity <= listed:
                raise FetchDataError(org_id, explain("repeated_page", page=str(number)))
            listed |= identity
        self._seen[org_id] = {
            number: (digest, page)
            for number, (digest, page) in seen.items()
            if not any(invoice.status in known.settles for invoice in page.invoices)
        }
        found: dict[str, Invoice] = {}
        settled: set[int] = set()
        nested = 0  # a page holds one entry per result, and one per linked invoice in it
        for _, page in seen.values():
            for invoice in page.invoices:
                found[invoice.id] = invoice
            settled.update(page.settled)
            nested += len(page.invoices) + len(page.settled) - page.size
        return list(found.values()), frozenset(settled), nested

    async def _page(
        self, org_id: str, number: int, from_date: date | None, known: Snapshot
    ) -> _Seen:
        """One page of the listing; parsed only when its body differs from the one this
        page had in the last successful listing."""
        params = {
            "itemsPerPage": str(ITEMS_PER_PAGE),
            "pageNum": str(number),
            "includeCount": "true" if number == 1 else "false",
            "viewLinkedInvoices": "true",
            "sortBy": "START_DATE",
            "orderBy": "asc",
        }
        if from_date is not None:
            params["fromDate"] = from_date.isoformat()
        body = await self._get(
            org_id, f"/orgs/{org_id}/invoices", params, endpoint="/orgs/{orgId}/invoices"
        )
        digest = hashlib.sha256(body).digest()
        before = self._seen.get(org_id, {}).get(number)
        if before is not None and before[0] == digest:
            return before
        if len(body) > _PARSE_INLINE:  # off the event loop
            page = await asyncio.to_thread(parse_page, org_id, body, known, self._max_values)
        else:
            page = parse_page(org_id, body, known, self._max_values)
        return digest, page

    async def read_org(
        self, org_id: str, from_date: date | None = None, known: Snapshot | None = None
    ) -> OrgRead:
        """List one organization's invoices; a failure is reported, never raised (an
        unexpected exception included: it is logged with its traceback). Cancellation
        propagates. ``known``: its snapshot (see :meth:`_list`)."""
        before = self.requests_sent
        try:
            invoices, settled, linked = await self._list(
                org_id, from_date, known if known is not None else Snapshot()
            )
        except FetchError as exc:  # its server text went through server_text()
            refused = isinstance(exc, FetchAuthError | FetchStatusError)
            return OrgRead(
                org_id, error=str(exc), requests=self.requests_sent - before, refused=refused
            )
        except Exception as exc:  # any body whatsoever fails this org only
            error = self._unexpected(org_id, "reading its invoices", exc)
            return OrgRead(org_id, error=str(error), requests=self.requests_sent - before)
        return OrgRead(
            org_id,
            tuple(invoices),
            settled,
            requests=self.requests_sent - before,
            listed=len(invoices) + len(settled),
            linked=linked,
        )

    async def read_orgs(
        self,
        org_ids: Sequence[str],
        from_dates: Mapping[str, date | None] | None = None,
        known: Mapping[str, Snapshot] | None = None,
        on_read: Callable[[OrgRead], Awaitable[None]] | None = None,
    ) -> dict[str, OrgRead]:
        """Read every organization concurrently; one failing never blocks the others.

        ``on_read`` is awaited with each organization's read as soon as it is complete,
        while the others are still being read; the reads returned are then their
        outcomes only (:meth:`OrgRead.outcome`), so that no organization's listing is
        held until the last one is read. An exception from ``on_read`` for one
        organization is logged with its traceback and makes that organization's read a
        failed one, which ``on_read`` is given again (so that it is recorded as any
        failed read is); it never stops another organization's read. Cancellation
        propagates.

        With Digest keys the first request goes alone again: the nonce of the last
        cycle may have gone stale since, and only one request should learn it.
        """
        from_dates = from_dates or {}
        known = known or {}
        reads: dict[str, OrgRead] = {}
        if self._digest:
            self._authenticated = False

        async def one(org_id: str) -> None:
            read = reads[org_id] = await self.read_org(
                org_id, from_dates.get(org_id), known.get(org_id)
            )
            if on_read is None:
                return
            try:
                await on_read(read)
            except Exception as exc:  # this org fails; the others go on
                error = self._unexpected(org_id, "taking its read", exc)
                failed = reads[org_id] = OrgRead(org_id, error=str(error), requests=read.requests)
                try:
                    await on_read(failed)
                except Exception as again:
                    self._unexpected(org_id, "recording its failed read", again)
                return
            reads[org_id] = read.outcome()

        try:
            async with asyncio.TaskGroup() as group:
                for org_id in org_ids:
                    group.create_task(one(org_id))
        finally:
            self._report_deprecations()
        return {org_id: reads[org_id] for org_id in org_ids}

    async def pending_line_items(self, org_id: str) -> dict[str, list[LineItem]]:
        """Line items of the organization's pending invoices, by invoice id (for breakdowns
        in messages; fetched only when a message needs them). Raises FetchError only."""
        body = await self._get(
            org_id,
            f"/orgs/{org_id}/invoices/pending",
            {},
            endpoint="/orgs/{orgId}/invoices/pending",
        )
        try:
            if len(body) > _PARSE_INLINE:  # off the event loop
                return await asyncio.to_thread(_pending_items, org_id, body, self._max_values)
            return _pending_items(org_id, body, self._max_values)
        except FetchError:
            raise
        except Exception as exc:  # a body no check foresaw
            raise self._unexpected(org_id, "reading its pending invoices", exc) from None

    async def invoice_line_items(self, org_id: str, invoice_id: str) -> list[LineItem]:
        """Line items of one invoice, from its CSV. Raises FetchError only."""
        body = await self._get(
            org_id,
            f"/orgs/{org_id}/invoices/{invoice_id}/csv",
            {},
            endpoint="/orgs/{orgId}/invoices/{invoiceId}/csv",
            csv_body=True,
        )
        try:
            if len(body) > _PARSE_INLINE:  # off the event loop
                return await asyncio.to_thread(_parse_csv_body, body, self._max_values)
            return _parse_csv_body(body, self._max_values)
        except (UnicodeDecodeError, ValueError, csv.Error, ArithmeticError) as exc:
            raise FetchDataError(
                org_id, f"the invoice CSV is malformed: {server_text(exc, 120)}"
            ) from None
        except Exception as exc:
            raise self._unexpected(org_id, "reading an invoice's CSV", exc) from None


# -- parsing ---------------------------------------------------------------------------


def _pending_items(
    org_id: str, body: bytes, max_values: int = _MAX_VALUES
) -> dict[str, list[LineItem]]:
    items: dict[str, list[LineItem]] = {}
    queue: list[tuple[Any, int]] = [(raw, 0) for raw in _results(org_id, body, max_values)]
    while queue:
        entry, depth = queue.pop()
        if not isinstance(entry, dict):
            continue
        linked = entry.get("linkedInvoices")
        if isinstance(linked, list) and depth < _MAX_LINK_DEPTH:
            queue.extend((nested, depth + 1) for nested in linked)
        line_items = entry.get("lineItems")
        invoice_id = entry.get("id")
        if isinstance(invoice_id, str) and isinstance(line_items, list):
            if not _HEX24.fullmatch(invoice_id):
                continue  # no invoice of the listing has this id: no message asks for it
            items[invoice_id] = _line_items_json(org_id, invoice_id, line_items)
    return items


def json_values(body: bytes) -> int:
    """How many JSON values ``body`` may hold, counted without parsing it: every array
    and object opens with a bracket, every value but the first of one follows a comma
    (those within strings are counted too: an overestimate, never an underestimate of
    what parsing it would build)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{")


class _TooManyValues(FetchDataError):
    pass


def _listing(org_id: str, body: bytes, max_values: int = _MAX_VALUES) -> dict[str, Any]:
    """A list endpoint's answer, checked to hold a `results` list; FetchDataError for
    an answer of more than ``max_values`` JSON values (:func:`json_values`), before it is
    parsed."""
    if len(body) > max_values and (values := json_values(body)) > max_values:
        raise _TooManyValues(
            org_id,
            explain(
                "too_many_values",
                values=f"{values:,}",
                cap=f"{max_values:,}",
                per=str(_BYTES_PER_VALUE),
            ),
        )
    try:
        data = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        raise FetchDataError(org_id, "the API answered with a body that is not JSON") from None
    except RecursionError:
        raise FetchDataError(org_id, "the API answered with JSON nested too deeply") from None
    if isinstance(data, dict) and "content" in data and "status" in data:
        data = data["content"]  # envelope=true
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FetchDataError(org_id, "the API answer has no `results` list")
    return data


def _results(org_id: str, body: bytes, max_values: int = _MAX_VALUES) -> list[Any]:
    results: list[Any] = _listing(org_id, body, max_values)["results"]
    return results


def parse_page(
    org_id: str, body: bytes, known: Snapshot | None = None, max_values: int = _MAX_VALUES
) -> Page:
    """One page of the organization's invoice listing -> :class:`Page`.

    A live invoice equal to its namesake in ``known`` is returned as that object; a
    settled one listed unchanged, as its key. FetchDataError for anything malformed,
    and for more than ``max_values`` JSON values (refused before parsing).
    """
    data = _listing(org_id, body, max_values)
    results = data["results"]
    total = data.get("totalCount")
    if type(total) is int and abs(total) > _INT64_MAX:
        raise FetchDataError(org_id, "`totalCount` is not an int64")
    invoices: list[Invoice] = []
    settled: list[int] = []
    for item in results:
        _flatten(org_id, item, known if known is not None else Snapshot(), invoices, settled)
    return Page(
        size=len(results),
        total=total if type(total) is int else None,
        invoices=tuple(invoices),
        settled=tuple(settled),
    )


def _flatten(
    source_org_id: str,
    item: Any,
    known: Snapshot,
    out: list[Invoice],
    settled: list[int],
    depth: int = 0,
) -> None:
    """The invoice and, recursively, the linked invoices nested in it, appended to
    ``out``: the known object when nothing in the item differs from it (checked field by
    field, without building a new invoice: most of a listing is unchanged), else the
    item parsed; or to ``settled``, the key of a settled invoice that is unchanged.
    ``linkedInvoices`` must be a list, nested at most :data:`_MAX_LINK_DEPTH` deep."""
    before = key = None
    if type(item) is dict and type(invoice_id := item.get("id")) is str:
        before = known.live.get(invoice_id)
        key = known.settled.get(invoice_id)
    if before is not None and _unchanged(before, item):
        out.append(before)
    elif key is not None and _settled_key(item) == key:
        settled.append(key)
    else:
        invoice = parse_invoice(source_org_id, item)
        out.append(before if before == invoice else invoice)
    linked = item.get("linkedInvoices")
    if linked:
        if type(linked) is not list:
            raise FetchDataError(
                source_org_id, f"invoice {item.get('id')!s:.40}: `linkedInvoices` is not a list"
            )
        if depth >= _MAX_LINK_DEPTH:
            raise FetchDataError(source_org_id, "`linkedInvoices` are nested too deeply")
        for nested in linked:
            _flatten(source_org_id, nested, known, out, settled, depth + 1)


def _unchanged(before: Invoice, item: dict[str, Any]) -> bool:
    """Whether :func:`parse_invoice` would make of ``item`` an invoice equal to
    ``before`` (which passed its checks when it was parsed)."""
    if item.get("statusName") != before.status or item.get("orgId") != before.org_id:
        return False
    for api_name, attr in AMOUNT_ATTRS.items():
        value = item.get(api_name)
        if value is None:
            if api_name == "amountBilledCents" or getattr(before, attr) != 0:
                return False
        elif type(value) is not int or value != getattr(before, attr):
            return False
    return (
        _same_instant(item.get("startDate"), before.start_date)
        and _same_instant(item.get("endDate"), before.end_date)
        and _same_instant(item.get("created"), before.created)
        and _same_instant(item.get("updated"), before.updated)
    )


def _settled_key(item: dict[str, Any]) -> int | None:
    """The settled key (:func:`~invoice_watch.types.settled_key`) of the invoice that
    :func:`parse_invoice` would make of ``item``, or None where it would refuse the item
    or might (then it is parsed, and what is wrong is reported)."""
    invoice_id, owner, status = item.get("id"), item.get("orgId"), item.get("statusName")
    if type(invoice_id) is not str or type(owner) is not str or type(status) is not str:
        return None
    amounts = []
    for api_name in AMOUNT_ATTRS:
        value = item.get(api_name)
        if value is None:
            if api_name == "amountBilledCents":
                return None
            value = 0
        elif type(value) is not int:
            return None
        amounts.append(value)
    start, end = _aware(item.get("startDate")), _aware(item.get("endDate"))
    created, updated = item.get("created"), item.get("updated")
    if start is None or end is None:
        return None
    if created is not None and (created := _aware(created)) is None:
        return None
    if updated is not None and (updated := _aware(updated)) is None:
        return None
    return settled_key(invoice_id, owner, status, tuple(amounts), start, end, created, updated)


def _aware(value: Any) -> datetime | None:
    """A timestamp as :func:`parse_invoice` reads it, or None where it would not."""
    if type(value) is not str:
        return None
    try:
        parsed = instant(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _same_instant(value: Any, known: datetime | None) -> bool:
    if value is None or known is None:
        return value is None and known is None
    return _aware(value) == known  # None (not a timestamp, or naive) never equals it


def _timestamp(org_id: str, item: dict[str, Any], key: str, *, required: bool) -> datetime | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise FetchDataError(org_id, f"invoice {item.get('id')!s:.40}: `{key}` is missing")
    try:
        parsed = instant(value)
    except ValueError:
        raise FetchDataError(
            org_id, f"invoice {item.get('id')!s:.40}: `{key}` is not a timestamp"
        ) from None
    if parsed.tzinfo is None:
        raise FetchDataError(org_id, f"invoice {item.get('id')!s:.40}: `{key}` has no timezone")
    try:
        parsed.astimezone(UTC)  # later stages work in UTC
    except OverflowError:
        raise FetchDataError(
            org_id, f"invoice {item.get('id')!s:.40}: `{key}` is out of range"
        ) from None
    return parsed


def parse_invoice(source_org_id: str, item: Any) -> Invoice:
    """One ``BillingInvoiceMetadata`` object -> :class:`Invoice`, checked field by field.

    The organization id and the status are interned: thousands of invoices share them.
    """
    org = source_org_id
    if not isinstance(item, dict):
        raise FetchDataError(org, "an entry of `results` is not an object")
    invoice_id = item.get("id")
    if not isinstance(invoice_id, str) or not _HEX24.fullmatch(invoice_id):
        raise FetchDataError(org, f"an invoice id is not 24 hex digits: {invoice_id!r:.40}")
    owner = item.get("orgId")
    if not isinstance(owner, str) or not _HEX24.fullmatch(owner):
        raise FetchDataError(org, f"invoice {invoice_id}: `orgId` is not 24 hex digits")
    status = item.get("statusName")
    if not isinstance(status, str) or not status:
        raise FetchDataError(org, f"invoice {invoice_id}: `statusName` is missing")
    if status not in _KNOWN_STATUSES and not _STATUS.fullmatch(status):
        raise FetchDataError(
            org,
            f"invoice {invoice_id}: `statusName` {status!r:.40} is not a status name "
            "(capital letters, digits and _, as PENDING or FAILED)",
        )
    amounts: dict[str, int] = {}
    values: dict[int, int] = {}  # equal amounts (billed and paid, say) share one int
    for api_name, attr in AMOUNT_ATTRS.items():
        value = item.get(api_name)
        if value is None:
            if api_name == "amountBilledCents":
                # Reading it as $0 would resolve a pending-amount alert that still holds.
                raise FetchDataError(org, f"invoice {invoice_id}: `{api_name}` is missing")
            value = 0
        elif type(value) is not int or abs(value) > _INT64_MAX:  # bool is not an int here
            raise FetchDataError(org, f"invoice {invoice_id}: `{api_name}` is not an int64")
        amounts[attr] = values.setdefault(value, value)
    start = _timestamp(org, item, "startDate", required=True)
    end = _timestamp(org, item, "endDate", required=True)
    assert start is not None and end is not None
    return Invoice(
        id=invoice_id,
        org_id=sys.intern(owner),
        status=sys.intern(status),
        start_date=start,
        end_date=end,
        created=_timestamp(org, item, "created", required=False),
        updated=_timestamp(org, item, "updated", required=False),
        source_org_id=source_org_id,
        **amounts,
    )


def _label(value: object, default: str) -> str:
    """A line item's project, SKU or cluster name as messages show it: printable
    (:func:`invoice_watch.redact.printable`), on one line, at most :data:`_LABEL`
    characters; ``default`` when empty. Never raises."""
    if value is None or value == "":
        return default
    text = value if isinstance(value, str) else str(value)
    text = printable(" ".join(text[: 4 * _LABEL].split()))
    if not text:
        return default
    return text if len(text) <= _LABEL else text[: _LABEL - 1] + "…"


def _line_items_json(org_id: str, invoice_id: str, raw: list[Any]) -> list[LineItem]:
    """A pending invoice's ``lineItems``. ``totalPriceCents`` must be an int64 (absent:
    0); FetchDataError otherwise."""
    items = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        cents = entry.get("totalPriceCents", 0)
        if cents is None:
            cents = 0
        if type(cents) is not int or abs(cents) > _INT64_MAX:
            raise FetchDataError(
                org_id,
                f"invoice {invoice_id}: a line item's `totalPriceCents` is not an int64",
            )
        group = entry.get("groupName") or entry.get("groupId")
        items.append(
            LineItem(
                project=_label(group, "—"),
                sku=_label(entry.get("sku"), "—"),
                cluster=_label(entry.get("clusterName"), ""),
                amount_cents=cents,
            )
        )
    return items


def _parse_csv_body(body: bytes, max_rows: int) -> list[LineItem]:
    return parse_invoice_csv(body.decode("utf-8-sig"), max_rows)


def parse_invoice_csv(text: str, max_rows: int | None = None) -> list[LineItem]:
    """The invoice CSV: a header block, a blank line, then one row per line item.
    :class:`ValueError` for a malformed one: an amount that is not a number of dollars
    within int64 cents, or more than ``max_rows`` rows (default: as many as
    ``atlas.max_response_size``'s default holds values, :data:`_MAX_VALUES`)."""
    limit = _MAX_VALUES if max_rows is None else max_rows
    blocks = re.split(r"\r?\n\r?\n", text, maxsplit=1)
    if len(blocks) != 2:
        raise ValueError("no blank line between the header block and the line items")
    items: list[LineItem] = []
    for row in csv.DictReader(io.StringIO(blocks[1])):  # one row at a time
        if len(items) >= limit:
            raise ValueError(f"more than {limit:,} line items")
        amount = (row.get("Amount") or "").replace("$", "").replace(",", "").strip()
        try:
            dollars = Decimal(amount or "0")
            if not dollars.is_finite() or abs(dollars) > _INT64_DOLLARS:
                raise InvalidOperation
        except InvalidOperation:
            raise ValueError(f"amount {amount!r:.20} is not a number of dollars") from None
        items.append(
            LineItem(
                project=_label((row.get("Project") or "").strip(), "—"),
                sku=_label((row.get("SKU") or "").strip(), "—"),
                cluster=_label((row.get("Cluster") or "").strip(), ""),
                amount_cents=int((dollars * 100).to_integral_value()),
            )
        )
    return items
