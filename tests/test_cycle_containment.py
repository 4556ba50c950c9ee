"""One organization's data never breaks the cycle for the others (A12-1, A12-2).

What Atlas lists for one organization may hold a value the state file cannot take (a
lone surrogate, which ``json.loads`` lets through; an amount of thousands of digits).
The cycle commits several organizations in one transaction (a group commit): a batch
refused for one organization's data is written again one organization at a time, the
refused one counts as a failed read (recorded with its cause, so that ``poll_failure``
counts it), and the others commit and alert. A breakdown that cannot be fetched, built
or stored costs the breakdown, never the message. An error of the state file itself
(a full disk) still fails the whole cycle, as before.

The App's real cycle and AtlasClient against a hand-made Atlas on loopback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.clock import FakeClock
from invoice_watch.errors import StateError
from invoice_watch.types import EventKind
from tests.conftest import ORG_A, ORG_B
from tests.hand_atlas import HandAtlas, hand_config, invoice
from tests.test_convergence import Recorder

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
    {"name": "over", "type": "pending_amount", "threshold": 5000, "notify": ["console"]},
    {"name": "atlas-down", "type": "poll_failure", "after": "1h", "notify": ["console"]},
]
MILLION = 1_000_000_00


def listing(*entries: dict[str, Any]) -> bytes:
    """A listing body; json.dumps writes a lone surrogate as its ``\\ud800`` escape, as a
    server may."""
    return json.dumps({"results": list(entries), "totalCount": len(entries)}).encode()


def pending(org: str, n: int, cents: list[int]) -> bytes:
    items = [
        {"sku": "CLUSTER", "groupName": f"p{i}", "totalPriceCents": c} for i, c in enumerate(cents)
    ]
    return json.dumps({"results": [{"id": f"{n:024x}", "orgId": org, "lineItems": items}]}).encode()


@pytest.fixture
async def atlas() -> AsyncIterator[HandAtlas]:
    async with HandAtlas() as server:
        # Org B: a FAILED invoice and a pending $1M (an amount alert, so that its part
        # is committed with A's, once the breakdowns are fetched: one batch).
        server.invoices[ORG_B] = [
            invoice(11, ORG_B, "FAILED", start="2026-10-01", end="2026-11-01"),
            invoice(12, ORG_B, "PENDING", MILLION),
        ]
        server.pending[ORG_B] = pending(ORG_B, 12, [600_000_00, 400_000_00])
        yield server


def fired(events: Any) -> list[tuple[EventKind, str, str | None]]:
    return sorted((e.kind, e.rule, e.org_id) for e in events)


async def test_cycle_an_unstorable_listing_fails_that_org_and_the_others_alert(
    tmp_path: Path, atlas: HandAtlas
):
    """A12-1: org A lists an invoice whose status holds a lone surrogate, and a pending
    $1M. The fetch refuses such a status now; were it let through, A and B would be
    committed in one batch, which SQLite refuses (UTF-8 cannot encode the surrogate; see
    the next tests for that path). Either way B's FIRINGs are committed and sent; A's
    read counts as failed, with its cause; an hour later poll_failure fires for A;
    `run --once` exits 1 with one line for A, no traceback."""
    atlas.answers[ORG_A] = (
        200,
        listing(invoice(1, ORG_A, "FAILED\ud800"), invoice(2, ORG_A, "PENDING", MILLION)),
    )
    clock = FakeClock(NOW)
    config = hand_config(tmp_path, atlas.url, rules=RULES)
    recorder = Recorder()
    async with App(config, clock=clock, notifiers={"console": recorder}) as app:
        first = await app.run_cycle()
        assert first.orgs_failed == [ORG_A]
        assert fired(first.events) == [
            (EventKind.FIRING, "failed-charge", ORG_B),
            (EventKind.FIRING, "over", ORG_B),
        ]
        state = app.store.snapshot.org_state(ORG_A)
        assert state.failing_since is not None and state.last_success is None
        assert "FAILED\\ud800" in (state.last_error or "")  # its cause, storable
        assert sorted(key.split("/")[0] for key in app.store.alerts.firing()) == [
            "failed-charge",
            "over",
        ]
        clock.advance(timedelta(minutes=61))
        later = await app.run_cycle()
        assert fired(later.events) == [(EventKind.FIRING, "atlas-down", ORG_A)]
        await app.deliverer.drain(5)
    assert sorted((e.kind, e.rule) for e in recorder.sent) == [
        (EventKind.FIRING, "atlas-down"),
        (EventKind.FIRING, "failed-charge"),
        (EventKind.FIRING, "over"),
    ]


async def test_run_once_with_an_unstorable_listing_exits_1_naming_that_org(
    tmp_path: Path, atlas: HandAtlas, capsys: pytest.CaptureFixture[str]
):
    atlas.answers[ORG_A] = (
        200,
        listing(invoice(1, ORG_A, "FAILED\ud800"), invoice(2, ORG_A, "PENDING", MILLION)),
    )
    config = hand_config(tmp_path, atlas.url, rules=RULES)
    recorder = Recorder()
    async with App(config, clock=FakeClock(NOW), notifiers={"console": recorder}) as app:
        assert await run_once(app) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: Production: ")
    assert "unexpected error" not in errors[0]
    assert sorted(e.rule for e in recorder.sent) == ["failed-charge", "over"]


async def test_cycle_a_breakdown_that_cannot_be_stored_costs_the_breakdown_not_the_message(
    tmp_path: Path, atlas: HandAtlas
):
    """A12-2: org A's pending invoice has 20 line items of 4,300 digits each (each one
    parses; their sum cannot be written as JSON). Both orgs' amount alerts fire, in one
    batch: A's without a breakdown, B's with its own."""
    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", MILLION)]
    atlas.pending[ORG_A] = pending(ORG_A, 1, [int("9" * 4300)] * 20)
    config = hand_config(tmp_path, atlas.url, rules=RULES)
    recorder = Recorder()
    async with App(config, clock=FakeClock(NOW), notifiers={"console": recorder}) as app:
        result = await app.run_cycle()
        assert result.orgs_failed == []
        over = {e.org_id: e for e in result.events if e.rule == "over"}
        assert over[ORG_A].breakdown == ()
        assert [line.name for line in over[ORG_B].breakdown][:2] == ["p0", "p1"]
        await app.deliverer.drain(5)
    assert sorted((e.rule, e.org_id) for e in recorder.sent) == [
        ("failed-charge", ORG_B),
        ("over", ORG_A),
        ("over", ORG_B),
    ]


async def test_cycle_a_bug_an_orgs_data_triggers_in_the_commit_is_that_orgs_failed_read(
    tmp_path: Path, atlas: HandAtlas, monkeypatch: pytest.MonkeyPatch
):
    """Whatever the commit of one organization's part raises (here: a bug writing its
    invoices, as a value the fetch lets through would make), that organization's read
    counts as failed and the others commit; the error is logged with its traceback."""
    from invoice_watch.store.sql import snapshot

    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", MILLION)]
    real = snapshot._invoice_row

    def row(item: Any) -> tuple[Any, ...]:
        if item.org_id == ORG_A:
            raise KeyError("a bug")
        return real(item)

    monkeypatch.setattr(snapshot, "_invoice_row", row)
    config = hand_config(tmp_path, atlas.url, rules=RULES)
    async with App(config, clock=FakeClock(NOW), notifiers={"console": Recorder()}) as app:
        result = await app.run_cycle()
        assert result.orgs_failed == [ORG_A]
        assert "KeyError: 'a bug'" in (result.reads[ORG_A].error or "")
        assert fired(result.events) == [
            (EventKind.FIRING, "failed-charge", ORG_B),
            (EventKind.FIRING, "over", ORG_B),
        ]
        assert ORG_A not in {key.split("/")[1] for key in app.store.alerts.firing()}


async def test_cycle_a_state_file_error_still_fails_the_whole_cycle(
    tmp_path: Path, atlas: HandAtlas, monkeypatch: pytest.MonkeyPatch
):
    """A full disk is no organization's fault: the cycle fails (nothing of it recorded
    but what was committed), as before."""
    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", MILLION)]
    config = hand_config(tmp_path, atlas.url, rules=RULES)
    async with App(config, clock=FakeClock(NOW), notifiers={"console": Recorder()}) as app:

        async def full(*args: Any, **kwargs: Any) -> None:
            raise StateError("could not write state file: database or disk is full")

        monkeypatch.setattr(app.store, "commit_orgs", full)
        with pytest.raises(StateError, match="disk is full"):
            await app.run_cycle()
        assert app.store.snapshot.org_state(ORG_A).last_attempt is None


@pytest.mark.parametrize("fault", ["unstorable line items", "a bug building it"])
async def test_cycle_a_breakdown_that_slips_through_the_fetch_still_costs_only_itself(
    tmp_path: Path, atlas: HandAtlas, monkeypatch: pytest.MonkeyPatch, fault: str
):
    """The fetch refuses numbers outside int64 now; line items it would let through
    that cannot be stored (their sum has more than 4,300 digits), or a bug building the
    breakdown, cost A's breakdown only: both messages go, B's with its breakdown."""
    from invoice_watch import breakdowns
    from invoice_watch.types import LineItem

    atlas.invoices[ORG_A] = [invoice(1, ORG_A, "PENDING", MILLION)]
    config = hand_config(tmp_path, atlas.url, rules=RULES)
    async with App(config, clock=FakeClock(NOW), notifiers={"console": Recorder()}) as app:
        real_items = app.client.pending_line_items
        real_breakdown = breakdowns.breakdown

        async def items(org_id: str) -> dict[str, list[LineItem]]:
            if org_id == ORG_A and fault == "unstorable line items":
                huge = LineItem("p", "CLUSTER", "c", int("9" * 4300))
                return {f"{1:024x}": [huge] * 20}
            return await real_items(org_id)

        def building(lines: Any, *args: Any) -> Any:
            if fault == "a bug building it" and lines and lines[0].amount_cents == 0:
                raise ZeroDivisionError("a bug")
            return real_breakdown(lines, *args)

        monkeypatch.setattr(app.client, "pending_line_items", items)
        monkeypatch.setattr(breakdowns, "breakdown", building)
        atlas.pending[ORG_A] = pending(ORG_A, 1, [0])
        result = await app.run_cycle()
    assert result.orgs_failed == []
    over = {e.org_id: e for e in result.events if e.rule == "over"}
    assert over[ORG_A].breakdown == ()
    assert [line.name for line in over[ORG_B].breakdown][:2] == ["p0", "p1"]
