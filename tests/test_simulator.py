"""The Atlas simulator, driven over real HTTP on 127.0.0.1 with aiohttp's own clients."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy

from invoice_watch.clock import FakeClock
from invoice_watch.constants import OAUTH_TOKEN_PATH, V2_CSV_MEDIA_TYPE, V2_MEDIA_TYPE
from invoice_watch.simulator import Scenario, Simulator, demo_scenario, load_scenario, serve
from invoice_watch.simulator.scenario import ScenarioLineItem

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
JSON_V2 = {"Accept": V2_MEDIA_TYPE}
CSV_HEADER = (
    "Date,Usage Date,Description,Note,Organization Name,Organization ID,Project,Project ID,"
    "SKU,Region,Cluster,Replica Set,Config Server,Application,Unit,Unit Price,Quantity,"
    "Discount Percent,Amount"
)


def small_scenario() -> Scenario:
    """Payer with 6 monthly invoices (PENDING now, FAILED two months ago, else PAID),
    Linked (paid for by Payer) with 2, and Secret (no billing role)."""
    scenario = Scenario(now=NOW)
    scenario.add_org("Payer")
    scenario.add_org("Linked", linked_to="Payer")
    scenario.add_org("Secret", forbidden=True)
    for age in range(6):
        status = "PENDING" if age == 0 else "FAILED" if age == 2 else "PAID"
        scenario.add_invoice(
            "Payer", period=-age, status=status, amount_cents=100_000 + age, name=f"payer-{age}"
        )
    for age in range(2):
        status = "PENDING" if age == 0 else "PAID"
        scenario.add_invoice(
            "Linked", period=-age, status=status, amount_cents=5_000 + age, name=f"linked-{age}"
        )
    scenario.add_invoice("Secret", period=0, amount_cents=1)
    return scenario


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    async with Simulator(small_scenario(), clock=clock) as simulator:
        yield simulator


@pytest.fixture
async def plain() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    digest = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
    async with aiohttp.ClientSession(middlewares=(digest,)) as session:
        yield session


class Capture:
    """A client middleware recording every attempt: (status, WWW-Authenticate, Authorization)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str | None, str | None]] = []

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        response = await handler(request)
        self.seen.append(
            (
                response.status,
                response.headers.get("WWW-Authenticate"),
                request.headers.get("Authorization"),
            )
        )
        return response


def org_id(sim: Simulator, name: str) -> str:
    return sim.scenario.org(name).id


def url(sim: Simulator, org: str, suffix: str = "", prefix: str = "/api/atlas/v2") -> str:
    return f"{sim.base_url}{prefix}/orgs/{org_id(sim, org)}/invoices{suffix}"


