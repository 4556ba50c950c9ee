"""The billing gauges of /metrics (issue 19 §3) against the simulator's demo scenario,
scraped over HTTP: pending amount, month to date per organization and per project (top N
and `other`), forecast, budget, last successful read; and the Grafana dashboard under
deploy/grafana, every metric it queries present in that /metrics output."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from invoice_watch import billing_metrics
from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.http_endpoint import make_http_app
from invoice_watch.simulator import Scenario, ScenarioLineItem, Simulator, demo_scenario
from tests.test_convergence import Recorder
from tests.test_e2e_usage import ANALYTICS, NOW, PROD

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "invoice-watch-billing.json"
FORECAST = {"name": "budget", "type": "forecast", "budget": 4000, "notify": ["console"]}


async def scrape(app: App) -> str:
    server = TestServer(
        make_http_app(app.metrics, lambda: (True, "ok"), lambda: (True, "ok")), host="127.0.0.1"
    )
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/metrics")) as resp,
        ):
            assert resp.status == 200
            return await resp.text()
    finally:
        await server.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def config_of_rules(sim: Simulator, tmp_path: Path) -> Config:
    data = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 0,
        },
        "organizations": [
            {"id": PROD, "name": "Production"},
            {"id": ANALYTICS, "name": "Analytics"},
        ],
        "state": {"path": str(tmp_path / "state.db")},
        "notifiers": {"console": {"type": "console"}},
        "rules": [{"name": "spike", "type": "usage_anomaly", "notify": ["console"]}, FORECAST],
    }
    return load(yaml.safe_dump(data), filename="m.yaml", env={}, base_dir=tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    async with Simulator(demo_scenario(now=NOW), clock=clock) as simulator:
        yield simulator


@pytest.fixture
async def metrics_text(sim: Simulator, clock: FakeClock, tmp_path: Path) -> AsyncIterator[str]:
    config = config_of_rules(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        assert await app.cycles.line_items_done(within=30)
        yield await scrape(app)


async def test_metrics_billing_gauges_from_the_snapshot_and_line_items(
    sim: Simulator, metrics_text: str
) -> None:
    got = samples(metrics_text)
    prod = (("org", PROD), ("org_name", "Production"))
    pending = sim.scenario.invoice("prod-pending")
    assert got[("invoice_watch_pending_amount_usd", prod)] == pending.amount_billed_cents / 100
    assert (
        got[("invoice_watch_forecast_usd", prod)] > got[("invoice_watch_pending_amount_usd", prod)]
    )
    assert got[("invoice_watch_budget_usd", (("rule", "budget"),))] == 4000.0
    assert got[("invoice_watch_last_successful_read_timestamp_seconds", prod)] == NOW.timestamp()
    # the line items' age, and a failure counter at 0 for each watched organization
    assert got[("invoice_watch_line_items_fetched_timestamp_seconds", prod)] == NOW.timestamp()
    for org in (PROD, ANALYTICS):
        assert got[("invoice_watch_line_item_fetch_failures_total", (("org", org),))] == 0
    per_project = {
        dict(labels)["project"]: value
        for (name, labels), value in got.items()
        if name == "invoice_watch_project_month_to_date_usd" and dict(labels)["org"] == PROD
    }
    assert per_project and sum(per_project.values()) == pytest.approx(
        got[("invoice_watch_month_to_date_usd", prod)]
    )


async def test_metrics_projects_beyond_the_top_n_are_one_other_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The label set is bounded: the TOP_PROJECTS largest projects, the rest summed as
    project="other"."""
    monkeypatch.setattr(billing_metrics, "TOP_PROJECTS", 1)
    scenario = Scenario(now=NOW)
    scenario.add_org("Production", id=PROD)
    scenario.add_org("Analytics", id=ANALYTICS)
    items = [
        ScenarioLineItem("ATLAS_AWS_INSTANCE_M40", 900_00, cluster="a", project="Big"),
        ScenarioLineItem("ATLAS_AWS_INSTANCE_M30", 200_00, cluster="b", project="Small"),
        ScenarioLineItem("ATLAS_AWS_INSTANCE_M10", 100_00, cluster="c", project="Tiny"),
    ]
    scenario.add_invoice("Production", period=0, status="PENDING", line_items=items)
    clock = FakeClock(NOW)
    async with Simulator(scenario, clock=clock) as sim:
        config = config_of_rules(sim, tmp_path)
        async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
            await app.run_cycle()
            assert await app.cycles.line_items_done(within=30)
            got = samples(await scrape(app))
    projects = {
        dict(labels)["project"]: value
        for (name, labels), value in got.items()
        if name == "invoice_watch_project_month_to_date_usd" and dict(labels)["org"] == PROD
    }
    assert set(projects) == {"Big", "other"}
    assert (
        projects["other"] == pytest.approx(sum(projects.values()) - projects["Big"])
        and projects["Big"] > projects["other"] > 0
    )


def test_grafana_dashboard_is_valid_json_with_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]


async def test_grafana_dashboard_queries_only_metrics_that_metrics_serves(
    metrics_text: str,
) -> None:
    served = {family.name for family in text_string_to_metric_families(metrics_text)}
    served |= {f"{name}_total" for name in served}  # a counter's samples
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\binvoice_watch_[a-z_]+", target["expr"])
    }
    queried |= set(re.findall(r"\binvoice_watch_[a-z_]+", json.dumps(dashboard["templating"])))
    assert queried and queried <= served, sorted(queried - served)
    assert "invoice_watch_line_items_fetched_timestamp_seconds" in queried  # their age


@pytest.mark.parametrize("fails", [False, True])
async def test_metrics_a_new_period_makes_the_line_items_due_at_once_and_no_closed_month_to_date(
    tmp_path: Path, fails: bool
) -> None:
    """The period rolls over (the pending invoice closes, a new one is listed): its line
    items are fetched at the next cycle, not up to usage.refresh later; and while they
    are not held (that fetch failed), the month-to-date gauges do not show the closed
    period's total as this month's."""
    start = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    clock = FakeClock(start)
    async with Simulator(demo_scenario(now=start), clock=clock) as sim:
        config = config_of_rules(sim, tmp_path)
        async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
            await app.run_cycle()
            assert await app.cycles.line_items_done(within=30)
            old = sim.scenario.invoice("prod-pending")
            clock.advance(timedelta(hours=1, minutes=30))
            sim.scenario.set_status(old.id, "CLOSED", clock.now())
            sim.scenario.add_invoice(PROD, period=clock.now(), amount_cents=1500)
            if fails:
                sim.faults.status(500, path="*/lineItems:search", org_id=PROD, times=100)
            await app.run_cycle()  # lists the new pending invoice
            assert await app.cycles.line_items_done(within=30)
            read = app.store.usage.read_state(PROD)
            assert read is not None
            got = samples(await scrape(app))
            mtd = ("invoice_watch_month_to_date_usd", (("org", PROD), ("org_name", "Production")))
            if fails:
                assert read.invoice_id == old.id and read.last_error is not None
                assert mtd not in got  # the closed period's line items: no month to date
            else:
                assert read.invoice_id != old.id and read.last_error is None  # at once
                assert mtd in got
