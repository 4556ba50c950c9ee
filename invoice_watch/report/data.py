"""What a spend report says (issue 19 §2), built from what the daemon already holds: the
organizations' pending invoices, their daily line items (this period's and last
period's, from ``lineItems:search``: :mod:`invoice_watch.atlas.usage`), the ``forecast``
rules and the firing alerts. Pure: data and ``now`` in, :class:`ReportData` out; no
I/O, no matplotlib.

Spend "to date" is usage: the sum of the period's daily line items (what the chart
draws and the top lists split); "the same point last month" is last period's daily
line items over as many days as this period has so far. The pending invoice's billed
amount (which includes tax) and its linear forecast are Atlas's figures, as the
``pending_amount`` and ``forecast`` rules see them; the budget is the tightest
``forecast`` rule covering the organization. Like that rule, a report forecasts nothing
before the period has run ``min_elapsed`` (it says "too early to forecast"): a monthly
report on day 1 would extrapolate a few hours. An organization with no daily line item
in the period is named in a note (spend to date counts none for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from invoice_watch.rules import forecast
from invoice_watch.types import AlertEvent, Invoice, LineItem

TOP = 5


@dataclass(frozen=True)
class OrgSpend:
    """One organization's input to a report: its pending invoice (None: none listed),
    its daily line items (any period: those outside this one and the last are left
    out), and the link to its billing page."""

    org_id: str
    org_name: str
    pending: Invoice | None
    items: Sequence[LineItem] = ()
    billing_url: str = ""


@dataclass(frozen=True)
class Change:
    """One project or SKU: this period to date, and last period to the same point (None
    when last period's line items are unknown)."""

    name: str
    amount_cents: int
    previous_cents: int | None = None

    @property
    def change_cents(self) -> int | None:
        return None if self.previous_cents is None else self.amount_cents - self.previous_cents

    @property
    def change_percent(self) -> float | None:
        if self.previous_cents is None or self.previous_cents <= 0:
            return None
        return (self.amount_cents - self.previous_cents) * 100 / self.previous_cents


@dataclass(frozen=True)
class FiringAlert:
    """An alert firing when the report was made: its latest message's facts."""

    rule: str
    severity: str
    org_name: str
    summary: str
    since: datetime | None


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, whatever carries it (email, Slack, a file).

    ``period_start`` and ``period_end`` (exclusive) bound this billing period;
    ``days`` is how many of its days have usage so far (the latest usage day's number,
    0: none yet); ``cumulative`` holds the running total after each of those days,
    ``last_cumulative`` last period's, every day of it (empty when unknown).
    """

    title: str
    orgs: tuple[tuple[str, str], ...]  # (id, name)
    now: datetime
    period_start: date
    period_end: date
    days: int
    to_date_cents: int
    last_to_date_cents: int | None
    billed_cents: int | None
    forecast_cents: int | None
    budget_cents: int | None
    budget_rules: tuple[str, ...]
    top_projects: tuple[Change, ...]
    top_skus: tuple[Change, ...]
    firing: tuple[FiringAlert, ...]
    cumulative: tuple[int, ...]
    last_cumulative: tuple[int, ...]
    billing_urls: tuple[str, ...] = ()
    # Organizations with no daily line items in this period (their spend counts none).
    no_items: tuple[str, ...] = ()
    # The forecast is left out: the period began less than ``min_elapsed`` ago.
    too_early: timedelta | None = None

    @property
    def period_days(self) -> int:
        return (self.period_end - self.period_start).days

    @property
    def change_cents(self) -> int | None:
        if self.last_to_date_cents is None:
            return None
        return self.to_date_cents - self.last_to_date_cents

    @property
    def over_budget(self) -> bool:
        return (
            self.budget_cents is not None
            and self.forecast_cents is not None
            and self.forecast_cents > self.budget_cents
        )


def _month_start(day: date, offset: int = 0) -> date:
    index = day.year * 12 + day.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


def _period(orgs: Sequence[OrgSpend], now: datetime) -> tuple[date, date]:
    """This billing period: the pending invoice's (the first one's), else ``now``'s
    calendar month (UTC), as Atlas's periods are."""
    for org in orgs:
        if org.pending is not None:
            start = org.pending.start_date.astimezone(UTC).date()
            end = org.pending.end_date.astimezone(UTC)
            last = (end - timedelta(microseconds=1)).date()
            return start, last + timedelta(days=1)
    today = now.astimezone(UTC).date()
    return _month_start(today), _month_start(today, 1)


def _daily(items: Iterable[LineItem], start: date, end: date) -> dict[date, int]:
    days: dict[date, int] = {}
    for item in items:
        if item.usage_date is not None and start <= item.usage_date < end:
            days[item.usage_date] = days.get(item.usage_date, 0) + item.amount_cents
    return days


def _cumulative(days: dict[date, int], start: date, count: int) -> tuple[int, ...]:
    total, out = 0, []
    for n in range(count):
        total += days.get(start + timedelta(days=n), 0)
        out.append(total)
    return tuple(out)


