"""Every rule type fires, reminds and resolves end to end, through the simulator and a
real Slack endpoint, with time driven by a FakeClock between `run --once` runs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from invoice_watch.config import load
from invoice_watch.simulator import Simulator
from invoice_watch.simulator.scenario import Scenario
from tests.fakes_slack import FakeSlack
from tests.fakes_smtp import Sink, StartServer
from tests.world import ANALYTICS, PROD, World, scenario


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


async def test_every_state_rule_fires_reminds_and_resolves(
    tmp_path: Path, smtp_server: StartServer
):
    s = scenario()
    sandbox = "c" * 24
    s.add_org("Sandbox", id=sandbox)
    s.add_invoice("Sandbox", period=0, status="PENDING", amount_cents=10_00)
    sink = Sink()
    port = await smtp_server(sink)
    async with Simulator(s) as sim, FakeSlack() as slack:
        world = World(sim, slack, sink, port, tmp_path)
        small = sim.scenario.invoice("small")
        every: dict[str, Any] = {"notify": ["slack"], "repeat": "1h"}
        rules: list[dict[str, Any]] = [
            {"name": "failed", "type": "invoice_status", **every},
            {"name": "budget", "type": "pending_amount", "threshold": 5000, **every},
            {"name": "jump", "type": "amount_increase", "threshold": 500, **every},
            {"name": "month", "type": "forecast", "budget": 3000, "orgs": [ANALYTICS], **every},
            {"name": "unreadable", "type": "poll_failure", "after": "1h", **every},
        ]
        data = world.config_data(rules=rules)
        data["organizations"].append({"id": sandbox, "name": "Sandbox"})
        data["atlas"]["retries"] = 0
        config = load(yaml.safe_dump(data), env={}, base_dir=tmp_path)
        sim.faults.status(503, times=10_000, path=f"/api/atlas/v2/orgs/{sandbox}/invoices")

        def by_rule(start: int) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for kind, rule in world.kinds()[start:]:
                out.setdefault(rule, []).append(kind)
            return out

        world.clock.set(small.start + timedelta(days=5))
        sim.set_amount(small.id, 1000_00)
        await world.run_once(config)
        assert by_rule(0) == {"failed": ["FIRING"], "budget": ["FIRING"], "month": ["FIRING"]}

        seen = len(world.kinds())
        sim.set_amount(small.id, 1600_00)  # +$600 within 24 h
        world.clock.advance(timedelta(hours=1))
        await world.run_once(config)
        assert by_rule(seen) == {
            "failed": ["REMINDER"],
            "budget": ["REMINDER"],
            "month": ["REMINDER"],
            "jump": ["FIRING"],
            "unreadable": ["FIRING"],
        }

        seen = len(world.kinds())
        world.clock.advance(timedelta(hours=1))
        await world.run_once(config)
        assert by_rule(seen) == {rule["name"]: ["REMINDER"] for rule in rules}

        seen = len(world.kinds())
        sim.set_status(sim.scenario.invoice("failed").id, "PAID")
        sim.set_amount(sim.scenario.invoice("pending").id, 4000_00)
        sim.set_amount(small.id, 100_00)  # no growth, and a forecast far under budget
        sim.faults.clear()
        world.clock.advance(timedelta(hours=1))
        assert await world.run_once(config) == 0
        assert by_rule(seen) == {rule["name"]: ["RESOLVED"] for rule in rules}
