"""The Atlas simulator: a real aiohttp server standing in for the MongoDB Atlas
Administration API invoice endpoints, in the three flavors (v2, legacy v1.0, Cloud
Manager), with real Digest and OAuth authentication, paging, filters, linked invoices,
CSV, a token-bucket rate limit and injectable faults.

Order of checks on an API request, as Atlas answers: authentication (401 with a Digest
challenge), the API access list (403 ``IP_ADDRESS_NOT_ON_ACCESS_LIST``), a retired API
version (410), rate limit (429 ``RATE_LIMITED_TOKEN_BUCKET``), queued fault, ``Accept``
(v2: 406), organization (404, 403), query parameters (400), then the resource (404 for
an unknown invoice). A deprecated API version (:meth:`Simulator.deprecate`) adds
``Deprecation`` and ``Sunset`` headers to every API answer.

Stricter than Atlas on purpose: an unknown or repeated query parameter is a 400, so a
client typo (``itemPerPage``) fails loudly instead of silently paging by 100.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO

from aiohttp import hdrs, web
from multidict import MultiMapping

from invoice_watch.clock import Clock, SystemClock
from invoice_watch.constants import (
    API_PREFIXES,
    INVOICE_STATUSES,
    OAUTH_TOKEN_PATH,
    REQUIRED_ROLE,
    USAGE_MEDIA_TYPE,
    V2_CSV_MEDIA_TYPE,
    V2_MEDIA_TYPE,
)
from invoice_watch.simulator.auth import (
    REALM,
    DigestResult,
    DigestVerifier,
    TokenIssuer,
    new_client_id,
    new_client_secret,
    new_private_key,
    new_public_key,
)
from invoice_watch.simulator.faults import Fault, Faults, RequestRecord
from invoice_watch.simulator.scenario import (
    HEX24,
    Scenario,
    ScenarioInvoice,
    ScenarioOrg,
    Step,
    demo_scenario,
    load_scenario,
)
from invoice_watch.simulator.usage import MAX_BODY_BYTES as MAX_USAGE_BODY
from invoice_watch.simulator.usage import BadQuery, item_json, parse_query, search
from invoice_watch.simulator.views import api_error, invoice_csv, invoice_json

logger = logging.getLogger(__name__)

# Operation -> path below the flavor's prefix (the spec's templates).
OPERATIONS: dict[str, str] = {
    "list": "/orgs/{orgId}/invoices",
    "pending": "/orgs/{orgId}/invoices/pending",
    "get": "/orgs/{orgId}/invoices/{invoiceId}",
    "csv": "/orgs/{orgId}/invoices/{invoiceId}/csv",
}
# Operation -> the query parameters it accepts (all that the spec declares for it).
QUERY_PARAMS: dict[str, frozenset[str]] = {
    "list": frozenset(
        {
            "envelope",
            "includeCount",
            "itemsPerPage",
            "pageNum",
            "pretty",
            "viewLinkedInvoices",
            "statusNames",
            "fromDate",
            "toDate",
            "sortBy",
            "orderBy",
        }
    ),
    "pending": frozenset({"envelope", "pretty"}),
    "get": frozenset({"envelope", "pretty"}),
    "csv": frozenset({"envelope", "pretty"}),
}
REPEATABLE_PARAMS = frozenset({"statusNames"})
# `lineItems:search` (simulator/usage.py): v2 only, GET with a JSON body of filters.
USAGE_OPERATION = "line_items"
USAGE_PATH = "/orgs/{orgId}/invoices/{invoiceId}/lineItems:search"
QUERY_PARAMS[USAGE_OPERATION] = frozenset({"envelope", "itemsPerPage", "pageNum"})
# Operation -> media types it serves, preferred first ("json" or "csv" per flavor).
OPERATION_FORMATS: dict[str, tuple[str, ...]] = {
    "list": ("json",),
    "pending": ("json",),
    "get": ("json", "csv"),
    "csv": ("csv",),
}
MEDIA_TYPES: dict[bool, dict[str, str]] = {  # v2? -> format -> media type
    True: {"json": V2_MEDIA_TYPE, "csv": V2_CSV_MEDIA_TYPE},
    False: {"json": "application/json", "csv": "text/csv"},
}
NOMINAL_RATE_LIMIT = 100  # RateLimit-Limit/-Remaining when the token bucket is off
MAX_ITEMS_PER_PAGE = 500
HTML_PAGE = "<html><head><title>Gateway</title></head><body>Please sign in.</body></html>"

RECORD_KEY = web.RequestKey("invoice_watch.simulator.record", RequestRecord)


class ApiProblem(Exception):
    """An error answer, rendered as an ``ApiError`` body with ``application/json``."""

    def __init__(
        self,
        status: int,
        error_code: str,
        detail: str,
        *,
        bad_fields: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        parameters: list[Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body = api_error(
            status, error_code, detail, bad_fields=bad_fields, parameters=parameters
        )
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst``; one token per request."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate_limit needs a positive rate and a burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.now().timestamp()

    def take(self) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is available."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    @property
    def remaining(self) -> int:
        self._refill()
        return int(self._tokens)

    def _refill(self) -> None:
        now = self._clock.now().timestamp()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now


class _Query:
    """Typed access to one request's query parameters; bad values raise a 400."""

    def __init__(self, query: MultiMapping[str], operation: str) -> None:
        self._query = query
        for name in dict.fromkeys(query):
            if name not in QUERY_PARAMS[operation]:
                self._invalid(name, query[name], "unknown query parameter")
            if name not in REPEATABLE_PARAMS and len(query.getall(name)) > 1:
                self._invalid(name, query[name], "given more than once")

    def flag(self, name: str, default: bool) -> bool:
        value = self._query.get(name)
        if value is None:
            return default
        if value.lower() not in ("true", "false"):
            self._invalid(name, value, "must be true or false")
        return value.lower() == "true"

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self._query.get(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self._invalid(name, value, "must be an integer")
        if number < low or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            self._invalid(name, value, f"must be {bounds}")
        return number

    def date(self, name: str) -> datetime | None:
        value = self._query.get(name)
        if value is None:
            return None
        try:
            day = datetime.strptime(value, "%Y-%m-%d")
        except ValueError:
            self._invalid(name, value, "must be a date, YYYY-MM-DD")
        return day.replace(tzinfo=UTC)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self._query.get(name, default)
        if value not in choices:
            self._invalid(name, value, f"must be one of {', '.join(choices)}")
        return value

    def statuses(self) -> set[str]:
        values = set(self._query.getall("statusNames", []))
        for value in values:
            if value not in INVOICE_STATUSES:
                self._invalid("statusNames", value, f"must be in {', '.join(INVOICE_STATUSES)}")
        return values

    @staticmethod
    def _invalid(name: str, value: str, why: str) -> NoReturn:
        raise ApiProblem(
            400,
            "INVALID_QUERY_PARAMETER",
            f"Invalid query parameter {name}={value!r}: {why}.",
            bad_fields=[(name, why)],
        )


def _page_links(
    request: web.Request, page: int, items_per_page: int, total: int
) -> list[dict[str, str]]:
    """A page's ``links`` (Atlas's paginated answers): ``self``, and ``previous`` and
    ``next`` where there are such pages, each the request's URL at that page."""

    def page_link(number: int, rel: str) -> dict[str, str]:
        url = request.url.update_query(pageNum=number, itemsPerPage=items_per_page)
        return {"href": str(url), "rel": rel}

    links = [page_link(page, "self")]
    if page > 1:
        links.append(page_link(page - 1, "previous"))
    if page * items_per_page < total:
        links.append(page_link(page + 1, "next"))
    return links


class Simulator:
    """The simulator server. It serves and changes ``scenario`` itself (the built-in
    demo when None): give each simulator a scenario of its own.

    Credentials are generated unless given. ``clock`` drives nonce and token expiry, the
    rate limit, ``updated`` timestamps and :meth:`run_timeline`; tests pass a
    ``FakeClock``. ``nonce_lifetime`` is how long a Digest nonce is good for (seconds).
    ``rate_limit`` is ``(requests per second, burst)`` per organization (Atlas keeps a
    bucket per endpoint set and scope, and the invoice endpoints' scope is the
    organization), off when None.

    What an operator's Atlas may also answer: ``access_list`` (the API access list of the
    credentials: other client addresses get 403 ``IP_ADDRESS_NOT_ON_ACCESS_LIST``; None
    lets every address in), :meth:`deprecate` and :meth:`retire_version`. With
    ``atlas_parameters``, error bodies carry ``parameters`` as Atlas fills them (strings
    and numbers, which the spec's schema does not allow: off by default, so that every
    body validates).

    ``rate_limit_headers``: which answers carry ``RateLimit-Limit`` and
    ``RateLimit-Remaining``: ``"always"`` (every API answer, the default), or ``"429"``
    (only the 429s, as the spec documents them). A 429 always says 0 remain.
    ``in_flight`` and ``max_in_flight`` count the API requests being answered (how many
    a client sent at once).
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_key: str | None = None,
        private_key: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        digest_algorithm: str = "MD5",
        token_lifetime: float = 3600,
        rate_limit: tuple[float, int] | None = None,
        nonce_lifetime: float = 300.0,
        clock: Clock | None = None,
        access_list: set[str] | None = None,
        atlas_parameters: bool = False,
        rate_limit_headers: Literal["always", "429"] = "always",
    ) -> None:
        if rate_limit_headers not in ("always", "429"):
            raise ValueError("rate_limit_headers is 'always' or '429'")
        self.scenario = scenario if scenario is not None else demo_scenario()
        self._clock: Clock = clock or SystemClock()
        self._host = host
        self._port = port
        self.public_key = public_key or new_public_key()
        self.private_key = private_key or new_private_key()
        self.client_id = client_id or new_client_id()
        self.client_secret = client_secret or new_client_secret()
        self._digest = DigestVerifier(
            self.public_key,
            self.private_key,
            digest_algorithm.upper(),
            nonce_lifetime,
            self._clock,
        )
        self._tokens = TokenIssuer(self.client_id, self.client_secret, token_lifetime, self._clock)
        self._rate_limit_args = rate_limit
        # A token bucket per organization (Atlas's scope for the invoice endpoints; its
        # rate-limit documentation), one for the paths that name none.
        self._buckets: dict[str, TokenBucket] = {}
        self.access_list = access_list
        self.atlas_parameters = atlas_parameters
        self.rate_limit_headers = rate_limit_headers
        self.in_flight = 0
        self.max_in_flight = 0
        self.deprecated: tuple[datetime, datetime | None] | None = None
        self.retired = False
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self.first_request = asyncio.Event()  # set by the first request served
        self._timeline: list[Step] = sorted(self.scenario.timeline, key=lambda step: step.at)
        self._next_step = 0
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.app = self._make_app()

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"<Simulator {where} orgs={len(self.scenario.orgs)}>"

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve. After :meth:`stop`, starting again reuses the same port."""
        if self._runner is not None:
            return
        if self.app.frozen:
            self.app = self._make_app()
        self._stopping.clear()
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            handler_cancellation=True,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except OSError:
            await runner.cleanup()
            raise
        host, port = runner.addresses[0][:2]
        self._port = port
        self._base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._runner = runner
        logger.debug("Atlas simulator listening on %s", self._base_url)

    async def stop(self) -> None:
        """Stop serving; hanging requests are released first. Idempotent."""
        if self._runner is None:
            return
        self._stopping.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, once started."""
        if self._base_url is None:
            raise RuntimeError("the simulator has no address yet: call start() first")
        return self._base_url

    @property
    def org_ids(self) -> list[str]:
        return [org.id for org in self.scenario.orgs]

    # ---- state: timeline and direct changes -------------------------------------------

    def advance_to(self, seconds: float) -> list[str]:
        """Apply every timeline step at or before ``seconds`` not yet applied; returns
        what changed, one line a step."""
        applied = []
        while self._next_step < len(self._timeline):
            step = self._timeline[self._next_step]
            if step.at > seconds:
                break
            self._next_step += 1
            line = f"t+{step.at:g}s: {self.scenario.apply(step, self._clock.now())}"
            logger.debug("timeline %s", line)
            applied.append(line)
        return applied

    async def run_timeline(
        self, speed: float = 1.0, on_step: Callable[[str], None] | None = None
    ) -> None:
        """Apply the remaining steps as the clock passes their offsets (``speed`` 2.0
        runs twice as fast); ``on_step`` gets each change's description."""
        start = self._clock.now()
        while self._next_step < len(self._timeline):
            due = self._timeline[self._next_step].at
            elapsed = (self._clock.now() - start).total_seconds()
            if due / speed > elapsed:
                await self._clock.sleep(due / speed - elapsed)
            for line in self.advance_to(due):
                if on_step is not None:
                    on_step(line)

    def set_status(self, invoice_id: str, status: str) -> None:
        self.scenario.set_status(invoice_id, status, self._clock.now())

    def set_amount(self, invoice_id: str, cents: int) -> None:
        """Set ``amountBilledCents``; subtotal, tax and line items follow."""
        self.scenario.set_amount(invoice_id, cents, self._clock.now())

    def add_invoice(self, org: str, **kwargs: Any) -> str:
        """Add an invoice (arguments of :meth:`Scenario.new_invoice`); returns its id."""
        invoice = self.scenario.new_invoice(org, **kwargs)
        invoice.created = invoice.updated = self._clock.now()
        self.scenario.add(invoice)
        return invoice.id

    def remove_invoice(self, invoice_id: str) -> None:
        self.scenario.remove(invoice_id)

    def revoke_credentials(self, *, api_key: bool = True, service_account: bool = True) -> None:
        """From now on the API key and/or the service account (and its tokens) get 401."""
        if api_key:
            self._digest.revoked = True
        if service_account:
            self._tokens.revoked = True
            self._tokens.revoke_tokens()

    def restore_credentials(self) -> None:
        """Undo :meth:`revoke_credentials` (tokens issued before stay revoked)."""
        self._digest.revoked = False
        self._tokens.revoked = False

    def deprecate(self, since: datetime, sunset: datetime | None = None) -> None:
        """From now on the API version is deprecated: every API answer carries
        ``Deprecation`` (RFC 9745: ``@<epoch>``) and, when given, ``Sunset`` (RFC 8594:
        an HTTP-date)."""
        self.deprecated = (since, sunset)

    def retire_version(self) -> None:
        """From now on the API version is gone: every API request is answered 410."""
        self.retired = True

    def _parameters(self, *values: Any) -> list[Any]:
        return list(values) if self.atlas_parameters else []

    def invoices(self, org_id: str) -> list[dict[str, Any]]:
        """The org's own invoices now, as the v2 listing shows them (newest first,
        without ``links`` and ``linkedInvoices``)."""
        own = self.scenario.invoices_of(org_id)
        own.sort(key=lambda i: (i.end, i.id), reverse=True)
        return [invoice_json(invoice, full=False) for invoice in own]

    # ---- HTTP -------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_middleware])
        app.on_response_prepare.append(self._add_rate_limit_headers)
        for flavor, prefix in API_PREFIXES.items():
            # "pending" is registered before "{invoiceId}" so it wins.
            for operation in ("list", "pending", "get", "csv"):
                app.router.add_get(
                    prefix + OPERATIONS[operation],
                    self._api_handler(flavor, operation),
                    allow_head=False,  # the spec declares GET only
                )
        app.router.add_get(API_PREFIXES["v2"] + USAGE_PATH, self._usage, allow_head=False)
        app.router.add_post(OAUTH_TOKEN_PATH, self._token)
        return app

    @web.middleware
    async def _record_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query={name: request.query.getall(name) for name in dict.fromkeys(request.query)},
            org_id=request.match_info.get("orgId"),
        )
        self.requests.append(record)
        self.first_request.set()
        request[RECORD_KEY] = record
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await handler(request)
        except ApiProblem as problem:
            response = problem.response()
        except web.HTTPException as exc:  # no such path or method
            if exc.status < 400:
                raise
            code = "RESOURCE_NOT_FOUND" if exc.status == 404 else "INVALID_METHOD"
            detail = f"Cannot {request.method} {request.path}."
            response = ApiProblem(exc.status, code, detail).response()
        finally:
            self.in_flight -= 1
        record.status = response.status
        logger.debug("%s %s -> %d", request.method, request.path, response.status)
        return response

    async def _add_rate_limit_headers(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        if self.rate_limit_headers == "always" or response.status == 429:
            bucket = self._bucket(request)
            if bucket is None:
                limit = remaining = NOMINAL_RATE_LIMIT
            else:
                limit, remaining = bucket.burst, bucket.remaining
            response.headers["RateLimit-Limit"] = str(limit)
            # A 429 means the bucket is empty, whatever refilled since it was checked.
            response.headers["RateLimit-Remaining"] = str(
                0 if response.status == 429 else remaining
            )
        if self.deprecated is not None and request.path != OAUTH_TOKEN_PATH:
            since, sunset = self.deprecated
            response.headers["Deprecation"] = f"@{int(since.timestamp())}"
            if sunset is not None:
                response.headers["Sunset"] = format_datetime(sunset.astimezone(UTC), usegmt=True)

    async def _admit(self, request: web.Request) -> RequestRecord:
        """The checks of every API request, in order: the configured delay, then
        authentication, the access list, the API version and the rate limit (each raises
        the answer Atlas gives); returns the request's record."""
        record: RequestRecord = request[RECORD_KEY]
        await self._delay()
        self._authenticate(request, record)
        self._check_access_list(request)
        self._check_version()
        self._rate_limit(request)
        return record

    def _api_handler(
        self, flavor: str, operation: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            await self._admit(request)
            return await self._with_faults(
                request, lambda: self._serve(request, flavor == "v2", operation)
            )

        return handle

    async def _usage(self, request: web.Request) -> web.StreamResponse:
        """``lineItems:search``: the checks of every API request, then the body (at most
        :data:`~invoice_watch.simulator.usage.MAX_BODY_BYTES`), then the answer."""
        record = await self._admit(request)
        body = await request.content.read(MAX_USAGE_BODY + 1)
        record.body = body.decode("utf-8", "replace")
        return await self._with_faults(request, lambda: self._serve_usage(request, body))

    def _serve_usage(self, request: web.Request, body: bytes) -> web.Response:
        if USAGE_MEDIA_TYPE not in self._accepted(request):
            raise ApiProblem(406, "INVALID_VERSION_DATE", "Invalid accept header or version date.")
        org = self._org(request.match_info["orgId"])
        query = _Query(request.query, USAGE_OPERATION)
        envelope = query.flag("envelope", False)
        items_per_page = query.integer("itemsPerPage", 100, 1, MAX_ITEMS_PER_PAGE)
        page = query.integer("pageNum", 1, 1)
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
        if content_type != USAGE_MEDIA_TYPE:
            why = f"must be {USAGE_MEDIA_TYPE}"
            raise ApiProblem(
                400,
                "INVALID_CONTENT_TYPE",
                f"Invalid Content-Type {content_type or '(none)'!r}: {why}.",
                bad_fields=[("Content-Type", why)],
            )
        if len(body) > MAX_USAGE_BODY:
            raise ApiProblem(400, "INVALID_JSON", "The request body is too large.")
        try:
            search_query = parse_query(body)
        except BadQuery as bad:
            raise ApiProblem(
                400,
                "INVALID_JSON_ATTRIBUTE" if bad.field != "body" else "INVALID_JSON",
                f"Invalid request body: {bad}.",
                bad_fields=[(bad.field, bad.why)],
            ) from None
        invoice = self._invoice(org, request.match_info["invoiceId"])
        found = search(invoice, search_query, self._clock.now())
        shown = found[(page - 1) * items_per_page : page * items_per_page]

        links = _page_links(request, page, items_per_page, len(found))
        answer: dict[str, Any] = {
            "links": links,
            "results": [item_json(daily) for daily in shown],
            "totalCount": len(found),
        }
        if envelope:
            answer["status"] = 200
        return web.Response(
            text=json.dumps(answer, separators=(",", ":")), content_type=USAGE_MEDIA_TYPE
        )

    async def _token(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/oauth/token``: OAuth 2.0 client credentials grant (RFC 6749 4.4)."""
        record = request[RECORD_KEY]
        await self._delay()
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        record.auth = authorization.partition(" ")[0].lower() if authorization else None
        if not self._tokens.client_ok(authorization):
            record.challenge = True
            return web.json_response(
                {"error": "invalid_client", "error_description": "Client authentication failed."},
                status=401,
                headers={hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}"'},
            )
        form = await request.post()
        grant = form.get("grant_type")
        if grant != "client_credentials":
            error = "invalid_request" if grant is None else "unsupported_grant_type"
            return web.json_response(
                {"error": error, "error_description": "grant_type must be client_credentials."},
                status=400,
            )

        def issue() -> web.Response:
            return web.json_response(
                {
                    "access_token": self._tokens.issue(),
                    "expires_in": int(self._tokens.lifetime),
                    "token_type": "Bearer",
                },
                headers={"Cache-Control": "no-store"},
            )

        return await self._with_faults(request, issue)

    async def _delay(self) -> None:
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)

    def _authenticate(self, request: web.Request, record: RequestRecord) -> None:
        """Accept a valid Digest answer or bearer token; else raise a 401 challenge."""
        authorization = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, credentials = authorization.partition(" ")
        record.auth = scheme.lower() or None
        if record.auth == "bearer":
            if self._tokens.valid(credentials.strip()):
                return
            record.challenge = True
            raise ApiProblem(
                401,
                "UNAUTHORIZED",
                "The access token is invalid or expired.",
                headers={hdrs.WWW_AUTHENTICATE: f'Bearer realm="{REALM}", error="invalid_token"'},
            )
        stale = False
        if record.auth == "digest":
            result = self._digest.verify(authorization, request.method, request.raw_path)
            if result is DigestResult.OK:
                return
            stale = result is DigestResult.STALE
        record.challenge = True
        raise ApiProblem(
            401,
            "UNAUTHORIZED",
            "You are not authorized for this resource.",
            headers={hdrs.WWW_AUTHENTICATE: self._digest.challenge(stale=stale)},
        )

    def _check_access_list(self, request: web.Request) -> None:
        address = request.remote or ""
        if self.access_list is not None and address not in self.access_list:
            raise ApiProblem(
                403,
                "IP_ADDRESS_NOT_ON_ACCESS_LIST",
                f"IP address {address} is not allowed to access this resource.",
                parameters=self._parameters(address),
            )

    def _check_version(self) -> None:
        if self.retired:
            raise ApiProblem(
                410,
                "API_VERSION_REMOVED",
                "The requested API version was removed. Use a supported API version.",
            )

    def _bucket(self, request: web.Request) -> TokenBucket | None:
        """The token bucket of the request's scope (its organization), None when the
        simulator has no rate limit."""
        if self._rate_limit_args is None:
            return None
        scope = request.match_info.get("orgId", "")
        bucket = self._buckets.get(scope)
        if bucket is None:
            bucket = self._buckets[scope] = TokenBucket(*self._rate_limit_args, self._clock)
        return bucket

    def _rate_limit(self, request: web.Request) -> None:
        bucket = self._bucket(request)
        if bucket is None:
            return
        wait = bucket.take()
        if wait > 0:
            raise ApiProblem(
                429,
                "RATE_LIMITED_TOKEN_BUCKET",
                f"Resource {request.path} is limited to {bucket.burst} requests every "
                f"{bucket.burst / bucket.rate:g} seconds.",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
                parameters=self._parameters(request.path, bucket.burst, bucket.burst / bucket.rate),
            )

    async def _with_faults(
        self, request: web.Request, serve: Callable[[], web.Response]
    ) -> web.StreamResponse:
        fault = self.faults.take(request.path, request.match_info.get("orgId"))
        if fault is None:
            return serve()
        request[RECORD_KEY].fault = fault.kind
        if fault.kind == "status":
            raise self._fault_problem(request, fault)
        if fault.kind == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), fault.seconds)
            return serve()
        if fault.kind == "content_type":
            return web.Response(text=HTML_PAGE, content_type="text/html")
        try:
            response = serve()
        except ApiProblem as problem:
            response = problem.response()
        body = response.body
        assert isinstance(body, bytes)
        content_type = response.headers[hdrs.CONTENT_TYPE]
        if fault.kind == "malformed_json":
            return web.Response(
                body=body[: len(body) // 2],
                status=response.status,
                headers={hdrs.CONTENT_TYPE: content_type},
            )
        stream = web.StreamResponse(
            status=response.status, headers={hdrs.CONTENT_TYPE: content_type}
        )
        stream.content_length = len(body)
        await stream.prepare(request)
        await stream.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            if fault.kind == "reset":
                sock = transport.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST, not FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        return stream

    def _fault_problem(self, request: web.Request, fault: Fault) -> ApiProblem:
        headers: dict[str, str] = {}
        if fault.status == 401:
            request[RECORD_KEY].challenge = True
            headers[hdrs.WWW_AUTHENTICATE] = self._digest.challenge()
        if fault.retry_after is not None or fault.status == 429:
            headers["Retry-After"] = str(fault.retry_after or 1)
        codes = {401: "UNAUTHORIZED", 429: "RATE_LIMITED", 500: "UNEXPECTED_ERROR"}
        code = codes.get(fault.status, "SERVICE_UNAVAILABLE" if fault.status >= 500 else "ERROR")
        return ApiProblem(fault.status, code, "Injected fault.", headers=headers)

    # ---- resources --------------------------------------------------------------------

    def _serve(self, request: web.Request, v2: bool, operation: str) -> web.Response:
        media_type = self._negotiate(request, v2, operation)
        org = self._org(request.match_info["orgId"])
        query = _Query(request.query, operation)
        envelope = query.flag("envelope", False)
        pretty = query.flag("pretty", False)
        base = str(request.url.origin()) + self._prefix_of(request)
        body: dict[str, Any]
        if operation in ("get", "csv"):
            invoice = self._invoice(org, request.match_info["invoiceId"])
            if media_type in (V2_CSV_MEDIA_TYPE, "text/csv"):
                owner = self.scenario.find_org(invoice.org_id)
                assert owner is not None
                return web.Response(text=invoice_csv(invoice, owner.name), content_type=media_type)
            payees = [] if org.billing_viewer else self.scenario.linked_orgs(invoice.org_id)
            body = self._render(invoice, full=True, v2=v2, base=base, payees=payees)
            if envelope:
                body = {"content": body, "status": 200}
        else:
            if operation == "list":
                body = self._list_body(request, query, org, v2, base)
            else:
                body = self._pending_body(request, org, v2, base)
            if envelope:  # list endpoints use the results object as the envelope
                body["status"] = 200
        text = json.dumps(body, indent=2) if pretty else json.dumps(body, separators=(",", ":"))
        return web.Response(text=text, content_type=media_type)

    @staticmethod
    def _prefix_of(request: web.Request) -> str:
        return next(p for p in API_PREFIXES.values() if request.path.startswith(p + "/"))

    @staticmethod
    def _accepted(request: web.Request) -> list[str]:
        """The media types of the request's ``Accept`` headers, in order."""
        return [
            part.split(";")[0].strip().lower()
            for header in request.headers.getall(hdrs.ACCEPT, [])
            for part in header.split(",")
        ]

    @classmethod
    def _negotiate(cls, request: web.Request, v2: bool, operation: str) -> str:
        """The media type to answer with. v2 serves only its versioned media types (406
        otherwise); v1.0 and Cloud Manager fall back to their first format."""
        accepted = cls._accepted(request)
        offered = [MEDIA_TYPES[v2][fmt] for fmt in OPERATION_FORMATS[operation]]
        for media_type in accepted:
            if media_type in offered:
                return media_type
        if not v2:
            return offered[0]
        raise ApiProblem(406, "INVALID_VERSION_DATE", "Invalid accept header or version date.")

    def _org(self, org_id: str) -> ScenarioOrg:
        org = self.scenario.find_org(org_id) if HEX24.fullmatch(org_id) else None
        if org is None:
            raise ApiProblem(
                404,
                "ORG_NOT_FOUND",
                f"No organization with ID {org_id} exists.",
            )
        if org.forbidden:
            raise ApiProblem(
                403,
                "USER_UNAUTHORIZED",
                f"Current user is not authorized to read the invoices of organization "
                f"{org_id}: the {REQUIRED_ROLE} role is required.",
            )
        return org

    def _invoice(self, org: ScenarioOrg, invoice_id: str) -> ScenarioInvoice:
        """An invoice of ``org`` or of an org it pays for."""
        invoice = self.scenario.find_invoice(invoice_id)
        if invoice is not None:
            owner = self.scenario.find_org(invoice.org_id)
            if invoice.org_id == org.id or (
                owner is not None and owner.linked_to == org.id and not org.billing_viewer
            ):
                return invoice
        raise ApiProblem(
            404,
            "INVOICE_NOT_FOUND",
            f"Invoice {invoice_id} not found in organization {org.id}.",
        )

    def _payees(self, org: ScenarioOrg) -> list[ScenarioOrg]:
        """The organizations whose invoices ``org``'s answers nest (none for a Billing
        Viewer: Atlas shows linked invoices to Billing Admin or Owner only)."""
        return [] if org.billing_viewer else self.scenario.linked_orgs(org.id)

    def _render(
        self,
        invoice: ScenarioInvoice,
        *,
        full: bool,
        v2: bool,
        base: str,
        payees: list[ScenarioOrg] | None,
    ) -> dict[str, Any]:
        """One invoice; with ``payees`` (the orgs its org pays for, None to leave out
        ``linkedInvoices``), their invoices of the same period nested."""
        nested = None
        if payees is not None:
            nested = [
                self._render(other, full=full, v2=v2, base=base, payees=None)
                for payee in payees
                for other in self.scenario.invoices_of(payee.id)
                if other.start == invoice.start
            ]
        href = f"{base}/orgs/{invoice.org_id}/invoices/{invoice.id}"
        return invoice_json(invoice, full=full, v2=v2, self_href=href, linked=nested)

    def _pending_body(
        self, request: web.Request, org: ScenarioOrg, v2: bool, base: str
    ) -> dict[str, Any]:
        payees = self._payees(org)
        pending = [
            self._render(invoice, full=True, v2=v2, base=base, payees=payees)
            for invoice in self.scenario.invoices_of(org.id)
            if invoice.status == "PENDING"
        ]
        return {
            "links": [{"href": str(request.url), "rel": "self"}],
            "results": pending,
            "totalCount": len(pending),
        }

    def _list_body(
        self, request: web.Request, query: _Query, org: ScenarioOrg, v2: bool, base: str
    ) -> dict[str, Any]:
        items_per_page = query.integer("itemsPerPage", 100, 1, MAX_ITEMS_PER_PAGE)
        page = query.integer("pageNum", 1, 1)
        include_count = query.flag("includeCount", True)
        view_linked = query.flag("viewLinkedInvoices", True)
        statuses = query.statuses()
        from_date, to_date = query.date("fromDate"), query.date("toDate")
        sort_by = query.choice("sortBy", ("START_DATE", "END_DATE"), "END_DATE")
        descending = query.choice("orderBy", ("desc", "asc"), "desc") == "desc"

        invoices = [
            invoice
            for invoice in self.scenario.invoices_of(org.id)
            if (not statuses or invoice.status in statuses)
            and (from_date is None or invoice.start >= from_date)
            and (to_date is None or invoice.end <= to_date)
        ]
        invoices.sort(
            key=lambda i: (i.start if sort_by == "START_DATE" else i.end, i.id), reverse=descending
        )
        total = len(invoices)
        shown = invoices[(page - 1) * items_per_page : page * items_per_page]

        links = _page_links(request, page, items_per_page, total)
        payees = self._payees(org) if view_linked else None
        body: dict[str, Any] = {
            "links": links,
            "results": [
                self._render(invoice, full=False, v2=v2, base=base, payees=payees)
                for invoice in shown
            ],
        }
        if include_count:
            body["totalCount"] = total
        return body


async def serve(
    scenario_path: str | None,
    host: str,
    port: int,
    out: TextIO = sys.stdout,
    *,
    write_config: str | None = None,
) -> None:
    """``invoice-watch simulate``: serve a scenario (the demo when None), print how to
    reach it, write a ready config to ``write_config`` (keeping the keys of one written
    before: UsageError for a file it did not write), and follow the scenario's timeline
    in real time from the first request on (so that it is still ahead when a daemon
    arrives), until cancelled."""
    from invoice_watch.demo import write_simulator_config, written_keys

    scenario = load_scenario(scenario_path) if scenario_path else demo_scenario()
    config_path = Path(write_config) if write_config else None
    keys = written_keys(config_path) if config_path is not None else {}

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    simulator = Simulator(
        scenario,
        host=host,
        port=port,
        public_key=keys.get("public_key"),
        private_key=keys.get("private_key"),
    )
    async with simulator as sim:
        say(f"Atlas simulator listening on {sim.base_url}")
        say(f"API key (HTTP Digest): public_key={sim.public_key} private_key={sim.private_key}")
        say(
            f"Service account (OAuth 2.0): client_id={sim.client_id} "
            f"client_secret={sim.client_secret}"
        )
        say("Organizations: " + ", ".join(f"{o.id} ({o.name})" for o in sim.scenario.orgs))
        if config_path is not None:
            write_simulator_config(sim, config_path)
            say(f"Config written to {config_path}: invoice-watch run -c {config_path}")
        steps = sim.scenario.timeline
        if steps:
            last = max(step.at for step in steps)
            say(f"Timeline: {len(steps)} change(s) over {last:g}s, from the first request on")
            await sim.first_request.wait()
            await sim.run_timeline(on_step=say)
        await asyncio.Event().wait()
