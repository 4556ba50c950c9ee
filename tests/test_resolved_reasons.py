"""A RESOLVED message says why the alert resolved: the amount fell, or a reload changed
the rule (a raised threshold, budget or limit; a status no longer watched)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from invoice_watch.app import App
from invoice_watch.dedup import AlertState, plan
from invoice_watch.rules import OrgView, evaluate
from invoice_watch.types import AlertEvent, EventKind, Invoice
from tests.conftest import NOW, ORG_A, PERIOD_START, inv
from tests.world import World


class Alerts:
    """evaluate + plan, cycle after cycle, with the amount history kept like the store."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.states: dict[str, AlertState] = {}
        self.history: dict[str, list[tuple[datetime, int]]] = {}
        self.now = NOW

    def cycle(self, invoice: Invoice, advance: timedelta = timedelta(hours=1)) -> list[AlertEvent]:
        self.now += advance
        view = OrgView(ORG_A, ok=True, invoices={invoice.id: invoice})
        evaluation = evaluate(self.config.rules, [view], self.history, self.now)
        self.history.setdefault(invoice.id, []).append((self.now, invoice.amount_billed_cents))
        transitions = plan(self.config, evaluation, self.states, {invoice.id: invoice}, self.now)
        for t in transitions:
            if t.state.firing:
                self.states[t.state.key] = t.state
            else:
                self.states.pop(t.state.key, None)
        return [t.event for t in transitions if t.event is not None]


def one(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "r", "notify": ["console"], **rule}]


def test_resolved_after_a_raised_threshold_says_the_threshold_changed(config_factory):
    alerts = Alerts(config_factory(rules=one({"type": "pending_amount", "threshold": 5000})))
    [fired] = alerts.cycle(inv(1, cents=6000_00))
    assert fired.kind is EventKind.FIRING
    alerts.config = config_factory(rules=one({"type": "pending_amount", "threshold": 8000}))
    [resolved] = alerts.cycle(inv(1, cents=7000_00))  # the amount rose
    assert resolved.kind is EventKind.RESOLVED
    assert resolved.summary == (
        "The rule's threshold changed from $5,000.00 to $8,000.00: the pending invoice "
        "($7,000.00) is under the new one, though it rose from $6,000.00."
    )
    assert "back under" not in resolved.summary


def test_resolved_after_the_amount_fell_says_back_under(config_factory):
    alerts = Alerts(config_factory(rules=one({"type": "pending_amount", "threshold": 5000})))
    alerts.cycle(inv(1, cents=6000_00))
    [resolved] = alerts.cycle(inv(1, cents=4000_00))
    assert resolved.summary == "Pending invoice is $4,000.00, back under the $5,000.00 threshold."
    # a raised threshold the amount fell under anyway: the amount fell, say that
    alerts.cycle(inv(1, cents=6000_00))
    alerts.config = config_factory(rules=one({"type": "pending_amount", "threshold": 5500}))
    [resolved] = alerts.cycle(inv(1, cents=4900_00))
    assert resolved.summary == "Pending invoice is $4,900.00, back under the $5,500.00 threshold."


def test_resolved_after_a_raised_forecast_budget_says_the_budget_changed(config_factory):
    budget = {"type": "forecast", "min_elapsed": "1d"}
    alerts = Alerts(config_factory(rules=one({**budget, "budget": 5000})))
    alerts.now = PERIOD_START + timedelta(days=14)  # half of November: $3,000 -> $6,000
    [fired] = alerts.cycle(inv(1, cents=3000_00))
    assert fired.kind is EventKind.FIRING
    alerts.config = config_factory(rules=one({**budget, "budget": 9000}))
    [resolved] = alerts.cycle(inv(1, cents=3100_00))
    assert resolved.summary.startswith(
        "The rule's budget changed from $5,000.00 to $9,000.00: the forecast for this period"
    )
    alerts.config = config_factory(rules=one({**budget, "budget": 5000}))
    assert [e.kind for e in alerts.cycle(inv(1, cents=3100_00))] == [EventKind.FIRING]
    [resolved] = alerts.cycle(inv(1, cents=1000_00))
    assert "is back under the $5,000.00 budget" in resolved.summary


def test_resolved_after_changed_growth_limits_says_the_limits_changed(config_factory):
    growth = {"type": "amount_increase", "window": "1d"}
    alerts = Alerts(config_factory(rules=one({**growth, "threshold": 500})))
    alerts.cycle(inv(1, cents=1000_00))
    [fired] = alerts.cycle(inv(1, cents=2000_00))
    assert fired.kind is EventKind.FIRING
    alerts.config = config_factory(rules=one({**growth, "threshold": 5000}))
    [resolved] = alerts.cycle(inv(1, cents=2500_00))
    assert resolved.summary == (
        "The rule's limits changed (over $500.00 within 1d -> over $5,000.00 within 1d): "
        "the growth within the window is not over the new ones."
    )


def test_resolved_when_a_status_is_no_longer_watched_says_so(config_factory):
    alerts = Alerts(config_factory(rules=one({"type": "invoice_status", "statuses": ["FAILED"]})))
    alerts.cycle(inv(1, status="FAILED"))
    alerts.config = config_factory(rules=one({"type": "invoice_status", "statuses": ["PREPAID"]}))
    [resolved] = alerts.cycle(inv(1, status="FAILED"))
    assert "no longer watches FAILED invoices" in resolved.summary
    assert "still FAILED" in resolved.summary


async def test_resolved_message_after_a_reload_names_the_threshold_change(world: World):
    """End to end, as reported: the pending invoice rises while a reload raises the
    threshold; Slack must not hear "back under the threshold"."""
    config = world.config()
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()  # $6,000 pending > $5,000: FIRING
        world.sim.set_amount(world.sim.scenario.invoice("pending").id, 7000_00)
        rules = world.config_data()["rules"]
        rules[1]["threshold"] = 8000
        assert await app.reload(world.config(rules=rules))
        await app.run_cycle()
        await app.deliverer.drain(10)
    resolved = [t for t in world.slack_texts() if t.startswith("RESOLVED: pending-over-budget")]
    assert len(resolved) == 1
    assert "threshold changed from $5,000.00 to $8,000.00" in resolved[0]
    assert "back under" not in resolved[0]
