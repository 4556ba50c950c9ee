"""The simulator against the official Atlas OpenAPI spec (server half of conformance):
every body it serves on the invoice endpoints validates against the schema the spec
declares for that path, status and media type, and it serves only declared paths,
query parameters and media types.

Reusable helpers for other conformance tests: :func:`validate_against_spec`,
:func:`validate_schema`, :func:`declared_query_params`, :func:`declared_media_types`.
Validation is strict by default: an object with declared ``properties`` may not carry
others, so a misspelt field fails. OpenAPI 3.0 ``nullable`` is honoured, ``$ref``s
resolve inside the spec document, and ``date-time`` values must be UTC (``...Z``).
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]  # no stubs installed
import pytest

from invoice_watch.clock import FakeClock
from invoice_watch.constants import V2_CSV_MEDIA_TYPE, V2_MEDIA_TYPE
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.simulator.server import OPERATIONS, QUERY_PARAMS, USAGE_PATH

SPEC_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "atlas-openapi" / "invoices.openapi.json"
)
V2 = "/api/atlas/v2"
TEMPLATES = {operation: V2 + path for operation, path in OPERATIONS.items()}
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


# ---- helpers (reusable) -----------------------------------------------------------------


@functools.cache
def _read_spec() -> dict[str, Any] | None:
    if not SPEC_PATH.is_file():
        return None
    data: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    return data


def load_spec() -> dict[str, Any]:
    """The official spec; skips the calling test when the file is not there."""
    spec = _read_spec()
    if spec is None:
        pytest.skip(
            f"official Atlas OpenAPI spec not found at {SPEC_PATH}: "
            "conformance needs ../shared/atlas-openapi/invoices.openapi.json beside the repo"
        )
    return spec


def _to_json_schema(node: Any, strict: bool) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema draft 4: ``nullable`` becomes a ``null`` type;
    with ``strict``, objects with ``properties`` forbid undeclared ones."""
    if isinstance(node, list):
        return [_to_json_schema(item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _to_json_schema(value, strict) for key, value in node.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if strict and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


_FORMATS = jsonschema.FormatChecker(formats=())
_UTC_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def _utc_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return _UTC_TIMESTAMP.fullmatch(value) is not None


def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_FORMATS.checks("date-time", raises=ValueError)(_utc_date_time)
_FORMATS.checks("int32")(_int32)
_FORMATS.checks("int64")(_int64)


@functools.cache
def _components(strict: bool) -> dict[str, Any]:
    converted: dict[str, Any] = _to_json_schema(load_spec()["components"], strict)
    return converted


def _validate(schema: dict[str, Any], body: Any, strict: bool) -> None:
    # Draft 4 ignores siblings of "$ref": the components ride along so that the spec's
    # own "#/components/..." references resolve inside this document.
    root = {
        "$ref": "#/definitions/target",
        "definitions": {"target": _to_json_schema(schema, strict)},
        "components": _components(strict),
    }
    jsonschema.Draft4Validator(root, format_checker=_FORMATS).validate(body)


def _operation(path_template: str, method: str) -> dict[str, Any]:
    spec = load_spec()
    operation = spec["paths"].get(path_template, {}).get(method.lower())
    if operation is None:
        raise AssertionError(f"the spec declares no {method.upper()} {path_template}")
    found: dict[str, Any] = operation
    return found


def _response(path_template: str, method: str, status: int) -> dict[str, Any]:
    responses = _operation(path_template, method)["responses"]
    response = responses.get(str(status))
    if response is None:
        raise AssertionError(
            f"the spec declares no {status} for {method.upper()} {path_template} "
            f"(declared: {', '.join(sorted(responses))})"
        )
    while "$ref" in response:  # "#/components/responses/<name>"
        response = load_spec()["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    found: dict[str, Any] = response
    return found


def declared_media_types(path_template: str, method: str, status: int) -> set[str]:
    """Media types the spec declares for that response."""
    return set(_response(path_template, method, status).get("content", {}))


def declared_query_params(path_template: str, method: str) -> set[str]:
    """Names of the query parameters the spec declares for the operation."""
    spec = load_spec()
    names = set()
    for parameter in _operation(path_template, method).get("parameters", []):
        if "$ref" in parameter:
            parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        if parameter["in"] == "query":
            names.add(parameter["name"])
    return names


def validate_against_spec(
    path_template: str,
    method: str,
    status: int,
    media_type: str,
    body: Any,
    *,
    strict: bool = True,
) -> None:
    """Validate ``body`` against the schema the spec declares for this operation, status
    and media type. Raises ``AssertionError`` when the spec declares none, and
    ``jsonschema.ValidationError`` when the body does not conform."""
    content = _response(path_template, method, status).get("content", {}).get(media_type)
    if content is None:
        raise AssertionError(
            f"the spec declares no {media_type} body for {status} on "
            f"{method.upper()} {path_template}"
        )
    _validate(content["schema"], body, strict)


def validate_schema(name: str, body: Any, *, strict: bool = True) -> None:
    """Validate ``body`` against ``#/components/schemas/<name>``."""
    _validate({"$ref": f"#/components/schemas/{name}"}, body, strict)


# ---- fixtures ---------------------------------------------------------------------------


def scenario() -> Scenario:
    built = Scenario(now=NOW)
    built.add_org("Payer")
    built.add_org("Linked", linked_to="Payer")
    built.add_org("Secret", forbidden=True)
    statuses = ["PENDING", "CLOSED", "FAILED", "PAID", "FORGIVEN", "FREE", "PREPAID", "INVOICED"]
    for age, status in enumerate(statuses):
        built.add_invoice(
            "Payer",
            period=-age,
            status=status,
            amount_cents=250_000 + age,
            sales_tax_cents=1_000,
            starting_balance_cents=500 if age == 1 else 0,
            credits_cents=200 if age == 2 else 0,
            name=f"payer-{age}",
        )
        if age < 3:
            built.add_invoice("Linked", period=-age, status=status, amount_cents=9_000 + age)
    return built


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    load_spec()
    async with Simulator(scenario(), clock=FakeClock(NOW), rate_limit=(1.0, 1000)) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    digest = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
    async with aiohttp.ClientSession(middlewares=(digest,)) as session:
        yield session


def address(sim: Simulator, operation: str, org: str = "Payer", invoice: str = "payer-3") -> str:
    path = TEMPLATES[operation].format(
        orgId=sim.scenario.org(org).id, invoiceId=sim.scenario.invoice(invoice).id
    )
    return sim.base_url + path


async def fetch(
    session: aiohttp.ClientSession, url: str, accept: str = V2_MEDIA_TYPE, **params: str
) -> tuple[int, str, Any, aiohttp.ClientResponse]:
    """GET; returns status, media type, body (parsed when JSON) and the response."""
    async with session.get(url, headers={"Accept": accept}, params=params or None) as resp:
        text = await resp.text()
        body = json.loads(text) if resp.content_type.endswith("json") else text
        return resp.status, resp.content_type, body, resp


# ---- the validator itself ---------------------------------------------------------------


def test_validator_rejects_what_the_spec_forbids() -> None:
    load_spec()
    good = {
        "id": "0123456789abcdef01234567",
        "statusName": "PAID",
        "created": "2026-11-01T00:00:00Z",
    }
    validate_schema("BillingInvoiceMetadata", good)
    for bad in (
        {**good, "statusName": "LATE"},
        {**good, "id": "XYZ"},
        {**good, "amountBilledCents": "12"},
        {**good, "created": "2026-11-01 00:00"},
        {**good, "created": "2026-11-01T00:00:00+02:00"},
        {**good, "amountBiledCents": 12},  # a typo: only strict validation notices
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_schema("BillingInvoiceMetadata", bad)
    validate_schema("BillingInvoiceMetadata", {**good, "amountBiledCents": 12}, strict=False)
    # OpenAPI 3.0 nullable: ApiError.detail and badRequestDetail may be null.
    validate_schema(
        "ApiError", {"error": 400, "errorCode": "X", "detail": None, "badRequestDetail": None}
    )
    with pytest.raises(jsonschema.ValidationError):
        validate_schema("ApiError", {"error": 400, "errorCode": None})
    with pytest.raises(AssertionError, match="declares no 418"):
        validate_against_spec(TEMPLATES["list"], "GET", 418, "application/json", {})
    with pytest.raises(AssertionError, match="declares no text/plain"):
        validate_against_spec(TEMPLATES["list"], "GET", 200, "text/plain", {})


# ---- 200 bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "has_linked"),
    [
        ({}, True),
        ({"viewLinkedInvoices": "false"}, False),
        ({"itemsPerPage": "3", "pageNum": "2", "includeCount": "false"}, False),
        ({"statusNames": "FAILED", "sortBy": "START_DATE", "orderBy": "asc"}, True),
        ({"fromDate": "2026-09-01", "toDate": "2026-12-01", "pretty": "true"}, True),
    ],
)
async def test_list_body_conforms(
    sim: Simulator, client, params: dict[str, str], has_linked: bool
) -> None:
    status, media_type, body, _ = await fetch(client, address(sim, "list"), **params)
    assert (status, media_type) == (200, V2_MEDIA_TYPE)
    assert body["results"]
    validate_against_spec(TEMPLATES["list"], "GET", 200, media_type, body)
    linked = [i for invoice in body["results"] for i in invoice.get("linkedInvoices", [])]
    assert bool(linked) == has_linked


async def test_pending_body_conforms(sim: Simulator, client) -> None:
    status, media_type, body, _ = await fetch(client, address(sim, "pending"))
    assert status == 200
    assert body["results"][0]["lineItems"] and body["results"][0]["linkedInvoices"]
    validate_against_spec(TEMPLATES["pending"], "GET", 200, media_type, body)


@pytest.mark.parametrize("invoice", ["payer-0", "payer-2", "payer-3", "payer-4", "payer-7"])
async def test_get_body_conforms(sim: Simulator, client, invoice: str) -> None:
    status, media_type, body, _ = await fetch(client, address(sim, "get", invoice=invoice))
    assert status == 200
    validate_against_spec(TEMPLATES["get"], "GET", 200, media_type, body)


async def test_linked_invoice_read_through_payer_conforms(sim: Simulator, client) -> None:
    linked = next(i for i in sim.scenario.invoices if i.org_id == sim.scenario.org("Linked").id)
    url = address(sim, "list").replace("/invoices", f"/invoices/{linked.id}")
    status, media_type, body, _ = await fetch(client, url)
    assert status == 200
    validate_against_spec(TEMPLATES["get"], "GET", 200, media_type, body)


async def test_enveloped_bodies_conform(sim: Simulator, client) -> None:
    _, media_type, body, _ = await fetch(client, address(sim, "list"), envelope="true")
    assert body.pop("status") == 200  # list endpoints: "status" added to the results object
    validate_against_spec(TEMPLATES["list"], "GET", 200, media_type, body)
    _, media_type, body, _ = await fetch(client, address(sim, "get"), envelope="true")
    assert body["status"] == 200
    validate_against_spec(TEMPLATES["get"], "GET", 200, media_type, body["content"])


async def test_generated_scenario_bodies_conform() -> None:
    load_spec()
    big = Scenario.generate(orgs=3, invoices_per_org=30, seed=3, now=NOW)
    async with Simulator(big) as sim:
        digest = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
        async with aiohttp.ClientSession(middlewares=(digest,)) as session:
            for org in sim.org_ids:
                base = f"{sim.base_url}{V2}/orgs/{org}/invoices"
                _, media_type, body, _ = await fetch(session, base)
                validate_against_spec(TEMPLATES["list"], "GET", 200, media_type, body)
                _, media_type, body, _ = await fetch(session, base + "/pending")
                validate_against_spec(TEMPLATES["pending"], "GET", 200, media_type, body)


@pytest.mark.parametrize("prefix", ["/api/atlas/v1.0", "/api/public/v1.0"])
async def test_legacy_flavor_bodies_have_the_same_fields(
    sim: Simulator, client, prefix: str
) -> None:
    """v1.0 and Cloud Manager use the same schemas (InvoiceLineItem minus cloudProvider)."""
    for operation in ("list", "pending", "get"):
        url = address(sim, operation).replace(V2, prefix)
        status, media_type, body, _ = await fetch(client, url, accept="application/json")
        assert (status, media_type) == (200, "application/json")
        validate_against_spec(TEMPLATES[operation], "GET", 200, V2_MEDIA_TYPE, body)


# ---- error bodies -----------------------------------------------------------------------


async def _error(sim: Simulator, client, kind: str, operation: str) -> tuple[int, Any]:
    url = address(sim, operation)
    if kind == "401":
        async with aiohttp.ClientSession() as anonymous:
            status, _, body, _ = await fetch(anonymous, url)
            return status, body
    if kind == "403":
        url = url.replace(sim.scenario.org("Payer").id, sim.scenario.org("Secret").id)
    elif kind == "404 org":
        url = url.replace(sim.scenario.org("Payer").id, "0123456789abcdef01234567")
    elif kind == "404 invoice":
        url = url.replace(sim.scenario.invoice("payer-3").id, "0123456789abcdef01234567")
    elif kind in ("429", "500"):
        sim.faults.status(int(kind))
    accept = V2_CSV_MEDIA_TYPE if operation == "csv" else V2_MEDIA_TYPE
    status, media_type, body, _ = await fetch(client, url, accept=accept)
    assert media_type == "application/json"
    return status, body


@pytest.mark.parametrize(
    ("kind", "operation"),
    [
        (kind, operation)
        for kind in ("401", "403", "404 org", "404 invoice", "429", "500")
        for operation in OPERATIONS
        if kind != "404 invoice" or operation in ("get", "csv")
    ],
)
async def test_error_body_conforms(sim: Simulator, client, kind: str, operation: str) -> None:
    status, body = await _error(sim, client, kind, operation)
    assert status == int(kind[:3])
    assert body["error"] == status
    validate_against_spec(TEMPLATES[operation], "GET", status, "application/json", body)


async def test_bucket_429_conforms(sim: Simulator, client) -> None:
    async with Simulator(scenario(), clock=FakeClock(NOW), rate_limit=(1.0, 1)) as limited:
        digest = aiohttp.DigestAuthMiddleware(limited.public_key, limited.private_key)
        async with aiohttp.ClientSession(middlewares=(digest,)) as session:
            assert (await fetch(session, address(limited, "list")))[0] == 200
            status, _, body, resp = await fetch(session, address(limited, "list"))
    assert status == 429 and body["errorCode"] == "RATE_LIMITED_TOKEN_BUCKET"
    assert int(resp.headers["Retry-After"]) >= 1
    validate_against_spec(TEMPLATES["list"], "GET", 429, "application/json", body)


@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_access_list_403_and_retired_410_conform(sim: Simulator, client, operation: str):
    """What an operator's Atlas also answers: 403 IP_ADDRESS_NOT_ON_ACCESS_LIST (a
    declared status) and 410 for a retired API version (undeclared: an ApiError all
    the same)."""
    accept = V2_CSV_MEDIA_TYPE if operation == "csv" else V2_MEDIA_TYPE
    sim.access_list = {"203.0.113.7"}
    status, media_type, body, _ = await fetch(client, address(sim, operation), accept=accept)
    assert (status, media_type, body["errorCode"]) == (
        403,
        "application/json",
        "IP_ADDRESS_NOT_ON_ACCESS_LIST",
    )
    validate_against_spec(TEMPLATES[operation], "GET", 403, media_type, body)
    sim.access_list = None
    sim.retire_version()
    status, media_type, body, _ = await fetch(client, address(sim, operation), accept=accept)
    assert (status, media_type) == (410, "application/json")
    assert "410" not in _operation(TEMPLATES[operation], "GET")["responses"]
    validate_schema("ApiError", body)


async def test_deprecated_version_headers(sim: Simulator, client) -> None:
    sim.deprecate(NOW, datetime(2027, 11, 1, tzinfo=UTC))
    status, _, body, resp = await fetch(client, address(sim, "list"))
    assert status == 200
    validate_against_spec(TEMPLATES["list"], "GET", 200, V2_MEDIA_TYPE, body)
    assert resp.headers["Deprecation"] == f"@{int(NOW.timestamp())}"  # RFC 9745
    assert resp.headers["Sunset"] == "Mon, 01 Nov 2027 00:00:00 GMT"  # RFC 8594


async def test_atlas_parameters_are_the_one_divergence_from_the_spec() -> None:
    """With ``atlas_parameters``, `parameters` holds strings and numbers as Atlas's
    answers do; the spec types its items as objects. Nothing else differs."""
    async with Simulator(scenario(), clock=FakeClock(NOW), atlas_parameters=True) as real:
        real.access_list = {"203.0.113.7"}
        digest = aiohttp.DigestAuthMiddleware(real.public_key, real.private_key)
        async with aiohttp.ClientSession(middlewares=(digest,)) as session:
            status, _, body, _ = await fetch(session, address(real, "list"))
    assert status == 403 and body["parameters"] == ["127.0.0.1"]
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'object'"):
        validate_against_spec(TEMPLATES["list"], "GET", 403, "application/json", body)
    validate_against_spec(
        TEMPLATES["list"], "GET", 403, "application/json", {**body, "parameters": []}
    )


@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_undeclared_400_and_406_bodies_are_api_errors(
    sim: Simulator, client, operation: str
) -> None:
    """The spec declares neither 400 nor 406 for these operations (Atlas sends both):
    their bodies must still be ApiErrors, as the spec's shared badRequest response."""
    declared = set(_operation(TEMPLATES[operation], "GET")["responses"])
    assert not declared & {"400", "406"}, "the spec declares them now: validate directly"
    status, media_type, body, _ = await fetch(client, address(sim, operation), accept="*/*")
    assert (status, media_type) == (406, "application/json")
    validate_schema("ApiError", body)
    status, media_type, body, _ = await fetch(client, address(sim, operation), color="red")
    if operation == "csv":  # CSV is negotiated first: answer 406, then check 400 with CSV
        status, media_type, body, _ = await fetch(
            client, address(sim, operation), accept=V2_CSV_MEDIA_TYPE, color="red"
        )
    assert (status, media_type) == (400, "application/json")
    validate_schema("ApiError", body)
    bad_request = load_spec()["components"]["responses"]["badRequest"]
    _validate(bad_request["content"]["application/json"]["schema"], body, strict=True)


# ---- paths, parameters, media types, headers --------------------------------------------


def test_served_v2_routes_are_declared_paths() -> None:
    spec = load_spec()
    routes = {
        (route.method, route.resource.canonical)
        for route in Simulator(scenario()).app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith(V2 + "/")
    }
    usage = ("GET", V2 + USAGE_PATH)  # lineItems:search: tests/test_simulator_usage.py
    assert routes == {("GET", template) for template in TEMPLATES.values()} | {usage}
    for method, path in routes:
        assert method.lower() in spec["paths"][path]


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_accepted_query_parameters_are_the_declared_ones(operation: str) -> None:
    assert QUERY_PARAMS[operation] == declared_query_params(TEMPLATES[operation], "GET")


@pytest.mark.parametrize(
    ("operation", "accept"),
    [
        ("list", V2_MEDIA_TYPE),
        ("pending", V2_MEDIA_TYPE),
        ("get", V2_MEDIA_TYPE),
        ("get", V2_CSV_MEDIA_TYPE),
        ("csv", V2_CSV_MEDIA_TYPE),
    ],
)
async def test_served_media_types_and_headers_are_declared(
    sim: Simulator, client, operation: str, accept: str
) -> None:
    status, media_type, _, resp = await fetch(client, address(sim, operation), accept=accept)
    assert status == 200
    assert media_type == accept
    assert media_type in declared_media_types(TEMPLATES[operation], "GET", 200)
    declared_headers = _response(TEMPLATES[operation], "GET", 200)["headers"]
    for name in declared_headers:
        assert int(resp.headers[name]) >= 0


async def test_csv_follows_the_spec_example(sim: Simulator, client) -> None:
    example = load_spec()["paths"][TEMPLATES["csv"]]["get"]["responses"]["200"]["content"][
        V2_CSV_MEDIA_TYPE
    ]["example"]
    _, _, text, _ = await fetch(client, address(sim, "csv"), accept=V2_CSV_MEDIA_TYPE)
    expected_rows = list(csv.reader(io.StringIO(example)))
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) > len(expected_rows)  # the example has no line items; ours has some
    for expected, got in zip(expected_rows[:4], rows[:4], strict=True):
        assert (got[0], len(got), got[-1]) == (expected[0], len(expected), "")
    assert rows[4] == expected_rows[4] == []
    assert rows[5] == expected_rows[5]
    assert all(len(row) == len(expected_rows[5]) for row in rows[6:])
    period = re.fullmatch(r"(\w+ \d{1,2}, \d{4}) - (\w+ \d{1,2}, \d{4})", rows[1][1])
    assert period is not None
    assert [datetime.strptime(day, "%B %d, %Y") for day in period.groups()] == [
        datetime(2026, 8, 1),
        datetime(2026, 9, 1),
    ]


def test_spec_file_is_untouched_by_conversion() -> None:
    spec = load_spec()
    before = copy.deepcopy(spec)
    validate_schema("BillingInvoice", {"id": "0123456789abcdef01234567"})
    assert spec == before
