"""A RESOLVED message says why the alert resolved: the amount fell, or a reload changed
the rule (a raised threshold, budget or limit; a status no longer watched; `orgs` that
no longer name the organization), or the rule or organization is gone from the
configuration; and it goes where the alert's FIRING went."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.config import load
from invoice_watch.rules import OrgView, evaluate
from invoice_watch.store import AlertState
from invoice_watch.types import AlertEvent, EventKind, Invoice
from tests.conftest import NOW, ORG_A, ORG_B, PERIOD_START, inv
from tests.plans import plan
from tests.world import ANALYTICS, PROD, World


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


# -- a rule's notify, orgs, name or state changed; an organization removed (A14-4, A14-5)


def mail_subjects(world: World) -> list[str]:
    return [str(world.sink.message(n)["Subject"]) for n in range(len(world.sink.envelopes))]


def pending_rule(**changes: Any) -> dict[str, Any]:
    return {"name": "pend", "type": "pending_amount", "threshold": 500, **changes}


async def cycle_and_deliver(app: App) -> Any:
    result = await app.run_cycle()
    await app.deliverer.drain(10)
    return result


async def test_resolved_goes_to_the_notifiers_that_got_the_firing_across_a_restart(world: World):
    """A14-4: the alert fired to mail; the rule's notify became [slack] (a restart with
    the new config): its RESOLVED goes to mail, which heard it fire, and to slack, the
    rule's notifier now; a REMINDER in between goes to both too."""
    first = world.config(rules=[pending_rule(notify=["mail"], repeat="1h", threshold=5000)])
    async with App(first, clock=world.clock) as app:
        await cycle_and_deliver(app)
    assert mail_subjects(world) == ["[invoice-watch] FIRING pend: Production $6,000.00"]
    assert world.slack_texts() == []

    moved = world.config(rules=[pending_rule(notify=["slack"], repeat="1h", threshold=5000)])
    world.clock.advance(timedelta(hours=1))
    async with App(moved, clock=world.clock) as app:
        await cycle_and_deliver(app)  # the reminder: to mail and slack
        raised = world.config(rules=[pending_rule(notify=["slack"], threshold=9000)])
        assert await app.reload(raised)
        await cycle_and_deliver(app)
    assert [s.split(":")[0] for s in mail_subjects(world)] == [
        "[invoice-watch] FIRING pend",
        "[invoice-watch] REMINDER pend",
        "[invoice-watch] RESOLVED pend",
    ]
    assert [text.split("\n")[0] for text in world.slack_texts()] == [
        "REMINDER: pend",
        "RESOLVED: pend",
    ]


async def test_resolved_when_orgs_no_longer_cover_an_org_says_so_not_back_under(world: World):
    """A14-5 (a): `orgs:` narrowed to Production: Analytics's alert ($700.00 pending,
    over $500.00) ends, and its RESOLVED says the rule no longer covers Analytics, not
    "back under the threshold"."""
    async with App(world.config(rules=[pending_rule(notify=["slack"])]), clock=world.clock) as app:
        await cycle_and_deliver(app)
        narrowed = world.config(rules=[pending_rule(notify=["slack"], orgs=[PROD])])
        assert await app.reload(narrowed)
        result = await cycle_and_deliver(app)
    [resolved] = [e for e in result.events if e.kind is EventKind.RESOLVED]
    assert resolved.org_name == "Analytics"
    assert resolved.summary.startswith(
        "The rule no longer covers Analytics (its `orgs` changed): this alert ends, though invoice "
    )
    assert resolved.summary.endswith("is still PENDING ($700.00).")


@pytest.mark.parametrize(
    ("rule", "narrowed"),
    [
        ({"type": "invoice_status"}, "FAILED"),
        ({"type": "pending_amount", "threshold": 50}, "PENDING"),
        ({"type": "forecast", "budget": 100, "min_elapsed": "1d"}, "PENDING"),
        ({"type": "amount_increase", "threshold": 10}, "PENDING"),
        ({"type": "poll_failure", "after": "1s"}, None),
    ],
)
def test_resolved_when_orgs_no_longer_cover_an_org_says_so_for_every_rule_type(
    config_factory: Any, rule: dict[str, Any], narrowed: str | None
):
    """Whatever the rule's type, an alert of an organization its `orgs` no longer names
    ends saying so (every type but status_change, whose notices never resolve)."""
    from invoice_watch.resolution import resolution_summary

    config = config_factory(rules=one({**rule, "orgs": [ORG_B]}))
    (configured,) = config.rules
    invoice = inv(1, status=narrowed) if narrowed else None
    summary = resolution_summary(
        configured, invoice, None, NOW, org_id=ORG_A, org_name="Production"
    )
    assert summary.startswith("The rule no longer covers Production (its `orgs` changed)")
    if invoice is not None:
        assert f"is still {narrowed} ($100.00)" in summary


