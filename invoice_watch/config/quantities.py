"""The quantities of the configuration, each with its unit: durations (``90s``, ``15m``,
``1h``, ``1d`` or ``1h30m`` in the file, ``timedelta`` in the models, each field with its
own upper bound, :func:`at_most`, some with a lower one, :func:`at_least`), sizes
(``64MiB`` in the file, bytes in the models), money (USD in the file, integer cents in
the models, without float arithmetic) and plain numbers (:data:`Whole`, :data:`Number`).

Digits are ASCII ``[0-9]`` everywhere: ``\\d`` and ``int()`` also take other scripts'
digits (``５s`` would be 5 seconds), and a YAML ``true`` is no number (pydantic's lax
mode reads it as 1). :func:`config_duration` writes a duration back as the file does,
for every message and log line that names one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from invoice_watch.format import usd

_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_HELP = "use a number and a unit s, m, h or d, e.g. 90s, 15m, 1h, 1d or 1h30m"
# Longer than any setting may be (each field has its own bound, `at_most`), short
# enough for any datetime arithmetic (a date plus it stays within year 9999).
_DURATION_LIMIT = timedelta(days=3660)
_SECONDS = (86400, 3600, 60, 1)
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def config_duration(value: timedelta | float) -> str:
    """A duration (or seconds) written as the configuration file writes it, to the
    second: ``90`` -> ``1m30s``, ``900`` -> ``15m``, ``0.4`` -> ``0s``; what every log
    line and message that names a duration shows, so that it can be searched for in
    the file and written back (``str(timedelta)`` gives ``0:00:02``)."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    rest = max(0, round(seconds))
    parts = []
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        delta = value
    elif (
        isinstance(value, str)
        and (m := _DURATION.fullmatch(value.replace(" ", "")))
        and any(m.groups())
    ):
        # Past the limit (or timedelta's range), every value is just "too long": the
        # field's own bound (`at_most`) says by how much.
        limit = int(_DURATION_LIMIT.total_seconds()) + 1
        numbers = [(g or "0").lstrip("0") or "0" for g in m.groups()]
        if any(len(n) > 12 for n in numbers):
            seconds = limit
        else:
            seconds = min(limit, sum(int(n) * u for n, u in zip(numbers, _SECONDS, strict=True)))
        delta = timedelta(seconds=seconds)
    elif isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"a duration needs a unit: write `{value}s` for {value} seconds; units are "
            "s, m, h and d (e.g. 90s, 15m, 1h, 1d)"
        )
    else:
        raise ValueError(f"invalid duration `{value}`; {_DURATION_HELP}")
    if delta < timedelta(0):
        raise ValueError("a duration cannot be negative")
    return delta


def _parse_positive_duration(value: object) -> timedelta:
    delta = _parse_duration(value)
    if delta < timedelta(seconds=1):
        raise ValueError(f"must be at least 1s; {_DURATION_HELP}")
    return delta


# A duration of at least one second; `DurationOrZero` also allows `0s`. Each field adds
# its upper bound with `at_most`.
Duration = Annotated[timedelta, BeforeValidator(_parse_positive_duration)]
DurationOrZero = Annotated[timedelta, BeforeValidator(_parse_duration)]


@dataclass(frozen=True)
class _Bound:
    """A duration field's bound, upper or lower; ``why`` completes "must be at most
    LIMIT: " (or "at least")."""

    limit: timedelta
    why: str
    lower: bool = False

    def __call__(self, value: timedelta) -> timedelta:
        if value < self.limit if self.lower else value > self.limit:
            side = "least" if self.lower else "most"
            raise ValueError(f"must be at {side} {config_duration(self.limit)}: {self.why}")
        return value


def at_most(limit: timedelta, why: str) -> AfterValidator:
    """The upper bound of one duration field: ``Annotated[Duration, at_most(limit, why)]``."""
    return AfterValidator(_Bound(limit, why))


def at_least(limit: timedelta, why: str) -> AfterValidator:
    """A lower bound of one duration field above :data:`Duration`'s one second:
    ``Annotated[Duration, at_least(limit, why), at_most(...)]``."""
    return AfterValidator(_Bound(limit, why, lower=True))


# The timeout of one request or SMTP conversation (Atlas, every notifier).
RequestTimeout = Annotated[
    Duration,
    at_most(
        timedelta(minutes=10), "one request or conversation that has not answered by then will not"
    ),
]


_SIZE = re.compile(r"([0-9]+) *([KMG]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
               "gib": 2**30}  # fmt: skip
