"""Atlas errors say what to fix (issue 13 §2): each answer Atlas gives, from the
simulator (or a loopback server where the simulator has no such answer: a TLS
certificate nobody trusts), ends in a message naming the fix, from the one table
:data:`invoice_watch.atlas.errors.FIXES`; 429s are ridden out (Retry-After, longer when they
repeat, and RateLimit-Remaining slows the client before a 429); deprecation headers are
warned about once per cycle and counted; a retired API version says to upgrade.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from yarl import URL

from invoice_watch.atlas.client import AtlasClient
from invoice_watch.atlas.errors import FIXES, Explainer, explain, parse_api_error
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config
from invoice_watch.constants import REQUIRED_ROLE
from invoice_watch.metrics import Metrics
from invoice_watch.simulator import Scenario, Simulator
from tests.conftest import base_config, make_config
from tests.loopback import LoopbackServer
from tests.test_atlas_containment import read_all

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
PAYER = "5f8a1c2e9b3d4a6f7e0c1b2a"
SECOND = "6a7b8c9d0e1f2a3b4c5d6e7f"


def scenario(*org_ids: str) -> Scenario:
    """One pending invoice for each org (default: PAYER and SECOND)."""
    s = Scenario(now=NOW)
    for n, org_id in enumerate(org_ids or (PAYER, SECOND)):
        s.add_org(f"Org {n}", id=org_id)
        s.add_invoice(org_id, period=0, status="PENDING", amount_cents=100_00)
    return s


def config_for(sim: Simulator, tmp_path: Path, *, service_account: bool = False, **atlas: Any):
    auth = (
        {"client_id": sim.client_id, "client_secret": sim.client_secret}
        if service_account
        else {"public_key": sim.public_key, "private_key": sim.private_key}
    )
    data = base_config()
    data["atlas"] = {"base_url": sim.base_url, "auth": auth, "retries": 0, **atlas}
    return make_config(tmp_path, data)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    async with Simulator(scenario(), clock=clock) as server:
        yield server


async def read(config: Config, org_id: str = PAYER, **kw: Any) -> str:
    async with AtlasClient(config.atlas, **kw) as client:
        result = await client.read_org(org_id)
    assert not result.ok
    return result.error or ""


# --- each answer names its fix --------------------------------------------------------


async def test_ip_access_list_refusal_names_the_access_list_and_the_caller_ip(
    sim: Simulator, tmp_path: Path
):
    sim.access_list = {"203.0.113.7"}
    error = await read(config_for(sim, tmp_path))
    assert "IP_ADDRESS_NOT_ON_ACCESS_LIST" in error
    assert "API access list of the API key" in error and "127.0.0.1" in error
    assert REQUIRED_ROLE not in error  # not the role: the old advice was wrong
    error = await read(config_for(sim, tmp_path, service_account=True))
    assert "API access list of the service account" in error


async def test_ip_from_atlas_parameters_when_the_detail_has_none(tmp_path: Path):
    error = parse_api_error(
        b'{"error":403,"errorCode":"IP_ADDRESS_NOT_ON_ACCESS_LIST","detail":"Forbidden.",'
        b'"parameters":["2001:db8::7"]}'
    )
    assert error.code == "IP_ADDRESS_NOT_ON_ACCESS_LIST" and error.ip() == "2001:db8::7"


async def test_unknown_org_names_the_config_key_and_the_id(sim: Simulator, tmp_path: Path):
    missing = "0123456789abcdef01234567"
    error = await read(config_for(sim, tmp_path), missing)
    assert "ORG_NOT_FOUND" in error
    assert "organizations[].id" in error and missing in error


async def test_missing_role_names_the_role_and_the_linked_invoice_roles(tmp_path: Path):
    s = scenario()
    s.add_org("Locked", id="0123456789abcdef0123ffff", forbidden=True)
    async with Simulator(s) as sim:
        error = await read(config_for(sim, tmp_path), "0123456789abcdef0123ffff")
    assert f"grant it the {REQUIRED_ROLE} role" in error
    assert "Organization Billing Admin or Organization Owner to see its linked invoices" in error


@pytest.mark.parametrize("service_account", [False, True], ids=["api key", "service account"])
async def test_refused_credentials_say_so_and_where_they_come_from(
    sim: Simulator, tmp_path: Path, service_account: bool
):
    sim.revoke_credentials()
    error = await read(config_for(sim, tmp_path, service_account=service_account))
    if service_account:
        assert "token endpoint refused the service account" in error
        assert "atlas.auth.client_id and client_secret" in error and "expired" in error
    else:
        assert "Atlas refused the credentials" in error and "revoked" in error
        assert "atlas.auth.public_key and private_key" in error


async def test_retired_api_version_says_to_upgrade(sim: Simulator, tmp_path: Path):
    sim.retire_version()
    error = await read(config_for(sim, tmp_path))
    assert "HTTP 410" in error
    assert "retired the API version this release of invoice-watch speaks (2023-01-01)" in error
    assert "upgrade invoice-watch" in error


async def test_connection_refused_names_host_port_and_cause(tmp_path: Path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = base_config()
    data["atlas"] |= {"base_url": f"http://127.0.0.1:{port}", "retries": 0}
    error = await read(make_config(tmp_path, data))
    assert f"cannot connect to 127.0.0.1:{port}" in error and "connection refused" in error
    assert "ClientConnectorError" not in error


async def test_tls_failure_names_host_port_and_the_certificate_problem(tmp_path: Path):
    """A real HTTPS server on loopback whose certificate no CA of this machine signed."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        data = base_config()
        data["atlas"] |= {"base_url": f"https://127.0.0.1:{port}", "retries": 0}
        error = await read(make_config(tmp_path, data))
    finally:
        await runner.cleanup()
    assert f"TLS with 127.0.0.1:{port} failed" in error
    assert "certificate" in error.lower()