async def get(
    session: aiohttp.ClientSession,
    address: str,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """GET; returns status, body (JSON when it is JSON, else text) and headers."""
    async with session.get(address, headers=headers or JSON_V2, params=params or None) as resp:
        text = await resp.text()
        body = json.loads(text) if "json" in resp.content_type else text
        return resp.status, body, resp.headers


async def bearer_token(session: aiohttp.ClientSession, sim: Simulator) -> str:
    auth = aiohttp.encode_basic_auth(sim.client_id, sim.client_secret)
    async with session.post(
        sim.base_url + OAUTH_TOKEN_PATH,
        data={"grant_type": "client_credentials"},
        headers={"Authorization": auth, "Accept": "application/json"},
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    return str(body["access_token"])


# ---- authentication ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_digest_authenticates_with_aiohttp_middleware(algorithm: str, plain) -> None:
    async with Simulator(small_scenario(), digest_algorithm=algorithm) as sim:
        status, body, headers = await get(plain, url(sim, "Payer"))
        assert status == 401
        challenge = headers["WWW-Authenticate"]
        assert challenge.startswith('Digest realm="MMS Public API", domain="", nonce="')
        assert f"algorithm={algorithm}" in challenge
        assert 'qop="auth"' in challenge and "stale=false" in challenge
        assert body["error"] == 401 and body["errorCode"] == "UNAUTHORIZED"

        digest = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
        async with aiohttp.ClientSession(middlewares=(digest,)) as session:
            for _ in range(3):
                status, body, _ = await get(session, url(sim, "Payer"))
                assert status == 200
        # One challenge for the first request; later ones reuse the nonce preemptively.
        assert [(r.status, r.challenge) for r in sim.requests[1:]] == [
            (401, True),
            (200, False),
            (200, False),
            (200, False),
        ]


async def test_digest_wrong_password_is_rejected(sim: Simulator) -> None:
    digest = aiohttp.DigestAuthMiddleware(sim.public_key, "not-the-private-key")
    async with aiohttp.ClientSession(middlewares=(digest,)) as session:
        status, body, _ = await get(session, url(sim, "Payer"))
    assert status == 401
    assert body["errorCode"] == "UNAUTHORIZED"
    assert [r.status for r in sim.requests] == [401, 401]


async def test_digest_expired_nonce_gets_stale_challenge(sim: Simulator, clock: FakeClock) -> None:
    capture = Capture()
    digest = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
    async with aiohttp.ClientSession(middlewares=(digest, capture)) as session:
        assert (await get(session, url(sim, "Payer")))[0] == 200
        clock.advance(timedelta(seconds=301))  # default nonce lifetime: 300 s
        assert (await get(session, url(sim, "Payer")))[0] == 200
    assert [status for status, _, _ in capture.seen] == [401, 200, 401, 200]
    assert "stale=false" in (capture.seen[0][1] or "")
    assert "stale=true" in (capture.seen[2][1] or "")


async def test_digest_replayed_nonce_count_is_rejected(sim: Simulator, plain) -> None:
    capture = Capture()
    digest = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
    async with aiohttp.ClientSession(middlewares=(digest, capture)) as session:
        assert (await get(session, url(sim, "Payer")))[0] == 200
    authorization = capture.seen[-1][2]
    assert authorization is not None and "nc=00000001" in authorization
    status, _, headers = await get(
        plain, url(sim, "Payer"), {**JSON_V2, "Authorization": authorization}
    )
    assert status == 401
    assert "stale=false" in headers["WWW-Authenticate"]


async def test_digest_concurrent_requests_share_one_nonce(sim: Simulator, client) -> None:
    assert (await get(client, url(sim, "Payer")))[0] == 200
    results = await asyncio.gather(*(get(client, url(sim, "Payer")) for _ in range(10)))
    assert [status for status, _, _ in results] == [200] * 10
    assert sum(r.challenge for r in sim.requests) == 1


async def test_oauth_token_then_bearer_authenticates(sim: Simulator, plain) -> None:
    token = await bearer_token(plain, sim)
    status, body, _ = await get(
        plain, url(sim, "Payer"), {**JSON_V2, "Authorization": f"Bearer {token}"}
    )
    assert status == 200
    assert len(body["results"]) == 6
    assert [(r.path, r.auth) for r in sim.requests] == [
        (OAUTH_TOKEN_PATH, "basic"),
        (f"/api/atlas/v2/orgs/{org_id(sim, 'Payer')}/invoices", "bearer"),
    ]


@pytest.mark.parametrize(
    ("authorization", "form", "status", "error"),
    [
        (None, {"grant_type": "client_credentials"}, 401, "invalid_client"),
        ("wrong-secret", {"grant_type": "client_credentials"}, 401, "invalid_client"),
        ("ok", {"grant_type": "password"}, 400, "unsupported_grant_type"),
        ("ok", {}, 400, "invalid_request"),
    ],
)
async def test_oauth_token_rejects_bad_requests(
    sim: Simulator, plain, authorization: str | None, form: dict[str, str], status: int, error: str
) -> None:
    headers = {}
    if authorization is not None:
        secret = sim.client_secret if authorization == "ok" else authorization
        headers["Authorization"] = aiohttp.encode_basic_auth(sim.client_id, secret)
    async with plain.post(sim.base_url + OAUTH_TOKEN_PATH, data=form, headers=headers) as resp:
        assert resp.status == status
        assert (await resp.json())["error"] == error


async def test_bearer_token_expires(sim: Simulator, plain, clock: FakeClock) -> None:
    headers = {**JSON_V2, "Authorization": f"Bearer {await bearer_token(plain, sim)}"}
    clock.advance(timedelta(seconds=3599))
    assert (await get(plain, url(sim, "Payer"), headers))[0] == 200
    clock.advance(timedelta(seconds=1))
    status, body, response_headers = await get(plain, url(sim, "Payer"), headers)
    assert status == 401
    assert body["errorCode"] == "UNAUTHORIZED"
    assert 'error="invalid_token"' in response_headers["WWW-Authenticate"]


async def test_bearer_unknown_token_is_rejected(sim: Simulator, plain) -> None:
    headers = {**JSON_V2, "Authorization": "Bearer made-up"}
    assert (await get(plain, url(sim, "Payer"), headers))[0] == 401


async def test_revoke_credentials_rejects_key_and_tokens(sim: Simulator, client, plain) -> None:
    headers = {**JSON_V2, "Authorization": f"Bearer {await bearer_token(plain, sim)}"}
    assert (await get(client, url(sim, "Payer")))[0] == 200
    sim.revoke_credentials()
    assert (await get(client, url(sim, "Payer")))[0] == 401
    assert (await get(plain, url(sim, "Payer"), headers))[0] == 401
    auth = aiohttp.encode_basic_auth(sim.client_id, sim.client_secret)
    form = {"grant_type": "client_credentials"}
    async with plain.post(
        sim.base_url + OAUTH_TOKEN_PATH, data=form, headers={"Authorization": auth}
    ) as resp:
        assert resp.status == 401

    sim.restore_credentials()
    assert (await get(client, url(sim, "Payer")))[0] == 200
    await bearer_token(plain, sim)


async def test_revoke_credentials_can_spare_the_service_account(
    sim: Simulator, client, plain
) -> None:
    sim.revoke_credentials(api_key=True, service_account=False)
    assert (await get(client, url(sim, "Payer")))[0] == 401
    headers = {**JSON_V2, "Authorization": f"Bearer {await bearer_token(plain, sim)}"}
    assert (await get(plain, url(sim, "Payer"), headers))[0] == 200


async def test_forbidden_org_is_403_naming_the_role(sim: Simulator, client) -> None:
    status, body, _ = await get(client, url(sim, "Secret"))
    assert status == 403
    assert body["errorCode"] == "USER_UNAUTHORIZED"
    assert "Organization Billing Viewer" in body["detail"]
    assert org_id(sim, "Secret") in body["detail"]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/atlas/v2/orgs/0123456789abcdef01234567/invoices", "ORG_NOT_FOUND"),
        ("/api/atlas/v2/orgs/not-an-id/invoices", "ORG_NOT_FOUND"),
        ("/api/atlas/v2/orgs/{payer}/invoices/0123456789abcdef01234567", "INVOICE_NOT_FOUND"),
        ("/api/atlas/v2/orgs/{linked}/invoices/{payer_invoice}", "INVOICE_NOT_FOUND"),
        ("/api/atlas/v2/nothing/here", "RESOURCE_NOT_FOUND"),
    ],
)
async def test_unknown_resources_are_404(sim: Simulator, client, path: str, code: str) -> None:
    address = sim.base_url + path.format(
        payer=org_id(sim, "Payer"),
        linked=org_id(sim, "Linked"),
        payer_invoice=sim.scenario.invoice("payer-1").id,
    )
    status, body, _ = await get(client, address)
    assert status == 404
    assert body["errorCode"] == code


