"""The usage_anomaly rule in rules.evaluate (issue 19 §1): conditions keyed by rule,
organization and dimension from the organization's verdict; no verdict (no line items
yet, too few days, stale ones): not evaluated, so a firing alert neither fires again nor
resolves; an organization the rule no longer covers is evaluated (its alerts resolve)."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

import pytest

from invoice_watch.anomaly import Anomaly, Contributor, Detection, Dimension
from invoice_watch.resolution import resolution_summary
from invoice_watch.rules import OrgView, evaluate
from invoice_watch.types import LineItem
from invoice_watch.usage_watch import UsageWatch, cannot_judge
from tests.conftest import ORG_A, ORG_B, OpenState
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


ORG = "5f1e0c0a9b8d7e6f5a4b3c2d"  # test_config_insight's organization


def flat_days(start: date, days: int) -> list[LineItem]:
    return [
        LineItem("Web", "ATLAS_AWS_INSTANCE_M10", "c0", 100_00, PROJECT, start + timedelta(days=n))
        for n in range(days)
    ]


async def test_usage_anomaly_that_cannot_judge_says_so_once_and_status_shows_why(
    open_state: OpenState, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh install's first days (line items not read yet, fewer days than needed)
    are one INFO; line items that stopped coming (the latest day too old, fetches
    failing) one WARNING, whatever the number of cycles; one INFO when it judges again;
    `status`'s rows (cannot_judge) say why meanwhile."""
    config = load("  - {name: spike, type: usage_anomaly, by: cluster, notify: [out]}\n")
    store = await open_state()
    watch = UsageWatch()
    caplog.set_level(logging.INFO, logger="invoice_watch.usage_watch")

    def said() -> list[tuple[int, str]]:
        found = [(r.levelno, r.getMessage()) for r in caplog.records if "spike" in r.getMessage()]
        caplog.clear()
        return found

    start = datetime(2026, 11, 4, 9, 0, tzinfo=UTC)
    for hour in range(3):  # not read yet
        await watch.before_cycle(config, store, start + timedelta(minutes=15 * hour))
    await store.usage.record(ORG, "inv-nov", date(2026, 11, 1), flat_days(date(2026, 11, 1), 3),
                             "search", start)  # fmt: skip
    for hour in range(3):  # 3 days held, 7 needed
        await watch.before_cycle(config, store, start + timedelta(hours=hour))
    [(level, message)] = said()
    assert level == logging.INFO and "not judged yet" in message
    [(rule, org, why)] = await cannot_judge(config, store, start)
    assert (rule, org) == ("spike", ORG) and "at least 7 are needed" in why

    judged = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
    await store.usage.record(ORG, "inv-nov", date(2026, 11, 1), flat_days(date(2026, 11, 1), 20),
                             "search", judged)  # fmt: skip
    await watch.before_cycle(config, store, judged)
    assert said() == [(logging.INFO, f"spike: {ORG}: usage judged again")]
    assert await cannot_judge(config, store, judged) == []

    # The line items stop coming: fetches fail, the latest day (the 20th) gets old.
    await store.usage.record_failure(ORG, judged + timedelta(days=1), "HTTP 500 from Atlas")
    for hour in range(5 * 24, 8 * 24, 6):
        await watch.before_cycle(config, store, judged + timedelta(hours=hour))
    [(level, message)] = said()
    assert level == logging.WARNING and "cannot judge" in message, message
    assert "days old" in message and "fetch of its line items failed" in message
    assert "HTTP 500" not in message  # the fetch's own WARNING says that
    [(_, _, why)] = await cannot_judge(config, store, judged + timedelta(days=6))
    assert "is 7 days old" in why and "HTTP 500 from Atlas" in why

    back = judged + timedelta(days=8)
    await store.usage.record(ORG, "inv-nov", date(2026, 11, 1), flat_days(date(2026, 11, 1), 28),
                             "search", back)  # fmt: skip
    await watch.before_cycle(config, store, back)
    assert said() == [(logging.INFO, f"spike: {ORG}: usage judged again")]


async def test_usage_anomaly_whose_line_items_were_never_read_warns_once(
    open_state: OpenState, caplog: pytest.LogCaptureFixture
) -> None:
    config = load("  - {name: spike, type: usage_anomaly, by: cluster, notify: [out]}\n")
    store = await open_state()
    watch = UsageWatch()
    caplog.set_level(logging.INFO, logger="invoice_watch.usage_watch")
    now = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
    await watch.before_cycle(config, store, now)  # start-up: not read yet (INFO)
    await store.usage.record_failure(ORG, now, "HTTP 503")
    for minutes in range(0, 120, 15):
        await watch.before_cycle(config, store, now + timedelta(minutes=minutes))
    levels = [r.levelno for r in caplog.records if "spike" in r.getMessage()]
    assert levels == [logging.INFO, logging.WARNING]
    [(_, _, why)] = await cannot_judge(config, store, now)
    assert "never been read" in why and "HTTP 503" in why
