"""Stage 1, fetch: read invoices from the Atlas Administration API.

Owns the HTTP side of the product: the aiohttp session, authentication (HTTP Digest API
keys or an OAuth service account), the three API flavors, paging, bounded concurrency,
retries with backoff, and turning every failure into a :class:`FetchError` for the one
organization it hit. Nothing outside this module sees an aiohttp type.
"""

from __future__ import annotations

import asyncio
import csv
import enum
import hashlib
import io
import json
import logging
import random
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs

from invoice_watch import __version__
from invoice_watch.clock import Clock, SystemClock
from invoice_watch.constants import (
    API_PREFIXES,
    ITEMS_PER_PAGE,
    OAUTH_TOKEN_PATH,
    REQUIRED_ROLE,
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
from invoice_watch.retry import parse_retry_after, retry_delay
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

log = logging.getLogger(__name__)

_HEX24 = re.compile(r"^[a-f0-9]{24}$")
_INT64_MAX = 2**63 - 1
_BACKOFF_BASE = 1.0
# Atlas's Retry-After is honoured up to this (beyond atlas.max_backoff: retrying sooner
# than asked only draws another 429).
_MAX_RETRY_AFTER = 300.0
# At most this many pages are requested together on the strength of `totalCount` (an
# estimate: a wild one must not turn into thousands of requests); paging goes on past it.
_PAGES_AT_ONCE = 100


class Decision(enum.Enum):
    """What to do with an HTTP status: the one place retry-or-give-up is decided."""

    OK = "ok"
    RETRY_AFTER = "retry-after"  # honour Retry-After when given, else back off
    BACKOFF = "backoff"  # exponential backoff with jitter
    AUTH = "auth"  # 401/403: credentials or role; never retried
    FAIL = "fail"  # retrying cannot help


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


class OAuthMiddleware:
    """aiohttp client middleware for Atlas service accounts (OAuth 2.0 client credentials).

    The token is fetched lazily, reused until shortly before it expires, and refreshed
    once when the API answers 401 (revoked or expired early). The token request itself
    bypasses this middleware.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str, clock: Clock) -> None:
        self._token_url = token_url
        self._basic = aiohttp.encode_basic_auth(client_id, client_secret)
        self._clock = clock
        self._token: str | None = None
        self._expires_at: datetime | None = None
        self._lock = asyncio.Lock()
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
            ) as resp:
                body = await resp.read()
                if resp.status in (400, 401, 403):
                    raise _TokenRefused(resp.status)
                if resp.status != 200:
                    raise _TokenUnavailable(resp.status, resp.headers.get(hdrs.RETRY_AFTER))
            try:
                data = json.loads(body)
                token = str(data["access_token"])
                lifetime = float(data.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError) as exc:
                raise _TokenUnavailable(200, None) from exc
            # Refresh a minute early (or at 90% of a short lifetime).
            margin = min(60.0, lifetime * 0.1)
            self._token = token
            self._expires_at = self._clock.now() + timedelta(seconds=lifetime - margin)
            return token

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        token = await self._token_for(request.session, stale=None)
        request.headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        response = await handler(request)
        if response.status != 401:
            return response
        response.release()
        token = await self._token_for(request.session, stale=token)
        request.headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        return await handler(request)


class _TokenRefused(Exception):
    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"token endpoint answered {status}")


class _TokenUnavailable(Exception):
    def __init__(self, status: int, retry_after: str | None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"token endpoint answered {status}")


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None


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


# A parsed page with the SHA-256 of the body it came from.
_Seen = tuple[bytes, Page]


class AtlasClient:
    """Lists invoices of Atlas (or Cloud Manager) organizations.

    One long-lived aiohttp session; at most ``max_concurrency`` requests in flight; with
    Digest keys, the first request authenticates alone so the others reuse its nonce
    instead of each drawing its own 401 challenge.
    """

    def __init__(
        self,
        config: AtlasConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        org_names: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._org_names = dict(org_names or {})
        self._base = config.base_url.rstrip("/")
        self._prefix = API_PREFIXES[config.api]
        from invoice_watch.config import DigestAuth

        self._digest = isinstance(config.auth, DigestAuth)
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._authenticated = False
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        # Each org's listing pages of the last successful read, by page number: a page
        # whose body comes back byte for byte the same is not parsed again.
        self._seen: dict[str, dict[int, _Seen]] = {}
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"AtlasClient(base_url={self._base!r}, api={self._config.api!r})"

    # -- lifecycle -------------------------------------------------------------------

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            from invoice_watch.config import DigestAuth

            auth = self._config.auth
            middleware: Any
            if isinstance(auth, DigestAuth):
                middleware = aiohttp.DigestAuthMiddleware(auth.public_key, auth.private_key.get())
            else:
                middleware = OAuthMiddleware(
                    self._base + OAUTH_TOKEN_PATH,
                    auth.client_id,
                    auth.client_secret.get(),
                    self._clock,
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
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AtlasClient:
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

    async def _send_once(self, url: str, params: Mapping[str, str], accept: str) -> _Answer:
        session = self._open()
        async with self._semaphore:
            self.requests_sent += 1
            async with session.get(url, params=params, headers={hdrs.ACCEPT: accept}) as resp:
                body = await resp.read()
                answer = _Answer(resp.status, body, resp.headers.get(hdrs.RETRY_AFTER))
        # Let the request waiting for this slot go out before this answer is parsed.
        await asyncio.sleep(0)
        return answer

    async def _send(self, url: str, params: Mapping[str, str], accept: str) -> _Answer:
        """Send one request. Until one has been answered without a 401/403, requests go
        one at a time, so that the others reuse its Digest nonce or OAuth token instead
        of each drawing a challenge of its own."""
        if not self._authenticated:
            async with self._auth_lock:
                if not self._authenticated:  # else another request did it while we waited
                    answer = await self._send_once(url, params, accept)
                    if answer.status not in (401, 403):
                        self._authenticated = True
                    return answer
        return await self._send_once(url, params, accept)

    async def _get(
        self, org_id: str, path: str, params: Mapping[str, str], *, csv_body: bool = False
    ) -> bytes:
        """GET with retries; returns the body of a 2xx answer or raises FetchError."""
        url = f"{self._base}{self._prefix}{path}"
        accept = self._accept(csv_body)
        label = self._org_label(org_id)
        retries = self._config.retries
        cap = self._config.max_backoff.total_seconds()
        last_problem = ""
        for attempt in range(retries + 1):
            retry_after: float | None = None
            try:
                answer = await self._send(url, params, accept)
            except _TokenRefused as exc:
                raise FetchAuthError(
                    org_id,
                    f"the OAuth token endpoint refused the service account ({exc.status}): "
                    "check atlas.auth.client_id and client_secret",
                ) from None
            except _TokenUnavailable as exc:
                last_problem = f"the OAuth token endpoint answered {exc.status}"
                retry_after = parse_retry_after(exc.retry_after, self._clock.now())
            except TimeoutError:
                last_problem = (
                    f"no answer within {self._config.timeout.total_seconds():g}s (atlas.timeout)"
                )
            except aiohttp.ClientError as exc:
                last_problem = f"connection failed: {type(exc).__name__}"
            else:
                decision = classify_status(answer.status)
                if decision is Decision.OK:
                    if attempt:
                        log.info("%s: %s succeeded after %d retries", label, path, attempt)
                    return answer.body
                detail = _api_error_detail(answer.body)
                if decision is Decision.AUTH:
                    raise FetchAuthError(org_id, _auth_message(answer.status, label, detail))
                if decision is Decision.FAIL:
                    raise FetchStatusError(
                        org_id,
                        answer.status,
                        f"{path} answered HTTP {answer.status}{detail}",
                    )
                last_problem = f"HTTP {answer.status}{detail}"
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
            log.warning(
                "%s: %s: %s; retry %d of %d in %.1fs",
                label,
                path,
                last_problem,
                attempt + 1,
                retries,
                delay,
            )
            await self._clock.sleep(delay)
        message = f"{path}: {last_problem} (gave up after {retries + 1} attempts)"
        if last_problem.startswith("no answer"):
            raise FetchTimeout(org_id, message)
        raise FetchError(org_id, message)

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

        ``known``: the invoices as last stored; a live one listed unchanged comes back as
        that very object, so that it is kept in memory once. A page is parsed again only
        when its body changed, or when it held an invoice that the snapshot is about to
        keep settled (so that it is not kept in memory as an object until then).
        """
        seen = {1: await self._page(org_id, 1, from_date, known)}
        first = seen[1][1]
        if first.full and first.total:
            promised = min(first.total // ITEMS_PER_PAGE + 1, _PAGES_AT_ONCE)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = {
                        number: group.create_task(self._page(org_id, number, from_date, known))
                        for number in range(2, promised + 1)
                    }
            except* FetchError as errors:
                raise errors.exceptions[0] from None
            seen.update((number, task.result()) for number, task in tasks.items())
        number = 1
        while seen[number][1].full:
            number += 1
            if number not in seen:
                seen[number] = await self._page(org_id, number, from_date, known)
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
        body = await self._get(org_id, f"/orgs/{org_id}/invoices", params)
        digest = hashlib.sha256(body).digest()
        before = self._seen.get(org_id, {}).get(number)
        if before is not None and before[0] == digest:
            return before
        return digest, parse_page(org_id, body, known)

    async def read_org(
        self, org_id: str, from_date: date | None = None, known: Snapshot | None = None
    ) -> OrgRead:
        """List one organization's invoices; a failure is reported, never raised.
        ``known``: its snapshot (see :meth:`_list`)."""
        before = self.requests_sent
        try:
            invoices, settled, linked = await self._list(
                org_id, from_date, known if known is not None else Snapshot()
            )
        except FetchError as exc:
            return OrgRead(org_id, error=str(exc), requests=self.requests_sent - before)
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
        while the others are still being read (it must not raise); the reads returned
        are then their outcomes only (:meth:`OrgRead.outcome`), so that no organization's
        listing is held until the last one is read.

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
            if on_read is not None:
                await on_read(read)
                reads[org_id] = read.outcome()

        async with asyncio.TaskGroup() as group:
            for org_id in org_ids:
                group.create_task(one(org_id))
        return {org_id: reads[org_id] for org_id in org_ids}

    async def pending_line_items(self, org_id: str) -> dict[str, list[LineItem]]:
        """Line items of the organization's pending invoices, by invoice id (for breakdowns
        in messages; fetched only when a message needs them)."""
        body = await self._get(org_id, f"/orgs/{org_id}/invoices/pending", {})
        items: dict[str, list[LineItem]] = {}
        for raw in _results(org_id, body):
            queue = [raw]
            while queue:
                entry = queue.pop()
                if not isinstance(entry, dict):
                    continue
                queue.extend(entry.get("linkedInvoices") or [])
                if isinstance(entry.get("id"), str):
                    items[entry["id"]] = _line_items_json(entry.get("lineItems") or [])
        return items

    async def invoice_line_items(self, org_id: str, invoice_id: str) -> list[LineItem]:
        """Line items of one invoice, from its CSV."""
        body = await self._get(
            org_id, f"/orgs/{org_id}/invoices/{invoice_id}/csv", {}, csv_body=True
        )
        try:
            return parse_invoice_csv(body.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FetchDataError(org_id, f"the invoice CSV is malformed: {exc}") from None


# -- parsing ---------------------------------------------------------------------------


def _api_error_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    parts = [str(data[k]) for k in ("errorCode", "detail") if isinstance(data.get(k), str)]
    return f" ({': '.join(parts)})" if parts else ""


def _auth_message(status: int, label: str, detail: str) -> str:
    if status == 401:
        return (
            f"Atlas refused the credentials for {label} (HTTP 401{detail}): check "
            "atlas.auth (API key pair or service account) and that the key is not revoked"
        )
    return (
        f"the credentials may not read invoices of {label} (HTTP 403{detail}): grant the "
        f"API key or service account the {REQUIRED_ROLE} role on this organization"
    )


def _listing(org_id: str, body: bytes) -> dict[str, Any]:
    """A list endpoint's answer, checked to hold a `results` list."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchDataError(org_id, "the API answered with a body that is not JSON") from None
    if isinstance(data, dict) and "content" in data and "status" in data:
        data = data["content"]  # envelope=true
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FetchDataError(org_id, "the API answer has no `results` list")
    return data


def _results(org_id: str, body: bytes) -> list[Any]:
    results: list[Any] = _listing(org_id, body)["results"]
    return results


def parse_page(org_id: str, body: bytes, known: Snapshot | None = None) -> Page:
    """One page of the organization's invoice listing -> :class:`Page`.

    A live invoice equal to its namesake in ``known`` is returned as that object; a
    settled one listed unchanged, as its key.
    """
    data = _listing(org_id, body)
    results = data["results"]
    total = data.get("totalCount")
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
    source_org_id: str, item: Any, known: Snapshot, out: list[Invoice], settled: list[int]
) -> None:
    """The invoice and, recursively, the linked invoices nested in it, appended to
    ``out``: the known object when nothing in the item differs from it (checked field by
    field, without building a new invoice: most of a listing is unchanged), else the
    item parsed; or to ``settled``, the key of a settled invoice that is unchanged."""
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
    for linked in item.get("linkedInvoices") or []:
        _flatten(source_org_id, linked, known, out, settled)


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
    return parsed


def parse_invoice(source_org_id: str, item: Any) -> Invoice:
    """One ``BillingInvoiceMetadata`` object -> :class:`Invoice`, checked field by field.

    The organization id and the status are interned: thousands of invoices share them.
    """
    org = source_org_id
    if not isinstance(item, dict):
        raise FetchDataError(org, "an entry of `results` is not an object")
    invoice_id = item.get("id")
    if not isinstance(invoice_id, str) or not _HEX24.match(invoice_id):
        raise FetchDataError(org, f"an invoice id is not 24 hex digits: {invoice_id!r:.40}")
    owner = item.get("orgId")
    if not isinstance(owner, str) or not _HEX24.match(owner):
        raise FetchDataError(org, f"invoice {invoice_id}: `orgId` is not 24 hex digits")
    status = item.get("statusName")
    if not isinstance(status, str) or not status:
        raise FetchDataError(org, f"invoice {invoice_id}: `statusName` is missing")
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


def _line_items_json(raw: list[Any]) -> list[LineItem]:
    items = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        cents = entry.get("totalPriceCents")
        items.append(
            LineItem(
                project=str(entry.get("groupName") or entry.get("groupId") or "—"),
                sku=str(entry.get("sku") or "—"),
                cluster=str(entry.get("clusterName") or ""),
                amount_cents=cents if isinstance(cents, int) else 0,
            )
        )
    return items


def parse_invoice_csv(text: str) -> list[LineItem]:
    """The invoice CSV: a header block, a blank line, then one row per line item."""
    blocks = re.split(r"\r?\n\r?\n", text, maxsplit=1)
    if len(blocks) != 2:
        raise ValueError("no blank line between the header block and the line items")
    rows = list(csv.DictReader(io.StringIO(blocks[1])))
    items = []
    for row in rows:
        amount = (row.get("Amount") or "").replace("$", "").replace(",", "").strip()
        try:
            cents = int((Decimal(amount or "0") * 100).to_integral_value())
        except InvalidOperation:
            raise ValueError(f"amount {amount!r:.20} is not a number") from None
        items.append(
            LineItem(
                project=(row.get("Project") or "—").strip() or "—",
                sku=(row.get("SKU") or "—").strip() or "—",
                cluster=(row.get("Cluster") or "").strip(),
                amount_cents=cents,
            )
        )
    return items


ReadOrgs = Callable[[Sequence[str], Mapping[str, date | None]], Awaitable[dict[str, OrgRead]]]