class Gateway(LoopbackServer):
    """What answers in Atlas's place: ``token`` and ``listing`` are (status, content
    type, body) for the OAuth token endpoint and the invoice listing."""

    def __init__(self) -> None:
        self.token = (200, "application/json", b'{"access_token": "tok-0123456789abcdef"}')
        self.listing = (200, "application/json", b'{"results": []}')
        self.headers: dict[str, str] = {}  # on the listing
        app = web.Application()
        app.router.add_post("/api/oauth/token", self._token)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._listing)
        super().__init__(app)

    @staticmethod
    def _answer(answer: tuple[int, str, bytes], **headers: str) -> web.Response:
        status, content_type, body = answer
        return web.Response(
            status=status, body=body, headers={"Content-Type": content_type, **headers}
        )

    async def _token(self, request: web.Request) -> web.Response:
        return self._answer(self.token)

    async def _listing(self, request: web.Request) -> web.Response:
        return self._answer(self.listing, **self.headers)


WAF_PAGE = b"<html><body><h1>403 Forbidden</h1>Request blocked by policy.</body></html>"


async def gateway_error(gateway: Gateway, tmp_path: Path, *, service_account: bool) -> str:
    data = base_config()
    data["atlas"] |= {"base_url": gateway.url, "retries": 0}
    if service_account:
        data["atlas"]["auth"] = {"client_id": "mdb_sa_id_1", "client_secret": "mdb_sa_sk_01234"}
    return await read(make_config(tmp_path, data))


async def test_token_endpoint_answering_html_is_not_an_oauth_answer(tmp_path: Path):
    """Attack 13, A13-8: "the OAuth token endpoint failed (HTTP 200)" said nothing."""
    async with Gateway() as gateway:
        gateway.token = (200, "text/html", b"<html>Please sign in</html>")
        error = await gateway_error(gateway, tmp_path, service_account=True)
    assert f"the OAuth token endpoint {gateway.url}/api/oauth/token" in error
    assert "is not an OAuth token (text/html)" in error and "proxy" in error
    assert "atlas.base_url" in error


async def test_token_endpoint_refusal_with_an_atlas_error_code_uses_its_fix(tmp_path: Path):
    """A 403 IP_ADDRESS_NOT_ON_ACCESS_LIST from the token endpoint is about the access
    list, not "client_id or client_secret is wrong"."""
    body = json.dumps(
        {
            "error": 403,
            "errorCode": "IP_ADDRESS_NOT_ON_ACCESS_LIST",
            "detail": "IP address 203.0.113.9 is not allowed to access this resource.",
        }
    ).encode()
    async with Gateway() as gateway:
        gateway.token = (403, "application/json", body)
        error = await gateway_error(gateway, tmp_path, service_account=True)
    assert "API access list of the service account" in error and "203.0.113.9" in error
    assert "client_secret is wrong" not in error
    assert "IP_ADDRESS_NOT_ON_ACCESS_LIST" in error