# ---- listing ----------------------------------------------------------------------------


async def test_list_pages_with_links_and_total_count(sim: Simulator, client) -> None:
    pages = []
    for number in (1, 2, 3):
        status, body, _ = await get(
            client, url(sim, "Payer"), itemsPerPage="4", pageNum=str(number)
        )
        assert status == 200
        pages.append(body)
    assert [len(page["results"]) for page in pages] == [4, 2, 0]
    assert all(page["totalCount"] == 6 for page in pages)
    rels = [[link["rel"] for link in page["links"]] for page in pages]
    assert rels == [["self", "next"], ["self", "previous"], ["self", "previous"]]
    assert pages[0]["links"][1]["href"].startswith(url(sim, "Payer") + "?")
    assert "pageNum=2" in pages[0]["links"][1]["href"]
    ids = [invoice["id"] for page in pages for invoice in page["results"]]
    assert len(set(ids)) == 6
    assert all("lineItems" not in invoice for invoice in pages[0]["results"])


async def test_list_defaults_to_100_per_page_newest_first(sim: Simulator, client) -> None:
    for age in range(6, 120):
        sim.add_invoice("Payer", period=-age, status="PAID", amount_cents=age)
    _, body, _ = await get(client, url(sim, "Payer"))
    assert len(body["results"]) == 100
    assert body["totalCount"] == 120
    ends = [invoice["endDate"] for invoice in body["results"]]
    assert ends == sorted(ends, reverse=True)


async def test_list_include_count_false_omits_total(sim: Simulator, client) -> None:
    _, body, _ = await get(client, url(sim, "Payer"), includeCount="false")
    assert "totalCount" not in body


@pytest.mark.parametrize(
    "params",
    [
        {"itemsPerPage": "0"},
        {"itemsPerPage": "501"},
        {"itemsPerPage": "many"},
        {"pageNum": "0"},
        {"includeCount": "yes"},
        {"statusNames": "LATE"},
        {"fromDate": "2026-13-01"},
        {"toDate": "11/01/2026"},
        {"sortBy": "AMOUNT"},
        {"orderBy": "up"},
        {"itemPerPage": "500"},
    ],
)
async def test_list_bad_query_parameter_is_400(
    sim: Simulator, client, params: dict[str, str]
) -> None:
    status, body, _ = await get(client, url(sim, "Payer"), JSON_V2, **params)
    assert status == 400
    assert body["errorCode"] == "INVALID_QUERY_PARAMETER"
    name = next(iter(params))
    assert body["badRequestDetail"]["fields"][0]["field"] == name


async def test_list_repeated_single_parameter_is_400(sim: Simulator, client) -> None:
    address = url(sim, "Payer") + "?pageNum=1&pageNum=2"
    assert (await get(client, address))[0] == 400


async def test_list_accepts_500_per_page(sim: Simulator, client) -> None:
    assert (await get(client, url(sim, "Payer"), itemsPerPage="500"))[0] == 200


async def test_list_filters_by_repeated_status_names(sim: Simulator, client) -> None:
    address = url(sim, "Payer") + "?statusNames=PENDING&statusNames=FAILED"
    _, body, _ = await get(client, address)
    assert sorted(i["statusName"] for i in body["results"]) == ["FAILED", "PENDING"]
    assert body["totalCount"] == 2


async def test_list_filters_by_date_range(sim: Simulator, client) -> None:
    # Payer's periods: 2026-06 .. 2026-11. fromDate bounds startDate, toDate bounds endDate.
    _, body, _ = await get(client, url(sim, "Payer"), fromDate="2026-08-01", toDate="2026-11-01")
    starts = sorted(invoice["startDate"] for invoice in body["results"])
    assert starts == ["2026-08-01T00:00:00Z", "2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z"]
    _, body, _ = await get(client, url(sim, "Payer"), fromDate="2026-08-02")
    assert [i["startDate"] for i in body["results"]] == [
        "2026-11-01T00:00:00Z",
        "2026-10-01T00:00:00Z",
        "2026-09-01T00:00:00Z",
    ]


@pytest.mark.parametrize(
    ("sort_by", "order_by", "field", "descending"),
    [
        ("START_DATE", "asc", "startDate", False),
        ("START_DATE", "desc", "startDate", True),
        ("END_DATE", "asc", "endDate", False),
    ],
)
async def test_list_sorts(
    sim: Simulator, client, sort_by: str, order_by: str, field: str, descending: bool
) -> None:
    _, body, _ = await get(client, url(sim, "Payer"), sortBy=sort_by, orderBy=order_by)
    values = [invoice[field] for invoice in body["results"]]
    assert values == sorted(values, reverse=descending)


async def test_list_nests_linked_invoices_of_the_same_period(sim: Simulator, client) -> None:
    _, body, _ = await get(client, url(sim, "Payer"))
    by_start = {invoice["startDate"]: invoice for invoice in body["results"]}
    current = by_start["2026-11-01T00:00:00Z"]["linkedInvoices"]
    assert [(i["orgId"], i["amountBilledCents"]) for i in current] == [
        (org_id(sim, "Linked"), 5_000)
    ]
    assert "lineItems" not in current[0]
    assert by_start["2026-07-01T00:00:00Z"]["linkedInvoices"] == []

    _, body, _ = await get(client, url(sim, "Payer"), viewLinkedInvoices="false")
    assert all("linkedInvoices" not in invoice for invoice in body["results"])


