"""When to try again: the one ``Retry-After`` parser and the one backoff of the product.

Every retry loop (the Atlas client, the outbox, every receiver) asks this module how
long to wait, so that a hostile or broken ``Retry-After`` (``0``, ``-1``, ``nan``, a date
a year away) can never turn into a storm of requests or a wait of a day.
"""

from __future__ import annotations

import math
import random
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# RFC 9110 §10.2.3: Retry-After = HTTP-date / delay-seconds, delay-seconds = 1*DIGIT.
_DELAY_SECONDS = re.compile(r"[0-9]{1,10}")
# No retry comes sooner than this, whatever the server asked: `Retry-After: 0` from a
# rate limiter would otherwise make every attempt an immediate one.
MIN_RETRY_SECONDS = 1.0


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (RFC 9110 §10.2.3), or None.

    ``value``: the header's value, either delay-seconds (digits only) or an HTTP-date
    (IMF-fixdate, or the obsolete RFC 850 and asctime forms, as RFC 9110 §5.6.7 says a
    recipient accepts); ``now``: the current time, timezone-aware UTC, for a date.
    Anything else (absent, negative, fractional, ``nan``, ``inf``, junk) is None: the
    caller then backs off as if no wish had been expressed. A date in the past is 0.
    The result is not yet bounded: see :func:`retry_delay`.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter, in seconds: uniform in ``[c/2, c]`` where
    ``c = min(cap, base * 2**attempt)`` (``attempt`` counts from 0)."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    return rng.uniform(ceiling / 2, ceiling)


def retry_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float,
    cap: float,
    rng: random.Random,
    retry_after_cap: float | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1``: the receiver's ``Retry-After``
    (from :func:`parse_retry_after`) when it gave a valid one, else :func:`backoff`.

    Never more than ``cap``. A ``Retry-After`` is never honoured below
    :data:`MIN_RETRY_SECONDS`, and is bounded by ``retry_after_cap`` instead of ``cap``
    when given (the Atlas client honours a longer wish than its own backoff cap, up to a
    limit, rather than draw another 429).
    """
    if retry_after is not None and math.isfinite(retry_after):
        limit = cap if retry_after_cap is None else retry_after_cap
        return min(max(retry_after, MIN_RETRY_SECONDS), max(limit, MIN_RETRY_SECONDS))
    return backoff(attempt, base=base, cap=cap, rng=rng)