@pytest.mark.parametrize(
    ("status", "body", "says", "not_said"),
    [
        # RFC 6749 §5.2: a malformed request is no wrong secret (final attack, NEW-4).
        (400, {"error": "invalid_request"}, "refused the token request itself", "is wrong"),
        (400, {"error": "unsupported_grant_type"}, "(a proxy: atlas.proxy", "is wrong"),
        # Atlas's own refusal of a kind the table does not know: its errorCode, quoted.
        (
            403,
            {"error": 403, "errorCode": "SERVICE_ACCOUNT_DISABLED", "detail": "Disabled."},
            "with Atlas's SERVICE_ACCOUNT_DISABLED",
            "is wrong",
        ),
        # What a wrong secret looks like still says so.
        (401, {"error": "invalid_client"}, "client_secret is wrong", "malformed"),
    ],
)
async def test_token_endpoint_refusals_are_explained_by_their_code(
    tmp_path: Path, status: int, body: dict[str, object], says: str, not_said: str
):
    async with Gateway() as gateway:
        gateway.token = (status, "application/json", json.dumps(body).encode())
        error = await gateway_error(gateway, tmp_path, service_account=True)
    assert says in error and not_said not in error, error
    assert "mdb_sa_sk_01234" not in error


@pytest.mark.parametrize("where", ["listing", "token endpoint"])
async def test_a_waf_page_is_not_atlas_refusing(tmp_path: Path, where: str):
    """A 403 HTML page from a firewall or proxy: not "grant it the role" (nor "the
    client secret is wrong"): the answer is not Atlas's."""
    async with Gateway() as gateway:
        if where == "listing":
            gateway.listing = (403, "text/html; charset=utf-8", WAF_PAGE)
        else:
            gateway.token = (403, "text/html", WAF_PAGE)
        error = await gateway_error(gateway, tmp_path, service_account=where != "listing")
    assert "is not Atlas's (text/html, not an Atlas error)" in error
    assert "a proxy, a firewall or a captive portal" in error
    assert REQUIRED_ROLE not in error and "client_secret is wrong" not in error


async def test_404_from_a_base_url_with_a_path_names_the_setting_and_the_url(
    sim: Simulator, tmp_path: Path
):
    """Attack 13, A13-8: `atlas.base_url: https://.../api/atlas/v2` doubled the API's
    path; the 404 blamed organizations[].id. The configuration refuses that path now
    (tests/test_config.py); any other path (a gateway's, or a mistake) that Atlas does
    not know is named by the 404."""
    config = config_for(sim, tmp_path, base_url=sim.base_url + "/atlas")
    error = await read(config)
    prefixed = f"{sim.base_url}/atlas/api/atlas/v2/orgs/{PAYER}/invoices"
    assert f"Atlas has no {prefixed}" in error
    assert f"atlas.base_url ({sim.base_url}/atlas) has a path" in error
    assert f"set atlas.base_url to {sim.base_url}" in error
    assert "organizations[].id" not in error


async def test_https_proxy_url_for_a_plain_http_proxy_says_to_write_http(
    sim: Simulator, tmp_path: Path
):
    """`HTTPS_PROXY=https://proxy` (or atlas.proxy) for a proxy that speaks plain HTTP:
    TLS "wrong version number" with the proxy; the fix is http:// in its URL."""
    from tests.fakes_proxy import FakeProxy

    async with FakeProxy() as proxy:
        https = proxy.url.replace("http://", "https://")
        error = await read(config_for(sim, tmp_path, proxy=https))
    assert f"TLS with the proxy {https} failed" in error
    assert "it speaks plain HTTP; write its URL with http://" in error


def test_dns_failure_names_the_host(tmp_path: Path):
    """Name resolution is the one answer no loopback server gives (and tests send no
    DNS query): the exception aiohttp raises is built here."""
    explainer = Explainer(make_config(tmp_path).atlas, {}, proxy=None)
    key = ConnectionKey("atlas.invalid", 443, True, True, None, None, None, None)
    exc = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    kind, fields = explainer.transport(exc, URL("https://atlas.invalid/x"))
    message = explain(kind, **fields)
    assert message.startswith("the host name atlas.invalid does not resolve")
    assert "Name or service not known" in message and "atlas.base_url" in message


