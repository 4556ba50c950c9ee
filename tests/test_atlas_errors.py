"""Atlas errors say what to fix (issue 13 §2): each answer Atlas gives, from the
simulator (or a loopback server where the simulator has no such answer: a TLS
certificate nobody trusts), ends in a message naming the fix, from the one table
:data:`invoice_watch.fetch.FIXES`; 429s are ridden out (Retry-After, longer when they
repeat, and RateLimit-Remaining slows the client before a 429); deprecation headers are
warned about once per cycle and counted; a retired API version says to upgrade.
"""

from __future__ import annotations

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

from invoice_watch.clock import FakeClock
from invoice_watch.config import Config
from invoice_watch.constants import REQUIRED_ROLE
from invoice_watch.fetch import FIXES, AtlasClient, explain, parse_api_error
from invoice_watch.health import Metrics
from invoice_watch.simulator import Scenario, Simulator
from tests.conftest import base_config, make_config

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


def test_dns_failure_names_the_host(tmp_path: Path):
    """Name resolution is the one answer no loopback server gives (and tests send no
    DNS query): the exception aiohttp raises is built here."""
    client = AtlasClient(make_config(tmp_path).atlas)
    key = ConnectionKey("atlas.invalid", 443, True, True, None, None, None, None)
    exc = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    kind, fields = client._transport(exc, URL("https://atlas.invalid/x"))
    message = explain(kind, **fields)
    assert message.startswith("the host name atlas.invalid does not resolve")
    assert "Name or service not known" in message and "atlas.base_url" in message


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
        result = await client.read_org(SECOND)
    assert not result.ok and "RATE_LIMITED_TOKEN_BUCKET" in (result.error or "")
    assert "lower atlas.max_concurrency" in (result.error or "")


async def test_rate_limit_remaining_slows_down_before_a_429(clock: FakeClock, tmp_path: Path):
    """A token bucket of 2 refilled at 1 a second, six organizations read four at a
    time: RateLimit-Remaining says when the bucket is empty, the client waits before
    the next request instead of drawing 429s."""
    orgs = [PAYER, SECOND, *(f"{n:024x}" for n in range(1, 5))]
    async with Simulator(scenario(*orgs), clock=clock, rate_limit=(1.0, 2)) as sim:
        config = config_for(sim, tmp_path, retries=5)
        async with AtlasClient(config.atlas, clock=clock) as client:
            reads = await client.read_orgs(orgs)
        assert all(read.ok for read in reads.values())
        assert [r.status for r in sim.requests if r.status == 429] == []
        assert sum(clock.sleeps) >= 3  # it did wait, about a second a request


# --- deprecation ----------------------------------------------------------------------


async def test_deprecated_endpoint_is_warned_once_per_cycle_and_counted(
    sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    sim.deprecate(datetime(2026, 10, 1, tzinfo=UTC), datetime(2027, 10, 1, tzinfo=UTC))
    metrics = Metrics()
    async with AtlasClient(config_for(sim, tmp_path).atlas, metrics=metrics) as client:
        for _ in range(2):  # two cycles
            reads = await client.read_orgs([PAYER, SECOND])
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