async def test_get_reads_a_linked_invoice_through_the_payer(sim: Simulator, client) -> None:
    linked = sim.scenario.invoice("linked-0")
    status, body, _ = await get(client, url(sim, "Payer", f"/{linked.id}"))
    assert status == 200
    assert body["orgId"] == org_id(sim, "Linked")
    assert body["amountBilledCents"] == 5_000
    assert body["lineItems"]


async def test_get_returns_billing_invoice_with_line_items(sim: Simulator, client) -> None:
    invoice = sim.scenario.invoice("payer-1")
    status, body, headers = await get(client, url(sim, "Payer", f"/{invoice.id}"))
    assert status == 200
    assert headers["Content-Type"].startswith(V2_MEDIA_TYPE)
    assert body["id"] == invoice.id and body["statusName"] == "PAID"
    assert sum(item["totalPriceCents"] for item in body["lineItems"]) == body["subtotalCents"]
    assert body["payments"][0]["statusName"] == "PAID"
    assert body["links"] == [{"href": url(sim, "Payer", f"/{invoice.id}"), "rel": "self"}]


async def test_pending_returns_pending_invoices_with_line_items(sim: Simulator, client) -> None:
    status, body, _ = await get(client, url(sim, "Payer", "/pending"))
    assert status == 200
    assert body["totalCount"] == 1
    (pending,) = body["results"]
    assert pending["statusName"] == "PENDING"
    assert pending["lineItems"][0]["cloudProvider"] == "AWS"
    assert [i["orgId"] for i in pending["linkedInvoices"]] == [org_id(sim, "Linked")]
    assert pending["linkedInvoices"][0]["lineItems"]


async def test_envelope_wraps_status_and_pretty_indents(sim: Simulator, client) -> None:
    _, listed, _ = await get(client, url(sim, "Payer"), envelope="true")
    assert listed["status"] == 200 and len(listed["results"]) == 6
    invoice = sim.scenario.invoice("payer-0")
    _, one, _ = await get(client, url(sim, "Payer", f"/{invoice.id}"), envelope="true")
    assert one["status"] == 200 and one["content"]["id"] == invoice.id
    address = url(sim, "Payer", "/pending")
    async with client.get(address, headers=JSON_V2, params={"pretty": "true"}) as resp:
        pretty = await resp.text()
    async with client.get(address, headers=JSON_V2) as resp:
        compact = await resp.text()
    assert "\n  " in pretty and "\n" not in compact
    assert json.loads(pretty)["results"] == json.loads(compact)["results"]


@pytest.mark.parametrize("suffix", ["", "/pending", "/{invoice}", "/{invoice}/csv"])
@pytest.mark.parametrize(
    "accept", [None, "application/json", "*/*", "application/vnd.atlas.2025-03-12+json"]
)
async def test_v2_without_its_media_type_is_406(
    sim: Simulator, client, suffix: str, accept: str | None
) -> None:
    headers = {"Accept": accept} if accept else {}
    address = url(sim, "Payer", suffix.format(invoice=sim.scenario.invoice("payer-1").id))
    async with client.get(address, headers=headers, skip_auto_headers=["Accept"]) as resp:
        assert resp.status == 406
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["errorCode"] == "INVALID_VERSION_DATE"
    assert body["error"] == 406


@pytest.mark.parametrize("prefix", ["/api/atlas/v1.0", "/api/public/v1.0"])
async def test_legacy_flavors_serve_plain_json_and_csv(sim: Simulator, client, prefix: str) -> None:
    invoice = sim.scenario.invoice("payer-1")
    async with client.get(url(sim, "Payer", prefix=prefix), skip_auto_headers=["Accept"]) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        listed = await resp.json()
    assert len(listed["results"]) == 6
    assert listed["links"][0]["href"].startswith(sim.base_url + prefix)

    status, one, _ = await get(client, url(sim, "Payer", f"/{invoice.id}", prefix), {})
    assert status == 200
    assert one["lineItems"] and "cloudProvider" not in one["lineItems"][0]

    for suffix, accept in ((f"/{invoice.id}/csv", "*/*"), (f"/{invoice.id}", "text/csv")):
        async with client.get(
            url(sim, "Payer", suffix, prefix), headers={"Accept": accept}
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/csv"
            assert (await resp.text()).startswith(f"Invoice Number,{invoice.id},\n")


# ---- CSV --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "accept"), [("/{invoice}/csv", V2_CSV_MEDIA_TYPE), ("/{invoice}", V2_CSV_MEDIA_TYPE)]
)
async def test_csv_has_header_block_and_spec_columns(
    sim: Simulator, client, suffix: str, accept: str
) -> None:
    invoice = sim.scenario.invoice("payer-1")
    address = url(sim, "Payer", suffix.format(invoice=invoice.id))
    async with client.get(address, headers={"Accept": accept}) as resp:
        assert resp.status == 200
        assert resp.content_type == V2_CSV_MEDIA_TYPE
        text = await resp.text()
    lines = text.split("\n")
    assert lines[:6] == [
        f"Invoice Number,{invoice.id},",
        'Billing Period,"October 1, 2026 - November 1, 2026",',
        "Organization Name,Payer,",
        f"Organization ID,{invoice.org_id},",
        "",
        CSV_HEADER,
    ]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[5:]))))
    assert len(rows) == len(invoice.line_items)
    total = sum(round(float(row["Amount"]) * 100) for row in rows)
    assert total == invoice.subtotal_cents
    assert {row["Organization ID"] for row in rows} == {invoice.org_id}
    assert rows[0]["SKU"] == "ATLAS_AWS_INSTANCE_M30"
    assert rows[0]["Date"] == "10/01/2026"


