"""Quiet hours per notifier (issue 18): while a window holds, the notifier's messages
wait in the outbox and go as one summary when it ends; messages of the severities in
``except`` go at once. Pure: every function is of the window and ``now``.

A window starts at ``from`` (local time in ``timezone``) on each of its ``days`` (every
day when none are given) and ends at the next ``to``: ``from: "20:00", to: "08:00"``
crosses midnight and ends the next morning; ``from`` equal to ``to`` is the whole day.
Times are wall-clock times in the zone: across a DST change a window is an hour shorter
or longer, and a ``from`` or ``to`` that a change skips (02:30 on a spring-forward
night) is read with the offset before the change (so it falls an hour later).

Quiet hours never cost a message: the time a window held it does not count toward
``delivery.max_age`` (:func:`quiet_time`, subtracted from its age by delivery), so a
weekend window longer than ``max_age`` delays the messages it holds and fails none.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from invoice_watch.types import AlertEvent, Severity

# How far back quiet_time looks: beyond max_age's bound (30 days) and a week of windows.
_QUIET_SCAN = timedelta(days=62)
# How the last error of a message waiting for quiet hours to end begins.
QUIET_PREFIX = "quiet hours"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class QuietWindow:
    """``start`` and ``end``: local wall-clock times in ``tz``; ``days``: weekdays a
    window starts on (0 = Monday; empty: every day); ``except_``: severities that go
    through at once."""

    tz: tzinfo
    start: time
    end: time
    days: frozenset[int] = frozenset()
    except_: frozenset[Severity] = frozenset()
    zone_name: str = "UTC"


def _window(q: QuietWindow, day: date) -> tuple[datetime, datetime]:
    """The window starting on local date ``day``, as UTC instants."""
    start = datetime.combine(day, q.start, tzinfo=q.tz)
    end_day = day if q.end > q.start else day + timedelta(days=1)
    end = datetime.combine(end_day, q.end, tzinfo=q.tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def _end_of(q: QuietWindow, now: datetime) -> datetime | None:
    """When the windows holding at ``now`` end (the last of them); None: none holds."""
    today = now.astimezone(q.tz).date()
    ends = []
    for day in (today - timedelta(days=1), today):
        if q.days and day.weekday() not in q.days:
            continue
        start, end = _window(q, day)
        if start <= now < end:
            ends.append(end)
    return max(ends) if ends else None


def window_end(q: QuietWindow, now: datetime) -> datetime | None:
    """When the quiet time holding at ``now`` ends (UTC); None outside any window.
    Back-to-back windows (every day with ``from`` equal to ``to``, or ``sat`` and
    ``sun`` from 00:00 to 00:00) are one quiet time: it ends when the last one does
    (looked at for at most a week)."""
    end = _end_of(q, now)
    for _ in range(8):
        if end is None:
            break
        follow = _end_of(q, end)
        if follow is None:
            break
        end = follow
    return end


def holds(q: QuietWindow, events: Collection[AlertEvent], now: datetime) -> datetime | None:
    """Until when a message of ``events`` waits at ``now`` (None: it goes now): a
    message goes at once when any of its events has a severity in ``except``."""
    end = window_end(q, now)
    if end is None or any(e.severity in q.except_ for e in events):
        return None
    return end


def quiet_time(q: QuietWindow, start: datetime, end: datetime) -> timedelta:
    """How much of ``start`` .. ``end`` lies inside ``q``'s windows (zero when ``end``
    is not after ``start``; only the last :data:`_QUIET_SCAN` of it is looked at, so
    the cost is bounded: about one window a day)."""
    begin = max(start, end - _QUIET_SCAN)
    if end <= begin:
        return timedelta(0)
    total = timedelta(0)
    covered = begin  # windows never overlap, but a DST night must not count twice
    day = begin.astimezone(q.tz).date() - timedelta(days=1)
    last = end.astimezone(q.tz).date()
    while day <= last:
        if not q.days or day.weekday() in q.days:
            low, high = _window(q, day)
            low, high = max(low, covered), min(high, end)
            if high > low:
                total += high - low
                covered = high
        day += timedelta(days=1)
    return total


def longest(q: QuietWindow) -> timedelta:
    """The longest quiet time ``q`` makes (back-to-back windows are one), by the wall
    clock in its zone (a DST night is an hour longer)."""
    nominal = QuietWindow(UTC, q.start, q.end, q.days)
    monday = datetime(2024, 1, 1, tzinfo=UTC)  # any week: the zone is set aside
    stretches = []
    for offset in range(7):
        day = monday + timedelta(days=offset)
        if q.days and day.weekday() not in q.days:
            continue
        start = datetime.combine(day.date(), q.start, tzinfo=UTC)
        end = window_end(nominal, start)
        if end is not None:
            stretches.append(end - start)
    return max(stretches, default=timedelta(0))