_SIZE_HELP = "write a size like 64MiB, 512KiB or 1GiB (or a number of bytes)"


def _parse_size(value: object) -> int:
    """A size in bytes: an int, or text with a unit (B, KB, MB, GB, KiB, MiB, GiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        size = int(m[1]) * _SIZE_UNITS[(m[2] or "").lower()]
    else:
        raise ValueError(f"invalid size `{value}`; {_SIZE_HELP}")
    return size


def _check_response_size(size: int) -> int:
    if not 64 * 2**10 <= size <= 2**30:
        raise ValueError(f"must be between 64KiB and 1GiB; {_SIZE_HELP}")
    return size


# A response size cap, in bytes.
ResponseSize = Annotated[int, BeforeValidator(_parse_size), AfterValidator(_check_response_size)]

_MONEY = re.compile(r"-?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_MONEY_HELP = 'write an amount in USD like 5000, 5000.50 or "$5,000.50"'
# Far above any invoice, far below SQLite's INTEGER (int64) limit.
MAX_MONEY_CENTS = 100 * 10**12


def _parse_money(value: object) -> int:
    """USD (int, Decimal or text) -> integer cents, without float arithmetic."""
    if isinstance(value, int) and not isinstance(value, bool):
        amount = Decimal(value)
    elif isinstance(value, Decimal) and value.is_finite():
        amount = value
    elif isinstance(value, str) and _MONEY.fullmatch(value.strip()):
        amount = Decimal(value.strip().replace("$", "").replace(",", ""))
    else:
        raise ValueError(f"invalid amount `{value}`: {_MONEY_HELP}")
    if amount < 0:
        raise ValueError(f"the amount cannot be negative: {_MONEY_HELP}")
    if amount > MAX_MONEY_CENTS // 100:  # before any arithmetic: 1e999999 is a Decimal
        raise ValueError(f"must be at most {usd(MAX_MONEY_CENTS)}")
    decimals = -int(amount.as_tuple().exponent)
    whole_digits = len(amount.as_tuple().digits) - decimals
    if decimals == 3 and 1 <= whole_digits <= 3 and "," not in str(value):
        # 5.000 is five thousand dollars where a point groups thousands (Germany, Italy,
        # Brazil...), and five dollars in the US: never guess an alert threshold.
        thousands = int(amount * 1000)
        cents = amount * 100
        small = f", or {cents / 100:.2f} for {usd(int(cents))}" if cents % 1 == 0 else ""
        raise ValueError(
            f"`{str(value).strip()}` has 3 decimals, so it is ambiguous: write {thousands} "
            f'(or "{thousands:,}") for {usd(thousands * 100)}{small}; an amount has at '
            "most 2 decimals (cents)"
        )
    if decimals > 2:
        raise ValueError("an amount has at most 2 decimals (cents), e.g. 5000.50")
    return int(amount * 100)


# Money in USD in the file, integer cents in the model.
Money = Annotated[int, BeforeValidator(_parse_money)]


def _parse_whole(value: object) -> int:
    """A whole number: an int (not a bool), or text of ASCII digits (``${VAR}``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if _WHOLE.fullmatch(text):
        if len(text) > 18:  # a YAML int too long for Python to convert, or text
            raise ValueError("expected a whole number, and this one is far too large")
        return int(text)
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, not {str(value).lower()}")
    raise ValueError("expected a whole number (digits 0-9)")


_WHOLE = re.compile(r"[0-9]+")

# A whole number; pydantic's own `int` also takes true (1), 4.0 and "1_000".
Whole = Annotated[int, BeforeValidator(_parse_whole)]

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")


def _parse_number(value: object) -> float:
    """A finite number: an int or decimal from YAML (not a bool), or text like ``12.5``
    or ``1e3``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not {str(value).lower()}")
    if isinstance(value, int | Decimal | float):
        number = float(value) if not isinstance(value, int) or value < 10**300 else math.inf
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and len(value) < 100:
        number = float(value.strip())
    else:
        raise ValueError("expected a number like 20 or 12.5 (digits 0-9)")
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


# A finite number (float); not a bool, and only ASCII digits in text.
Number = Annotated[float, BeforeValidator(_parse_number)]


def _parse_flag(value: object) -> bool:
    """true or false (YAML's booleans, or that text from ``${VAR}``); not 1 or "yes"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("expected true or false")


# A boolean; pydantic's own `bool` also takes 1, "yes", "on" and "t".
Flag = Annotated[bool, BeforeValidator(_parse_flag)]
