"""report_runs and report messages in the outbox, on every backend (issue 19 §2): a
report due is enqueued once per due time, in the transaction that records it; the
outbox gives it back whole; silences and alert handling leave it alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from invoice_watch.report.outbox import ReportMessage
from invoice_watch.store import Store
from invoice_watch.store.records import Silence
from tests.conftest import Backend, OpenState

PROD = "5f8a1c2e9b3d4a6f7e0c1b2a"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
T1 = T0 + timedelta(days=7)
NOW = T1 + timedelta(hours=3)


@pytest.fixture
def backend(every_backend: Backend) -> Backend:
    return every_backend


def message(due: datetime = T1, chart: bytes | None = b"\x89PNG\r\n\x1a\n...") -> ReportMessage:
    return ReportMessage(
        report="weekly",
        scope=PROD,
        due=due,
        title="Spend report: Production",
        subject="[invoice-watch] Spend report: Production (2026-11-30)",
        facts=(("Spend to date", "$1.00 (day 1 of 30)"),),
        text="Spend report: Production\n",
        html="<p>report</p>",
        chart=chart,
    )


async def test_a_due_report_is_enqueued_once_per_due_time(store: Store):
    runs = store.reports
    assert await runs.last_due() == {}
    assert await runs.start("weekly", PROD, T0) == T0
    assert await runs.start("weekly", PROD, T1) == T0  # a row that exists is kept
    msg = message()
    args = (["mail", "bot"], msg.to_json(), msg.summary, NOW)
    assert await runs.enqueue("weekly", PROD, T1, *args)
    assert not await runs.enqueue("weekly", PROD, T1, *args)  # the same time: never twice
    assert not await runs.enqueue("weekly", PROD, T0, *args)  # an older one neither
    assert await runs.last_due() == {("weekly", PROD): T1}

    due = await store.outbox.due(NOW)
    assert [(d.notifier, d.events, d.report) for d in due] == [("mail", [], msg), ("bot", [], msg)]
    assert (await store.outbox.counts()) == {"pending": 2}
    assert [row.summary for row in await store.outbox.messages(["pending"])] == [msg.summary] * 2


async def test_silences_and_alert_handling_leave_a_report_alone(store: Store):
    """A silence active while a report is due: the report is not looked at as an alert
    (its events column is an object, not events), and goes."""
    msg = message(chart=None)
    assert await store.reports.enqueue(
        "weekly", PROD, T1, ["mail"], msg.to_json(), msg.summary, NOW
    )
    await store.silences.add(
        Silence("s1", "weekly", None, None, T0, NOW + timedelta(days=1), "maintenance", T0)
    )
    (due,) = await store.outbox.due(NOW)
    assert await store.silences.silence_pending(NOW, [due.id]) == {}
    assert await store.outbox.unnotified("mail") == set()
    await store.outbox.mark_sent(due.id, NOW)
    assert (await store.outbox.counts()) == {"sent": 1}


def test_a_report_message_survives_its_json():
    msg = message()
    assert ReportMessage.from_json(msg.to_json()) == msg
    with pytest.raises(ValueError, match="not a stored report"):
        ReportMessage.from_json('{"report": {"scope": 1}}')


async def test_two_writers_racing_enqueue_a_due_report_once(
    open_state: OpenState, backend: Backend, tmp_path: Path
):
    """Two processes (no leadership between them) enqueue the same due time at once on
    PostgreSQL (READ COMMITTED): the conditional upsert lets exactly one write it.
    (SQLite has one writer at a time and one daemon per file.)"""
    if isinstance(backend(tmp_path), Path):
        pytest.skip("SQLite: one process writes a state file")
    a = await open_state()
    b = await open_state()
    await a.reports.start("weekly", PROD, T0)
    msg = message()
    wins = 0
    for day in range(10):
        due = T1 + timedelta(days=day)
        both = await asyncio.gather(
            a.reports.enqueue("weekly", PROD, due, ["mail"], msg.to_json(), msg.summary, NOW),
            b.reports.enqueue("weekly", PROD, due, ["mail"], msg.to_json(), msg.summary, NOW),
        )
        assert sorted(both) == [False, True]
        wins += 1
    assert (await a.outbox.counts()) == {"pending": wins}


def test_a_combined_reports_summary_says_all_organizations_not_a_star():
    """``history`` and ``status`` show the summary: the combined scope reads as words."""
    assert message().summary == f"REPORT weekly ({PROD}) 2026-11-30 08:00Z"
    combined = ReportMessage(**{**message().__dict__, "scope": "*"})
    assert combined.summary == "REPORT weekly (all organizations) 2026-11-30 08:00Z"
