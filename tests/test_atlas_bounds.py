"""Bounds against a hostile or broken Atlas (issue 12 §3 and §5): paging ends (a repeated
page, a page cap), an answer's decoded size is capped (a gzip bomb stops at the cap
without the memory it would take), credentials never cross origins on a redirect (OAuth
bearer, OAuth client secret, Digest), and text a server echoes is redacted before it is
logged, stored or shown by ``status``.

Every server here is a real aiohttp server on loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import hdrs, web

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.atlas.paging import page_cap
from invoice_watch.cli.commands import run_once
from invoice_watch.config import Config
from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.types import Snapshot
from tests.conftest import ORG_A, base_config, make_config
from tests.loopback import LoopbackServer

START, END = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"


def invoice(n: int, org: str = ORG_A, status: str = "PAID") -> dict[str, Any]:
    return {
        "id": f"{n:024x}",
        "orgId": org,
        "statusName": status,
        "startDate": START,
        "endDate": END,
        "amountBilledCents": 100,
        "amountPaidCents": 100 if status == "PAID" else 0,
    }


def config_for(tmp_path: Path, url: str, **atlas: Any) -> Config:
    data = base_config()
    data["atlas"] |= {"base_url": url, "retries": 0, **atlas}
    return make_config(tmp_path, data)


# --- paging ---------------------------------------------------------------------------


class Pager(LoopbackServer):
    """A listing whose pages a test shapes: ``page(number) -> body``."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.pages: list[int] = []
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        number = int(request.query["pageNum"])
        self.pages.append(number)
        return web.json_response(self.page(number))


async def read_a(tmp_path: Path, server: LoopbackServer, **atlas: Any) -> Any:
    async with AtlasClient(config_for(tmp_path, server.url, **atlas).atlas) as client:
        async with asyncio.timeout(30):  # the old client never ended
            return await client.read_org(ORG_A)


async def test_listing_that_repeats_page_one_forever_stops_as_a_failed_read(tmp_path: Path):
    """A server ignoring pageNum answers page 1 (full, 500 invoices) to every page:
    the listing stops at page 2, as a failed read saying why."""
    full = {"results": [invoice(n) for n in range(500)], "totalCount": 1200}
    async with Pager(lambda number: full) as server:
        read = await read_a(tmp_path, server)
    assert not read.ok and "page 2 of the listing repeats" in (read.error or "")
    assert len(server.pages) <= 3  # pages 2 and 3 asked together on the estimate


async def test_a_listing_of_settled_keys_tells_a_repeat_and_counts_a_key_on_two_pages_once(
    tmp_path: Path,
):
    """A snapshot that holds every invoice listed as settled (a restart's first listing)
    has them listed as its keys: an invoice on two pages (the listing moved while it was
    paged) is one key of the read, and a server repeating page 1 still ends the listing
    at page 2 as a failed read."""
    pages = {1: range(0, 500), 2: range(499, 999), 3: range(999, 1003)}

    def page(number: int) -> dict[str, Any]:
        return {"results": [invoice(n) for n in pages.get(number, ())], "totalCount": 1004}

    async with Pager(page) as server:
        config = config_for(tmp_path, server.url)
        async with AtlasClient(config.atlas) as client:
            empty = Snapshot(settles=FINAL_STATUSES)
            known = empty.updated((await client.read_org(ORG_A, None, empty)).invoices, [])
        assert len(known.settled) == 1003
        async with AtlasClient(config.atlas) as client:  # a restart: every page parsed
            read = await client.read_org(ORG_A, None, known)
    assert read.ok and not read.invoices
    assert list(read.settled) == sorted(known.settled.values())

    full = {"results": [invoice(n) for n in range(500)], "totalCount": 1200}
    async with (
        Pager(lambda number: full) as server,
        AtlasClient(config_for(tmp_path, server.url).atlas) as client,
    ):
        read = await client.read_org(ORG_A, None, known)
    assert not read.ok and "page 2 of the listing repeats" in (read.error or "")


