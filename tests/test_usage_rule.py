"""The usage_anomaly rule in rules.evaluate (issue 19 §1): conditions keyed by rule,
organization and dimension from the organization's verdict; no verdict (no line items
yet, too few days, stale ones): not evaluated, so a firing alert neither fires again nor
resolves; an organization the rule no longer covers is evaluated (its alerts resolve)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from invoice_watch.anomaly import Anomaly, Contributor, Detection, Dimension
from invoice_watch.resolution import resolution_summary
from invoice_watch.rules import OrgView, evaluate
from tests.conftest import ORG_A, ORG_B
from tests.test_config_insight import load

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
PROJECT = "5f1e00000000000000000001"
RULES = f"""\
  - {{name: spike, type: usage_anomaly, by: cluster, notify: [out]}}
  - {{name: only-b, type: usage_anomaly, orgs: [{ORG_B}], notify: [out]}}
"""


def anomaly() -> Anomaly:
    dimension = Dimension("cluster", f"{PROJECT}/orders", "Web", PROJECT, cluster="orders")
    return Anomaly(
        dimension,
        date(2026, 11, 20),
        650_00,
        baseline_cents=130_00,
        spread_cents=5_00,
        threshold_cents=230_00,
        history_days=14,
        contributors=(Contributor("ATLAS_AWS_INSTANCE_M40", 600_00, 100_00),),
    )


def test_usage_anomaly_condition_names_project_cluster_day_and_contributors() -> None:
    config = load(RULES)
    found = anomaly()
    verdict = Detection(found.day, {found.key: found})
    view = OrgView(ORG_A, ok=True, usage={"spike": verdict})
    result = evaluate(config.rules, [view], {}, NOW)
    key = f"spike/{ORG_A}/cluster:{PROJECT}/orders"
    assert list(result.holding) == [key]
    assert ("spike", ORG_A) in result.evaluated
    assert ("only-b", ORG_A) in result.evaluated  # not covered: its alerts resolve
    condition = result.holding[key]
    details = dict(condition.details)
    assert details["Project"] == f"Web ({PROJECT})" and details["Cluster"] == "orders"
    assert details["Spend that day"] == "$650.00" and details["Usual"].startswith("$130.00")
    assert details["Top contributors"].startswith("ATLAS_AWS_INSTANCE_M40: $600.00")
    assert condition.summary.startswith("Unusual spend: cluster orders of project Web")


def test_usage_anomaly_without_a_verdict_is_not_evaluated() -> None:
    config = load(RULES)
    for usage in ({}, {"spike": Detection(None, reason="no daily line items yet")}):
        result = evaluate(config.rules, [OrgView(ORG_A, ok=True, usage=usage)], {}, NOW)
        assert ("spike", ORG_A) not in result.evaluated and not result.holding
    failed = OrgView(ORG_A, ok=False, usage={"spike": Detection(date(2026, 11, 20))})
    assert ("spike", ORG_A) not in evaluate(config.rules, [failed], {}, NOW).evaluated


def test_usage_anomaly_a_normal_day_is_evaluated_and_holds_nothing() -> None:
    config = load(RULES)
    view = OrgView(ORG_A, ok=True, usage={"spike": Detection(date(2026, 11, 21))})
    result = evaluate(config.rules, [view], {}, NOW)
    assert ("spike", ORG_A) in result.evaluated and not result.holding


def test_usage_anomaly_resolution_says_the_daily_spend_fell_back() -> None:
    config = load(RULES)
    rule = config.rules[1]
    text = resolution_summary(rule, None, None, NOW, org_id=ORG_A)
    assert "back under the anomaly threshold" in text
    assert "no longer listed" not in text
