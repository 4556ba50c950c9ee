"""Atlas faults are contained to the organization they hit: no crash, no phantom
"disappeared" invoices, no false alert, a clear log line, and `poll_failure` fires when
the fault lasts.

Network and HTTP faults come from the simulator's fault queue; bodies no simulator would
send (missing fields, ids that are not 24-hex, pages that repeat or shift) come from a
hand-made listing server in this module. Time moves through the world's FakeClock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import yaml
from aiohttp import web

from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.types import Invoice
from tests.fakes_slack import FakeSlack
from tests.fakes_smtp import Sink
from tests.loopback import LoopbackServer
from tests.world import ANALYTICS, PROD, World

SLACK_RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status", "notify": ["slack"]},
    {"name": "pending-over-budget", "type": "pending_amount", "threshold": 5000,
     "notify": ["slack"]},
    {"name": "unreadable", "type": "poll_failure", "after": "1h", "notify": ["slack"]},
]  # fmt: skip


def config(world: World, **kw: Any) -> Config:
    return world.config(rules=SLACK_RULES, **kw)


async def run(world: World, cfg: Config, advance: timedelta = timedelta(0)) -> int:
    world.clock.advance(advance)
    return await world.run_once(cfg)


async def snapshot(cfg: Config, org_id: str) -> dict[str, Invoice]:
    """The organization's invoices as the state file holds them; its snapshot in memory
    must name the same ones."""
    async with App(cfg) as app:
        stored = {i.id: i for i in await app.store.snapshot.stored_invoices(org_id)}
        assert set(app.store.snapshot.get(org_id)) == set(stored)
        return stored


def org_warnings(caplog: pytest.LogCaptureFixture, org_name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "invoice_watch.cycle"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith(org_name)
    ]


# --- faults of the simulator ---------------------------------------------------------

LISTING = "*/invoices"
FAULTS: dict[str, tuple[Callable[[Simulator], None], str]] = {
    "5xx burst": (
        lambda sim: sim.faults.status(500, times=10_000, org_id=PROD, path=LISTING),
        "HTTP 500",
    ),
    "503 with Retry-After": (
        lambda sim: sim.faults.status(503, times=10_000, org_id=PROD, retry_after=20),
        "HTTP 503",
    ),
    "429 storm": (
        lambda sim: sim.faults.status(429, times=10_000, org_id=PROD, retry_after=30),
        "HTTP 429",
    ),
    "reset mid-page": (
        lambda sim: sim.faults.reset(times=10_000, org_id=PROD, path=LISTING),
        "broke off",
    ),
    "truncated body": (
        lambda sim: sim.faults.truncated(times=10_000, org_id=PROD, path=LISTING),
        "broke off",
    ),
    "non-JSON body": (
        lambda sim: sim.faults.malformed_json(times=10_000, org_id=PROD, path=LISTING),
        "not JSON",
    ),
    "wrong content type": (
        lambda sim: sim.faults.wrong_content_type(times=10_000, org_id=PROD, path=LISTING),
        "not JSON",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_atlas_fault_is_contained_to_its_org_and_poll_failure_fires_if_it_lasts(
    world: World, caplog: pytest.LogCaptureFixture, fault: str
):
    inject, reason = FAULTS[fault]
    cfg = config(world)
    assert await run(world, cfg) == 0
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    before = await snapshot(cfg, PROD)

    inject(world.sim)
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")  # unseen for now
    world.sim.set_amount(world.sim.scenario.invoice("small").id, 5100_00)
    assert await run(world, cfg, timedelta(minutes=15)) == 1  # exit 1, no crash
    # Analytics was read and alerted; Production's alerts neither resolved nor vanished.
    assert world.kinds()[2:] == [("FIRING", "pending-over-budget")]
    assert "Analytics" in world.slack_texts()[2]
    assert await snapshot(cfg, PROD) == before
    warnings = org_warnings(caplog, "Production")
    assert warnings and all(reason in w and PROD in w for w in warnings), warnings

    assert await run(world, cfg, timedelta(minutes=45)) == 1
    assert len(world.kinds()) == 3  # failing for 45 minutes: not yet an alert
    assert await run(world, cfg, timedelta(minutes=16)) == 1
    assert world.kinds()[3:] == [("FIRING", "unreadable")]  # over an hour: poll_failure
    assert "Production" in world.slack_texts()[3] and reason in world.slack_texts()[3]
    assert await run(world, cfg, timedelta(minutes=15)) == 1
    assert len(world.kinds()) == 4  # and only once

    world.sim.faults.clear()
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert sorted(world.kinds()[4:]) == [("RESOLVED", "failed-charge"), ("RESOLVED", "unreadable")]
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert len(world.kinds()) == 6


@pytest.mark.parametrize(
    ("inject", "sleeps"),
    [
        (lambda sim: sim.faults.status(502, times=3, org_id=PROD, path=LISTING), None),
        (lambda sim: sim.faults.status(429, times=4, org_id=PROD, retry_after=12), [12.0]),
        (lambda sim: sim.faults.reset(times=2, org_id=PROD, path=LISTING), None),
        (lambda sim: sim.faults.truncated(times=2, org_id=PROD, path=LISTING), None),
    ],
    ids=["5xx burst", "429 burst", "resets", "truncations"],
)
async def test_atlas_fault_shorter_than_the_retries_is_absorbed_within_the_cycle(
    world: World, caplog: pytest.LogCaptureFixture, inject: Any, sleeps: list[float] | None
):
    inject(world.sim)
    assert await run(world, config(world)) == 0
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    assert world.sim.faults.pending == []
    if sleeps is not None:  # Retry-After honoured, through the clock, and 429s in a row
        waits = world.clock.sleeps  # wait longer each time (Atlas's documentation advises it)
        assert waits[0] == sleeps[0] and waits == sorted(set(waits)) and len(waits) == 4
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all("Production" in line for line in retries)
    assert org_warnings(caplog, "Production") == []  # the org did not fail


async def test_atlas_rate_limit_storm_is_ridden_out_with_retry_after(tmp_path):
    """Atlas's own rate limit (one request per 10 s here) answering 429 to the requests
    of six organizations read four at a time: every org is read in the cycle, a 429's
    wait is the Retry-After asked for, and no org fails."""
    clock = FakeClock()
    storm = Scenario.generate(orgs=6, invoices_per_org=2, seed=6, now=clock.now())
    async with Simulator(storm, rate_limit=(0.1, 1), clock=clock) as sim, FakeSlack() as slack:
        world = World(sim, slack, Sink(), smtp_port=9, tmp=tmp_path)
        world.clock = clock
        data = world.config_data(rules=SLACK_RULES)
        data["organizations"] = [{"id": org_id} for org_id in sim.org_ids]
        cfg = load(yaml.safe_dump(data), env={}, base_dir=tmp_path)
        assert await world.run_once(cfg) == 0
        limited = [r for r in sim.requests if r.status == 429]
        assert limited  # the bucket did run dry
        assert max(clock.sleeps) <= 30.0  # each wait bounded (atlas.max_backoff)
        async with App(cfg) as app:
            assert all(app.store.snapshot.org_state(o).last_success for o in sim.org_ids)


async def test_atlas_timeout_is_contained_and_poll_failure_fires(
    world: World, caplog: pytest.LogCaptureFixture
):
    """A hung request ends at atlas.timeout (real time: kept to four one-second hangs:
    each `run --once` starts with a full listing, and an incremental read stands in for
    it when it fails, which hangs too)."""
    atlas = {**world.config_data()["atlas"], "timeout": "1s", "retries": 0}
    cfg = config(world, atlas=atlas)
    assert await run(world, cfg) == 0
    before = await snapshot(cfg, PROD)
    world.sim.faults.hang(times=4, org_id=PROD, path=LISTING)
    assert await run(world, cfg, timedelta(minutes=15)) == 1
    assert await snapshot(cfg, PROD) == before
    assert len(world.kinds()) == 2
    (warning,) = org_warnings(caplog, "Production")
    assert "no answer within 1s (atlas.timeout)" in warning
    assert await run(world, cfg, timedelta(minutes=61)) == 1
    assert world.kinds()[2:] == [("FIRING", "unreadable")]
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert world.kinds()[3:] == [("RESOLVED", "unreadable")]


@pytest.mark.parametrize("service_account", [False, True], ids=["api key", "service account"])
async def test_atlas_revoked_key_is_not_retried_and_alerts_once_per_org(
    world: World, caplog: pytest.LogCaptureFixture, service_account: bool
):
    cfg = config(world, service_account=service_account)
    assert await run(world, cfg) == 0
    world.sim.revoke_credentials()
    requests = len(world.sim.requests)
    assert await run(world, cfg, timedelta(minutes=15)) == 1
    assert world.clock.sleeps == []  # a 401 is not retried with backoff
    assert len(world.sim.requests) - requests <= 4  # a challenge or a token refresh each
    for name in ("Production", "Analytics"):
        (warning,) = org_warnings(caplog, name)
        assert "401" in warning or "refused" in warning
        assert "client_secret" in warning if service_account else "revoked" in warning
    assert len(world.kinds()) == 2  # no false RESOLVED
    assert await run(world, cfg, timedelta(minutes=61)) == 1
    assert world.kinds()[2:] == [("FIRING", "unreadable")] * 2
    world.sim.restore_credentials()
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert world.kinds()[4:] == [("RESOLVED", "unreadable")] * 2


async def test_atlas_pending_endpoint_failing_costs_only_the_breakdown(
    world: World, caplog: pytest.LogCaptureFixture
):
    world.sim.faults.status(500, times=10_000, path="*/invoices/pending")
    assert await run(world, config(world)) == 0
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    pending = next(t for t in world.slack_texts() if "pending-over-budget" in t)
    assert "Top projects" not in pending
    assert any("no breakdown for Production" in r.getMessage() for r in caplog.records)


# --- bodies no simulator sends: a hand-made listing server ---------------------------

START, END = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"


def item(
    n: int, org: str, status: str = "PAID", cents: int = 100_00, **extra: Any
) -> dict[str, Any]:
    data = {
        "id": f"{n:024x}",
        "orgId": org,
        "statusName": status,
        "startDate": START,
        "endDate": END,
        "amountBilledCents": cents,
        "amountPaidCents": cents if status == "PAID" else 0,
    }
    return {**data, **extra}


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


class HandMadeAtlas(LoopbackServer):
    """The v2 listing and pending endpoints, serving whatever the test puts in
    ``invoices`` (raw JSON objects, paged by ``itemsPerPage``) or, per org, a raw
    ``body``. ``before_page(org, page)`` runs before each page is cut (to shift it)."""

    def __init__(self) -> None:
        self.invoices: dict[str, list[Any]] = {
            PROD: [item(1, PROD, "FAILED", 4350_20), item(2, PROD, "PENDING", 6000_00)],
            ANALYTICS: [item(3, ANALYTICS, "PENDING", 700_00)],
        }
        self.body: dict[str, tuple[bytes, str]] = {}
        self.status: dict[str, int] = {}  # per org, with `body`
        self.before_page: Callable[[str, int], None] | None = None
        self.pages: list[tuple[str, int]] = []
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices/pending", self._pending)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        if org in self.body:
            body, content_type = self.body[org]
            return web.Response(
                body=body, content_type=content_type, status=self.status.get(org, 200)
            )
        size, page = int(request.query["itemsPerPage"]), int(request.query["pageNum"])
        self.pages.append((org, page))
        if self.before_page is not None:
            self.before_page(org, page)
        shown = self.invoices[org][(page - 1) * size : page * size]
        return web.json_response({"results": shown, "links": [], "totalCount": 0})

    async def _pending(self, request: web.Request) -> web.Response:
        return web.json_response({"results": [], "links": [], "totalCount": 0})


@pytest.fixture
async def atlas() -> AsyncIterator[HandMadeAtlas]:
    async with HandMadeAtlas() as server:
        yield server


def handmade_config(world: World, atlas: HandMadeAtlas) -> Config:
    data = world.config_data(rules=SLACK_RULES)
    data["atlas"]["base_url"] = atlas.url
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def json_body(value: Any) -> tuple[bytes, str]:
    return json.dumps(value).encode(), "application/json"


BAD_LISTINGS: dict[str, tuple[Callable[[list[Any]], tuple[bytes, str]], str]] = {
    "missing statusName": (
        lambda items: json_body({"results": [without(items[0], "statusName"), *items[1:]]}),
        "`statusName` is missing",
    ),
    "missing startDate": (
        lambda items: json_body({"results": [without(items[0], "startDate"), *items[1:]]}),
        "`startDate` is missing",
    ),
    "missing id": (
        lambda items: json_body({"results": [without(items[0], "id"), *items[1:]]}),
        "not 24 hex digits",
    ),
    "id not 24-hex": (
        lambda items: json_body({"results": [{**items[0], "id": "INV-2026-11"}, *items[1:]]}),
        "not 24 hex digits",
    ),
    "orgId not 24-hex": (
        lambda items: json_body({"results": [{**items[0], "orgId": "acme"}, *items[1:]]}),
        "`orgId` is not 24 hex digits",
    ),
    "amount beyond int64": (
        lambda items: json_body({"results": [{**items[0], "amountBilledCents": 2**63}]}),
        "not an int64",
    ),
    "amount as a float": (
        lambda items: json_body({"results": [{**items[0], "amountBilledCents": 4350.2}]}),
        "not an int64",
    ),
    "amount as text": (
        lambda items: json_body({"results": [{**items[0], "amountBilledCents": "4350"}]}),
        "not an int64",
    ),
    "timestamp without zone": (
        lambda items: json_body({"results": [{**items[0], "startDate": "2026-11-01T00:00:00"}]}),
        "has no timezone",
    ),
    "no results list": (lambda items: json_body({"totalCount": 2}), "no `results` list"),
    "results not a list": (lambda items: json_body({"results": {"0": items[0]}}), "no `results`"),
    "entry not an object": (lambda items: json_body({"results": ["x"]}), "not an object"),
    "JSON null": (lambda items: json_body(None), "no `results` list"),
    "HTML page": (lambda items: (b"<html>Sign in</html>", "text/html"), "not JSON"),
    "empty body": (lambda items: (b"", "application/json"), "not JSON"),
    "cut JSON": (lambda items: (json_body({"results": items})[0][:40], "application/json"), "JSON"),
    "linkedInvoices a number": (
        lambda items: json_body({"results": [{**items[0], "linkedInvoices": 5}, *items[1:]]}),
        "`linkedInvoices` is not a list",
    ),
    "JSON nested 100,000 deep": (
        lambda items: (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        "nested too deeply",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LISTINGS))
async def test_atlas_malformed_listing_is_contained_to_its_org(
    world: World, atlas: HandMadeAtlas, caplog: pytest.LogCaptureFixture, case: str
):
    make, reason = BAD_LISTINGS[case]
    cfg = handmade_config(world, atlas)
    assert await run(world, cfg) == 0
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    before = await snapshot(cfg, PROD)

    atlas.body[PROD] = make(atlas.invoices[PROD])
    atlas.invoices[ANALYTICS].append(item(4, ANALYTICS, "FAILED", 99_00))
    assert await run(world, cfg, timedelta(minutes=15)) == 1
    assert world.kinds()[2:] == [("FIRING", "failed-charge")]  # Analytics' new one only
    assert await snapshot(cfg, PROD) == before  # nothing vanished, nothing changed
    (warning,) = org_warnings(caplog, "Production")
    assert reason in warning and PROD in warning

    del atlas.body[PROD]  # Atlas answers properly again: nothing to say
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert len(world.kinds()) == 3


async def test_atlas_unknown_status_and_odd_amounts_are_kept_without_alerting(
    world: World, atlas: HandMadeAtlas
):
    cfg = handmade_config(world, atlas)
    assert await run(world, cfg) == 0
    atlas.invoices[ANALYTICS] = [
        item(3, ANALYTICS, "PENDING", -250_00),  # a credit: negative amounts are valid
        item(5, ANALYTICS, "REFUNDED", 120_00),  # a status Atlas may add one day
        item(6, ANALYTICS, "PAID", 2**63 - 1),  # the largest int64 survives the state file
    ]
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert len(world.kinds()) == 2  # nothing new to say
    stored = await snapshot(cfg, ANALYTICS)
    assert stored[f"{3:024x}"].amount_billed_cents == -250_00
    assert stored[f"{5:024x}"].status == "REFUNDED"
    assert stored[f"{6:024x}"].amount_billed_cents == 2**63 - 1


async def test_atlas_unknown_status_is_logged_once(
    world: World, atlas: HandMadeAtlas, caplog: pytest.LogCaptureFixture
):
    cfg = handmade_config(world, atlas)
    assert await run(world, cfg) == 0
    atlas.invoices[ANALYTICS].append(item(5, ANALYTICS, "REFUNDED", 120_00))
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "REFUNDED" in r.getMessage()
    ]
    assert len(said) == 1 and f"{5:024x}" in said[0] and "Analytics" in said[0]


async def test_atlas_missing_amount_does_not_resolve_a_pending_alert(
    world: World, atlas: HandMadeAtlas
):
    cfg = handmade_config(world, atlas)
    assert await run(world, cfg) == 0
    atlas.invoices[PROD][1] = without(atlas.invoices[PROD][1], "amountBilledCents")
    await run(world, cfg, timedelta(minutes=15))
    assert len(world.kinds()) == 2  # not "back under the threshold"


def many(org: str, count: int, first: int = 100) -> list[dict[str, Any]]:
    return [item(n, org) for n in range(first, first + count)]


async def test_atlas_same_invoice_on_two_pages_is_counted_once(world: World, atlas: HandMadeAtlas):
    cfg = handmade_config(world, atlas)
    listing = [*atlas.invoices[PROD], *many(PROD, 499)]  # 501: two pages
    atlas.invoices[PROD] = [*listing[:500], listing[499], listing[0], *listing[500:]]
    assert await run(world, cfg) == 0
    assert (PROD, 2) in atlas.pages
    assert set(await snapshot(cfg, PROD)) == {i["id"] for i in listing}
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]


async def test_atlas_page_shifting_while_paging_loses_nothing(world: World, atlas: HandMadeAtlas):
    """An invoice created between two pages pushes the rest one place down (as with
    Atlas's default newest-first order): the first page's last invoice shows again on
    the second, none is missed, the new one is seen on the next cycle."""
    cfg = handmade_config(world, atlas)
    atlas.invoices[PROD] = [*atlas.invoices[PROD], *many(PROD, 600)]
    assert await run(world, cfg) == 0
    listed = {i["id"] for i in atlas.invoices[PROD]}
    newcomer = item(9999, PROD, "FAILED", 10_00)

    def shift(org: str, page: int) -> None:
        if org == PROD and page == 2:
            atlas.invoices[PROD].insert(0, newcomer)

    atlas.before_page = shift
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert set(await snapshot(cfg, PROD)) == listed  # none vanished
    assert len(world.kinds()) == 2  # no false RESOLVED
    atlas.before_page = None
    assert await run(world, cfg, timedelta(minutes=15)) == 0
    assert world.kinds()[2:] == [("FIRING", "failed-charge")]  # the newcomer, next cycle
    assert newcomer["id"] in world.slack_texts()[2]


@pytest.mark.parametrize("status", [200, 500])
async def test_atlas_broken_org_fails_alone_through_the_cli_and_is_recorded(
    world: World, atlas: HandMadeAtlas, status: int
):
    """Issue 12 §1, end to end with the real command line: Production's listing is JSON
    nested 100,000 deep (on a 200, or in a 500's error body) or holds a linkedInvoices
    that is a number. Analytics' FAILED invoice still alerts; Production's failure is
    recorded (status shows it, and poll_failure can count from it); `run --once` exits 1
    with one line per failed org on stderr, no traceback."""
    path = world.tmp / "config.yaml"
    data = world.config_data(rules=SLACK_RULES)
    data["atlas"] |= {"base_url": atlas.url, "retries": 0}  # a real process: real sleeps
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    async def invoice_watch(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "invoice_watch", *args, "-c", str(path), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    atlas.invoices[ANALYTICS].append(item(4, ANALYTICS, "FAILED", 99_00))
    atlas.body[PROD] = (b"[" * 100_000 + b"]" * 100_000, "application/json")
    atlas.status[PROD] = status
    code, _, err = await invoice_watch("run", "--once")
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: Production: "), err
    assert ("nested too deeply" if status == 200 else "HTTP 500") in errors[0]
    assert ("FIRING", "failed-charge") in world.kinds()
    assert any(f"{4:024x}" in text for text in world.slack_texts())  # Analytics' invoice

    code, out, _ = await invoice_watch("status")
    assert code == 0
    (row,) = [line for line in out.splitlines() if line.startswith("Production")]
    assert "never" in row and " ok" not in row  # failing, with its error, not "ok"
    assert ("nested too deeply" if status == 200 else "HTTP 500") in row

    atlas.body[PROD] = json_body({"results": [item(1, PROD, linkedInvoices=5)]})
    atlas.status[PROD] = 200
    code, _, err = await invoice_watch("run", "--once")
    assert code == 1 and "Traceback" not in err
    assert "`linkedInvoices` is not a list" in err
