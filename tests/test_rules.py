"""Table-driven tests of rule evaluation at its edges. Pure: data and `now` in."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from invoice_watch.constants import INVOICE_STATUSES
from invoice_watch.diff import diff
from invoice_watch.rules import (
    UNDECIDED,
    Condition,
    OrgView,
    _check,
    alert_key,
    evaluate,
    forecast,
    growth,
)
from tests.conftest import NOW, ORG_A, ORG_B, PERIOD_START, inv


def rules_of(config_factory, *rules: dict[str, Any]):
    return config_factory(rules=[{"notify": ["console"], **r} for r in rules]).rules


def view(*invoices, org=ORG_A, first_read=False, old=None, **kw) -> OrgView:
    current = {i.id: i for i in invoices}
    change = diff({i.id: i for i in old} if old is not None else current, invoices)
    return OrgView(org, ok=True, invoices=current, diff=change, first_read=first_read, **kw)


@pytest.mark.parametrize(
    ("status", "statuses", "fires"),
    [
        ("FAILED", None, True),
        ("PAID", None, False),
        ("CLOSED", ["CLOSED", "FAILED"], True),
        ("PENDING", ["FAILED"], False),
    ],
)
def test_invoice_status_matches_statuses(config_factory, status, statuses, fires):
    rule: dict[str, Any] = {"name": "r", "type": "invoice_status"}
    if statuses:
        rule["statuses"] = statuses
    result = evaluate(rules_of(config_factory, rule), [view(inv(1, status=status))], {}, NOW)
    assert (alert_key("r", ORG_A, inv(1).id) in result.holding) is fires


@pytest.mark.parametrize(
    ("cents", "status", "fires"),
    [
        (500_000, "PENDING", False),  # exactly at the threshold: not over
        (500_001, "PENDING", True),  # one cent over
        (900_000, "CLOSED", False),  # only pending invoices
    ],
)
def test_pending_amount_threshold_edges(config_factory, cents, status, fires):
    rules = rules_of(config_factory, {"name": "p", "type": "pending_amount", "threshold": 5000})
    result = evaluate(rules, [view(inv(1, status=status, cents=cents))], {}, NOW)
    assert bool(result.holding) is fires


def test_rule_orgs_filter_uses_the_invoices_own_org(config_factory):
    rules = rules_of(config_factory, {"name": "r", "type": "invoice_status", "orgs": [ORG_B]})
    linked = inv(2, status="FAILED", org=ORG_B, source=ORG_A)
    own = inv(1, status="FAILED")
    result = evaluate(rules, [view(own, linked)], {}, NOW)
    assert list(result.holding) == [alert_key("r", ORG_B, linked.id)]
    assert result.holding[alert_key("r", ORG_B, linked.id)].source_org_id == ORG_A


def test_failed_read_is_not_evaluated_for_invoice_rules(config_factory):
    rules = rules_of(config_factory, {"name": "r", "type": "invoice_status"})
    failed = OrgView(ORG_A, ok=False, invoices={inv(1).id: inv(1, status="FAILED")}, error="x")
    result = evaluate(rules, [failed], {}, NOW)
    assert result.holding == {}
    assert ("r", ORG_A) not in result.evaluated


def test_disabled_rule_is_skipped(config_factory):
    rules = rules_of(config_factory, {"name": "r", "type": "invoice_status", "enabled": False})
    assert evaluate(rules, [view(inv(1, status="FAILED"))], {}, NOW).holding == {}


@pytest.mark.parametrize(
    ("history", "current", "expected"),
    [
        ([], 100, (100, 0)),
        ([(NOW - timedelta(hours=30), 50), (NOW - timedelta(hours=2), 80)], 100, (50, 50)),
        # history shorter than the window: base is the first observation
        ([(NOW - timedelta(hours=3), 60)], 100, (60, 40)),
        # base is the latest observation at or before now - window
        (
            [
                (NOW - timedelta(hours=48), 10),
                (NOW - timedelta(hours=24), 20),
                (NOW - timedelta(hours=1), 90),
            ],
            100,
            (20, 80),
        ),
    ],
)
def test_growth_base_and_amount(history, current, expected):
    assert growth(history, current, NOW, timedelta(hours=24)) == expected


@pytest.mark.parametrize(
    ("rule", "base", "current", "fires"),
    [
        ({"threshold": 100}, 500_00, 600_00, False),  # grew exactly $100: not more
        ({"threshold": 100}, 500_00, 600_01, True),
        ({"percent": 10}, 1000_00, 1100_00, False),  # exactly 10 %
        ({"percent": 10}, 1000_00, 1100_01, True),
        ({"percent": 10}, 0, 50_00, False),  # percent with a zero base never fires
        ({"percent": 10, "threshold": 20}, 0, 50_00, True),  # ...but the amount can
    ],
)
def test_amount_increase_edges(config_factory, rule, base, current, fires):
    rules = rules_of(config_factory, {"name": "g", "type": "amount_increase", **rule})
    history = {inv(1).id: [(NOW - timedelta(hours=25), base), (NOW, current)]}
    result = evaluate(rules, [view(inv(1, cents=current))], history, NOW)
    assert bool(result.holding) is fires


@pytest.mark.parametrize(
    "rule",
    [
        {"type": "invoice_status"},
        {"type": "invoice_status", "statuses": ["CLOSED", "PAID", "FORGIVEN"]},
        {"type": "pending_amount", "threshold": 1},
        {"type": "amount_increase", "threshold": 1},
        {"type": "forecast", "budget": 1},
    ],
)
def test_a_rule_passes_over_only_invoices_it_cannot_hold_for(config_factory, rule):
    """evaluate asks a rule about the invoices of the statuses it looks at only (a
    start's views hold every invoice listed): what it holds is what asking the rule
    about every invoice of every status holds."""
    rules = rules_of(config_factory, {"name": "r", **rule})
    invoices = [inv(n, status=s, cents=9_000_000_00) for n, s in enumerate(INVOICE_STATUSES)]
    history = {i.id: [(NOW - timedelta(days=2), 0), (NOW, 9_000_000_00)] for i in invoices}
    now = PERIOD_START + timedelta(days=10)
    seen = view(*invoices, old=[])
    asked = [_check(rules[0], seen, i, history[i.id], now, lambda at: now - at) for i in invoices]
    result = evaluate(rules, [seen], history, now)
    holding = [c.key for c in asked if isinstance(c, Condition)]
    assert holding  # (the case is one where the rule holds for some)
    assert list(result.holding) == holding
    undecided = [i for i, c in zip(invoices, asked, strict=True) if c is UNDECIDED]
    assert result.undecided == {alert_key("r", ORG_A, i.id) for i in undecided}


def test_amount_increase_waits_for_the_second_poll(config_factory):
    rules = rules_of(config_factory, {"name": "g", "type": "amount_increase", "threshold": 1})
    history = {inv(1).id: [(NOW - timedelta(hours=25), 0), (NOW, 100_00)]}
    result = evaluate(rules, [view(inv(1, cents=100_00), first_read=True)], history, NOW)
    assert result.holding == {}


def test_forecast_extrapolates_linearly():
    # 14 of 30 days elapsed with $1,400: forecast $3,000
    invoice = inv(1, cents=1400_00)
    at = PERIOD_START + timedelta(days=14)
    assert forecast(invoice, at) == 3000_00
    # after the period ended the forecast is the amount itself
    assert forecast(invoice, PERIOD_START + timedelta(days=45)) == 1400_00


@pytest.mark.parametrize(
    ("elapsed_days", "cents", "fires"),
    [
        (2, 1000_00, False),  # before min_elapsed (3 days), whatever the pace
        (3, 1000_00, True),  # $1,000 in 3 days -> $10,000 > $5,000
        (15, 2500_00, False),  # exactly on budget: not over
        (15, 2500_01, True),
    ],
)
def test_forecast_edges(config_factory, elapsed_days, cents, fires):
    rules = rules_of(config_factory, {"name": "f", "type": "forecast", "budget": 5000})
    now = PERIOD_START + timedelta(days=elapsed_days)
    result = evaluate(rules, [view(inv(1, cents=cents))], {}, now)
    assert bool(result.holding) is fires


def test_status_change_notices_only_matching_moves(config_factory):
    rules = rules_of(
        config_factory, {"name": "s", "type": "status_change", "from": ["CLOSED"], "to": ["FAILED"]}
    )
    old = [inv(1, status="CLOSED"), inv(2, status="CLOSED"), inv(3, status="PENDING")]
    new = [inv(1, status="FAILED"), inv(2, status="PAID"), inv(3, status="FAILED")]
    result = evaluate(rules, [view(*new, old=old)], {}, NOW)
    assert [(n.invoice.id, n.previous_status) for n in result.notices if n.invoice] == [
        (inv(1).id, "CLOSED")
    ]


def test_status_change_is_silent_on_the_first_read(config_factory):
    rules = rules_of(config_factory, {"name": "s", "type": "status_change"})
    old = [inv(1, status="CLOSED")]
    result = evaluate(rules, [view(inv(1, status="FAILED"), old=old, first_read=True)], {}, NOW)
    assert result.notices == []


@pytest.mark.parametrize(
    ("failing_for", "fires"),
    [(timedelta(minutes=59), False), (timedelta(hours=1), True), (None, False)],
)
def test_poll_failure_after(config_factory, failing_for, fires):
    rules = rules_of(config_factory, {"name": "pf", "type": "poll_failure", "after": "1h"})
    if failing_for is None:
        org_view = view()
    else:
        org_view = OrgView(ORG_A, ok=False, failing_since=NOW - failing_for, error="HTTP 503")
    result = evaluate(rules, [org_view], {}, NOW)
    assert (alert_key("pf", ORG_A) in result.holding) is fires
    assert ("pf", ORG_A) in result.evaluated


def test_alert_keys_are_stable_per_rule_org_and_invoice():
    assert alert_key("r", ORG_A, "0" * 24) == f"r/{ORG_A}/{'0' * 24}"
    assert alert_key("r", ORG_A) == f"r/{ORG_A}"


def test_breakdown_top_three_projects_and_skus_with_growth():
    from invoice_watch.breakdowns import breakdown
    from invoice_watch.types import LineItem

    items = [
        LineItem("shop", "M30", "orders", 300_00),
        LineItem("shop", "M10", "orders", 100_00),
        LineItem("analytics", "M30", "sink", 250_00),
        LineItem("web", "TRANSFER", "", 50_00),
        LineItem("batch", "BACKUP", "", 10_00),
    ]
    first = breakdown(items)
    assert [(b.dimension, b.name, b.amount_cents) for b in first] == [
        ("project", "shop", 400_00),
        ("project", "analytics", 250_00),
        ("project", "web", 50_00),
        ("sku", "M30", 550_00),
        ("sku", "M10", 100_00),
        ("sku", "TRANSFER", 50_00),
    ]
    assert all(b.growth_cents is None for b in first)
    grown = breakdown([*items, LineItem("analytics", "M30", "sink", 100_00)], first)
    assert [(b.name, b.growth_cents) for b in grown if b.dimension == "project"] == [
        ("shop", 0),
        ("analytics", 100_00),
        ("web", 0),
    ]