def test_timeout_through_an_https_proxy_url_says_most_proxies_speak_http(tmp_path: Path):
    """A silent proxy named https:// (attack 13, A13-8): the timeout message says
    what to try. (A timeout is built here: a real one takes wall-clock time.)"""
    data = base_config()
    data["atlas"] |= {"proxy": "https://proxy.example:3128"}
    explainer = Explainer(make_config(tmp_path, data).atlas, {}, "https://proxy.example:3128")
    kind, fields = explainer.transport(TimeoutError(), URL("https://cloud.mongodb.com/x"))
    message = explain(kind, **{**explainer.fields("x", URL("https://x")), **fields})
    assert "through the proxy https://proxy.example:3128" in message
    assert "most proxies speak plain HTTP: then write http://" in message


def test_every_fix_fills_its_fields():
    fields = {
        "org": "Production (5f8a1c2e9b3d4a6f7e0c1b2a)",
        "org_id": "5f8a1c2e9b3d4a6f7e0c1b2a",
        "credentials": "API key",
        "where": "atlas.auth.public_key and private_key",
        "role": REQUIRED_ROLE,
        "linked_roles": "Organization Billing Admin or Organization Owner",
        "ip": " 203.0.113.7",
        "version": "2023-01-01",
        "host": "cloud.mongodb.com",
        "port": "443",
        "cause": "refused",
        "timeout": "30s",
        "via": "",
        "proxy": "http://proxy:3128",
        "location": "https://elsewhere.example/",
        "limit": "64 MiB",
        "page": "2",
        "cap": "6",
        "values": "4,000,000",
        "per": "20",
        "what": "the answer",
        "content_type": "text/html",
        "url": "https://cloud.mongodb.com/api/atlas/v2/api/atlas/v2/orgs/x/invoices",
        "base_url": "https://cloud.mongodb.com/api/atlas/v2",
        "prefix": "/api/atlas/v2",
        "origin": "https://cloud.mongodb.com",
        "atlas_code": "SERVICE_ACCOUNT_DISABLED",
        "code": "invalid_request",
    }
    for status, code in FIXES:
        message = explain(status, code, **fields)
        assert "{" not in message and "?" not in message.replace("(?", ""), (status, code)
    # A status without a row of its own falls back to its class.
    assert explain(418, "TEAPOT", **fields) == explain(400, None, **fields)
    assert explain(502, None, **fields) == explain(500, None, **fields)


# --- rate limits ----------------------------------------------------------------------


async def test_real_429_body_with_parameters_is_read_and_retry_after_honoured(
    clock: FakeClock, tmp_path: Path
):
    """Atlas's token-bucket 429 (``parameters`` as Atlas fills them): the client waits
    the Retry-After, longer when 429s repeat, and names the errorCode if it gives up."""
    async with Simulator(scenario(), clock=clock, atlas_parameters=True) as sim:
        sim.faults.status(429, times=3, retry_after=5)
        async with AtlasClient(config_for(sim, tmp_path, retries=5).atlas, clock=clock) as client:
            assert (await client.read_org(PAYER)).ok
        assert (
            clock.sleeps[0] == 5.0 and clock.sleeps[1] > 5.0 and clock.sleeps[2] > clock.sleeps[1]
        )
    async with (
        Simulator(scenario(), clock=clock, rate_limit=(0.01, 1), atlas_parameters=True) as sim,
        AtlasClient(config_for(sim, tmp_path).atlas, clock=clock) as client,
    ):
        assert (await client.read_org(PAYER)).ok
        result = await client.read_org(PAYER)  # its organization's bucket is empty
    assert not result.ok and "RATE_LIMITED_TOKEN_BUCKET" in (result.error or "")
    assert "lower atlas.max_concurrency" in (result.error or "")


async def test_rate_limit_remaining_slows_down_before_a_429(clock: FakeClock, tmp_path: Path):
    """A token bucket of 2 refilled at 1 a second (one organization's: Atlas's scope
    for the invoice endpoints), six reads of it four at a time: RateLimit-Remaining
    says when the bucket is empty, the client waits before the next request instead of
    drawing 429s."""
    async with Simulator(scenario(), clock=clock, rate_limit=(1.0, 2)) as sim:
        config = config_for(sim, tmp_path, retries=5)
        async with AtlasClient(config.atlas, clock=clock) as client:
            reads = await asyncio.gather(*(client.read_org(PAYER) for _ in range(6)))
        assert all(read.ok for read in reads)
        assert [r.status for r in sim.requests if r.status == 429] == []
        assert sum(clock.sleeps) >= 3  # it did wait, about a second a request


