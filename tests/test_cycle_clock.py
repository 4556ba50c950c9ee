"""Durations between a stored wall time and now survive wall-clock steps (A12-11):
``poll_failure`` (failing since), ``repeat`` reminders (last notified) and
``amount_increase`` windows (observed at) count time that passed on the monotonic clock,
not what the wall clock says; a stored time in the future counts as now, logged once.
Such an age is a lower bound (AD-1): it may delay a new FIRING, never resolve one that
fires (poll_failure, amount_increase, forecast after a restart with the clock set back).

The App's real cycle against a hand-made Atlas on loopback; time is a FakeClock, whose
``step`` sets the wall clock without time passing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.types import EventKind
from tests.conftest import ORG_A, ORG_B
from tests.hand_atlas import HandAtlas, hand_config, invoice
from tests.test_convergence import Recorder

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
DAYS_2 = timedelta(days=2)


@pytest.fixture
async def atlas() -> AsyncIterator[HandAtlas]:
    async with HandAtlas() as server:
        server.invoices[ORG_B] = [invoice(2, ORG_B, "PAID")]
        yield server


def kinds(events: Any) -> list[tuple[EventKind, str]]:
    return sorted((e.kind, e.rule) for e in events)


@pytest.mark.parametrize("step", [-DAYS_2, DAYS_2], ids=["set-back", "set-forward"])
async def test_poll_failure_counts_time_that_passed_whichever_way_the_clock_steps(
    tmp_path: Path, atlas: HandAtlas, step: timedelta
):
    """Org A fails from the first cycle on (``after: 1h``). The wall clock is set two
    days back (or forward) 12 minutes later: poll_failure still fires 1 h after the
    first failure, not 2 days later (nor at once)."""
    atlas.answers[ORG_A] = (500, b'{"detail": "down"}')
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).events == []
        clock.advance(timedelta(minutes=12))
        clock.step(step)
        clock.advance(timedelta(minutes=30))
        assert (await app.run_cycle()).events == []  # 42 min of failing
        clock.advance(timedelta(minutes=17))
        assert (await app.run_cycle()).events == []  # 59 min
        clock.advance(timedelta(minutes=2))
        fired = await app.run_cycle()  # 61 min
        assert kinds(fired.events) == [(EventKind.FIRING, "atlas-down")]
        assert "could not be read for 1h 1m" in fired.events[0].summary


@pytest.mark.parametrize("step", [-DAYS_2, DAYS_2], ids=["set-back", "set-forward"])
async def test_repeat_reminds_after_the_time_that_passed_whichever_way_the_clock_steps(
    tmp_path: Path, atlas: HandAtlas, step: timedelta
):
    """A FAILED invoice's alert reminds every hour: with the wall clock set two days
    back (or forward) in between, the reminder still comes an hour after the FIRING."""
    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "FAILED")]
    rules: list[dict[str, Any]] = [
        {"name": "failed-charge", "type": "invoice_status", "repeat": "1h", "notify": ["console"]}
    ]
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url, rules=rules)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert kinds((await app.run_cycle()).events) == [(EventKind.FIRING, "failed-charge")]
        clock.advance(timedelta(minutes=20))
        clock.step(step)
        clock.advance(timedelta(minutes=39))
        assert (await app.run_cycle()).events == []  # 59 min
        clock.advance(timedelta(minutes=2))
        reminded = await app.run_cycle()
        assert kinds(reminded.events) == [(EventKind.REMINDER, "failed-charge")]


async def test_amount_increase_window_counts_time_that_passed_when_the_clock_steps_back(
    tmp_path: Path, atlas: HandAtlas
):
    """A pending invoice grows $300 within a 1h window, then the wall clock is set two
    days back: the observation before the growth is still an hour old an hour later
    (the window is over), not two days in the future (which would keep the growth
    "within the window" for two more days)."""
    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", 1000_00)]
    rules: list[dict[str, Any]] = [
        {"name": "jump", "type": "amount_increase", "threshold": 200, "window": "1h"}
    ]
    rules[0]["notify"] = ["console"]
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url, rules=rules)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        clock.advance(timedelta(minutes=10))
        atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", 1300_00)]
        assert kinds((await app.run_cycle()).events) == [(EventKind.FIRING, "jump")]
        clock.step(-DAYS_2)
        clock.advance(timedelta(minutes=61))
        over = await app.run_cycle()
        assert kinds(over.events) == [(EventKind.RESOLVED, "jump")]


async def test_a_stored_failure_in_the_future_counts_from_now_and_is_said_once(
    tmp_path: Path, atlas: HandAtlas, caplog: pytest.LogCaptureFixture
):
    """The daemon restarts with the wall clock set two days back: the state file says
    org A fails since a time two days ahead. That time counts as now (one warning says
    so): poll_failure fires an hour later, not two days and an hour later."""
    atlas.answers[ORG_A] = (500, b'{"detail": "down"}')
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
    clock.step(-DAYS_2)
    caplog.set_level(logging.WARNING, logger="invoice_watch.elapsed")
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).events == []
        clock.advance(timedelta(minutes=59))
        assert (await app.run_cycle()).events == []
        clock.advance(timedelta(minutes=2))
        assert kinds((await app.run_cycle()).events) == [(EventKind.FIRING, "atlas-down")]
    warnings = [r.getMessage() for r in caplog.records if r.name == "invoice_watch.elapsed"]
    assert len(warnings) == 1 and "was the clock set back?" in warnings[0]


def test_elapsed_forgets_times_no_cycle_asks_about():
    from invoice_watch.elapsed import Elapsed

    clock = FakeClock(NOW)
    elapsed = Elapsed(clock)
    stamped = elapsed.stamp()
    old = NOW - timedelta(hours=1)
    assert elapsed.age(old) == timedelta(hours=1)
    clock.step(-DAYS_2)
    clock.advance(60)
    assert elapsed.age(stamped) == timedelta(seconds=60)
    assert elapsed.age(old) == timedelta(hours=1, seconds=60)
    for _ in range(3):
        elapsed.sweep()
    assert elapsed.age(stamped) == timedelta(0)  # forgotten: now from the wall clock


async def test_a_restart_with_the_clock_set_back_keeps_a_firing_poll_failure_firing(
    tmp_path: Path, atlas: HandAtlas
):
    """AD-1: org A fails and atlas-down fires (after 1h). The daemon restarts with the
    wall clock set two days back: the stored failure lies in the future and counts from
    now, which may delay a new FIRING but never resolves the one already firing (no
    false RESOLVED, no second FIRING an hour later); it resolves once org A is read."""
    atlas.answers[ORG_A] = (500, b'{"detail": "down"}')
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        await app.run_cycle()
        clock.advance(timedelta(minutes=61))
        assert kinds((await app.run_cycle()).events) == [(EventKind.FIRING, "atlas-down")]
    clock.step(-DAYS_2)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).events == []  # not "failing for 0s": RESOLVED
        for _ in range(3):
            clock.advance(timedelta(minutes=31))
            assert (await app.run_cycle()).events == []  # nor FIRING a second time
        del atlas.answers[ORG_A]
        clock.advance(timedelta(minutes=5))
        assert kinds((await app.run_cycle()).events) == [(EventKind.RESOLVED, "atlas-down")]


async def test_a_restart_with_the_clock_set_back_neither_fires_nor_resolves_amount_increase(
    tmp_path: Path, atlas: HandAtlas
):
    """AD-1, amount_increase: the observations of the last two days lie in the future
    after a restart with the clock set two days back. Growth over those days is not
    growth "within the 1h window" (no false FIRING), and the window's alert that fired
    does not resolve for want of a base: both wait until the window has passed."""
    rules: list[dict[str, Any]] = [
        {"name": "jump", "type": "amount_increase", "threshold": 200, "window": "1h"}
    ]
    rules[0]["notify"] = ["console"]
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url, rules=rules)
    amount = 1000_00
    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", amount)]
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        for _ in range(12):  # $100 every 4 h for two days: never $200 within an hour
            clock.advance(timedelta(hours=4))
            amount += 100_00
            atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", amount)]
            assert (await app.run_cycle()).events == []
    clock.step(-DAYS_2 - timedelta(hours=1))
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).events == []  # not $1,200 "within 1h"
        clock.advance(timedelta(minutes=61))
        assert (await app.run_cycle()).events == []


async def test_a_restart_with_the_clock_set_back_does_not_resolve_a_firing_forecast(
    tmp_path: Path, atlas: HandAtlas
):
    """AD-1, forecast: it fired 15 days into the period (min_elapsed 14d). After a
    restart with the wall clock set two days back the period looks 13 days old, under
    min_elapsed: no reason to resolve while the clock reads earlier than the state file."""
    rules: list[dict[str, Any]] = [
        {"name": "budget", "type": "forecast", "budget": 1000, "min_elapsed": "14d"}
    ]
    rules[0]["notify"] = ["console"]
    clock = FakeClock(NOW)  # 14.5 days into November
    config = hand_config(tmp_path, atlas.url, rules=rules)
    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", 900_00)]
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert kinds((await app.run_cycle()).events) == [(EventKind.FIRING, "budget")]
    clock.step(-DAYS_2)
    async with App(config, clock=clock, notifiers={"console": Recorder()}) as app:
        assert (await app.run_cycle()).events == []
