"""The simulator's ``lineItems:search`` (v2, 2024-08-05) against the official Atlas OpenAPI
spec, the daily line items it derives from a scenario, and their parsing into
``LineItem`` s (invoice_watch.atlas.usage) down to a usage_anomaly verdict (issue 19 §1)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]  # no stubs installed
import pytest

from invoice_watch import anomaly
from invoice_watch.atlas import usage
from invoice_watch.clock import FakeClock
from invoice_watch.constants import USAGE_MEDIA_TYPE, V2_MEDIA_TYPE
from invoice_watch.errors import FetchDataError
from invoice_watch.simulator import Scenario, ScenarioLineItem, Simulator, demo_scenario
from invoice_watch.simulator.server import QUERY_PARAMS, USAGE_OPERATION, USAGE_PATH
from invoice_watch.simulator.usage import daily_items, service_of, split, usage_days
from invoice_watch.types import LineItem
from tests.test_conformance import (
    declared_query_params,
    load_spec,
    validate_against_spec,
    validate_schema,
)

V2 = "/api/atlas/v2"
TEMPLATE = V2 + USAGE_PATH
NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)  # a Saturday; usage up to Friday the 20th
PROJECT = "Checkout"


def scenario() -> Scenario:
    built = Scenario(now=NOW)
    built.add_org("Payer")
    built.add_org("Secret", forbidden=True)
    items = [
        ScenarioLineItem(
            "ATLAS_AWS_INSTANCE_M40", 2870_00, unit_price_dollars=1.04, cluster="orders",
            project=PROJECT, daily="weekly", spike_day=-1, spike_times=5,
        ),
        ScenarioLineItem(
            "ATLAS_AWS_INSTANCE_M30", 640_00, cluster="sink", project=PROJECT, daily="weekly"
        ),
        ScenarioLineItem(
            "ATLAS_AWS_DATA_TRANSFER_DIFFERENT_REGION", 270_00, unit="GB",
            unit_price_dollars=0.02, cluster="orders", project="Web",
        ),
        ScenarioLineItem(
            "ATLAS_AWS_BACKUP_SNAPSHOT_STORAGE", 0, unit="GB days", unit_price_dollars=0.0047,
            cluster="orders", project="Web",
        ),
    ]  # fmt: skip
    built.add_invoice("Payer", period=0, status="PENDING", line_items=items, name="pending")
    built.add_invoice("Payer", period=-1, status="CLOSED", amount_cents=3000_00, name="last")
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


def address(sim: Simulator, org: str = "Payer", invoice: str = "pending") -> str:
    path = TEMPLATE.format(
        orgId=sim.scenario.org(org).id, invoiceId=sim.scenario.invoice(invoice).id
    )
    return sim.base_url + path


async def search(
    session: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    accept: str = USAGE_MEDIA_TYPE,
    content_type: str = USAGE_MEDIA_TYPE,
    raw: bytes | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    """GET with a JSON body, as the spec declares the operation."""
    data = raw if raw is not None else json.dumps({} if body is None else body).encode()
    headers = {"Accept": accept, "Content-Type": content_type}
    async with session.get(url, data=data, headers=headers, params=params or None) as resp:
        text = await resp.text()
        return resp.status, resp.content_type, json.loads(text)


async def every_item(
    session: aiohttp.ClientSession, url: str, body: Any = None, per_page: int = 500
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for page in range(1, 100):
        status, _, answer = await search(
            session, url, body, params={"itemsPerPage": str(per_page), "pageNum": str(page)}
        )
        assert status == 200, answer
        found += answer["results"]
        if not any(link["rel"] == "next" for link in answer["links"]):
            return found
    raise AssertionError("no last page")


# ---- against the spec ------------------------------------------------------------------


def test_served_route_and_query_parameters_are_the_declared_ones() -> None:
    spec = load_spec()
    assert "get" in spec["paths"][TEMPLATE]
    routes = {
        (route.method, route.resource.canonical)
        for route in Simulator(scenario()).app.router.routes()
        if route.resource is not None and route.resource.canonical.endswith(":search")
    }
    assert routes == {("GET", TEMPLATE)}  # v2 only: v1.0 and Cloud Manager have none
    assert QUERY_PARAMS[USAGE_OPERATION] == declared_query_params(TEMPLATE, "GET")
    declared = spec["paths"][TEMPLATE]["get"]["requestBody"]["content"]
    assert set(declared) == {USAGE_MEDIA_TYPE}
    assert set(spec["paths"][TEMPLATE]["get"]["responses"]["200"]["content"]) == {USAGE_MEDIA_TYPE}


@pytest.mark.parametrize(
    "body",
    [
        usage.search_body(),
        usage.search_body(
            usage_start=date(2026, 11, 1),
            usage_end=date(2026, 11, 20),
            group_ids=("5f1e0c0a9b8d7e6f5a4b3c2d",),
            include_zero=True,
            sort_field="TOTAL_PRICE_CENTS",
        ),
    ],
)
def test_client_request_body_conforms(body: dict[str, Any]) -> None:
    load_spec()
    validate_schema("ApiPublicUsageDetailsQueryRequest", body)


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ({}, {}),
        (usage.search_body(), {"itemsPerPage": "5", "pageNum": "2"}),
        ({"filters": {"includeZeroCentLineItems": True}, "sortField": "USAGE_DATES"}, {}),
        ({"sortField": "TOTAL_PRICE_CENTS", "sortOrder": "ASCENDING"}, {"envelope": "false"}),
    ],
)
async def test_search_body_conforms(
    sim: Simulator, client, body: dict[str, Any], params: dict[str, str]
) -> None:
    validate_schema("ApiPublicUsageDetailsQueryRequest", body)

    status, media_type, answer = await search(client, address(sim), body, params=params)

    assert (status, media_type) == (200, USAGE_MEDIA_TYPE)
    assert answer["results"]
    validate_against_spec(TEMPLATE, "GET", 200, media_type, answer)


async def test_search_enveloped_body_conforms(sim: Simulator, client) -> None:
    _, media_type, answer = await search(client, address(sim), {}, params={"envelope": "true"})

    assert answer.pop("status") == 200
    validate_against_spec(TEMPLATE, "GET", 200, media_type, answer)


async def test_search_of_a_closed_invoice_covers_its_whole_period(sim: Simulator, client):
    found = await every_item(client, address(sim, invoice="last"))

    days = {item["usageDate"][:10] for item in found}
    assert len(days) == 31 and min(days) == "2026-10-01" and max(days) == "2026-10-31"
    assert sum(item["totalPriceCents"] for item in found) == 3000_00


@pytest.mark.parametrize(
    ("kind", "status"),
    [("401", 401), ("403", 403), ("404 org", 404), ("404 invoice", 404), ("429", 429),
     ("500", 500)],
)  # fmt: skip
async def test_search_error_body_conforms(sim: Simulator, client, kind: str, status: int):
    url = address(sim)
    if kind == "401":
        async with aiohttp.ClientSession() as anonymous:
            got, media_type, answer = await search(anonymous, url)
    else:
        if kind == "403":
            url = url.replace(sim.scenario.org("Payer").id, sim.scenario.org("Secret").id)
        elif kind == "404 org":
            url = url.replace(sim.scenario.org("Payer").id, "0123456789abcdef01234567")
        elif kind == "404 invoice":
            url = url.replace(sim.scenario.invoice("pending").id, "0123456789abcdef01234567")
        else:
            sim.faults.status(status, path="*/lineItems:search")
        got, media_type, answer = await search(client, url)

    assert (got, media_type) == (status, "application/json")
    validate_against_spec(TEMPLATE, "GET", status, media_type, answer)


@pytest.mark.parametrize(
    ("body", "raw", "field"),
    [
        (None, b"", "body"),
        (None, b"{not json", "body"),
        ([], None, "body"),
        ({"filter": {}}, None, "filter"),
        ({"filters": {"usageStart": "2026-11-01"}}, None, "filters.usageStart"),
        ({"filters": {"usageStartDate": "2026-11-31"}}, None, "filters.usageStartDate"),
        ({"filters": {"usageEndDate": "20261101"}}, None, "filters.usageEndDate"),
        ({"filters": {"groupIds": ["XYZ"]}}, None, "filters.groupIds"),
        ({"filters": {"clusterIds": "5f1e0c0a9b8d7e6f5a4b3c2d"}}, None, "filters.clusterIds"),
        ({"filters": {"skuServices": ["Clusters", "Clusters"]}}, None, "filters.skuServices"),
        ({"filters": {"skuServices": ["Instances"]}}, None, "filters.skuServices"),
        ({"filters": {"includeZeroCentLineItems": 1}}, None, "filters.includeZeroCentLineItems"),
        ({"sortField": "PRICE"}, None, "sortField"),
        ({"sortOrder": "asc"}, None, "sortOrder"),
    ],
)  # fmt: skip
async def test_search_refuses_a_body_the_spec_does_not_allow(
    sim: Simulator, client, body: Any, raw: bytes | None, field: str
) -> None:
    if body is not None and not field.endswith("Date"):  # no checker for `format: date`
        with pytest.raises(jsonschema.ValidationError):
            validate_schema("ApiPublicUsageDetailsQueryRequest", body)

    status, media_type, answer = await search(client, address(sim), body, raw=raw)

    assert (status, media_type) == (400, "application/json")
    assert answer["badRequestDetail"]["fields"][0]["field"] == field
    validate_against_spec(TEMPLATE, "GET", 400, media_type, answer)


async def test_search_refuses_other_media_types_and_query_parameters(sim: Simulator, client):
    status, _, answer = await search(client, address(sim), accept=V2_MEDIA_TYPE)
    assert status == 406 and answer["errorCode"] == "INVALID_VERSION_DATE"
    validate_schema("ApiError", answer)

    status, _, answer = await search(client, address(sim), content_type="application/json")
    assert status == 400 and answer["badRequestDetail"]["fields"][0]["field"] == "Content-Type"
    validate_against_spec(TEMPLATE, "GET", 400, "application/json", answer)

    for name, value in (("pretty", "true"), ("includeCount", "false"), ("itemsPerPage", "501")):
        status, _, answer = await search(client, address(sim), params={name: value})
        assert status == 400, name
        validate_against_spec(TEMPLATE, "GET", 400, "application/json", answer)


async def test_search_is_v2_only(sim: Simulator, client) -> None:
    for prefix in ("/api/atlas/v1.0", "/api/public/v1.0"):
        status, _, answer = await search(client, address(sim).replace(V2, prefix))
        assert status == 404, prefix
        validate_schema("ApiError", answer)


async def test_search_records_the_request_body(sim: Simulator, client) -> None:
    body = usage.search_body(usage_start=date(2026, 11, 7))

    await search(client, address(sim), body)

    assert json.loads(sim.requests[-1].body or "") == body


# ---- paging, filters, order -----------------------------------------------------------


async def test_search_pages_add_up_to_one_page(sim: Simulator, client) -> None:
    whole = await every_item(client, address(sim), usage.search_body())

    for per_page in (1, 7, 100):
        assert await every_item(client, address(sim), usage.search_body(), per_page) == whole
    status, _, answer = await search(
        client, address(sim), {}, params={"itemsPerPage": "7", "pageNum": "999"}
    )
    assert status == 200 and answer["results"] == [] and answer["totalCount"] == len(whole) > 0


async def test_search_filters(sim: Simulator, client) -> None:
    url = address(sim)
    everything = await every_item(client, url, {"filters": {"includeZeroCentLineItems": True}})
    web = sim.scenario.invoice("pending").line_items[2].project_id
    orders = sim.scenario.invoice("pending").line_items[0].cluster_id

    def select(body: dict[str, Any]) -> Any:
        return every_item(client, url, body)

    def same(items: list[dict[str, Any]]) -> list[str]:
        return sorted(map(json.dumps, items))

    nonzero = [item for item in everything if item["totalPriceCents"]]
    assert len(nonzero) < len(everything)
    assert same(await select({})) == same(await select(usage.search_body())) == same(nonzero)
    week = await select({"filters": {"usageStartDate": "2026-11-09", "usageEndDate": "2026-11-15"}})
    assert {item["usageDate"][:10] for item in week} == {f"2026-11-{d:02d}" for d in range(9, 16)}
    billed = await select({"filters": {"billStartDate": "2026-11-21"}})
    assert {item["billDate"] for item in billed} == {"2026-11-21T00:00:00Z"}
    assert {i["groupId"] for i in await select({"filters": {"groupIds": [web]}})} == {web}
    clusters = await select({"filters": {"clusterIds": [orders]}})
    assert {(i["groupId"], i["clusterName"]) for i in clusters} == {
        (sim.scenario.invoice("pending").line_items[0].project_id, "orders")
    }
    transfer = await select({"filters": {"skuServices": ["Data Transfer"]}})
    assert {i["description"] for i in transfer} == {"ATLAS AWS Data Transfer Different Region"}


async def test_search_sorts(sim: Simulator, client) -> None:
    url = address(sim)

    by_bill = await every_item(client, url, {})  # default: bill dates, descending
    assert [i["billDate"] for i in by_bill] == sorted(
        (i["billDate"] for i in by_bill), reverse=True
    )
    cheapest = await every_item(
        client, url, {"sortField": "TOTAL_PRICE_CENTS", "sortOrder": "ASCENDING"}
    )
    prices = [i["totalPriceCents"] for i in cheapest]
    assert prices == sorted(prices)


# ---- the daily line items of a scenario ---------------------------------------------------


def test_split_sums_exactly_and_follows_the_weights() -> None:
    assert split(100, [1, 1, 1]) == [34, 33, 33]
    assert split(7, [1000, 600]) == [4, 3]
    assert split(0, [5, 5]) == [0, 0]
    assert sum(split(2870_00, list(range(1, 31)))) == 2870_00


def test_usage_days_run_to_yesterday_within_the_period() -> None:
    built = scenario()
    pending, last = built.invoice("pending"), built.invoice("last")

    assert usage_days(pending, NOW)[-1] == date(2026, 11, 20)
    assert usage_days(pending, datetime(2026, 11, 1, 3, tzinfo=UTC)) == [date(2026, 11, 1)]
    assert usage_days(last, NOW)[0] == date(2026, 10, 1)
    assert usage_days(last, NOW)[-1] == date(2026, 10, 31)


def test_daily_items_sum_to_each_line_item_and_show_the_pattern_and_spike() -> None:
    pending = scenario().invoice("pending")

    days = daily_items(pending, NOW)

    for item in pending.line_items:
        assert sum(d.cents for d in days if d.item is item) == item.total_cents
    m40 = {d.day: d.cents for d in days if d.item is pending.line_items[0]}
    weekdays = [c for day, c in m40.items() if day.weekday() < 5 and day != date(2026, 11, 20)]
    weekends = [c for day, c in m40.items() if day.weekday() >= 5]
    assert max(weekends) < 0.7 * min(weekdays)  # weekends at 60%, jitter 3%
    assert m40[date(2026, 11, 20)] > 4.5 * max(weekdays)  # the spike: 5 times the usual


def test_daily_items_scale_with_the_invoice_amount() -> None:
    built = scenario()
    pending = built.invoice("pending")
    before = {(d.item.sku, d.day): d.cents for d in daily_items(pending, NOW)}

    built.set_amount("pending", pending.amount_billed_cents * 2, NOW)

    after = {(d.item.sku, d.day): d.cents for d in daily_items(pending, NOW)}
    assert sum(after.values()) == pending.subtotal_cents
    assert all(abs(after[key] - 2 * cents) <= 2 for key, cents in before.items())


def test_scenario_yaml_takes_daily_and_spike() -> None:
    built = demo_scenario(now=NOW)

    m40 = built.invoice("prod-pending").line_items[0]
    assert (m40.daily, m40.spike_day, m40.spike_times) == ("weekly", -1, 5)
    with pytest.raises(ValueError, match="spike day"):
        ScenarioLineItem("X", 1, spike_day=0)
    with pytest.raises(ValueError, match="daily must be"):
        ScenarioLineItem("X", 1, daily="hourly")  # type: ignore[arg-type]


def test_service_of_maps_skus_to_the_spec_services() -> None:
    assert service_of("ATLAS_AWS_INSTANCE_M40") == "Clusters"
    assert service_of("ATLAS_AWS_BACKUP_SNAPSHOT_STORAGE") == "Backup"
    assert service_of("ATLAS_AWS_DATA_TRANSFER_DIFFERENT_REGION") == "Data Transfer"
    assert service_of("ATLAS_SUPPORT_DEVELOPER") == "Support"
    assert service_of("SOMETHING_NEW") == "Atlas"


# ---- parsing the answer, down to a verdict --------------------------------------------


async def test_parsed_pages_are_line_items_with_their_usage_day(sim: Simulator, client):
    web_id = sim.scenario.invoice("pending").line_items[2].project_id
    names = {web_id: "Web"}
    items: list[LineItem] = []
    for page in range(1, 100):
        _, _, answer = await search(
            client,
            address(sim),
            usage.search_body(),
            params={"itemsPerPage": "50", "pageNum": str(page)},
        )
        parsed = usage.parse_usage_page(
            "org", "inv", answer, page_num=page, items_per_page=50, names=names
        )
        items += parsed.items
        if not parsed.has_next:
            break

    assert (
        sum(item.amount_cents for item in items) == sim.scenario.invoice("pending").subtotal_cents
    )
    transfer = [i for i in items if i.sku == "ATLAS AWS Data Transfer Different Region"]
    assert {(i.project, i.project_id, i.cluster) for i in transfer} == {("Web", web_id, "orders")}
    checkout = next(i for i in items if i.cluster == "sink")
    assert checkout.project == checkout.project_id  # no name given: the id
    assert {i.usage_date for i in items} == {date(2026, 11, d) for d in range(1, 21)}


async def test_demo_line_items_make_the_spiking_cluster_fire() -> None:
    """The demo scenario's daily usage, read through the simulator and parsed, makes a
    usage_anomaly verdict name the `orders` cluster's spike (with last month's days for
    history) and nothing else."""
    load_spec()
    async with Simulator(demo_scenario(now=NOW), clock=FakeClock(NOW)) as demo:
        digest = aiohttp.DigestAuthMiddleware(demo.public_key, demo.private_key)
        async with aiohttp.ClientSession(middlewares=(digest,)) as session:
            items: list[LineItem] = []
            for invoice in ("prod-last-month", "prod-pending"):
                url = address(demo, "Production", invoice)
                for answer in [{"results": await every_item(session, url, usage.search_body())}]:
                    items += usage.parse_usage_page("org", "inv", answer).items

    bys: list[tuple[anomaly.By, str]] = [("cluster", "/orders"), ("project", "")]
    for by, key in bys:
        detection = anomaly.detect(
            NOW,
            anomaly.series(items, by),
            anomaly.Params(),
        )
        assert detection.day == NOW.date() - timedelta(days=1)
        (fired,) = detection.fired
        assert fired.key.endswith(key)
        assert fired.contributors[0].name.endswith("AWS Instance M40")


def test_parse_usage_page_refuses_what_the_spec_does_not_promise() -> None:
    good = {"usageDate": "2026-11-20T00:00:00Z", "totalPriceCents": 5}
    assert usage.parse_usage_page("o", "i", {"results": [good, 3]}).items[0].amount_cents == 5
    with pytest.raises(FetchDataError, match="no `results` list"):
        usage.parse_usage_page("o", "i", {"result": []})
    with pytest.raises(FetchDataError, match="totalPriceCents"):
        usage.parse_usage_page("o", "i", {"results": [{**good, "totalPriceCents": 1.5}]})
    with pytest.raises(FetchDataError, match="totalPriceCents"):
        usage.parse_usage_page("o", "i", {"results": [{**good, "totalPriceCents": 2**63}]})
    with pytest.raises(FetchDataError, match="usageDate"):
        usage.parse_usage_page("o", "i", {"results": [{**good, "usageDate": "yesterday"}]})
    with pytest.raises(FetchDataError, match="usageDate"):
        usage.parse_usage_page("o", "i", {"results": [{"totalPriceCents": 5}]})
    with pytest.raises(FetchDataError, match="totalCount"):
        usage.parse_usage_page("o", "i", {"results": [], "totalCount": -1})


def test_parse_usage_page_keeps_names_printable_and_bounded() -> None:
    entry = {
        "usageDate": "2026-11-20T23:30:00-02:00",  # 2026-11-21 in UTC
        "totalPriceCents": 5,
        "groupId": "5f1e0c0a9b8d7e6f5a4b3c2d",
        "clusterName": "a\x1b[2Jb",
        "description": "x" * 500,
    }
    (item,) = usage.parse_usage_page(
        "o", "i", {"content": {"results": [entry]}, "status": 200},
        names={"5f1e0c0a9b8d7e6f5a4b3c2d": "Web\nshop"},
    ).items  # fmt: skip

    assert item.usage_date == date(2026, 11, 21)
    assert item.project == "Web shop" and item.project_id == "5f1e0c0a9b8d7e6f5a4b3c2d"
    assert "\x1b" not in item.cluster and len(item.sku) == 120


@pytest.mark.parametrize(
    ("answer", "page", "has_next"),
    [
        ({"results": [{}] * 0, "links": [{"rel": "next", "href": "x"}]}, 1, True),
        ({"results": [], "totalCount": 10}, 1, False),
        ({"results": [{"usageDate": "2026-11-01T00:00:00Z"}], "totalCount": 1001}, 2, True),
        ({"results": [{"usageDate": "2026-11-01T00:00:00Z"}], "totalCount": 1000}, 2, False),
        ({"results": [{"usageDate": "2026-11-01T00:00:00Z"}]}, 1, False),
    ],
)
def test_parse_usage_page_says_whether_a_next_page_exists(
    answer: dict[str, Any], page: int, has_next: bool
) -> None:
    assert usage.parse_usage_page("o", "i", answer, page_num=page).has_next is has_next


@pytest.mark.parametrize(
    "amounts",
    [
        [2**63 - 1, 2**63 - 1],  # each an int64, their sum none
        [usage.MAX_ITEM_CENTS + 1],
        [-usage.MAX_ITEM_CENTS - 1],
        [usage.MAX_ITEM_CENTS] * (usage.MAX_INVOICE_CENTS // usage.MAX_ITEM_CENTS + 1),
    ],
)
def test_line_item_amounts_whose_sums_could_overflow_are_refused(amounts: list[int]) -> None:
    """An answer whose amounts (each a valid int64) could add up past an int64 in the
    state's sums is refused as that organization's line items' FetchDataError."""
    day = date(2026, 11, 20)
    answer = {
        "results": [
            {"usageDate": f"{day}T00:00:00Z", "groupId": "5f8a1c2e9b3d4a6f7e0c1b21",
             "clusterName": "orders", "description": "M40", "totalPriceCents": cents}
            for cents in amounts
        ],
        "totalCount": len(amounts),
    }  # fmt: skip
    page = usage.parse_usage_page("org", "inv", answer)  # each one is an int64
    with pytest.raises(FetchDataError, match="line items were not read"):
        usage.check_amounts("org", "inv", page.items)
    usage.check_amounts("org", "inv", page.items[:0])  # none: fine


@pytest.mark.parametrize(
    "when", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00", "2026-13-01T00:00:00Z"]
)
def test_a_usage_date_out_of_range_is_a_data_error(when: str) -> None:
    """A `usageDate` whose UTC day is out of range is a plain FetchDataError (it was an
    OverflowError, logged as an unexpected failure with its traceback)."""
    answer = {"results": [{"usageDate": when, "totalPriceCents": 1}], "totalCount": 1}
    with pytest.raises(FetchDataError, match="usageDate"):
        usage.parse_usage_page("org", "inv", answer)
