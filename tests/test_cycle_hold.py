"""One slow organization never holds back the others' messages (A12-10, A13-4).

A cycle holds the messages of the organizations it committed until it ends, to group a
burst (more than ``delivery.group_over`` for one notifier: one message). A slow
organization (a 429 loop, timeouts, long paging) would make that minutes or hours: the
daemon releases what a running cycle holds at most ``HOLD_SECONDS`` after it was
committed, grouped by the same rule over what is held then; the rest goes at the end.

The daemon (``App.serve``) on a ManualClock (the test moves time) against a hand-made
Atlas on loopback, whose slow organization answers when the test lets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from invoice_watch.app import App
from invoice_watch.constants import HOLD_SECONDS
from invoice_watch.types import AlertEvent, Part
from tests.conftest import ORG_A, ORG_B
from tests.hand_atlas import HandAtlas, hand_config, invoice
from tests.manual_clock import ManualClock

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


class Batches:
    """A notifier that keeps each message it is sent (a grouped one: several events)."""

    name = "console"

    def __init__(self) -> None:
        self.messages: list[list[AlertEvent]] = []

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None:
        self.messages.append(list(events))

    async def aclose(self) -> None:
        return None

    def orgs(self) -> list[list[str]]:
        return [sorted(e.org_id for e in message) for message in self.messages]


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[None]:
    stop = asyncio.Event()
    daemon = asyncio.create_task(app.serve(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 15)


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 (loopback I/O: no event to await)
            await asyncio.sleep(0.01)


def failed(first: int, count: int, org: str) -> list[dict[str, Any]]:
    return [invoice(n, org, "FAILED") for n in range(first, first + count)]


async def test_daemon_releases_what_a_cycle_holds_while_a_slow_org_is_read(tmp_path: Path):
    """Org A is read and committed at once; org B answers only when let go. A's FIRING
    goes out HOLD_SECONDS later, while the cycle still waits for B (before, it waited
    for the cycle's end); B's goes at the end."""
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = failed(1, 1, ORG_A)
        atlas.invoices[ORG_B] = failed(11, 1, ORG_B)
        atlas.gates[ORG_B] = asyncio.Event()
        clock = ManualClock(NOW)
        notifier = Batches()
        config = hand_config(tmp_path, atlas.url)
        async with (
            App(config, clock=clock, notifiers={"console": notifier}) as app,
            serving(app),
        ):
            await eventually(lambda: HOLD_SECONDS in clock.waits_of("release-held"))
            clock.advance(HOLD_SECONDS - 1)
            await asyncio.sleep(0.05)
            assert notifier.messages == []  # held: B may still make it a burst
            clock.advance(1)
            await eventually(lambda: notifier.orgs() == [[ORG_A]])
            assert app.cycles.last is None  # the cycle still waits for B
            atlas.gates[ORG_B].set()
            await eventually(lambda: notifier.orgs() == [[ORG_A], [ORG_B]])
            assert app.cycles.last is not None and app.cycles.last.orgs_failed == []


async def test_daemon_groups_what_it_releases_early_as_it_groups_at_the_end(tmp_path: Path):
    """A burst (6 FAILED invoices of A, group_over 5) held when the bound comes goes as
    one grouped message; B's 6, committed after, as another at the cycle's end."""
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = failed(1, 6, ORG_A)
        atlas.invoices[ORG_B] = failed(11, 6, ORG_B)
        atlas.gates[ORG_B] = asyncio.Event()
        clock = ManualClock(NOW)
        notifier = Batches()
        config = hand_config(tmp_path, atlas.url, delivery={"group_over": 5})
        async with (
            App(config, clock=clock, notifiers={"console": notifier}) as app,
            serving(app),
        ):
            await eventually(lambda: HOLD_SECONDS in clock.waits_of("release-held"))
            clock.advance(HOLD_SECONDS)
            await eventually(lambda: len(notifier.messages) == 1)
            assert notifier.orgs() == [[ORG_A] * 6]
            atlas.gates[ORG_B].set()
            await eventually(lambda: len(notifier.messages) == 2)
            assert notifier.orgs() == [[ORG_A] * 6, [ORG_B] * 6]


async def test_daemon_cycle_that_ends_within_the_bound_groups_its_whole_burst(tmp_path: Path):
    """A cycle that ends before the bound releases everything at its end, grouped
    together as before: 3 + 3 FAILED invoices of two orgs, group_over 5, one message."""
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = failed(1, 3, ORG_A)
        atlas.invoices[ORG_B] = failed(11, 3, ORG_B)
        clock = ManualClock(NOW)
        notifier = Batches()
        config = hand_config(tmp_path, atlas.url, delivery={"group_over": 5})
        async with (
            App(config, clock=clock, notifiers={"console": notifier}) as app,
            serving(app),
        ):
            await eventually(lambda: len(notifier.messages) == 1)
            assert notifier.orgs() == [[ORG_A] * 3 + [ORG_B] * 3]
            assert not clock.waits_of("release-held")  # no release timer left behind


async def test_daemon_cycle_counts_the_messages_released_while_it_ran_and_at_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """2 FAILED invoices of A released HOLD_SECONDS in (two messages), 2 of B at the end
    (two more), group_over 3: the cycle's line and result say 4 messages (they said 1:
    the 4 events grouped as if released together)."""
    caplog.set_level(logging.INFO, logger="invoice_watch.cycle")
    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = failed(1, 2, ORG_A)
        atlas.invoices[ORG_B] = failed(11, 2, ORG_B)
        atlas.gates[ORG_B] = asyncio.Event()
        clock = ManualClock(NOW)
        notifier = Batches()
        config = hand_config(tmp_path, atlas.url, delivery={"group_over": 3})
        async with (
            App(config, clock=clock, notifiers={"console": notifier}) as app,
            serving(app),
        ):
            await eventually(lambda: HOLD_SECONDS in clock.waits_of("release-held"))
            clock.advance(HOLD_SECONDS)
            await eventually(lambda: len(notifier.messages) == 2)
            atlas.gates[ORG_B].set()
            await eventually(lambda: len(notifier.messages) == 4)
            await eventually(lambda: app.cycles.last is not None)
            assert app.cycles.last is not None and app.cycles.last.released == 4
    [line] = [m for m in caplog.messages if m.startswith("cycle: ")]
    assert ", 4 events, 4 messages, " in line
