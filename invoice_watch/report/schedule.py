"""When a report is due (issue 19 §2): ``daily 08:00``, ``mon 09:00`` (weekly, ``mon`` to
``sun``), ``monthly 1 09:00`` (day 1 to 31), at a local wall-clock time of an IANA time
zone (``timezone``, default UTC). Pure: instants in, instants out, all aware datetimes.

Daylight saving time is the zone's, through :mod:`zoneinfo` (``tzdata`` where the
system has no zone database):

- the wall-clock time is kept across a change: ``mon 09:00`` in Europe/Berlin is 08:00
  UTC in winter and 07:00 UTC in summer;
- a time that a change skips (02:30 on the night clocks go forward) fires once, at the
  same distance past the change as it was meant to be (03:30), as PEP 495 reads it
  (``fold=0``);
- a time that occurs twice (02:30 on the night clocks go back) fires once, at its
  first occurrence;
- ``monthly 31`` fires on the last day of shorter months.

A missed time (the daemon was down) is due once when it comes back: :meth:`due` gives
the latest time in a range, never each of them.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_WEEKDAYS = tuple(calendar.day_name[i].lower() for i in range(7))
_TIME = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")  # ASCII digits only
HELP = 'write "daily 08:00", "mon 09:00" (mon..sun) or "monthly 1 09:00" (day 1..31)'
# The farthest apart two times of a valid schedule can be (a month), with room.
_SEARCH_DAYS = 70


def zone(name: str) -> tzinfo:
    """The time zone named ``name`` (IANA, e.g. ``Europe/Berlin``; ``UTC``).
    :class:`ValueError` naming it when no zone database knows it."""
    if name in ("UTC", "Etc/UTC", "Z"):
        return UTC  # works without any zone database
    plausible = name.isprintable() and 0 < len(name) <= 64 and ".." not in name
    # Files of the zone database that are not IANA zones: the host's own zone (it
    # changes with the host), the POSIX rules template, and the leap-second variants.
    odd = name in ("localtime", "posixrules", "Factory") or name.startswith(("right/", "posix/"))
    if not plausible or odd or name.startswith(("/", ".")):
        raise ValueError(f"unknown time zone {name!r}; use an IANA name like Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name like Europe/Berlin or "
            "America/New_York (names are case-sensitive)"
        ) from None


@dataclass(frozen=True)
class ReportSchedule:
    """A parsed schedule: ``kind``, the local time ``at``, ``weekday`` (0 = Monday) for
    a weekly one, ``day`` (1..31) for a monthly one, in ``tz``."""

    kind: Literal["daily", "weekly", "monthly"]
    at: time
    tz: tzinfo
    weekday: int | None = None
    day: int | None = None

    def __str__(self) -> str:
        clock = f"{self.at:%H:%M}"
        if self.kind == "daily":
            return f"daily {clock}"
        if self.kind == "weekly":
            assert self.weekday is not None
            return f"{WEEKDAYS[self.weekday]} {clock}"
        return f"monthly {self.day} {clock}"

    def _runs_on(self, day: date) -> bool:
        if self.kind == "daily":
            return True
        if self.kind == "weekly":
            return day.weekday() == self.weekday
        assert self.day is not None
        last = calendar.monthrange(day.year, day.month)[1]
        return day.day == min(self.day, last)

    def _instant(self, day: date) -> datetime:
        """The instant (UTC) of ``at`` on the local ``day`` (see the module docstring
        for the times a DST change skips or repeats)."""
        local = datetime.combine(day, self.at).replace(tzinfo=self.tz, fold=0)
        return local.astimezone(UTC)

    def next_after(self, after: datetime) -> datetime:
        """The first time strictly after ``after`` (aware), in UTC."""
        first = after.astimezone(self.tz).date() - timedelta(days=1)
        for n in range(_SEARCH_DAYS):
            day = first + timedelta(days=n)
            if self._runs_on(day) and (when := self._instant(day)) > after:
                return when
        raise AssertionError(f"{self}: no time within {_SEARCH_DAYS} days")  # never

    def latest_at(self, now: datetime) -> datetime:
        """The last time at or before ``now`` (aware), in UTC."""
        last = now.astimezone(self.tz).date() + timedelta(days=1)
        for n in range(_SEARCH_DAYS):
            day = last - timedelta(days=n)
            if self._runs_on(day) and (when := self._instant(day)) <= now:
                return when
        raise AssertionError(f"{self}: no time within {_SEARCH_DAYS} days")  # never

    def due(self, since: datetime, now: datetime) -> datetime | None:
        """The one report due now: the latest time in (``since``, ``now``], or None.
        ``since`` is the time of the last report sent (or when the report was first
        configured: a new report waits for its first time), so that times missed while
        the daemon was down give one report, never one each."""
        latest = self.latest_at(now)
        return latest if latest > since else None


def parse_schedule(text: str, timezone: str = "UTC") -> ReportSchedule:
    """``daily HH:MM``, ``<weekday> HH:MM`` or ``monthly D HH:MM`` (case-insensitive;
    weekdays ``mon``..``sun`` or in full) in the zone ``timezone``. :class:`ValueError`
    saying what to write."""
    tz = zone(timezone)
    words = text.lower().split(" ")
    words = [word for word in words if word]
    if not text.isprintable() or not words or len(words) > 3 or not _TIME.fullmatch(words[-1]):
        raise ValueError(f"invalid schedule {text!r}: {HELP}")
    hours, minutes = words[-1].split(":")
    at = time(int(hours), int(minutes))
    kind = words[0]
    if len(words) == 2 and kind == "daily":
        return ReportSchedule("daily", at, tz)
    if len(words) == 2 and (kind in WEEKDAYS or kind in _FULL_WEEKDAYS):
        weekday = WEEKDAYS.index(kind[:3])
        return ReportSchedule("weekly", at, tz, weekday=weekday)
    if len(words) == 3 and kind == "monthly":
        if not (words[1].isascii() and words[1].isdigit()) or not 1 <= int(words[1]) <= 31:
            raise ValueError(
                f"invalid schedule {text!r}: the day of the month is 1..31 "
                "(31 runs on the last day of shorter months)"
            )
        return ReportSchedule("monthly", at, tz, day=int(words[1]))
    raise ValueError(f"invalid schedule {text!r}: {HELP}")
