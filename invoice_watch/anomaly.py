"""The ``usage_anomaly`` rule's detection: which projects, clusters or SKUs spent
unusually much on their latest day of usage, and what drove it. Pure: ``now`` and the
daily series in, verdicts out (issue 19 §1).

Each dimension (``by: project | cluster | sku``) has a daily series of cents, built from
the daily line items of ``lineItems:search`` (:func:`series`). The day judged is a
complete *posted* day (Atlas posts a day's charges the next day, not all at once): the
latest day before today's UTC day (today's usage is still coming in: never judged) that
any dimension has usage for, when every part (the finest line items: cluster and SKU of
a project, project and cluster of a SKU) that had a line item on the posted day before
it has one on it too; otherwise that day is still being posted and the posted day
before it is judged (a part that stopped for good delays the judgement by one day
only: the next day is complete against it). A usage day later than ``now``'s means the
wall clock was set back: nothing is judged until it catches up (a clock step never
makes an anomaly resolve, :mod:`~invoice_watch.elapsed`). Its amount is compared with
the dimension's own recent past, robustly:

- the **window** is the posted days among the ``baseline`` calendar days before it (a
  day with no line items at all was not posted, or not fetched: it is left out, never
  counted as a day of zero spend; a posted day on which the dimension has no line item
  is a day of zero spend for it);
- **expected** spend is the median of the window, or the median of the same weekdays
  in it when that is higher (at least two of them: a weekly batch on Sundays is usual
  on Sundays);
- **spread** is the median absolute deviation (MAD) of the window, scaled by 1.4826 so
  that it estimates a standard deviation;
- the day is anomalous when its amount is over ``expected`` by more than each of:
  ``min_increase``, ``z`` spreads, and ``relative`` times ``expected`` (``z`` and
  ``relative`` are the rule's ``sensitivity``, :data:`SENSITIVITY`). One spike moves
  neither the median nor the MAD, so a day after a spike is judged against the usual
  spend, and a slow ramp moves both along with it (a trend is the ``forecast`` rule's);
- a **new** dimension (no spend in the whole window) is anomalous when its day is over
  ``min_increase`` on its own.

Nothing is judged (no alert fires or resolves) while the organization has fewer than
:func:`min_history` posted days in the window, or when its latest posted day is more
than :data:`MAX_AGE_DAYS` days before ``now`` (line items stopped coming: that is a
fetch problem, not a return to normal). An anomaly holds while its day is the latest
posted day; it resolves when a later posted day is back under the threshold.

Amounts are integer cents throughout; days are UTC dates (``usageDate``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal

from invoice_watch.format import usd
from invoice_watch.types import LineItem

By = Literal["project", "cluster", "sku"]
Sensitivity = Literal["low", "medium", "high"]

# sensitivity -> (z: spreads over expected, relative: fraction of expected), each a floor
# the increase must clear (with min_increase). "high" fires on smaller deviations.
SENSITIVITY: dict[str, tuple[float, float]] = {
    "low": (5.0, 0.5),
    "medium": (3.5, 0.2),
    "high": (2.5, 0.1),
}
MAD_SCALE = 1.4826  # MAD -> standard deviation of a normal distribution
# The latest posted day may be this many days before `now` (a day posts the next day,
# sometimes later); older, nothing is judged.
MAX_AGE_DAYS = 4
TOP_CONTRIBUTORS = 3
DEFAULT_BASELINE_DAYS = 14
DEFAULT_MIN_INCREASE_CENTS = 100_00


@dataclass(frozen=True, slots=True)
class Dimension:
    """What one series measures. ``key`` is its identity (an alert's subject): the
    project's id (``project``), project id and cluster name (``cluster``), or the SKU
    (``sku``: across the organization's projects)."""

    by: By
    key: str
    project: str = ""
    project_id: str = ""
    cluster: str = ""
    sku: str = ""

    @property
    def label(self) -> str:
        """How a message names it: ``project Web (5f1e…)``, ``cluster orders of project
        Web (5f1e…)``, ``SKU ATLAS_AWS_INSTANCE_M40``."""
        project = f"project {self.project}" + (
            f" ({self.project_id})" if self.project_id and self.project_id != self.project else ""
        )
        if self.by == "project":
            return project
        if self.by == "cluster":
            return f"cluster {self.cluster or '—'} of {project}"
        return f"SKU {self.sku}"


@dataclass(frozen=True)
class DailySeries:
    """One dimension's spend per usage day (cents; a day absent: no line item), and
    the same split by what it is made of (``parts``: contributor -> cents per day;
    project: cluster and SKU, cluster: SKU, SKU: project and cluster)."""

    dimension: Dimension
    days: Mapping[date, int]
    parts: Mapping[str, Mapping[date, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Params:
    """A ``usage_anomaly`` rule's knobs: ``baseline_days`` of history, the smallest
    increase that counts (cents) and the sensitivity level (:data:`SENSITIVITY`)."""

    baseline_days: int = DEFAULT_BASELINE_DAYS
    min_increase_cents: int = DEFAULT_MIN_INCREASE_CENTS
    sensitivity: Sensitivity = "medium"

    def __post_init__(self) -> None:
        if self.baseline_days < 3:
            raise ValueError("baseline_days must be at least 3")
        if self.min_increase_cents < 0:
            raise ValueError("min_increase_cents must not be negative")
        if self.sensitivity not in SENSITIVITY:
            raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITY)}")


def min_history(baseline_days: int) -> int:
    """Posted days the window must hold before anything is judged: half of it, at least
    3 (a median of fewer says little)."""
    return max(3, baseline_days // 2)


@dataclass(frozen=True, slots=True)
class Contributor:
    """One part of an anomalous day: its amount that day and its own expected spend
    (the median of the window)."""

    name: str
    amount_cents: int
    baseline_cents: int

    @property
    def increase_cents(self) -> int:
        return self.amount_cents - self.baseline_cents


@dataclass(frozen=True)
class Anomaly:
    """A dimension whose ``day`` is over its ``threshold_cents``: the facts a message
    needs. ``baseline_cents`` is the expected spend, ``spread_cents`` the scaled MAD,
    ``history_days`` the posted days it was computed from; ``new``: no spend at all in
    the window. ``contributors``: the parts that grew most that day (at most
    :data:`TOP_CONTRIBUTORS`)."""

    dimension: Dimension
    day: date
    amount_cents: int
    baseline_cents: int
    spread_cents: int
    threshold_cents: int
    history_days: int
    new: bool = False
    contributors: tuple[Contributor, ...] = ()

    @property
    def key(self) -> str:
        return self.dimension.key

    @property
    def increase_cents(self) -> int:
        return self.amount_cents - self.baseline_cents

    def summary(self) -> str:
        """One sentence for a FIRING message."""
        name = self.dimension.label
        if self.new:
            return (
                f"New spend: {name} cost {usd(self.amount_cents)} on {self.day.isoformat()}, "
                f"with no spend in the {self.history_days} days before."
            )
        return (
            f"Unusual spend: {name} cost {usd(self.amount_cents)} on {self.day.isoformat()}, "
            f"{usd(self.increase_cents)} over its usual {usd(self.baseline_cents)} a day."
        )


@dataclass(frozen=True)
class Recovery:
    """A firing anomaly whose dimension's latest posted day is back under its
    threshold (``dimension`` None: no line item of it any more, an amount of 0)."""

    key: str
    day: date
    amount_cents: int
    threshold_cents: int | None
    baseline_cents: int | None
    dimension: Dimension | None = None

    def summary(self) -> str:
        """One sentence for a RESOLVED message."""
        name = self.dimension.label if self.dimension is not None else self.key
        usual = (
            f", back under {usd(self.threshold_cents)}" if self.threshold_cents is not None else ""
        )
        return f"{name} cost {usd(self.amount_cents)} on {self.day.isoformat()}{usual}."


@dataclass(frozen=True)
class Detection:
    """The verdict of one organization's series. ``day`` None: nothing was judged
    (``reason`` says why), and no alert fires or resolves. ``holding``: every dimension
    anomalous on ``day``, by key; ``fired``: those not already firing; ``resolved``:
    firing keys back to normal on ``day``; ``below``: every dimension not anomalous on
    ``day``, by key (its amount that day and threshold)."""

    day: date | None
    holding: Mapping[str, Anomaly] = field(default_factory=dict)
    fired: tuple[Anomaly, ...] = ()
    resolved: tuple[Recovery, ...] = ()
    reason: str | None = None
    # ``day`` None because the history is still short (no posted day yet, fewer than
    # :func:`min_history`): the normal first days of a fresh install, not a fault.
    startup: bool = False
    # Every other dimension's facts on ``day`` (under its threshold), by key: what a
    # RESOLVED message says of it.
    below: Mapping[str, Recovery] = field(default_factory=dict)


# ---- series from line items ------------------------------------------------------------


def dimension_of(item: LineItem, by: By) -> Dimension:
    """The dimension a daily line item belongs to."""
    project_id = item.project_id or item.project
    if by == "project":
        return Dimension("project", project_id, item.project, item.project_id)
    if by == "cluster":
        key = f"{project_id}/{item.cluster}"
        return Dimension("cluster", key, item.project, item.project_id, cluster=item.cluster)
    return Dimension("sku", item.sku, sku=item.sku)


def _part_of(item: LineItem, by: By) -> str:
    if by == "project":
        return f"{item.cluster} · {item.sku}" if item.cluster else item.sku
    if by == "cluster":
        return item.sku
    return f"{item.project} · {item.cluster}" if item.cluster else item.project


def series(items: Iterable[LineItem], by: By) -> dict[str, DailySeries]:
    """The daily series of every dimension the line items show, by key, named as its
    latest line item names it (a project renamed mid-period: its new name). Items
    without a ``usage_date`` (a whole period's lines) are left out."""
    days: dict[str, dict[date, int]] = {}
    parts: dict[str, dict[str, dict[date, int]]] = {}
    dimensions: dict[str, Dimension] = {}
    named_on: dict[str, date] = {}  # key -> the day its dimension's names are of
    for item in items:
        if item.usage_date is None:
            continue
        dimension = dimension_of(item, by)
        key = dimension.key
        if key not in named_on or item.usage_date >= named_on[key]:  # the latest name
            dimensions[key], named_on[key] = dimension, item.usage_date
        per_day = days.setdefault(key, {})
        per_day[item.usage_date] = per_day.get(item.usage_date, 0) + item.amount_cents
        part = parts.setdefault(key, {}).setdefault(_part_of(item, by), {})
        part[item.usage_date] = part.get(item.usage_date, 0) + item.amount_cents
    return {key: DailySeries(dimensions[key], days[key], parts[key]) for key in sorted(dimensions)}


# ---- detection ---------------------------------------------------------------------------


def _median(values: list[int]) -> int:
    """The median of ``values`` (not empty), in whole cents (the mean of the middle two,
    rounded down)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) // 2


def posted_days(all_series: Iterable[DailySeries]) -> set[date]:
    """The days any series has a line item for."""
    return {day for one in all_series for day in one.days}


@dataclass(frozen=True)
class _Verdict:
    anomaly: Anomaly | None
    threshold_cents: int
    baseline_cents: int


def _judge(one: DailySeries, day: date, window: list[date], params: Params) -> _Verdict:
    z, relative = SENSITIVITY[params.sensitivity]
    amount = one.days.get(day, 0)
    values = [one.days.get(d, 0) for d in window]
    if not any(values):  # nothing spent in the window: a new dimension
        threshold = params.min_increase_cents
        if amount <= threshold:
            return _Verdict(None, threshold, 0)
        anomaly = Anomaly(
            one.dimension,
            day,
            amount,
            baseline_cents=0,
            spread_cents=0,
            threshold_cents=threshold,
            history_days=len(window),
            new=True,
            contributors=_contributors(one, day, window),
        )
        return _Verdict(anomaly, threshold, 0)
    median = _median(values)
    spread = math.ceil(MAD_SCALE * _median([abs(v - median) for v in values]))
    same_weekday = [v for d, v in zip(window, values, strict=True) if d.weekday() == day.weekday()]
    expected = max(median, _median(same_weekday)) if len(same_weekday) >= 2 else median
    margin = max(params.min_increase_cents, math.ceil(z * spread), math.ceil(relative * expected))
    threshold = expected + margin
    if amount <= threshold:
        return _Verdict(None, threshold, expected)
    anomaly = Anomaly(
        one.dimension,
        day,
        amount,
        baseline_cents=expected,
        spread_cents=spread,
        threshold_cents=threshold,
        history_days=len(window),
        contributors=_contributors(one, day, window),
    )
    return _Verdict(anomaly, threshold, expected)


def _contributors(one: DailySeries, day: date, window: list[date]) -> tuple[Contributor, ...]:
    """The parts that grew most on ``day`` against their own median of the window (the
    largest amounts when none grew)."""
    found = [
        Contributor(
            name,
            per_day.get(day, 0),
            _median([per_day.get(d, 0) for d in window]) if window else 0,
        )
        for name, per_day in one.parts.items()
    ]
    grew = [c for c in found if c.increase_cents > 0]
    if grew:
        ranked = sorted(grew, key=lambda c: (-c.increase_cents, c.name))
    else:
        ranked = sorted(found, key=lambda c: (-c.amount_cents, c.name))
    return tuple(ranked[:TOP_CONTRIBUTORS])


def _complete(all_series: Iterable[DailySeries], day: date, before: date) -> bool:
    """Whether ``day`` looks fully posted: every part of every series (its finest line
    items: cluster and SKU of a project, ...) that has a line item on ``before`` has one
    on ``day`` too."""
    for one in all_series:
        for per_day in one.parts.values() or (one.days,):
            if before in per_day and day not in per_day:
                return False
    return True


def detect(
    now: datetime,
    all_series: Mapping[str, DailySeries],
    params: Params,
    *,
    firing: Collection[str] = (),
    posted: Collection[date] | None = None,
) -> Detection:
    """Judge every series' latest posted day (see the module docstring).

    ``all_series``: one organization's daily series of one ``by``, by dimension key
    (:func:`series`); ``firing``: the keys whose alerts fire now; ``posted``: the days
    whose line items were read (default: the days any series has). Returns the
    :class:`Detection`: what holds, what fires anew, what resolves (with the facts a
    message needs).
    """
    days = set(posted) if posted is not None else posted_days(all_series.values())
    today = now.date()
    ahead = [d for d in days if d > today]
    if ahead:  # the wall clock was set back: no day is judged from it (elapsed.py)
        return Detection(
            None,
            reason=f"the wall clock reads {today.isoformat()}, earlier than the usage day "
            f"{max(ahead).isoformat()} held: nothing is judged until it catches up",
        )
    days = {d for d in days if d < today}  # today's usage is still coming in
    if not days:
        return Detection(None, reason="no daily line items yet", startup=True)
    day = max(days)
    before = max((d for d in days if d < day), default=None)
    if before is not None and not _complete(all_series.values(), day, before):
        day = before  # the latest day is still being posted: the one before is judged
    if (today - day).days > MAX_AGE_DAYS:
        return Detection(
            None,
            reason=f"the latest usage day, {day.isoformat()}, is {(today - day).days} days "
            f"old: line items have not come since",
        )
    start = day - timedelta(days=params.baseline_days)
    window = sorted(d for d in days if start <= d < day)
    needed = min_history(params.baseline_days)
    if len(window) < needed:
        return Detection(
            None,
            reason=f"{len(window)} day(s) of usage before {day.isoformat()}; "
            f"at least {needed} are needed",
            startup=True,
        )
    holding: dict[str, Anomaly] = {}
    verdicts: dict[str, _Verdict] = {}
    for key, one in all_series.items():
        verdict = _judge(one, day, window, params)
        verdicts[key] = verdict
        if verdict.anomaly is not None:
            holding[key] = verdict.anomaly
    fired = tuple(holding[key] for key in sorted(holding) if key not in firing)
    resolved = []
    for key in sorted(set(firing) - set(holding)):
        one_series = all_series.get(key)
        verdict_of = verdicts.get(key)
        resolved.append(
            Recovery(
                key,
                day,
                one_series.days.get(day, 0) if one_series is not None else 0,
                verdict_of.threshold_cents if verdict_of is not None else None,
                verdict_of.baseline_cents if verdict_of is not None else None,
                one_series.dimension if one_series is not None else None,
            )
        )
    below = {
        key: Recovery(
            key,
            day,
            all_series[key].days.get(day, 0),
            verdict.threshold_cents,
            verdict.baseline_cents,
            all_series[key].dimension,
        )
        for key, verdict in verdicts.items()
        if key not in holding
    }
    return Detection(day, holding, fired, tuple(resolved), below=below)
