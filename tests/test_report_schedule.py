"""Tests of invoice_watch.report.schedule: parsing report schedules and the next time a
report is due, across daylight saving time changes (real zoneinfo), pure."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from invoice_watch.report.schedule import ReportSchedule, parse_schedule, zone


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "kind", "at", "weekday", "day"),
    [
        ("daily 08:00", "daily", time(8, 0), None, None),
        ("Daily 8:05", "daily", time(8, 5), None, None),
        ("mon 09:00", "weekly", time(9, 0), 0, None),
        ("SUN 23:59", "weekly", time(23, 59), 6, None),
        ("friday 07:30", "weekly", time(7, 30), 4, None),
        ("monthly 1 09:00", "monthly", time(9, 0), None, 1),
        ("  monthly   31   00:00 ", "monthly", time(0, 0), None, 31),
    ],
)
def test_parse_schedule_reads_each_form(
    text: str, kind: str, at: time, weekday: int | None, day: int | None
):
    schedule = parse_schedule(text)

    assert (schedule.kind, schedule.at, schedule.weekday, schedule.day) == (kind, at, weekday, day)
    assert parse_schedule(str(schedule)) == schedule


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", 'write "daily 08:00"'),
        ("daily", 'write "daily 08:00"'),
        ("daily 24:00", "invalid schedule"),
        ("daily 9", "invalid schedule"),
        ("daily 09:60", "invalid schedule"),
        ("weekly 09:00", "mon..sun"),
        ("mon tue 09:00", "invalid schedule"),
        ("monthly 09:00", "invalid schedule"),
        ("monthly 0 09:00", "1..31"),
        ("monthly 32 09:00", "1..31"),
        ("monthly first 09:00", "1..31"),
        ("every day at 9", "invalid schedule"),
        ("daily 08:00\n", "invalid schedule"),
        ("daily\t08:00", "invalid schedule"),
        ("monthly \u0663 09:00", "1..31"),  # ARABIC-INDIC DIGIT THREE: ASCII digits only
        ("daily \u0660\u0669:00", "invalid schedule"),
    ],
)
def test_parse_schedule_says_what_to_write(text: str, fragment: str):
    with pytest.raises(ValueError, match="invalid schedule") as raised:
        parse_schedule(text)

    assert fragment.replace("\\", "") in str(raised.value)


@pytest.mark.parametrize("name", ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata"])
def test_zone_knows_iana_names(name: str):
    assert zone(name) is not None


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Olympus",
        "europe/berlin",
        "",
        "/etc/passwd",
        "../x",
        "Europe/Berlin\n",
        # Files of the zone database that are not zones: the host's, a template, leap seconds.
        "localtime",
        "posixrules",
        "right/UTC",
        "posix/Europe/Berlin",
    ],
)
def test_zone_refuses_unknown_names_saying_what_to_use(name: str):
    with pytest.raises(ValueError, match="IANA name like Europe/Berlin"):
        zone(name)


# (schedule, zone, after, next time in UTC)
NEXT = [
    ("daily 08:00", "UTC", utc(2026, 11, 20, 7, 59), utc(2026, 11, 20, 8, 0)),
    ("daily 08:00", "UTC", utc(2026, 11, 20, 8, 0), utc(2026, 11, 21, 8, 0)),  # strictly after
    ("daily 08:00", "Europe/Berlin", utc(2026, 11, 20, 6, 0), utc(2026, 11, 20, 7, 0)),
    ("daily 08:00", "Europe/Berlin", utc(2026, 7, 20, 6, 0), utc(2026, 7, 21, 6, 0)),
    ("mon 09:00", "Europe/Berlin", utc(2026, 11, 20, 12, 0), utc(2026, 11, 23, 8, 0)),
    ("mon 09:00", "Europe/Berlin", utc(2026, 11, 23, 8, 0), utc(2026, 11, 30, 8, 0)),
    ("sun 23:30", "America/New_York", utc(2026, 11, 22, 12, 0), utc(2026, 11, 23, 4, 30)),
    ("monthly 1 09:00", "UTC", utc(2026, 11, 20, 0, 0), utc(2026, 12, 1, 9, 0)),
    ("monthly 1 09:00", "Asia/Tokyo", utc(2026, 11, 30, 23, 59), utc(2026, 12, 1, 0, 0)),
    ("monthly 31 09:00", "UTC", utc(2027, 2, 1, 0, 0), utc(2027, 2, 28, 9, 0)),
    ("monthly 31 09:00", "UTC", utc(2028, 2, 1, 0, 0), utc(2028, 2, 29, 9, 0)),
    ("monthly 30 09:00", "UTC", utc(2026, 12, 30, 9, 0), utc(2027, 1, 30, 9, 0)),
    # Europe/Berlin: clocks go forward 2026-03-29 02:00 -> 03:00, back 2026-10-25 03:00 -> 02:00.
    ("mon 09:00", "Europe/Berlin", utc(2026, 3, 27, 0, 0), utc(2026, 3, 30, 7, 0)),
    ("mon 09:00", "Europe/Berlin", utc(2026, 10, 23, 0, 0), utc(2026, 10, 26, 8, 0)),
    ("daily 02:30", "Europe/Berlin", utc(2026, 3, 28, 12, 0), utc(2026, 3, 29, 1, 30)),  # 03:30
    ("daily 02:30", "Europe/Berlin", utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 30)),
    ("daily 02:30", "Europe/Berlin", utc(2026, 10, 24, 12, 0), utc(2026, 10, 25, 0, 30)),  # 1st
    ("daily 02:30", "Europe/Berlin", utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)),  # once
    # America/New_York: forward 2026-03-08 02:00 -> 03:00, back 2026-11-01 02:00 -> 01:00.
    ("sun 01:30", "America/New_York", utc(2026, 10, 31, 12, 0), utc(2026, 11, 1, 5, 30)),
    ("sun 02:15", "America/New_York", utc(2026, 3, 7, 12, 0), utc(2026, 3, 8, 7, 15)),  # 03:15
    # Australia/Lord_Howe moves by 30 minutes: back 2026-04-05 02:00 -> 01:30.
    ("daily 01:45", "Australia/Lord_Howe", utc(2026, 4, 4, 12, 0), utc(2026, 4, 4, 14, 45)),
]


@pytest.mark.parametrize(("text", "tz", "after", "expected"), NEXT)
def test_next_after_keeps_the_local_time_across_dst(
    text: str, tz: str, after: datetime, expected: datetime
):
    schedule = parse_schedule(text, tz)

    when = schedule.next_after(after)

    assert when == expected
    assert when.tzinfo is UTC


def test_next_after_fires_each_local_day_once_through_a_year_of_dst_changes():
    for tz in ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"):
        for clock in ("00:00", "01:30", "02:30", "09:00"):
            schedule = parse_schedule(f"daily {clock}", tz)
            when = utc(2026, 1, 1)
            days = []
            for _ in range(366):
                after = schedule.next_after(when)
                assert after > when
                assert after - when <= timedelta(hours=25), (tz, clock, when)
                days.append(after.astimezone(schedule.tz).date())
                when = after
            assert len(set(days)) == 366, (tz, clock)  # one a day, none twice


@pytest.mark.parametrize(("text", "tz", "after", "expected"), NEXT)
def test_latest_at_is_the_inverse_of_next_after(
    text: str, tz: str, after: datetime, expected: datetime
):
    schedule = parse_schedule(text, tz)

    assert schedule.latest_at(expected) == expected
    assert schedule.latest_at(expected - timedelta(seconds=1)) <= after


def test_due_sends_a_missed_time_once():
    schedule = parse_schedule("mon 09:00", "Europe/Berlin")
    sent = utc(2026, 11, 9, 8, 0)  # Monday 2026-11-09 09:00 Berlin

    assert schedule.due(sent, utc(2026, 11, 16, 7, 59)) is None  # not yet
    assert schedule.due(sent, utc(2026, 11, 16, 8, 0)) == utc(2026, 11, 16, 8, 0)
    # Down for three weeks: back on Wednesday, one report for the latest Monday.
    assert schedule.due(sent, utc(2026, 12, 2, 10, 0)) == utc(2026, 11, 30, 8, 0)
    assert schedule.due(utc(2026, 11, 30, 8, 0), utc(2026, 12, 2, 10, 0)) is None


def test_due_waits_for_the_first_time_after_a_report_is_configured():
    schedule = parse_schedule("daily 08:00")
    configured = utc(2026, 11, 20, 12, 0)

    assert schedule.due(configured, utc(2026, 11, 20, 23, 0)) is None
    assert schedule.due(configured, utc(2026, 11, 21, 8, 0)) == utc(2026, 11, 21, 8, 0)


def test_schedule_str_round_trips():
    schedule = ReportSchedule("monthly", time(9, 0), UTC, day=1)

    assert str(schedule) == "monthly 1 09:00"
    assert str(parse_schedule("friday 7:05")) == "fri 07:05"
