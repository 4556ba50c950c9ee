"""The usage_anomaly rule end to end against the simulator (issue 19 §1): the demo
scenario's spike (yesterday, the `orders` cluster's M40 at 5 times its usual day) fires
one alert keyed by rule, organization and cluster, delivered through the outbox, and
resolves once a later day is back to normal; line items are fetched at most once per
`usage.refresh` across polls (and across a restart); a failing `lineItems:search` never
fails the invoice read; the CSV is read where the search is not served."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.config import Config, load
from invoice_watch.cycle import CycleResult
from invoice_watch.simulator import Simulator, demo_scenario
from invoice_watch.store.records import Silence
from invoice_watch.types import EventKind
from tests.test_convergence import Recorder

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)  # a Saturday: usage up to Friday the 20th
PROD = "5f8a1c2e9b3d4a6f7e0c1b2a"
ANALYTICS = "6a7b8c9d0e1f2a3b4c5d6e7f"
SEARCH = "lineItems:search"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    scenario = demo_scenario(now=NOW)
    # The spike on a fixed day (the 20th), not "the latest day": a day later, the latest
    # day is a usual one again.
    for item in scenario.invoice("prod-pending").line_items:
        if item.spike_day is not None:
            item.spike_day = 20
    async with Simulator(scenario, clock=clock) as simulator:
        yield simulator


def config_of(sim: Simulator, tmp: Path, **extra: Any) -> Config:
    data = {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 0,
        },
        "organizations": [
            {"id": PROD, "name": "Production"},
            {"id": ANALYTICS, "name": "Analytics"},
        ],
        "state": {"path": str(tmp / "state.db")},
        "poll": {"interval": "15m"},
        "notifiers": {"console": {"type": "console"}},
        "rules": [
            {"name": "spend-spike", "type": "usage_anomaly", "by": "cluster", "min_increase": 50,
             "notify": ["console"]},
        ],
    }  # fmt: skip
    data.update(extra)
    return load(yaml.safe_dump(data), filename="usage.yaml", env={}, base_dir=tmp)


def searches(sim: Simulator) -> int:
    return sum(1 for r in sim.requests if r.path.endswith(SEARCH))


def csvs(sim: Simulator) -> int:
    return sum(1 for r in sim.requests if r.path.endswith("/csv"))


async def run_cycle(app: App) -> CycleResult:
    """One cycle, and the line items stage it started (its own task) to its end."""
    result = await app.run_cycle()
    assert await app.cycles.line_items_done(within=30)
    return result


async def cycle(app: App, recorder: Recorder) -> list[tuple[EventKind, str]]:
    """One cycle (its line items stage too), then delivery; the (kind, key) of what the
    notifier got."""
    before = len(recorder.sent)
    await run_cycle(app)
    await app.deliverer.drain(0)
    return [(e.kind, e.key) for e in recorder.sent[before:]]


async def test_e2e_usage_anomaly_fires_on_the_demo_spike_and_resolves_when_it_falls_back(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    recorder = Recorder()
    config = config_of(sim, tmp_path)
    project_id = sim.scenario.invoice("prod-pending").line_items[0].project_id
    key = f"spend-spike/{PROD}/cluster:{project_id}/orders"
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        assert await cycle(app, recorder) == []  # the invoices first; line items after
        fetched = searches(sim)
        assert fetched >= 2  # both organizations' pending invoices (and last month's)
        sent = await cycle(app, recorder)
        assert [k for k in sent if k[1].startswith("spend-spike/")] == [(EventKind.FIRING, key)]
        [firing] = [e for e in recorder.sent if e.key == key]
        assert firing.rule_type == "usage_anomaly"
        details = dict(firing.details)
        assert details["Cluster"] == "orders"
        assert details["Project"].endswith(")") and "(" in details["Project"]  # name (id)
        assert details["Usage day"] == "2026-11-20"
        assert details["Top contributors"].startswith("ATLAS AWS Instance M40: ")
        assert "Unusual spend: cluster orders of project" in firing.summary
        for _ in range(4):  # an hour of polls: no line item fetched again, nothing sent
            clock.advance(timedelta(minutes=15))
            assert await cycle(app, recorder) == []
        assert searches(sim) == fetched

    # A restart within usage.refresh fetches nothing (the time is in the state).
    clock.advance(timedelta(minutes=15))
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        assert await cycle(app, recorder) == []
        assert searches(sim) == fetched
        # A day later the line items are due again; the 21st is a usual day.
        clock.advance(timedelta(days=1))
        assert await cycle(app, recorder) == []
        assert searches(sim) > fetched
        assert await cycle(app, recorder) == [(EventKind.RESOLVED, key)]
        resolved = recorder.sent[-1]
        assert "back under the anomaly threshold" in resolved.summary
        assert "cluster orders" in resolved.summary


async def test_e2e_a_failing_line_item_search_never_fails_the_invoice_read(
    sim: Simulator, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = config_of(sim, tmp_path)
    sim.faults.status(500, path=f"*/{SEARCH}", times=1000)
    caplog.set_level(logging.INFO)
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        result = await run_cycle(app)
        assert result.orgs_failed == [] and result.orgs_ok == 2
        read = app.store.usage.read_state(PROD)
        assert read is not None and read.fetched_at is None and "500" in (read.last_error or "")
        failures = app.metrics.registry.get_sample_value(
            "invoice_watch_line_item_fetch_failures_total", {"org": PROD}
        )
        assert failures == 1
        tried = searches(sim)
        for _ in range(3):  # polls within the hour after a failure try nothing again
            clock.advance(timedelta(minutes=15))
            assert (await run_cycle(app)).orgs_failed == []
        assert searches(sim) == tried
        clock.advance(timedelta(minutes=20))
        await run_cycle(app)
        assert searches(sim) > tried  # tried again after an hour
    warned = [r for r in caplog.records if "line items could not be read" in r.getMessage()]
    assert len(warned) == 2  # once per organization, not once per attempt
    # The rule cannot judge either organization: one WARNING each, and `status` says why.
    unjudged = [r for r in caplog.records if "cannot judge its usage" in r.getMessage()]
    assert [r.levelno for r in unjudged] == [logging.WARNING] * 2
    from invoice_watch import ops

    out = io.StringIO()
    assert await ops.status(config, out=out, now=clock.now()) == 0
    text = out.getvalue()
    assert "Usage anomaly rules that cannot judge an organization: 2" in text, text
    rows = [line for line in text.splitlines() if line.startswith("spend-spike ")]
    assert len(rows) == 2 and all("never been read" in row and "500" in row for row in rows)


@pytest.mark.parametrize("status", [404, 406, 415])
async def test_e2e_line_items_come_from_the_csv_where_the_search_is_not_served(
    sim: Simulator, clock: FakeClock, tmp_path: Path, status: int
) -> None:
    """The fallback is per organization and for a while: one organization's search
    answering 404/406/415 reads THAT organization's CSV (the other's search goes on),
    and its next refresh tries the search again (it once switched every organization
    to the CSV until a restart)."""
    recorder = Recorder()
    config = config_of(sim, tmp_path)
    sim.faults.status(status, path=f"*/{SEARCH}", org_id=PROD, times=1000)
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        result = await run_cycle(app)
        assert result.orgs_failed == []
        read = app.store.usage.read_state(PROD)
        assert read is not None and read.source == "csv" and read.last_error is None
        [period, *_] = await app.store.usage.periods(PROD)
        assert period.items and all(item.usage_date is not None for item in period.items)
        assert csvs(sim) >= 1
        other = app.store.usage.read_state(ANALYTICS)
        assert other is not None and other.source == "search"
        tried = searches(sim)
        clock.advance(timedelta(minutes=15))
        await run_cycle(app)
        assert searches(sim) == tried  # nothing due
        sim.faults.clear()
        clock.advance(timedelta(hours=7))  # the next refresh: the search is tried again
        await run_cycle(app)
        read = app.store.usage.read_state(PROD)
        assert read is not None and read.source == "search"


async def test_e2e_last_months_line_items_failing_once_are_read_at_the_next_refresh(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    """The period before's line items (a baseline over the 1st) failing once are tried
    again at the organization's next fetch (they were once never tried again in that
    process)."""
    last_month = sim.scenario.invoice("prod-last-month").id
    sim.faults.status(500, path=f"*/{last_month}/{SEARCH}", times=1)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await run_cycle(app)
        assert [p.invoice_id for p in await app.store.usage.periods(PROD)] != [
            sim.scenario.invoice("prod-pending").id,
            last_month,
        ]
        clock.advance(timedelta(hours=7))
        await run_cycle(app)
        held = [p.invoice_id for p in await app.store.usage.periods(PROD)]
        assert held == [sim.scenario.invoice("prod-pending").id, last_month]


async def test_e2e_run_once_judges_the_line_items_an_earlier_run_fetched(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    """`run --once` from cron: each run is a new process. The line items the first run
    fetched (after its cycle) are judged by the second before its cycle: it fires."""
    recorder = Recorder()
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        await app.run_once()
    assert recorder.sent == []
    clock.advance(timedelta(minutes=15))
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        await app.run_once()
    assert [(e.kind, e.rule) for e in recorder.sent] == [(EventKind.FIRING, "spend-spike")]


async def test_e2e_a_silence_on_the_usage_anomaly_rule_holds_its_firing(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    """Silences apply to usage_anomaly alerts as to any: a silence of the rule for the
    organization keeps the FIRING from the notifier, and it goes out once lifted."""
    recorder = Recorder()
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        await app.store.silences.add(
            Silence("s1", "spend-spike", PROD, None, NOW, NOW + timedelta(hours=1), "known", NOW)
        )
        await cycle(app, recorder)
        assert await cycle(app, recorder) == []  # held by the silence
        clock.advance(timedelta(hours=1, minutes=1))
        sent = await cycle(app, recorder)
        assert [kind for kind, key in sent if key.startswith("spend-spike/")] == [EventKind.FIRING]


@pytest.mark.parametrize(
    ("rule", "fetched"),
    [
        ({"orgs": [PROD]}, {PROD}),  # only the organizations a rule covers
        ({"enabled": False}, set()),  # a disabled rule needs none
    ],
)
async def test_e2e_line_items_are_read_only_for_organizations_something_needs(
    sim: Simulator, clock: FakeClock, tmp_path: Path, rule: dict[str, Any], fetched: set[str]
) -> None:
    spike = {"name": "spend-spike", "type": "usage_anomaly", "notify": ["console"], **rule}
    config = config_of(sim, tmp_path, rules=[spike])
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await run_cycle(app)
    assert {r.org_id for r in sim.requests if r.path.endswith(SEARCH)} == fetched


async def test_e2e_a_hanging_line_item_search_delays_no_cycle_reload_or_stop(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    """The line items stage is its own task, outside the cycle lock: while
    `lineItems:search` hangs, a cycle ends at once, the next one too, a reload is taken
    and closing the App cancels the stage (it was once awaited under the lock, after the
    cycle: every poll and reload waited for it)."""
    sim.faults.hang(path=f"*/{SEARCH}", times=1000)
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        first = await asyncio.wait_for(app.run_cycle(), 10)  # a guard, not a timer
        assert first.orgs_ok == 2
        stage = app.cycles.line_items
        assert stage is not None and not stage.done()
        clock.advance(timedelta(minutes=15))
        assert (await asyncio.wait_for(app.run_cycle(), 10)).orgs_ok == 2
        assert app.cycles.line_items is stage  # one at a time
        assert await asyncio.wait_for(app.reload(config_of(sim, tmp_path)), 10)
        assert not await app.cycles.line_items_done(within=0)
    assert stage.cancelled()
    assert app.store.usage.read_state(PROD) is None  # nothing recorded: fetched later


async def test_e2e_run_once_delivers_without_waiting_for_line_items_and_a_stop_cancels_them(
    sim: Simulator, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`run --once` while `lineItems:search` hangs: its cycle's FIRING is delivered, and
    a stop then cancels the line items without calling the finished cycle stopped."""
    sim.faults.hang(path=f"*/{SEARCH}", times=1000)
    recorder = Recorder()
    rules = [
        {"name": "pending-over", "type": "pending_amount", "threshold": 1,
         "notify": ["console"]},
        {"name": "spend-spike", "type": "usage_anomaly", "notify": ["console"]},
    ]  # fmt: skip
    config = config_of(sim, tmp_path, rules=rules)
    stop = asyncio.Event()
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        once = asyncio.create_task(app.run_once(stop=stop))
        while not (recorder.sent and searches(sim)):  # delivered; the search under way
            await asyncio.sleep(0.01)
            assert not once.done()
        stop.set()
        outcome = await asyncio.wait_for(once, 10)
    assert outcome.result is not None and outcome.result.orgs_ok == 2
    assert {e.rule for e in recorder.sent} == {"pending-over"}
    assert outcome.stopped and outcome.pending == 0
    assert not [r for r in caplog.records if "stopped before it ended" in r.getMessage()]