async def test_listing_with_a_links_self_that_differs_is_still_a_repeat(tmp_path: Path):
    """Atlas's bodies carry `links` naming the page: a repeat is told by what is listed,
    not by the bytes."""

    def page(number: int) -> dict[str, Any]:
        return {
            "results": [invoice(n) for n in range(500)],
            "links": [{"rel": "self", "href": f"https://x/?pageNum={number}"}],
        }

    async with Pager(page) as server:
        read = await read_a(tmp_path, server)
    assert not read.ok and "repeats" in (read.error or "")


async def test_listing_of_endless_new_pages_stops_at_the_cap_from_total_count(tmp_path: Path):
    """Every page full of invoices never seen: the listing stops at the cap derived
    from `totalCount` (1,200: 3 pages promised, plus 3), as a failed read."""

    def page(number: int) -> dict[str, Any]:
        first = number * 1000
        return {"results": [invoice(n) for n in range(first, first + 500)], "totalCount": 1200}

    async with Pager(page) as server:
        read = await read_a(tmp_path, server)
    assert page_cap(1200) == 6
    assert not read.ok and "did not end within 6 pages" in (read.error or "")
    assert max(server.pages) == 6


async def test_listing_without_an_estimate_stops_at_the_hard_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("invoice_watch.atlas.paging.MAX_PAGES", 4)

    def page(number: int) -> dict[str, Any]:
        first = number * 1000
        return {"results": [invoice(n) for n in range(first, first + 500)]}

    async with Pager(page) as server:
        read = await read_a(tmp_path, server)
    assert not read.ok and "did not end within 4 pages" in (read.error or "")
    assert server.pages == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("total", "cap"),
    [(None, 1000), (0, 1000), (499, 1000), (500, 5), (1200, 6), (100_000, 251), (10**12, 1000)],
)
def test_page_cap_table(total: int | None, cap: int):
    assert page_cap(total) == cap


async def test_listing_of_exactly_the_estimate_reads_every_page(tmp_path: Path):
    """The cap never cuts a listing that keeps to its estimate (with an invoice or
    two created while paging)."""

    def page(number: int) -> dict[str, Any]:
        count = max(0, min(500, 1502 - (number - 1) * 500))
        first = (number - 1) * 500
        return {"results": [invoice(n) for n in range(first, first + count)], "totalCount": 1500}

    async with Pager(page) as server:
        read = await read_a(tmp_path, server)
    assert read.ok and read.listed == 1502


# --- answer size ----------------------------------------------------------------------