# ---- rate limit -------------------------------------------------------------------------


async def test_rate_limit_headers_on_every_answer(sim: Simulator, client, plain) -> None:
    for session, address in ((plain, url(sim, "Payer")), (client, url(sim, "Secret"))):
        async with session.get(address, headers=JSON_V2) as resp:
            assert resp.status in (401, 403)
            assert resp.headers["RateLimit-Limit"] == "100"
            assert resp.headers["RateLimit-Remaining"] == "100"


async def test_rate_limit_bucket_answers_429_with_retry_after(clock: FakeClock, plain) -> None:
    async with Simulator(small_scenario(), clock=clock, rate_limit=(0.5, 3)) as sim:
        headers = {**JSON_V2, "Authorization": f"Bearer {await bearer_token(plain, sim)}"}
        remaining = []
        for _ in range(3):
            status, _, response_headers = await get(plain, url(sim, "Payer"), headers)
            assert status == 200
            assert response_headers["RateLimit-Limit"] == "3"
            remaining.append(response_headers["RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]

        status, body, response_headers = await get(plain, url(sim, "Payer"), headers)
        assert status == 429
        assert body["errorCode"] == "RATE_LIMITED_TOKEN_BUCKET"
        assert response_headers["Retry-After"] == "2"  # one token at 0.5/s

        clock.advance(timedelta(seconds=2))
        assert (await get(plain, url(sim, "Payer"), headers))[0] == 200


async def test_rate_limit_headers_on_429s_only_as_the_spec_documents(
    clock: FakeClock, plain
) -> None:
    """``rate_limit_headers="429"``: the spec declares RateLimit-Limit/-Remaining on its
    tooManyRequests answer only; a 429 always says 0 remain (the bucket's or an
    injected one)."""
    async with Simulator(
        small_scenario(), clock=clock, rate_limit=(0.5, 2), rate_limit_headers="429"
    ) as sim:
        headers = {**JSON_V2, "Authorization": f"Bearer {await bearer_token(plain, sim)}"}
        for _ in range(2):
            status, _, response_headers = await get(plain, url(sim, "Payer"), headers)
            assert status == 200 and "RateLimit-Remaining" not in response_headers
        status, _, response_headers = await get(plain, url(sim, "Payer"), headers)
        assert status == 429
        assert response_headers["RateLimit-Limit"] == "2"
        assert response_headers["RateLimit-Remaining"] == "0"
    async with Simulator(small_scenario(), clock=clock, rate_limit_headers="429") as sim:
        sim.faults.status(429, path="*/invoices")
        headers = {**JSON_V2, "Authorization": f"Bearer {await bearer_token(plain, sim)}"}
        status, _, response_headers = await get(plain, url(sim, "Payer"), headers)
        assert (status, response_headers["RateLimit-Remaining"]) == (429, "0")
        status, _, response_headers = await get(plain, url(sim, "Payer"), headers)
        assert status == 200 and "RateLimit-Limit" not in response_headers
    with pytest.raises(ValueError, match="rate_limit_headers"):
        Simulator(small_scenario(), rate_limit_headers="sometimes")  # type: ignore[arg-type]


async def test_in_flight_counts_requests_answered_at_once(sim: Simulator, client) -> None:
    sim.faults.latency = 0.05
    await asyncio.gather(*(get(client, url(sim, "Payer")) for _ in range(3)))
    assert sim.in_flight == 0 and sim.max_in_flight == 3


# ---- faults -----------------------------------------------------------------------------


async def test_fault_status_n_times_then_recovers(sim: Simulator, client) -> None:
    sim.faults.status(503, times=2, retry_after=7)
    first, second, third = [await get(client, url(sim, "Payer")) for _ in range(3)]
    assert first[0] == second[0] == 503
    assert first[1]["error"] == 503 and first[2]["Retry-After"] == "7"
    assert third[0] == 200
    assert sim.faults.pending == []
    assert [r.fault for r in sim.requests if r.status != 401] == ["status", "status", None]


async def test_fault_429_carries_retry_after(sim: Simulator, client) -> None:
    sim.faults.status(429)
    status, body, headers = await get(client, url(sim, "Payer"))
    assert (status, body["errorCode"], headers["Retry-After"]) == (429, "RATE_LIMITED", "1")


async def test_fault_401_challenges_and_digest_client_recovers(sim: Simulator, client) -> None:
    assert (await get(client, url(sim, "Payer")))[0] == 200
    sim.faults.status(401)
    assert (await get(client, url(sim, "Payer")))[0] == 200  # the middleware re-authenticates
    assert [(r.status, r.fault) for r in sim.requests[-2:]] == [(401, "status"), (200, None)]


async def test_fault_matches_path_and_org(sim: Simulator, client) -> None:
    sim.faults.status(500, path="*/invoices/pending", org_id=org_id(sim, "Linked"))
    assert (await get(client, url(sim, "Payer", "/pending")))[0] == 200
    assert (await get(client, url(sim, "Linked")))[0] == 200
    status, body, _ = await get(client, url(sim, "Linked", "/pending"))
    assert (status, body["errorCode"]) == (500, "UNEXPECTED_ERROR")


async def test_fault_applies_to_token_endpoint(sim: Simulator, plain) -> None:
    sim.faults.status(503, path=OAUTH_TOKEN_PATH)
    auth = aiohttp.encode_basic_auth(sim.client_id, sim.client_secret)
    form = {"grant_type": "client_credentials"}
    async with plain.post(
        sim.base_url + OAUTH_TOKEN_PATH, data=form, headers={"Authorization": auth}
    ) as resp:
        assert resp.status == 503
    await bearer_token(plain, sim)


async def test_fault_latency_delays_every_request(sim: Simulator, client) -> None:
    await get(client, url(sim, "Payer"))
    sim.faults.latency = 0.05
    loop = asyncio.get_running_loop()
    started = loop.time()
    await get(client, url(sim, "Payer"))
    assert loop.time() - started >= 0.05


async def test_fault_hang_outlasts_client_timeout(sim: Simulator, client) -> None:
    await get(client, url(sim, "Payer"))
    sim.faults.hang()
    with pytest.raises(TimeoutError):
        async with client.get(
            url(sim, "Payer"), headers=JSON_V2, timeout=aiohttp.ClientTimeout(total=0.1)
        ) as resp:
            await resp.read()
    assert sim.requests[-1].fault == "hang"
    assert (await get(client, url(sim, "Payer")))[0] == 200


async def test_fault_hang_ends_and_answers(sim: Simulator, client) -> None:
    await get(client, url(sim, "Payer"))
    sim.faults.hang(seconds=0.01)
    assert (await get(client, url(sim, "Payer")))[0] == 200


@pytest.mark.parametrize("kind", ["reset", "truncated"])
async def test_fault_broken_connection_mid_body(sim: Simulator, client, kind: str) -> None:
    await get(client, url(sim, "Payer"))
    getattr(sim.faults, kind)()
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(client, url(sim, "Payer"))
    assert (sim.requests[-1].status, sim.requests[-1].fault) == (200, kind)
    assert (await get(client, url(sim, "Payer")))[0] == 200


async def test_fault_malformed_json_is_well_framed(sim: Simulator, client) -> None:
    await get(client, url(sim, "Payer"))
    sim.faults.malformed_json()
    async with client.get(url(sim, "Payer"), headers=JSON_V2) as resp:
        assert resp.status == 200
        assert resp.content_type == V2_MEDIA_TYPE
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.text())


async def test_fault_wrong_content_type_serves_html(sim: Simulator, client) -> None:
    await get(client, url(sim, "Payer"))
    sim.faults.wrong_content_type()
    async with client.get(url(sim, "Payer"), headers=JSON_V2) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ContentTypeError):
            await resp.json(content_type=V2_MEDIA_TYPE)