def test_resolved_poll_failure_whose_after_was_raised_says_it_still_fails(config_factory: Any):
    from invoice_watch.resolution import resolution_summary

    (rule,) = config_factory(rules=one({"type": "poll_failure", "after": "2h"})).rules
    summary = resolution_summary(
        rule, None, None, NOW, org_id=ORG_A, org_name="Production", failing_for=timedelta(hours=1)
    )
    assert summary == (
        "The rule's `after` is now 2h: Production has failed to be read for 1h, not that long yet."
    )


@pytest.mark.parametrize("change", ["rename", "disable", "remove", "remove-quiet", "org"])
async def test_alerts_of_a_rule_or_org_gone_from_the_config_resolve_saying_why(
    world: World, change: str
):
    """A14-5 (b): a rule renamed (a removal and a new rule), disabled or removed, or an
    organization removed: its alerts can never be evaluated again, so they resolve now,
    saying why, sent where their FIRING went (unless the rule's send_resolved was
    false); `status`, metrics and the state file forget them (none firing for ever)."""
    failed = {"name": "failed-charge", "type": "invoice_status", "notify": ["slack"]}
    pend = pending_rule(notify=["mail"], send_resolved=change != "remove-quiet")
    async with App(world.config(rules=[failed, pend]), clock=world.clock) as app:
        await cycle_and_deliver(app)
        assert sorted(k.split("/")[0] for k in app.store.alerts.firing()) == [
            "failed-charge",
            "pend",
            "pend",
        ]
        rules: list[dict[str, Any]] = [failed, pend]
        data = world.config_data(rules=rules)
        if change == "rename":
            rules[1] = {**pend, "name": "pend2"}
        elif change == "disable":
            rules[1] = {**pend, "enabled": False}
        elif change.startswith("remove"):
            rules.pop()
        data = world.config_data(rules=rules)
        if change == "org":
            data["organizations"] = [o for o in data["organizations"] if o["id"] == PROD]
        config = load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)
        assert await app.reload(config)
        result = await cycle_and_deliver(app)
        again = await cycle_and_deliver(app)
        firing = sorted(k.split("/")[:2] for k in app.store.alerts.firing())
        metric = app.metrics.registry.get_sample_value(
            "invoice_watch_alerts_firing", {"rule": "pend"}
        )

    resolved = sorted(
        (e.rule, e.org_name, e.summary) for e in result.events if e.kind == "RESOLVED"
    )
    fired = sorted((e.rule, e.org_name) for e in result.events if e.kind == "FIRING")
    assert again.events == []
    subjects = [s.split(":")[0] for s in mail_subjects(world)]
    if change == "rename":
        assert [(r, o) for r, o, _ in resolved] == [("pend", "Analytics"), ("pend", "Production")]
        assert "no longer in the configuration (removed, or renamed" in resolved[0][2]
        assert fired == [("pend2", "Analytics"), ("pend2", "Production")]
        assert firing == [["failed-charge", PROD], ["pend2", PROD], ["pend2", ANALYTICS]]
    elif change == "disable":
        assert [r for r, _, _ in resolved] == ["pend", "pend"]
        assert (
            resolved[0][2]
            == "The rule pend was disabled (enabled: false): this alert ends with it."
        )
        assert firing == [["failed-charge", PROD]]
    elif change == "remove":
        assert [r for r, _, _ in resolved] == ["pend", "pend"] and fired == []
        assert subjects.count("[invoice-watch] RESOLVED pend") == 2
        assert firing == [["failed-charge", PROD]]
    elif change == "remove-quiet":  # send_resolved: false when it fired: resolved quietly
        assert resolved == [] and "[invoice-watch] RESOLVED pend" not in subjects
        assert firing == [["failed-charge", PROD]]
    else:
        assert resolved == [
            (
                "pend",
                "Analytics",
                "The organization Analytics is no longer under `organizations:` in the "
                "configuration: its alerts end.",
            )
        ]
        assert firing == [["failed-charge", PROD], ["pend", PROD]]
    if change in ("rename", "remove", "remove-quiet"):
        assert metric is None  # the gauge no longer names a rule gone, none firing
    elif change == "disable":
        assert metric == 0
