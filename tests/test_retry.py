"""The one Retry-After parser and backoff (invoice_watch.retry): strict RFC 9110
parsing, a floor and a cap, whatever a server sends."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from invoice_watch.retry import MIN_RETRY_SECONDS, backoff, parse_retry_after, retry_delay

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("3", 3.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("120", 120.0),
        ("-5", None),
        ("-0", None),
        ("1.5", None),
        ("nan", None),
        ("NaN", None),
        ("inf", None),
        ("1e9", None),
        ("abc", None),
        ("", None),
        ("99999999999999999999", None),
        # HTTP-date forms (RFC 9110 §5.6.7): IMF-fixdate, RFC 850, asctime
        ("Mon, 30 Nov 2026 12:00:30 GMT", 30.0),
        ("Monday, 30-Nov-26 12:01:00 GMT", 60.0),
        ("Mon Nov 30 12:00:10 2026", 10.0),
        ("Sun, 29 Nov 2026 12:00:00 GMT", 0.0),  # in the past: now
        ("Mon, 99 Nov 2026 12:00:30 GMT", None),
    ],
)
def test_parse_retry_after_is_strict(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize("retry_after", [0.0, 0.001, float("nan"), float("-inf"), -3.0])
def test_retry_delay_never_storms(retry_after):
    """Retry-After 0 (or a value that slipped through as nan/negative) waits at least the
    floor, or falls back to backoff: never an immediate retry loop."""
    delay = retry_delay(0, retry_after, base=2.0, cap=60.0, rng=random.Random(1))
    assert delay >= MIN_RETRY_SECONDS


def test_retry_delay_caps_a_long_wish():
    rng = random.Random(1)
    assert retry_delay(0, 86_400.0, base=2.0, cap=60.0, rng=rng) == 60.0
    assert retry_delay(0, 86_400.0, base=1.0, cap=30.0, rng=rng, retry_after_cap=300.0) == 300.0
    assert retry_delay(0, 7.0, base=1.0, cap=30.0, rng=rng, retry_after_cap=300.0) == 7.0


def test_backoff_grows_with_jitter_and_respects_the_cap():
    rng = random.Random(7)
    for attempt in range(80):
        delay = backoff(attempt, base=1.0, cap=30.0, rng=rng)
        ceiling = min(30.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