def test_faults_reject_nonsense() -> None:
    sim = Simulator(small_scenario())
    with pytest.raises(ValueError, match="error status"):
        sim.faults.status(200)
    with pytest.raises(ValueError, match="at least once"):
        sim.faults.reset(times=0)
    sim.faults.status(500)
    sim.faults.latency = 1.0
    sim.faults.clear()
    assert sim.faults.pending == [] and sim.faults.latency == 0.0


async def test_requests_record_what_was_served(sim: Simulator, client) -> None:
    await get(client, url(sim, "Payer") + "?statusNames=PAID&statusNames=FAILED&pageNum=1")
    challenge, served = sim.requests
    assert (challenge.status, challenge.challenge, challenge.auth) == (401, True, None)
    assert served.method == "GET"
    assert served.path == f"/api/atlas/v2/orgs/{org_id(sim, 'Payer')}/invoices"
    assert served.query == {"statusNames": ["PAID", "FAILED"], "pageNum": ["1"]}
    assert (served.status, served.challenge, served.auth) == (200, False, "digest")
    assert served.org_id == org_id(sim, "Payer")


# ---- lifecycle --------------------------------------------------------------------------


async def test_stop_then_start_serves_on_the_same_port(plain) -> None:
    sim = Simulator(small_scenario())
    with pytest.raises(RuntimeError, match="start"):
        _ = sim.base_url
    await sim.start()
    first = sim.base_url
    await sim.stop()
    await sim.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(plain, url(sim, "Payer"))
    await sim.start()
    try:
        assert sim.base_url == first
        assert (await get(plain, url(sim, "Payer")))[0] == 401
    finally:
        await sim.stop()


def test_simulator_repr_and_credentials() -> None:
    sim = Simulator(small_scenario(), public_key="abcdefgh", private_key="p-r-i-v")
    assert (sim.public_key, sim.private_key) == ("abcdefgh", "p-r-i-v")
    assert sim.client_id.startswith("mdb_sa_id_") and sim.client_secret.startswith("mdb_sa_sk_")
    assert sim.private_key not in repr(sim) and sim.client_secret not in repr(sim)
    other = Simulator(small_scenario())
    assert other.private_key != Simulator(small_scenario()).private_key
    assert len(other.public_key) == 8


async def test_serve_prints_how_to_connect(tmp_path: Path) -> None:
    out = io.StringIO()
    task = asyncio.create_task(serve(None, "127.0.0.1", 0, out))
    try:
        while out.getvalue().count("\n") < 4:
            assert not task.done()
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    base, key, account, orgs = out.getvalue().splitlines()[:4]
    assert base.startswith("Atlas simulator listening on http://127.0.0.1:")
    assert "public_key=" in key and "private_key=" in key
    assert "client_id=mdb_sa_id_" in account and "client_secret=mdb_sa_sk_" in account
    assert "5f8a1c2e9b3d4a6f7e0c1b2a (Production)" in orgs
    assert "6a7b8c9d0e1f2a3b4c5d6e7f (Analytics)" in orgs


# ---- scenarios and timeline --------------------------------------------------------------