def _top(
    items: Sequence[LineItem],
    key: str,
    this: tuple[date, date],
    last: tuple[date, date] | None,
) -> tuple[Change, ...]:
    def totals(bounds: tuple[date, date]) -> dict[str, int]:
        found: dict[str, int] = {}
        for item in items:
            if item.usage_date is not None and bounds[0] <= item.usage_date < bounds[1]:
                name = item.project if key == "project" else item.sku
                found[name] = found.get(name, 0) + item.amount_cents
        return found

    now_totals = totals(this)
    before = totals(last) if last is not None else None
    ranked = sorted(now_totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    return tuple(
        Change(name, cents, None if before is None else before.get(name, 0))
        for name, cents in ranked
    )


def _covers(rule: Any, org_id: str) -> bool:
    return rule.orgs is None or org_id in rule.orgs


def _budget(orgs: Sequence[OrgSpend], rules: Sequence[Any]) -> tuple[int | None, tuple[str, ...]]:
    """The tightest enabled ``forecast`` budget covering each organization, summed over
    them (None unless every one has a budget), and the rules it comes from."""
    total, names = 0, []
    for org in orgs:
        budgets = [
            (rule.budget_cents, rule.name)
            for rule in rules
            if rule.type == "forecast" and rule.enabled and _covers(rule, org.org_id)
        ]
        if not budgets:
            return None, ()
        cents, name = min(budgets)
        total += cents
        names.append(name)
    return total, tuple(dict.fromkeys(names))


def _min_elapsed(orgs: Sequence[OrgSpend], rules: Sequence[Any]) -> timedelta:
    """How long a period must have run before the report forecasts it: the longest
    ``min_elapsed`` of the enabled ``forecast`` rules covering the organizations (the
    rule's default, 3 days, when none does), as the ``forecast`` rule itself waits."""
    from invoice_watch.config.rules import ForecastRule

    found = [
        rule.min_elapsed
        for rule in rules
        if rule.type == "forecast"
        and rule.enabled
        and any(_covers(rule, org.org_id) for org in orgs)
    ]
    default: timedelta = ForecastRule.model_fields["min_elapsed"].default
    return max(found, default=default)


def build_report(
    orgs: Sequence[OrgSpend],
    now: datetime,
    *,
    rules: Sequence[Any] = (),
    firing: Sequence[AlertEvent] = (),
    title: str | None = None,
) -> ReportData:
    """The report of ``orgs`` (one, or several for a combined report) as of ``now``.

    ``rules``: the configured rules (their ``forecast`` budgets count); ``firing``: the
    latest event of each firing alert (those of other organizations are left out).
    ``title`` defaults to "Spend report: <org name>" (or "<n> organizations")."""
    if not orgs:
        raise ValueError("a report needs at least one organization")
    start, end = _period(orgs, now)
    last_start = _month_start(start, -1)
    items = [item for org in orgs for item in org.items]
    today = now.astimezone(UTC).date()
    this_days = _daily(items, start, min(end, today + timedelta(days=1)))
    last_days = _daily(items, last_start, start)
    days = (max(this_days) - start).days + 1 if this_days else 0
    last_known = bool(last_days)
    last_to_date = sum(last_days.get(last_start + timedelta(days=n), 0) for n in range(days))
    # Last period up to the same day of the period as this one has reached.
    same_point = (last_start, min(start, last_start + timedelta(days=days))) if last_known else None
    pendings = [org.pending for org in orgs if org.pending is not None]
    billed = sum(p.amount_billed_cents for p in pendings) if pendings else None
    forecasts = [forecast(p, now) for p in pendings]
    projected = (
        sum(f for f in forecasts if f is not None)
        if pendings and len(pendings) == len(orgs) and None not in forecasts
        else None
    )
    early = _min_elapsed(orgs, rules)
    too_early = early if any(now - p.start_date < early for p in pendings) else None
    if too_early is not None:  # a day's spend extrapolated to a month says nothing
        projected = None
    budget, budget_rules = _budget(orgs, rules)
    ids = {org.org_id for org in orgs}
    alerts = sorted(
        (
            FiringAlert(e.rule, str(e.severity), e.org_name, e.summary, e.firing_since or e.at)
            for e in firing
            if e.org_id in ids
        ),
        key=lambda a: (a.since or now, a.rule),
    )
    names = tuple((org.org_id, org.org_name) for org in orgs)
    return ReportData(
        title=title
        or (
            f"Spend report: {orgs[0].org_name}"
            if len(orgs) == 1
            else f"Spend report: {len(orgs)} organizations"
        ),
        orgs=names,
        now=now,
        period_start=start,
        period_end=end,
        days=days,
        to_date_cents=sum(this_days.values()),
        last_to_date_cents=last_to_date if last_known else None,
        billed_cents=billed,
        forecast_cents=projected,
        budget_cents=budget,
        budget_rules=budget_rules,
        top_projects=_top(items, "project", (start, end), same_point),
        top_skus=_top(items, "sku", (start, end), same_point),
        firing=tuple(alerts),
        cumulative=_cumulative(this_days, start, days),
        last_cumulative=_cumulative(last_days, last_start, (start - last_start).days)
        if last_known
        else (),
        billing_urls=tuple(org.billing_url for org in orgs if org.billing_url),
        no_items=tuple(
            org.org_name
            for org in orgs
            if not any(i.usage_date is not None and start <= i.usage_date < end for i in org.items)
        ),
        too_early=too_early,
    )