async def test_one_429_with_no_token_left_does_not_pace_reads_for_good(
    clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Attack 13, A13-3: Atlas sends RateLimit-* on 429s only (as its spec documents).
    One 429 saying `RateLimit-Remaining: 0` made every later request go one at a time,
    for the life of the process (cycles of 1.5 s became 4-5.5 s). The hint is cleared
    by the next answer without it (and would expire with the window it counts): the
    next reads go four at a time again. The first 429 is not "kept rate-limiting"."""
    orgs = [f"{n:024x}" for n in range(1, 9)]
    async with Simulator(scenario(*orgs), clock=clock, rate_limit_headers="429") as sim:
        sim.faults.latency = 0.02  # so that requests sent together overlap
        config = config_for(sim, tmp_path, retries=2, max_concurrency=4)
        async with AtlasClient(config.atlas, clock=clock) as client:
            sim.faults.status(429, org_id=orgs[0], retry_after=1)
            reads = await read_all(client, orgs)
            assert all(read.ok for read in reads.values())
            sim.max_in_flight = 0
            reads = await read_all(client, orgs)  # the next cycle
            assert all(read.ok for read in reads.values())
        assert sim.max_in_flight == 4  # before: 1, for good
    [throttled] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "Atlas is rate-limiting the requests" in throttled and "kept" not in throttled


async def test_rate_limit_hint_expires_with_its_window(clock: FakeClock, tmp_path: Path):
    """With RateLimit-* on every answer, the last answer of a cycle said none remain:
    a minute later (the window it counts), the next cycle's reads go four at a time
    again from the start, without a 429 (before: one at a time)."""
    orgs = [f"{n:024x}" for n in range(1, 5)]
    async with Simulator(scenario(*orgs), clock=clock, rate_limit=(1.0, 4)) as sim:
        sim.faults.latency = 0.02  # so that requests sent together overlap
        config = config_for(sim, tmp_path, service_account=True, retries=5)
        async with AtlasClient(config.atlas, clock=clock) as client:
            assert all(r.ok for r in (await read_all(client, orgs)).values())
            assert sim.requests[-1].status == 200  # it took the bucket's last token
            clock.advance(61)
            sim.max_in_flight = 0
            assert all(r.ok for r in (await read_all(client, orgs)).values())
        assert sim.max_in_flight == 4
        assert [r.status for r in sim.requests if r.status == 429] == []


@pytest.mark.parametrize("value", ["²", "٣", "-1", "1e3", "99999999999", " 7 x"])
async def test_malformed_rate_limit_remaining_is_ignored(tmp_path: Path, value: str):
    """`'²'.isdigit()` is true but `int('²')` fails: the header is read as ASCII digits
    only, anything else is no hint (it never fails the read)."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"results": []}, headers={"RateLimit-Remaining": value})

    app = web.Application()
    app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", listing)
    async with LoopbackServer(app) as server:
        data = base_config()
        data["atlas"] |= {"base_url": server.url, "retries": 0}
        async with AtlasClient(make_config(tmp_path, data).atlas) as client:
            assert (await client.read_org(PAYER)).ok


# --- deprecation ----------------------------------------------------------------------

LISTING = "/api/atlas/v2/orgs/{orgId}/invoices"


@pytest.mark.parametrize(
    ("headers", "said", "sunset"),
    [
        # Drafts before RFC 9745 sent `true` (attack 13: "deprecated since true").
        ({"Deprecation": "true"}, "as deprecated; no removal date yet: upgrade", 0),
        ({"Deprecation": "?1"}, "as deprecated; no removal date yet", 0),
        ({"Deprecation": "@1790812800"}, "as deprecated since 2026-10-01;", 0),  # RFC 9745
        ({"Deprecation": "Thu, 01 Oct 2026 00:00:00 GMT"}, "deprecated since 2026-10-01;", 0),
        ({"Deprecation": "@1893456000"}, "as deprecated from 2030-01-01;", 0),  # to come
        ({"Deprecation": "maybe"}, "(its Deprecation header is not a date: 'maybe')", 0),
        # A past Sunset no longer says "before then" (attack 13).
        (
            {"Deprecation": "true", "Sunset": "Sun, 01 Nov 2026 00:00:00 GMT"},
            "Atlas was to remove it on 2026-11-01, which has passed: upgrade invoice-watch now",
            datetime(2026, 11, 1, tzinfo=UTC).timestamp(),
        ),
        (
            {"Sunset": "Fri, 01 Oct 2027 00:00:00 GMT"},  # RFC 8594
            "Atlas will remove it on 2027-10-01: upgrade invoice-watch before then",
            datetime(2027, 10, 1, tzinfo=UTC).timestamp(),
        ),
        # An ISO date was exported as 0 (attack 13): read, or said to be no date.
        (
            {"Sunset": "2027-10-01"},
            "Atlas will remove it on 2027-10-01",
            datetime(2027, 10, 1, tzinfo=UTC).timestamp(),
        ),
        (
            {"Sunset": "2027-10-01T12:00:00+02:00"},
            "Atlas will remove it on 2027-10-01",
            datetime(2027, 10, 1, 10, tzinfo=UTC).timestamp(),
        ),
        ({"Sunset": "soon"}, "its Sunset header is not a date ('soon'): upgrade", None),
    ],
)
async def test_deprecation_and_sunset_headers_in_every_form(
    clock: FakeClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    said: str,
    sunset: float | None,
):
    metrics = Metrics()
    async with Gateway() as gateway:
        gateway.headers = headers
        data = base_config()
        data["atlas"] |= {"base_url": gateway.url, "retries": 0}
        config = make_config(tmp_path, data)
        async with AtlasClient(config.atlas, clock=clock, metrics=metrics) as client:
            assert all(r.ok for r in (await read_all(client, [PAYER])).values())
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said in warning, warning
    assert "since true" not in warning and ("before then" in warning) == ("will remove" in said)
    value = metrics.registry.get_sample_value(
        "invoice_watch_atlas_endpoint_sunset_timestamp_seconds", {"endpoint": LISTING}
    )
    assert value == sunset


async def test_deprecated_endpoint_is_warned_once_per_cycle_and_counted(
    sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    sim.deprecate(datetime(2026, 10, 1, tzinfo=UTC), datetime(2027, 10, 1, tzinfo=UTC))
    metrics = Metrics()
    async with AtlasClient(config_for(sim, tmp_path).atlas, metrics=metrics) as client:
        for _ in range(2):  # two cycles
            reads = await read_all(client, [PAYER, SECOND])
            assert all(read.ok for read in reads.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per cycle, however many requests
    assert "/api/atlas/v2/orgs/{orgId}/invoices" in warnings[0]
    assert "2027-10-01" in warnings[0] and "since 2026-10-01" in warnings[0]
    assert "upgrade invoice-watch" in warnings[0]
    endpoint = {"endpoint": "/api/atlas/v2/orgs/{orgId}/invoices"}
    registry = metrics.registry
    assert (
        registry.get_sample_value("invoice_watch_atlas_deprecation_warnings_total", endpoint) == 2
    )
    assert (
        registry.get_sample_value("invoice_watch_atlas_endpoint_sunset_timestamp_seconds", endpoint)
        == datetime(2027, 10, 1, tzinfo=UTC).timestamp()
    )


async def test_one_organizations_429_holds_back_only_its_own_requests():
    """Atlas's buckets for the invoice endpoints are per organization (its rate-limit
    documentation: an endpoint set and a scope); a 429 asking org A to wait a minute
    delays no request of org B (final attack, NEW-5), while A's next request waits."""
    from invoice_watch.atlas.pacing import RateLimits
    from invoice_watch.clock import FakeClock

    clock = FakeClock()
    rates = RateLimits(clock, max_concurrency=4, max_backoff=60.0)
    base = "https://cloud.mongodb.com/api/atlas/v2/orgs"
    rates.of(f"{base}/{'a' * 24}/invoices").note(429, {"Retry-After": "60"})
    async with rates.of(f"{base}/{'b' * 24}/invoices/1").turn():
        pass
    async with rates.of("https://cloud.mongodb.com/api/atlas/v2").turn():
        pass
    assert clock.sleeps == []
    async with rates.of(f"{base}/{'a' * 24}/invoices?pageNum=2").turn():
        pass
    assert clock.sleeps == [60.0]