def timeline_scenario() -> Scenario:
    scenario = small_scenario()
    scenario.schedule(5, "payer-1", set_status="FAILED")
    scenario.schedule(10, "payer-0", set_amount_cents=600_000)
    scenario.schedule(10, "payer-1", set_status="PAID")
    scenario.schedule(12, scenario.new_invoice("Linked", period=-2, status="PAID", name="late"))
    scenario.schedule(20, "late", remove=True)
    return scenario


def test_advance_to_applies_due_steps_once(clock: FakeClock) -> None:
    sim = Simulator(timeline_scenario(), clock=clock)
    assert sim.advance_to(4.9) == []
    (line,) = sim.advance_to(5)
    assert line.startswith("t+5s: Payer 2026-10 invoice ")
    assert line.endswith(": status PAID -> FAILED")
    assert sim.advance_to(5) == []
    lines = sim.advance_to(12)
    assert [line.split(": ", 2)[-1] for line in lines] == [
        "amount $1,000.00 -> $6,000.00",
        "status FAILED -> PAID",
        "added (PAID, $0.00)",
    ]
    linked = org_id(sim, "Linked")
    assert len(sim.invoices(linked)) == 3
    assert sim.advance_to(100)[0].endswith(": removed")
    assert len(sim.invoices(linked)) == 2


async def test_run_timeline_follows_the_clock(clock: FakeClock) -> None:
    sim = Simulator(timeline_scenario(), clock=clock)
    seen: list[str] = []
    await sim.run_timeline(speed=2.0, on_step=seen.append)
    assert len(seen) == 5
    assert clock.sleeps == [2.5, 2.5, 1.0, 4.0]
    assert clock.now() == NOW + timedelta(seconds=10)


async def test_timeline_changes_show_in_the_api(sim: Simulator, client, clock: FakeClock) -> None:
    invoice = sim.scenario.invoice("payer-1")
    clock.advance(timedelta(minutes=5))
    sim.set_status(invoice.id, "FAILED")
    _, body, _ = await get(client, url(sim, "Payer", f"/{invoice.id}"))
    assert body["statusName"] == "FAILED"
    assert body["updated"] == "2026-11-15T12:05:00Z"
    assert body["payments"][0]["statusName"] == "FAILED"

    sim.set_amount(invoice.id, 123_456)
    new_id = sim.add_invoice("Payer", period=1, status="PENDING", amount_cents=42)
    _, body, _ = await get(client, url(sim, "Payer"))
    amounts = {i["id"]: i["amountBilledCents"] for i in body["results"]}
    assert amounts[invoice.id] == 123_456 and amounts[new_id] == 42
    sim.remove_invoice(new_id)
    assert new_id not in {i["id"] for i in sim.invoices(org_id(sim, "Payer"))}


def test_set_status_paid_records_the_payment(clock: FakeClock) -> None:
    sim = Simulator(small_scenario(), clock=clock)
    invoice = sim.scenario.invoice("payer-2")
    assert invoice.amount_paid_cents == 0
    sim.set_status(invoice.id, "PAID")
    assert invoice.amount_paid_cents == invoice.amount_billed_cents
    with pytest.raises(ValueError, match="status"):
        sim.set_status(invoice.id, "LATE")


def assert_consistent(scenario: Scenario) -> None:
    for invoice in scenario.invoices:
        assert invoice.subtotal_cents == sum(item.total_cents for item in invoice.line_items)
        assert invoice.amount_billed_cents == (
            invoice.subtotal_cents + invoice.sales_tax_cents - invoice.starting_balance_cents
        )
        assert all(item.total_cents >= 0 for item in invoice.line_items)
        assert invoice.sales_tax_cents >= 0


def test_generate_makes_consistent_deterministic_scenarios() -> None:
    scenario = Scenario.generate(orgs=20, invoices_per_org=12, seed=7, now=NOW)
    assert len(scenario.orgs) == 20 and len(scenario.invoices) == 240
    assert_consistent(scenario)
    assert len({invoice.id for invoice in scenario.invoices}) == 240
    assert {
        i.status for i in scenario.invoices if i.start == datetime(2026, 11, 1, tzinfo=UTC)
    } == {"PENDING"}
    assert any(invoice.sales_tax_cents for invoice in scenario.invoices)
    again = Scenario.generate(orgs=20, invoices_per_org=12, seed=7, now=NOW)
    assert [i.id for i in again.invoices] == [i.id for i in scenario.invoices]
    assert [i.amount_billed_cents for i in again.invoices] == [
        i.amount_billed_cents for i in scenario.invoices
    ]
    other = Scenario.generate(orgs=20, invoices_per_org=12, seed=8, now=NOW)
    assert [i.id for i in other.invoices] != [i.id for i in scenario.invoices]


@settings(max_examples=200, database=None, deadline=None)
@given(
    items=st.lists(st.integers(0, 10**7), min_size=1, max_size=5),
    tax=st.integers(0, 10**6),
    balance=st.integers(0, 10**6),
    target=st.integers(0, 10**8),
)
def test_set_amount_keeps_amounts_consistent(
    items: list[int], tax: int, balance: int, target: int
) -> None:
    scenario = Scenario(now=NOW)
    scenario.add_org("Org")
    invoice = scenario.add_invoice(
        "Org",
        line_items=[ScenarioLineItem(sku=f"SKU_{n}", total_cents=c) for n, c in enumerate(items)],
        sales_tax_cents=tax,
        starting_balance_cents=balance,
    )
    scenario.set_amount(invoice.id, target, NOW)
    assert invoice.amount_billed_cents == target
    assert invoice.starting_balance_cents == balance
    assert_consistent(scenario)


