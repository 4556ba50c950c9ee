"""Every rule type fires, reminds and resolves end to end, through the simulator and a
real Slack endpoint, with time driven by a FakeClock between `run --once` runs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from invoice_watch.simulator import Simulator
from invoice_watch.simulator.scenario import Scenario
from tests.fakes_slack import FakeSlack
from tests.fakes_smtp import Sink, StartServer
from tests.world import ANALYTICS, PROD, World


def slack_rule(**rule: Any) -> dict[str, Any]:
    return {"notify": ["slack"], **rule}


async def run(world: World, rules: list[dict[str, Any]], advance: timedelta = timedelta(0), **kw):
    world.clock.advance(advance)
    return await world.run_once(world.config(rules=rules, **kw))


def new_kinds(world: World, seen: int) -> list[str]:
    return [kind for kind, _ in world.kinds()[seen:]]


async def test_rule_status_change_is_a_one_shot_notice(world: World):
    rules = [slack_rule(name="moves", type="status_change", to=["PAID"])]
    await run(world, rules)
    assert world.kinds() == []  # change rules start from the second poll
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    await run(world, rules, timedelta(minutes=15))
    assert world.kinds() == [("NOTICE", "moves")]
    assert "FAILED -> PAID" in world.slack_texts()[0]
    await run(world, rules, timedelta(minutes=15))
    assert len(world.kinds()) == 1  # once


async def test_rule_amount_increase_fires_with_breakdown_and_resolves(world: World):
    rules = [slack_rule(name="jump", type="amount_increase", threshold=500, window="24h")]
    pending = world.sim.scenario.invoice("small").id
    await run(world, rules)
    world.sim.set_amount(pending, 1000_00)  # +$300 in an hour: under $500
    await run(world, rules, timedelta(hours=1))
    assert world.kinds() == []
    world.sim.set_amount(pending, 1300_00)  # +$600 since the first observation
    await run(world, rules, timedelta(hours=1))
    assert world.kinds() == [("FIRING", "jump")]
    text = world.slack_texts()[0]
    assert "grew $600.00" in text and "Top projects" in text and "Top SKUs" in text
    # A day later nothing grew inside the window: resolved.
    await run(world, rules, timedelta(hours=25))
    assert new_kinds(world, 1) == ["RESOLVED"]


async def test_rule_forecast_fires_reminds_and_resolves(world: World):
    pending = world.sim.scenario.invoice("small")
    start = pending.start
    rules = [slack_rule(name="month", type="forecast", budget=3000, repeat="1d", orgs=[ANALYTICS])]
    world.clock.set(start + timedelta(days=2))
    world.sim.set_amount(pending.id, 1000_00)
    await run(world, rules)
    assert world.kinds() == []  # before min_elapsed (3 days)
    world.clock.set(start + timedelta(days=5))  # $1,000 in 5 days -> about $6,000
    await run(world, rules)
    assert world.kinds() == [("FIRING", "month")]
    assert "over the $3,000.00 budget" in world.slack_texts()[0]
    await run(world, rules, timedelta(hours=12))
    assert len(world.kinds()) == 1
    await run(world, rules, timedelta(hours=12))  # a day after the FIRING
    assert new_kinds(world, 1) == ["REMINDER"]
    world.clock.set(start + timedelta(days=11))  # $1,000 in 11 days -> about $2,700
    await run(world, rules)
    assert new_kinds(world, 2) == ["RESOLVED"]


async def test_rule_poll_failure_after_an_hour_and_back(world: World):
    rules = [slack_rule(name="unreadable", type="poll_failure", after="1h")]
    atlas = {"retries": 0}
    world.sim.faults.status(503, times=1000, path=f"/api/atlas/v2/orgs/{ANALYTICS}/invoices")
    assert await run(world, rules, atlas=atlas_with(world, atlas)) == 1
    await run(world, rules, timedelta(minutes=59), atlas=atlas_with(world, atlas))
    assert world.kinds() == []
    await run(world, rules, timedelta(minutes=1), atlas=atlas_with(world, atlas))
    assert world.kinds() == [("FIRING", "unreadable")]
    assert "Analytics" in world.slack_texts()[0] and "503" in world.slack_texts()[0]
    world.sim.faults.clear()
    assert await run(world, rules, timedelta(minutes=15), atlas=atlas_with(world, atlas)) == 0
    assert new_kinds(world, 1) == ["RESOLVED"]


def atlas_with(world: World, extra: dict[str, Any]) -> dict[str, Any]:
    atlas: dict[str, Any] = world.config_data()["atlas"]
    return {**atlas, **extra}


async def test_rule_pending_amount_message_names_top_projects_and_skus(world: World):
    await run(world, [slack_rule(name="budget", type="pending_amount", threshold=5000)])
    [text] = world.slack_texts()
    assert "Top projects:" in text and "Top SKUs:" in text
    assert "Production Project" in text


async def test_rule_invoice_status_reminds_every_repeat(world: World):
    rules = [slack_rule(name="failed", type="invoice_status", repeat="6h")]
    await run(world, rules)
    for _ in range(4):
        await run(world, rules, timedelta(hours=3))
    assert [k for k, _ in world.kinds()] == ["FIRING", "REMINDER", "REMINDER"]


async def test_flood_control_groups_a_30_event_cycle_per_notifier(
    tmp_path: Path, smtp_server: StartServer
):
    many = Scenario()
    many.add_org("Production", id=PROD)
    many.add_org("Analytics", id=ANALYTICS)
    for month in range(1, 31):
        many.add_invoice("Production", period=-month, status="FAILED", amount_cents=100_00 + month)
    sink = Sink()
    port = await smtp_server(sink)
    async with Simulator(many) as sim, FakeSlack() as slack:
        world = World(sim, slack, sink, port, tmp_path)
        rules = [{"name": "failed", "type": "invoice_status", "notify": ["slack", "mail"]}]
        assert await world.run_once(world.config(rules=rules)) == 0
        assert len(slack.accepted) == 1 and len(sink.envelopes) == 1
        assert slack.accepted[0]["text"].startswith("30 alerts: 30 FIRING")
        assert sink.message()["Subject"] == "[invoice-watch] 30 alerts: 30 FIRING"
