"""Tests of invoice_watch.anomaly: the usage_anomaly detection, pure, with tables of daily
series (flat, weekly pattern, a real spike, a slow ramp, a new project, missing days)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import pytest

from invoice_watch.anomaly import (
    DailySeries,
    Dimension,
    Params,
    detect,
    min_history,
    series,
)
from invoice_watch.types import LineItem

LAST = date(2026, 11, 20)  # the latest usage day of every series below (a Friday)
NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)  # its line items posted this morning
DAYS = 28


def daily(amounts: Sequence[int | None], last: date = LAST) -> dict[date, int]:
    """Dollars per day, oldest first, the last one on ``last``; None: no line item."""
    start = last - timedelta(days=len(amounts) - 1)
    return {
        start + timedelta(days=i): dollars * 100
        for i, dollars in enumerate(amounts)
        if dollars is not None
    }


def project(key: str, amounts: Sequence[int | None], last: date = LAST) -> DailySeries:
    return DailySeries(Dimension("project", key, f"Project {key}", key), daily(amounts, last))


def noisy(base: int, n: int = DAYS, seed: int = 1, spread: float = 0.03) -> list[int]:
    rng = random.Random(seed)
    return [round(base * (1 + rng.uniform(-spread, spread))) for _ in range(n)]


def weekly(weekday: int, weekend: int, n: int = DAYS, last: date = LAST) -> list[int]:
    start = last - timedelta(days=n - 1)
    return [weekend if (start + timedelta(days=i)).weekday() >= 5 else weekday for i in range(n)]


def sundays(weekday: int, sunday: int, n: int = DAYS, last: date = LAST) -> list[int]:
    start = last - timedelta(days=n - 1)
    return [sunday if (start + timedelta(days=i)).weekday() == 6 else weekday for i in range(n)]


def ramp(base: int, rate: float, n: int = DAYS) -> list[int]:
    return [round(base * (1 + rate) ** i) for i in range(n)]


def with_last(values: Sequence[int | None], last: int | None) -> list[int | None]:
    return [*values[:-1], last]


def gaps(values: Sequence[int | None], missing: set[int]) -> list[int | None]:
    """``values`` without the days at these offsets from the end (1 = the day before
    the last)."""
    n = len(values)
    return [None if n - 1 - i in missing else v for i, v in enumerate(values)]


SUNDAY = LAST + timedelta(days=(6 - LAST.weekday()) % 7)

# (case, series of each project in dollars per day, the keys that fire)
CASES: list[tuple[str, dict[str, Sequence[int | None]], set[str]]] = [
    ("flat", {"a": [1000] * DAYS}, set()),
    ("flat with noise", {"a": noisy(1000)}, set()),
    ("flat, small org, under min_increase", {"a": with_last([20] * DAYS, 110)}, set()),
    ("weekly pattern, quiet weekends", {"a": weekly(1000, 400)}, set()),
    (
        "weekly pattern with noise",
        {"a": [round(w * n / 1000) for w, n in zip(weekly(1000, 400), noisy(1000), strict=True)]},
        set(),
    ),
    ("a real spike", {"a": with_last(noisy(1000), 3000)}, {"a"}),
    ("a spike in one of two projects", {"a": noisy(1000), "b": with_last(noisy(500), 2500)}, {"b"}),
    ("a 10% rise is no anomaly", {"a": with_last(noisy(1000), 1100)}, set()),
    ("a spike on a small project", {"a": with_last([40] * DAYS, 400)}, {"a"}),
    ("a slow ramp, 3% a day", {"a": ramp(1000, 0.03)}, set()),
    ("a slow ramp, 5% a day", {"a": ramp(1000, 0.05)}, set()),
    ("a spike on top of a ramp", {"a": with_last(ramp(1000, 0.03), 6000)}, {"a"}),
    ("a new project over min_increase", {"a": noisy(1000), "new": [None] * 27 + [500]}, {"new"}),
    ("a new project under min_increase", {"a": noisy(1000), "new": [None] * 27 + [60]}, set()),
    ("a project back from a pause", {"a": noisy(1000), "b": [None] * 20 + [800] * 8}, set()),
    (
        "a cluster paused for half the window, resumed",
        {"a": noisy(1000), "b": [800] * 14 + [None] * 7 + [800] * 7},
        set(),
    ),
    ("missing days are not zero spend", {"a": gaps([1000] * DAYS, {1, 2, 3, 5, 8, 9})}, set()),
    (
        "a spike after missing days",
        {"a": with_last(gaps(noisy(1000), {1, 2, 3, 5, 8, 9}), 2600)},
        {"a"},
    ),
]


@pytest.mark.parametrize(("case", "amounts", "fires"), CASES, ids=[case for case, _, _ in CASES])
def test_detect_fires_on_what_is_unusual_for_the_dimension(
    case: str, amounts: dict[str, Sequence[int | None]], fires: set[str]
):
    all_series = {key: project(key, values) for key, values in amounts.items()}

    detection = detect(NOW, all_series, Params())

    assert detection.day == LAST, detection.reason
    assert set(detection.holding) == fires
    assert {a.key for a in detection.fired} == fires
    assert detection.resolved == ()


@pytest.mark.parametrize("weekday", range(7))
def test_detect_weekly_pattern_fires_on_no_day_of_the_week(weekday: int):
    last = LAST + timedelta(days=(weekday - LAST.weekday()) % 7)
    for amounts in (weekly(1000, 400, last=last), sundays(1000, 3000, last=last)):
        one = DailySeries(Dimension("project", "a", "A"), daily(amounts, last))

        detection = detect(
            datetime.combine(last, datetime.min.time(), UTC) + timedelta(days=1),
            {"a": one},
            Params(),
        )

        assert detection.day == last
        assert detection.holding == {}


def test_detect_a_spike_on_a_busy_weekday_counts_against_that_weekday():
    """Sundays usually cost $3,000: a Sunday at $3,300 is usual, one at $6,000 is not."""
    usual = sundays(1000, 3000, last=SUNDAY)
    now = datetime.combine(SUNDAY, datetime.min.time(), UTC) + timedelta(days=1)

    def verdict(last: int) -> set[str]:
        one = DailySeries(Dimension("project", "a", "A"), daily(with_last(usual, last), SUNDAY))
        return set(detect(now, {"a": one}, Params()).holding)

    assert verdict(3300) == set()
    assert verdict(6000) == {"a"}


def test_detect_anomaly_carries_the_facts_a_message_needs():
    one = DailySeries(
        Dimension("project", "5f1e0c0a9b8d7e6f5a4b3c2d", "Web", "5f1e0c0a9b8d7e6f5a4b3c2d"),
        daily(with_last([1000] * DAYS, 3000)),
        {
            "orders · ATLAS_AWS_INSTANCE_M40": daily(with_last([800] * DAYS, 2700)),
            "orders · ATLAS_AWS_DATA_TRANSFER": daily(with_last([150] * DAYS, 250)),
            "logs · ATLAS_AWS_BACKUP": daily(with_last([50] * DAYS, 50)),
        },
    )

    (anomaly,) = detect(NOW, {one.dimension.key: one}, Params()).fired

    assert (anomaly.day, anomaly.amount_cents, anomaly.baseline_cents) == (LAST, 3000_00, 1000_00)
    assert anomaly.increase_cents == 2000_00 and not anomaly.new
    assert anomaly.threshold_cents == 1000_00 + 200_00  # relative floor: 20% of expected
    assert anomaly.history_days == 14
    assert [(c.name, c.increase_cents) for c in anomaly.contributors] == [
        ("orders · ATLAS_AWS_INSTANCE_M40", 1900_00),
        ("orders · ATLAS_AWS_DATA_TRANSFER", 100_00),
    ]
    assert anomaly.summary() == (
        "Unusual spend: project Web (5f1e0c0a9b8d7e6f5a4b3c2d) cost $3,000.00 on "
        "2026-11-20, $2,000.00 over its usual $1,000.00 a day."
    )


def test_detect_new_project_says_it_is_new():
    all_series = {
        "a": project("a", noisy(1000)),
        "new": project("new", [None] * 27 + [500]),
    }

    (anomaly,) = detect(NOW, all_series, Params()).fired

    assert anomaly.new and anomaly.baseline_cents == 0
    assert anomaly.summary().startswith("New spend: project Project new (new) cost $500.00")
    assert "no spend in the 14 days before" in anomaly.summary()


@pytest.mark.parametrize(
    ("spike", "low", "medium", "high"),
    [(1150, False, False, True), (1300, False, True, True), (1700, True, True, True)],
)
def test_detect_sensitivity_levels_fire_on_smaller_deviations_as_they_rise(
    spike: int, low: bool, medium: bool, high: bool
):
    all_series = {"a": project("a", with_last([1000] * DAYS, spike))}

    fired = {
        level: bool(detect(NOW, all_series, Params(sensitivity=level)).holding)
        for level in ("low", "medium", "high")
    }

    assert fired == {"low": low, "medium": medium, "high": high}


def test_detect_min_increase_is_a_floor_in_cents():
    all_series = {"a": project("a", with_last([20] * DAYS, 110))}

    assert detect(NOW, all_series, Params(min_increase_cents=100_00)).holding == {}
    assert set(detect(NOW, all_series, Params(min_increase_cents=50_00)).holding) == {"a"}


def test_detect_baseline_is_the_trailing_window_only():
    """A spike older than the window is forgotten; the window is `baseline` days."""
    amounts = [5000] * 10 + [1000] * 18
    all_series = {"a": project("a", with_last(amounts, 1000))}

    assert detect(NOW, all_series, Params(baseline_days=14)).holding == {}
    long = detect(NOW, {"a": project("a", with_last(amounts, 4000))}, Params(baseline_days=28))
    assert long.holding["a"].history_days == 27


# ---- the day judged, and when nothing is judged --------------------------------------


def test_detect_judges_the_latest_posted_day_when_today_has_not_posted():
    all_series = {"a": project("a", with_last(noisy(1000), 3000))}

    for days_later in (1, 2, 4):
        now = NOW + timedelta(days=days_later - 1)
        assert detect(now, all_series, Params()).day == LAST


def test_detect_judges_nothing_when_line_items_stopped_coming():
    all_series = {"a": project("a", with_last(noisy(1000), 3000))}

    detection = detect(NOW + timedelta(days=5), all_series, Params(), firing={"a"})

    assert detection.day is None
    assert (detection.holding, detection.fired, detection.resolved) == ({}, (), ())
    assert detection.reason is not None and "2026-11-20, is 6 days old" in detection.reason


@pytest.mark.parametrize("posted", [0, 1, 6])
def test_detect_judges_nothing_without_enough_history(posted: int):
    amounts: list[int | None] = [None] * (DAYS - posted - 1) + [1000] * posted + [3000]
    all_series = {"a": project("a", amounts), "b": project("b", [None] * 27 + [900])}

    detection = detect(NOW, all_series, Params(), firing={"a"})

    assert posted < min_history(14) == 7
    assert detection.day is None
    assert detection.resolved == () and detection.fired == ()
    assert detection.reason is not None and "at least 7 are needed" in detection.reason


def test_detect_without_line_items_judges_nothing():
    detection = detect(NOW, {}, Params(), firing={"a"})

    assert detection.day is None and detection.resolved == ()
    assert detection.reason == "no daily line items yet"


def test_detect_never_judges_todays_partial_day_nor_from_a_clock_set_back():
    """Today's UTC day is still being posted: never judged (a line item dated today once
    made a spike still going on resolve). A usage day after `now` means the wall clock
    was set back: nothing is judged (it once judged an earlier day, resolving the
    alert, then fired it again when the clock was put right)."""
    amounts = with_last([1000] * DAYS, 3000)
    all_series = {"a": project("a", amounts)}

    assert detect(NOW, all_series, Params()).day == LAST
    today = detect(datetime(2026, 11, 20, 23, 0, tzinfo=UTC), all_series, Params())
    assert today.day == LAST - timedelta(days=1) and today.holding == {}
    set_back = detect(datetime(2026, 11, 19, 12, 0, tzinfo=UTC), all_series, Params())
    assert set_back.day is None and "wall clock" in (set_back.reason or "")


def test_detect_judges_the_day_before_a_partly_posted_latest_day():
    """The latest day is judged only once every part seen the day before has posted:
    while the spiking cluster's line items for the 21st have not come (the others'
    have), the 20th (its spike) is still judged: no RESOLVED, then FIRING again."""
    items = [
        LineItem("Web", sku, cluster, cents * 100, "p1", LAST - timedelta(days=n))
        for n in range(DAYS)
        for cluster, sku, cents in (("orders", "M40", 3000 if n == 0 else 1000),
                                    ("web", "M10", 200))
    ]  # fmt: skip
    partial = [LineItem("Web", "M10", "web", 200_00, "p1", LAST + timedelta(days=1))]
    later = NOW + timedelta(days=1)
    spike = detect(NOW, series(items, "cluster"), Params())
    assert set(spike.holding) == {"p1/orders"}

    still = detect(later, series(items + partial, "cluster"), Params(), firing={"p1/orders"})
    assert still.day == LAST and set(still.holding) == {"p1/orders"} and still.resolved == ()

    posted = [*partial, LineItem("Web", "M40", "orders", 1000_00, "p1", LAST + timedelta(days=1))]
    back = detect(later, series(items + posted, "cluster"), Params(), firing={"p1/orders"})
    assert back.day == LAST + timedelta(days=1) and [r.key for r in back.resolved] == ["p1/orders"]


# ---- firing and resolving --------------------------------------------------------------


def test_detect_a_firing_anomaly_is_not_fired_again_while_it_holds():
    all_series = {"a": project("a", with_last(noisy(1000), 3000))}

    detection = detect(NOW, all_series, Params(), firing={"a"})

    assert set(detection.holding) == {"a"}
    assert detection.fired == () and detection.resolved == ()


def test_detect_resolves_when_the_daily_spend_falls_back():
    amounts = [*with_last(noisy(1000), 3000), 1010]  # the spike, then a usual day
    all_series = {"a": project("a", amounts, LAST + timedelta(days=1))}

    detection = detect(NOW + timedelta(days=1), all_series, Params(), firing={"a"})

    (recovery,) = detection.resolved
    assert detection.holding == {} and detection.fired == ()
    assert (recovery.key, recovery.day, recovery.amount_cents) == (
        "a",
        LAST + timedelta(days=1),
        1010_00,
    )
    assert recovery.baseline_cents is not None and 970_00 <= recovery.baseline_cents <= 1030_00
    assert recovery.threshold_cents is not None and recovery.threshold_cents > 1010_00
    assert recovery.summary().startswith("project Project a (a) cost $1,010.00 on 2026-11-21")


def test_detect_a_spike_in_the_window_does_not_hide_the_next_one():
    amounts = [*with_last(noisy(1000), 3000), 1000, 1000, 3100]
    all_series = {"a": project("a", amounts, LAST + timedelta(days=3))}

    detection = detect(NOW + timedelta(days=3), all_series, Params())

    assert set(detection.holding) == {"a"}
    assert 970_00 <= detection.holding["a"].baseline_cents <= 1030_00


def test_detect_resolves_a_dimension_that_has_no_line_item_any_more():
    all_series = {"a": project("a", noisy(1000))}

    (recovery,) = detect(NOW, all_series, Params(), firing={"gone"}).resolved

    assert (recovery.key, recovery.amount_cents, recovery.dimension) == ("gone", 0, None)
    assert recovery.summary() == "gone cost $0.00 on 2026-11-20."


# ---- series from daily line items -------------------------------------------------------


def _items() -> list[LineItem]:
    day1, day2 = date(2026, 11, 1), date(2026, 11, 2)
    web, api = "5f1e0c0a9b8d7e6f5a4b3c2d", "60a1b2c3d4e5f60718293a4b"

    def item(project_id: str, cluster: str, sku: str, cents: int, day: date | None) -> LineItem:
        name = {web: "Web", api: "API"}[project_id]
        return LineItem(name, sku, cluster, cents, project_id=project_id, usage_date=day)

    return [
        item(web, "orders", "M40", 100, day1),
        item(web, "orders", "M40", 110, day2),
        item(web, "orders", "TRANSFER", 5, day2),
        item(web, "logs", "M40", 40, day2),
        item(api, "orders", "M40", 70, day2),  # the same cluster name in another project
        item(api, "orders", "M40", 9999, None),  # a whole period's line: not daily
    ]


def test_series_by_project_sums_each_day_and_splits_by_cluster_and_sku():
    by_project = series(_items(), "project")

    web = by_project["5f1e0c0a9b8d7e6f5a4b3c2d"]
    assert web.dimension == Dimension(
        "project", "5f1e0c0a9b8d7e6f5a4b3c2d", "Web", "5f1e0c0a9b8d7e6f5a4b3c2d"
    )
    assert web.days == {date(2026, 11, 1): 100, date(2026, 11, 2): 155}
    assert set(web.parts) == {"orders · M40", "orders · TRANSFER", "logs · M40"}
    assert by_project["60a1b2c3d4e5f60718293a4b"].days == {date(2026, 11, 2): 70}


def test_series_by_cluster_keeps_clusters_of_different_projects_apart():
    by_cluster = series(_items(), "cluster")

    assert set(by_cluster) == {
        "5f1e0c0a9b8d7e6f5a4b3c2d/orders",
        "5f1e0c0a9b8d7e6f5a4b3c2d/logs",
        "60a1b2c3d4e5f60718293a4b/orders",
    }
    orders = by_cluster["5f1e0c0a9b8d7e6f5a4b3c2d/orders"]
    assert orders.dimension.label == "cluster orders of project Web (5f1e0c0a9b8d7e6f5a4b3c2d)"
    assert set(orders.parts) == {"M40", "TRANSFER"}


def test_series_by_sku_spans_projects():
    by_sku = series(_items(), "sku")

    assert by_sku["M40"].days == {date(2026, 11, 1): 100, date(2026, 11, 2): 220}
    assert set(by_sku["M40"].parts) == {"Web · orders", "Web · logs", "API · orders"}
    assert by_sku["M40"].dimension.label == "SKU M40"


def test_params_refuse_what_detection_cannot_use():
    with pytest.raises(ValueError, match="at least 3"):
        Params(baseline_days=2)
    with pytest.raises(ValueError, match="negative"):
        Params(min_increase_cents=-1)
    with pytest.raises(ValueError, match="sensitivity"):
        Params(sensitivity="extreme")  # type: ignore[arg-type]


def test_series_names_a_dimension_as_its_latest_line_item_does():
    """A project renamed mid-period: its series bears the new name, whatever the order
    of the line items (this period's are read before last period's)."""
    items = [  # as the state gives them: this period oldest day first, then the last
        LineItem("Old name", "M10", "c0", 100, "p1", LAST - timedelta(days=3)),
        LineItem("New name", "M10", "c0", 100, "p1", LAST),
        LineItem("Old name", "M10", "c0", 100, "p1", LAST - timedelta(days=40)),
    ]
    [one] = series(items, "project").values()
    assert one.dimension.project == "New name"