class Body(LoopbackServer):
    """Answers every listing with ``body`` (bytes), optionally gzip-encoded on the fly
    from ``chunks`` (a gzip bomb: little on the wire, a lot decoded)."""

    def __init__(self) -> None:
        self.body = b""
        self.bomb: int = 0  # decoded size of a gzip bomb of zeros, when set
        self.sent = 0
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if not self.bomb:
            return web.Response(body=self.body, content_type="application/json")
        response = web.StreamResponse(
            headers={hdrs.CONTENT_TYPE: "application/json", hdrs.CONTENT_ENCODING: "gzip"}
        )
        await response.prepare(request)
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip wrapper
        zeros = bytes(2**20)
        try:
            for _ in range(self.bomb // len(zeros)):
                chunk = packer.compress(zeros)
                if chunk:
                    self.sent += len(chunk)
                    await response.write(chunk)
            await response.write(packer.flush())
        except (ConnectionResetError, ConnectionError):
            pass  # the client stopped reading: what a cap does
        return response


@pytest.fixture
async def body_server() -> AsyncIterator[Body]:
    async with Body() as server:
        yield server


async def test_answer_beyond_max_response_size_fails_the_read(tmp_path: Path, body_server: Body):
    """A valid listing padded to 2 MiB with a 1 MiB cap: a failed read naming the
    setting, not a listing read into memory."""
    padding = "x" * (2 * 2**20)
    body_server.body = json.dumps({"results": [invoice(1)], "padding": padding}).encode()
    read = await read_a(tmp_path, body_server, max_response_size="1MiB")
    assert not read.ok
    assert "larger than 1 MiB (atlas.max_response_size)" in (read.error or "")
    body_server.body = json.dumps({"results": [invoice(1)]}).encode()
    assert (await read_a(tmp_path, body_server, max_response_size="1MiB")).ok


async def test_gzip_bomb_stops_at_the_cap_without_the_memory(tmp_path: Path, body_server: Body):
    """256 MiB of zeros, gzip-encoded (about 256 KiB on the wire), against a 1 MiB cap:
    the read fails at the cap, the Python heap never holds more than a few MiB, and the
    server is stopped long before it sent the whole bomb."""
    body_server.bomb = 256 * 2**20
    tracemalloc.start()
    try:
        read = await read_a(tmp_path, body_server, max_response_size="1MiB")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not read.ok and "larger than 1 MiB" in (read.error or "")
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


async def test_answer_of_empty_containers_is_refused_before_it_is_parsed(
    tmp_path: Path, body_server: Body
):
    """Attack 12, A12-7: `{"results":[[],[],...]}` under the byte cap took some 28 times
    its size once parsed (60 MiB: 1.7 GB, and the event loop frozen for 10 s). More
    JSON values than one per 20 bytes of the cap: refused unparsed, the memory never
    more than the body's."""
    body_server.body = b'{"results":[' + b"[]," * (4 * 2**20 // 3 - 10) + b"[]]}"
    tracemalloc.start()
    try:
        read = await read_a(tmp_path, body_server, max_response_size="4MiB")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not read.ok
    assert "JSON values, more than the 209,715 allowed" in (read.error or "")
    assert "atlas.max_response_size" in (read.error or "")
    assert peak < 3 * 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # 4 MiB body: ~110 MiB before


def linked_page(count: int, linked: int) -> bytes:
    """A full page as Atlas writes it (`links` included), each invoice nesting
    ``linked`` invoices of linked organizations."""

    def one(n: int, org: str) -> dict[str, Any]:
        href = f"https://cloud.mongodb.com/api/atlas/v2/orgs/{org}/invoices/{n:024x}"
        return {**invoice(n, org), "links": [{"href": href, "rel": "self"}]}

    results = [
        {
            **one(n, ORG_A),
            "linkedInvoices": [one(10**6 * (k + 1) + n, f"{k + 1:024x}") for k in range(linked)],
        }
        for n in range(count)
    ]
    return json.dumps({"results": results, "totalCount": count}).encode()


async def test_large_real_page_is_parsed_off_the_event_loop(
    tmp_path: Path, body_server: Body, monkeypatch: pytest.MonkeyPatch
):
    """A real page stays well within the JSON value cap (Atlas writes some 26 bytes a
    value); one over 1 MiB is parsed in a worker thread, a small one on the loop."""
    import threading

    from invoice_watch.atlas import parse

    threads: list[bool] = []
    real = parse.parse_page

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(parse, "parse_page", spy)
    body_server.body = linked_page(499, 5)  # 2,994 invoices, about 1.1 MB
    assert 2**20 < len(body_server.body) < 2 * 2**20
    read = await read_a(tmp_path, body_server, max_response_size="2MiB")
    assert read.ok and read.listed == 2994
    body_server.body = linked_page(10, 0)
    assert (await read_a(tmp_path, body_server)).ok
    assert threads == [False, True]


def test_max_response_size_setting_is_parsed_and_bounded(tmp_path: Path):
    from invoice_watch.errors import ConfigError

    config = config_for(tmp_path, "http://127.0.0.1:9")
    assert config.atlas.max_response_size == 16 * 2**20  # the default
    assert config_for(tmp_path, "http://x", max_response_size="512KiB").atlas.max_response_size == (
        512 * 2**10
    )
    assert config_for(tmp_path, "http://x", max_response_size=2**20).atlas.max_response_size == (
        2**20
    )
    for bad in ("lots", "0", "2GiB", "1KiB", -5):
        with pytest.raises(ConfigError, match=r"test.yaml:\d+:\d+: atlas.max_response_size"):
            config_for(tmp_path, "http://x", max_response_size=bad)


# --- credentials and redirects --------------------------------------------------------


class Elsewhere(LoopbackServer):
    """Another origin: records the Authorization of every request it gets."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        super().__init__(app)

    async def _any(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get(hdrs.AUTHORIZATION))
        return web.json_response({"results": []})


class Redirecting(LoopbackServer):
    """Atlas that issues OAuth tokens (or challenges Digest), then answers the listing
    (or the token request, with ``token_redirect``) with a 302 to ``target``."""

    def __init__(self, target: str, *, token_redirect: bool = False) -> None:
        self.target = target
        self.token_redirect = token_redirect
        app = web.Application()
        app.router.add_post("/api/oauth/token", self._token)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _token(self, request: web.Request) -> web.Response:
        if self.token_redirect:
            raise web.HTTPFound(self.target + "/api/oauth/token")
        return web.json_response({"access_token": "bearer-token-0123456789", "expires_in": 3600})

    async def _list(self, request: web.Request) -> web.Response:
        authorization = request.headers.get(hdrs.AUTHORIZATION, "")
        if not authorization.startswith(("Bearer", "Digest")):
            return web.json_response(
                {"error": 401, "errorCode": "UNAUTHORIZED"},
                status=401,
                headers={
                    hdrs.WWW_AUTHENTICATE: 'Digest realm="MMS Public API", nonce="abc", '
                    'algorithm=MD5, qop="auth"'
                },
            )
        raise web.HTTPFound(self.target + request.path_qs)


SERVICE_ACCOUNT = {"client_id": "mdb_sa_id_1", "client_secret": "mdb_sa_sk_never-elsewhere"}


@pytest.mark.parametrize("auth", ["service account", "api key"])
async def test_redirect_to_another_origin_never_carries_credentials(tmp_path: Path, auth: str):
    """Atlas answering 302 to another origin: invoice-watch does not follow it (the
    other origin receives nothing: no Bearer token, no Digest answer); the read fails
    saying where the redirect pointed and what to do."""
    async with Elsewhere() as other, Redirecting(other.url) as atlas:
        credentials = SERVICE_ACCOUNT if auth == "service account" else None
        extra = {"auth": credentials} if credentials else {}
        read = await read_a(tmp_path, atlas, **extra)
    assert other.authorizations == []
    assert not read.ok
    assert f"redirect to {other.url}" in (read.error or "") and "atlas.base_url" in (
        read.error or ""
    )


async def test_token_endpoint_redirect_never_carries_the_client_secret(tmp_path: Path):
    async with Elsewhere() as other, Redirecting(other.url, token_redirect=True) as atlas:
        read = await read_a(tmp_path, atlas, auth=SERVICE_ACCOUNT)
    assert other.authorizations == []
    assert not read.ok


async def test_oauth_middleware_adds_the_bearer_only_for_its_own_origin(tmp_path: Path):
    """Defence in depth: even a request the client would make to another origin
    through the same session goes without the token."""
    async with Elsewhere() as other, Redirecting(other.url) as atlas:
        config = config_for(tmp_path, atlas.url, auth=SERVICE_ACCOUNT)
        async with AtlasClient(config.atlas) as client:
            session = client._transport.open()
            async with session.get(other.url + "/anything") as resp:
                assert resp.status == 200
    assert other.authorizations == [None]


# --- text from servers is redacted ----------------------------------------------------


class Echoing(LoopbackServer):
    """Atlas whose error `detail` echoes the request's Authorization header (as a
    misbehaving gateway might), for the listing of org A."""

    def __init__(self, status: int) -> None:
        self.status = status
        app = web.Application()
        app.router.add_post("/api/oauth/token", self._token)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "echoed-bearer-secret-42", "expires_in": 3600})

    async def _list(self, request: web.Request) -> web.Response:
        authorization = request.headers.get(hdrs.AUTHORIZATION, "")
        return web.json_response(
            {
                "error": self.status,
                "errorCode": "UNEXPECTED_ERROR",
                "detail": f"request rejected;\nAuthorization: {authorization} "
                f"(client secret {SERVICE_ACCOUNT['client_secret']})",
            },
            status=self.status,
        )


@pytest.mark.parametrize("status", [400, 403, 500])
async def test_server_text_echoing_credentials_is_redacted_in_logs_stderr_and_status(
    tmp_path: Path,
    status: int,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    no_secret_in_logs: set[str],
):
    no_secret_in_logs.update({"echoed-bearer-secret-42", SERVICE_ACCOUNT["client_secret"]})
    async with Echoing(status) as atlas:
        config = config_for(tmp_path, atlas.url, auth=SERVICE_ACCOUNT)
        async with App(config) as app:
            assert await run_once(app) == 1
        report = io.StringIO()
        assert await ops.status(config, out=report) == 0
    _, err = capsys.readouterr()
    for where, text in {"stderr": err, "status": report.getvalue(), "logs": caplog.text}.items():
        assert "echoed-bearer-secret-42" not in text, where
        assert SERVICE_ACCOUNT["client_secret"] not in text, where
        assert "Bearer <secret>" in text, where  # the echo is still shown, redacted
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert f"HTTP {status}" in line and "rejected; Authorization: Bearer <secret>" in line


class BareTokenEcho(LoopbackServer):
    """A token endpoint issuing a new token each time (``runtime-token-<n>-...``, for 30
    s), and a listing answering 400 with the bearer token echoed without its prefix."""

    def __init__(self) -> None:
        self.issued: list[str] = []
        app = web.Application()
        app.router.add_post("/api/oauth/token", self._token)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        super().__init__(app)

    async def _token(self, request: web.Request) -> web.Response:
        self.issued.append(f"runtime-token-{len(self.issued)}-abcdef0123456789")
        return web.json_response({"access_token": self.issued[-1], "expires_in": 30})

    async def _list(self, request: web.Request) -> web.Response:
        token = request.headers.get(hdrs.AUTHORIZATION, "").removeprefix("Bearer ")
        return web.json_response(
            {"error": 400, "errorCode": "INVALID_ATTRIBUTE", "detail": f"token {token} rejected"},
            status=400,
        )


async def test_oauth_access_token_echoed_without_its_prefix_is_redacted(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    no_secret_in_logs: set[str],
):
    """Attack 12, A12-4: the runtime token is registered for redaction when it is
    received, so an echo of it is redacted in the log, the stderr line and `status`."""
    async with BareTokenEcho() as atlas:
        config = config_for(tmp_path, atlas.url, auth=SERVICE_ACCOUNT)
        async with App(config) as app:
            assert await run_once(app) == 1
        report = io.StringIO()
        assert await ops.status(config, out=report) == 0
    token = atlas.issued[0]
    no_secret_in_logs.add(token)
    _, err = capsys.readouterr()
    for where, text in {"stderr": err, "status": report.getvalue(), "logs": caplog.text}.items():
        assert token not in text, where
        assert "token <secret> rejected" in text, where


async def test_oauth_tokens_replaced_by_a_refresh_are_forgotten(tmp_path: Path):
    """The set of secrets stays bounded: the token in use and the one before it are
    redacted; older ones, and all of them once the client is closed, are let go."""
    from invoice_watch.clock import FakeClock
    from invoice_watch.redact import redact

    clock = FakeClock()
    async with BareTokenEcho() as atlas:
        config = config_for(tmp_path, atlas.url, auth=SERVICE_ACCOUNT)
        async with AtlasClient(config.atlas, clock=clock) as client:
            for _ in range(4):
                await client.read_org(ORG_A)
                clock.advance(40)  # past the token's 30 s
            assert len(atlas.issued) == 4
            assert [redact(t) == "<secret>" for t in atlas.issued] == [False, False, True, True]
        assert all(redact(t) == t for t in atlas.issued)