async def test_e2e_an_organization_over_the_page_cap_is_tried_again_a_day_later_not_hourly(
    sim: Simulator, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A period with more line items than a search is read for (MAX_PAGES) is no
    transient failure: tried again a day later (usage.refresh when longer), one
    WARNING, not 320 requests every hour."""
    from invoice_watch.atlas import usage

    monkeypatch.setattr(usage, "ITEMS_PER_PAGE", 10)
    monkeypatch.setattr(usage, "MAX_PAGES", 2)
    config = config_of(sim, tmp_path)

    def tried() -> int:
        return sum(1 for r in sim.requests if r.path.endswith(SEARCH) and r.org_id == PROD)

    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await run_cycle(app)
        read = app.store.usage.read_state(PROD)
        assert read is not None and "past 2 pages" in (read.last_error or "")
        before = tried()
        for _ in range(23):  # a day of hourly polls: not tried again
            clock.advance(timedelta(hours=1))
            await run_cycle(app)
        assert tried() == before
        clock.advance(timedelta(hours=1, minutes=1))
        await run_cycle(app)
        assert tried() > before
    warned = [
        r for r in caplog.records
        if r.levelno >= logging.WARNING and "past 2 pages" in r.getMessage()
        and PROD in r.getMessage()
    ]  # fmt: skip
    assert len(warned) == 1


@pytest.mark.parametrize("status", [500, 429])
async def test_e2e_line_item_search_retries_are_not_a_warning_each(
    sim: Simulator, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:  # fmt: skip
    """The transport's retries of `lineItems:search` are logged at DEBUG: the line items
    stage says the outcome once while it lasts (each hourly attempt once added a
    WARNING per retry)."""
    sim.faults.status(status, path=f"*/{SEARCH}", times=10_000)
    atlas = {"base_url": sim.base_url, "retries": 2, "max_backoff": "1s",
             "auth": {"public_key": sim.public_key, "private_key": sim.private_key}}  # fmt: skip
    config = config_of(sim, tmp_path, atlas=atlas)
    caplog.set_level(logging.INFO)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        for _ in range(6):
            await run_cycle(app)
            clock.advance(timedelta(hours=1, minutes=1))
    warned = [
        r.getMessage() for r in caplog.records
        if r.levelno >= logging.WARNING and SEARCH in r.getMessage()
    ]  # fmt: skip
    assert len(warned) == 2, warned  # once per organization


async def test_e2e_a_wall_clock_set_back_neither_resolves_nor_fires_the_anomaly_again(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    """The wall clock set back two days after a FIRING (an NTP fix, a VM restore): no
    RESOLVED (it once judged an older day), and no second FIRING once it is put right."""
    recorder = Recorder()
    config = config_of(sim, tmp_path)
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        await cycle(app, recorder)
        sent = await cycle(app, recorder)
        assert [kind for kind, key in sent if key.startswith("spend-spike/")] == [EventKind.FIRING]
        clock.step(timedelta(days=-2))
        for _ in range(3):
            clock.advance(timedelta(minutes=15))
            assert await cycle(app, recorder) == []
        clock.step(timedelta(days=2))
        clock.advance(timedelta(minutes=15))
        assert await cycle(app, recorder) == []


async def test_e2e_usage_alerts_name_their_dimension_in_logs_status_and_resolved(
    sim: Simulator, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A usage_anomaly alert is told apart from the rule's others: the delivery log and
    `status` name its cluster; the FIRING names project and cluster once; the RESOLVED
    says the later day's amount and date (Recovery.summary)."""
    from invoice_watch import ops

    recorder = Recorder()
    config = config_of(sim, tmp_path)
    project_id = sim.scenario.invoice("prod-pending").line_items[0].project_id
    subject = f"cluster {project_id}/orders"
    caplog.set_level(logging.INFO)
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        await cycle(app, recorder)
        await cycle(app, recorder)
        [firing] = [e for e in recorder.sent if e.rule == "spend-spike"]
        names = [name for name, _ in firing.details]
        assert "Dimension" not in names and names.count("Cluster") == 1
        delivered = [r.getMessage() for r in caplog.records if "delivered" in r.getMessage()]
        assert any(f"FIRING spend-spike Production {subject}" in m for m in delivered), delivered
        capsys.readouterr()
        assert await ops.status(config) == 0
        assert subject in capsys.readouterr().out
        clock.advance(timedelta(days=1))
        await cycle(app, recorder)
        await cycle(app, recorder)
    [resolved] = [e for e in recorder.sent if e.kind is EventKind.RESOLVED]
    assert "on 2026-11-21, back under $" in resolved.summary, resolved.summary
    assert "cluster orders of project" in resolved.summary