def test_set_amount_below_the_starting_balance_is_refused() -> None:
    scenario = Scenario(now=NOW)
    scenario.add_org("Org")
    invoice = scenario.add_invoice("Org", amount_cents=100, starting_balance_cents=50)
    with pytest.raises(ValueError, match="starting balance"):
        scenario.set_amount(invoice.id, -51, NOW)
    scenario.set_amount(invoice.id, -50, NOW)
    assert invoice.amount_billed_cents == -50


def test_demo_scenario_fires_and_resolves_within_a_minute() -> None:
    demo = demo_scenario(now=NOW)
    assert [org.name for org in demo.orgs] == ["Production", "Analytics"]
    assert_consistent(demo)
    pending = demo.invoice("prod-pending")
    failing = demo.invoice("prod-last-month")
    assert (pending.status, pending.amount_billed_cents) == ("PENDING", 390_000)
    assert failing.status == "CLOSED"
    production = demo.org("Production").id
    history = [i for i in demo.invoices if i.org_id == production and i.status == "PAID"]
    assert len(history) >= 3

    sim = Simulator(demo)
    timeline: dict[float, tuple[str, int]] = {}
    for at in range(61):
        sim.advance_to(at)
        invoice = sim.scenario.invoice("prod-pending")
        timeline[at] = (sim.scenario.invoice("prod-last-month").status, invoice.amount_billed_cents)
    assert timeline[4] == ("CLOSED", 448_000)
    assert timeline[5][0] == "FAILED"
    assert timeline[9][1] < 500_000 < timeline[10][1]
    assert timeline[24][0] == "FAILED" and timeline[25][0] == "PAID"
    assert timeline[29][1] > 500_000 > timeline[30][1]
    assert max(step.at for step in demo.timeline) < 45
    assert_consistent(sim.scenario)


def test_load_scenario_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(
        """
orgs:
  - {name: Child, linked_to: Parent}
  - {name: Parent, id: 0123456789abcdef01234567}
  - {name: Hidden, forbidden: true}
invoices:
  - {name: bill, org: Parent, period: 2026-10, status: CLOSED, amount: 1234.56, sales_tax: 4.56}
  - org: Child
    period: 2026-10
    status: PAID
    line_items:
      - {sku: ATLAS_GCP_INSTANCE_M40, amount: 10.5, unit_price: 1.04, cloud_provider: GCP}
timeline:
  - {at: 1, invoice: bill, set_status: FAILED}
  - {at: 2, add_invoice: {name: extra, org: Child, period: 2026-11, amount: 1}}
  - {at: 3, invoice: extra, set_amount: 2}
  - {at: 4, remove_invoice: bill}
""",
        encoding="utf-8",
    )
    scenario = load_scenario(path, now=NOW)
    parent, child, hidden = (scenario.org(n) for n in ("Parent", "Child", "Hidden"))
    assert parent.id == "0123456789abcdef01234567"
    assert child.linked_to == parent.id and hidden.forbidden
    bill = scenario.invoice("bill")
    assert (bill.amount_billed_cents, bill.sales_tax_cents, bill.subtotal_cents) == (
        123_456,
        456,
        123_000,
    )
    (child_invoice,) = [i for i in scenario.invoices if i.org_id == child.id]
    assert child_invoice.amount_paid_cents == child_invoice.amount_billed_cents == 1_050
    assert child_invoice.line_items[0].cloud_provider == "GCP"
    assert [step.action for step in scenario.timeline] == [
        "set_status",
        "add_invoice",
        "set_amount",
        "remove_invoice",
    ]
    again = load_scenario(path, now=NOW)
    assert [i.id for i in again.invoices] == [i.id for i in scenario.invoices]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("orgs: [{name: A, colour: red}]", "orgs.0.colour: Extra inputs are not permitted"),
        ("orgs: [{name: A}]\ninvoices: [{org: B}]", "unknown organization 'B'"),
        ("orgs: [{name: A}]\ninvoices: [{org: A, status: LATE}]", "must be one of"),
        ("orgs: [{name: A}]\ninvoices: [{org: A, amount: 1.005}]", "more than two decimals"),
        ("orgs: [{name: A}]\ninvoices: [{org: A, period: 2026-13}]", "not YYYY-MM"),
        ("orgs: [{name: A, id: XYZ}]", "not 24 lowercase hex"),
        ("orgs: [{name: A}, {name: A}]", "defined twice"),
        (
            "orgs: [{name: A}]\ntimeline: [{at: 1, invoice: nope, set_status: PAID}]",
            "unknown invoice",
        ),
        ("orgs: [{name: A}]\ntimeline: [{at: 1}]", "exactly one of"),
        ("orgs: [{name: A}\n", "not valid YAML"),
    ],
)
def test_load_scenario_reports_problems(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        load_scenario(path, now=NOW)
    assert str(caught.value).startswith(str(path))


def test_load_scenario_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.yaml")


def test_a_new_invoice_never_gets_the_id_of_one_removed() -> None:
    """Atlas never gives a new invoice an id it used before: an invoice added after one
    of the same organization and month was removed gets an id of its own (it got the
    removed one's, so a product under test saw two invoices as one)."""
    scenario = Scenario(now=datetime(2026, 11, 15, tzinfo=UTC))
    scenario.add_org("Production", id="5f8a1c2e9b3d4a6f7e0c1b2a")
    first = scenario.add_invoice("Production", period=-1, status="FAILED")
    scenario.remove(first.id)
    second = scenario.add_invoice("Production", period=-1, status="FAILED")
    assert second.id != first.id
    scenario.remove(second.id)
    scenario.add(first)  # a caller may still put an invoice back under its own id
    assert scenario.invoice(first.id) is first
