"""What the simulator answers to ``lineItems:search`` (v2, resource version 2024-08-05,
``searchInvoiceLineItems`` in ``../shared/atlas-openapi``): an invoice's daily usage,
filtered, sorted and paged as the spec declares.

Daily line items are derived from the scenario, never stored, so they always add up:
each :class:`~invoice_watch.simulator.scenario.ScenarioLineItem`'s amount is spread
over the invoice's days of usage (its first day up to the day before ``now``: a day's
charges post the next day; every day of a closed period), by weight: 1000 a day, 600
on weekends for a ``weekly`` item, a small deterministic jitter (±3%), and
``spike_times`` the usual on its ``spike_day``. The cents of each day are the largest
remainders of that split, so that a line item's days sum to its ``totalPriceCents``
exactly, and a timeline's ``set_amount`` scales every day alike (a spike stays one).

Each day of a line item is one ``PublicApiUsageDetailsLineItemView``: ``usageDate`` (the
day, midnight UTC), ``billDate`` (the next day), ``groupId`` (the project),
``clusterName``, ``description`` (the SKU's name), ``totalPriceCents``, ``quantity`` and
``unitPriceDollars``, ``cloudProvider``.

The request (:func:`parse_query`): a JSON object (``ApiPublicUsageDetailsQueryRequest``,
``{}`` for everything) of ``filters`` (``UsageDetailsFilterRequest``), ``sortField``
(default ``BILL_DATES``) and ``sortOrder`` (default ``DESCENDING``). As strict as the rest
of the simulator: an undeclared key, a value of the wrong type or format, or a body
that is not JSON is a 400 naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from invoice_watch.simulator.scenario import HEX24, ScenarioInvoice, ScenarioLineItem
from invoice_watch.simulator.views import iso

QUERY_PARAMS = frozenset({"envelope", "itemsPerPage", "pageNum"})  # as the spec declares
MAX_BODY_BYTES = 64 * 2**10
WEEKDAY_WEIGHT = 1000
WEEKEND_WEIGHT = 600
JITTER = 30  # +- on a weight of 1000: 3%

SORT_FIELDS = ("USAGE_DATES", "BILL_DATES", "TOTAL_PRICE_CENTS")
SORT_ORDERS = ("ASCENDING", "DESCENDING")
# The spec's enum of `skuServices`.
SKU_SERVICES = (
    "Atlas",
    "Clusters",
    "Storage",
    "Serverless Instances",
    "Backup",
    "Data Transfer",
    "BI Connector",
    "DSC Compute",
    "DSC Storage",
    "Premium Features",
    "Atlas Data Federation",
    "Atlas Stream Processing",
    "App Services",
    "Charts",
    "Cloud Manager",
    "Cloud Manager Standard/Premium",
    "Legacy Backup",
    "AI Model APIs",
    "Automated Embedding",
    "Native Reranking",
    "Flex Consulting",
    "Support",
    "Credits",
)
# SKU name fragment -> the service it belongs to (first match wins; else "Atlas").
_SERVICE_OF = (
    ("SERVERLESS", "Serverless Instances"),
    ("BACKUP", "Backup"),
    ("DATA_TRANSFER", "Data Transfer"),
    ("STORAGE", "Storage"),
    ("BI_CONNECTOR", "BI Connector"),
    ("DATA_FEDERATION", "Atlas Data Federation"),
    ("STREAM", "Atlas Stream Processing"),
    ("INSTANCE", "Clusters"),
    ("SUPPORT", "Support"),
)
_DATE_FILTERS = ("billStartDate", "billEndDate", "usageStartDate", "usageEndDate")
_ID_FILTERS = ("clusterIds", "groupIds")
_FILTERS = (*_DATE_FILTERS, *_ID_FILTERS, "includeZeroCentLineItems", "skuServices")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def service_of(sku: str) -> str:
    """The ``skuServices`` value a SKU belongs to."""
    return next((service for fragment, service in _SERVICE_OF if fragment in sku), "Atlas")


@dataclass(frozen=True)
class DailyItem:
    """One day of one scenario line item."""

    item: ScenarioLineItem
    day: date
    cents: int

    @property
    def bill_day(self) -> date:
        return self.day + timedelta(days=1)


def usage_days(invoice: ScenarioInvoice, now: datetime) -> list[date]:
    """The invoice's days of usage: its first day up to the day before ``now`` (at
    least its first day), within its period."""
    first = invoice.start.date()
    last = min((invoice.end - timedelta(days=1)).date(), (now - timedelta(days=1)).date())
    last = max(first, last)
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def _weight(invoice: ScenarioInvoice, item: ScenarioLineItem, day: date, index: int, n: int) -> int:
    weight = WEEKEND_WEIGHT if item.daily == "weekly" and day.weekday() >= 5 else WEEKDAY_WEIGHT
    seed = f"{invoice.id}|{item.sku}|{item.cluster}|{day.isoformat()}".encode()
    jitter = int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % (2 * JITTER + 1) - JITTER
    weight += weight * jitter // WEEKDAY_WEIGHT
    spike = item.spike_day
    if spike is not None and (day.day == spike if spike > 0 else index == n + spike):
        weight = round(weight * item.spike_times)
    return max(weight, 1)


def split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, in whole units that sum to it
    exactly (largest remainders first, then the earliest)."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


def daily_items(invoice: ScenarioInvoice, now: datetime) -> list[DailyItem]:
    """Every day of every line item of ``invoice``, as of ``now``."""
    days = usage_days(invoice, now)
    found = []
    for item in invoice.line_items:
        weights = [_weight(invoice, item, day, i, len(days)) for i, day in enumerate(days)]
        for day, cents in zip(days, split(item.total_cents, weights), strict=True):
            found.append(DailyItem(item, day, cents))
    return found


def item_json(daily: DailyItem) -> dict[str, Any]:
    """One ``PublicApiUsageDetailsLineItemView``."""
    item = daily.item
    return {
        "billDate": iso(datetime.combine(daily.bill_day, datetime.min.time(), UTC)),
        "cloudProvider": item.cloud_provider,
        "clusterName": item.cluster,
        "description": item.description,
        "groupId": item.project_id,
        "quantity": round(daily.cents / (item.unit_price_dollars * 100), 6),
        "totalPriceCents": daily.cents,
        "unitPriceDollars": item.unit_price_dollars,
        "usageDate": iso(datetime.combine(daily.day, datetime.min.time(), UTC)),
    }


class BadQuery(ValueError):
    """A request body the operation refuses: ``field`` (dotted) and why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@dataclass(frozen=True)
class Query:
    """A parsed ``ApiPublicUsageDetailsQueryRequest``."""

    sort_field: str = "BILL_DATES"
    descending: bool = True
    include_zero: bool = False
    usage: tuple[date | None, date | None] = (None, None)
    bill: tuple[date | None, date | None] = (None, None)
    cluster_ids: frozenset[str] | None = None
    group_ids: frozenset[str] | None = None
    services: frozenset[str] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def matches(self, daily: DailyItem) -> bool:
        item = daily.item
        return (
            (self.include_zero or daily.cents != 0)
            and _within(daily.day, self.usage)
            and _within(daily.bill_day, self.bill)
            and (self.cluster_ids is None or item.cluster_id in self.cluster_ids)
            and (self.group_ids is None or item.project_id in self.group_ids)
            and (self.services is None or service_of(item.sku) in self.services)
        )

    def sort_key(self) -> Callable[[DailyItem], tuple[Any, ...]]:
        def key(daily: DailyItem) -> tuple[Any, ...]:
            primary: Any = {
                "USAGE_DATES": daily.day,
                "BILL_DATES": daily.bill_day,
                "TOTAL_PRICE_CENTS": daily.cents,
            }[self.sort_field]
            item = daily.item
            return (primary, item.project_id, item.cluster, item.description, daily.day)

        return key


def _within(day: date, bounds: tuple[date | None, date | None]) -> bool:
    start, end = bounds
    return (start is None or day >= start) and (end is None or day <= end)


def _day(name: str, value: object) -> date:
    if isinstance(value, str) and _DAY.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise BadQuery(f"filters.{name}", "must be a date, YYYY-MM-DD")


def _strings(name: str, value: object, check: Callable[[str], bool], what: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise BadQuery(f"filters.{name}", "must be an array")
    for element in value:
        if not isinstance(element, str) or not check(element):
            raise BadQuery(f"filters.{name}", f"each element must be {what}")
    if len(set(value)) != len(value):
        raise BadQuery(f"filters.{name}", "must not hold the same value twice")
    return frozenset(value)


def parse_query(body: bytes) -> Query:
    """The request body -> :class:`Query`; :class:`BadQuery` for anything the spec's
    ``ApiPublicUsageDetailsQueryRequest`` does not allow."""
    if not body.strip():
        raise BadQuery("body", "is required: send {} to get every line item")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadQuery("body", "is not JSON") from None
    if not isinstance(data, dict):
        raise BadQuery("body", "must be a JSON object")
    for key in data:
        if key not in ("filters", "sortField", "sortOrder"):
            raise BadQuery(str(key), "is not an attribute of this request")
    sort_field = data.get("sortField", "BILL_DATES")
    if sort_field not in SORT_FIELDS:
        raise BadQuery("sortField", f"must be one of {', '.join(SORT_FIELDS)}")
    sort_order = data.get("sortOrder", "DESCENDING")
    if sort_order not in SORT_ORDERS:
        raise BadQuery("sortOrder", f"must be one of {', '.join(SORT_ORDERS)}")
    filters = data.get("filters", {})
    if not isinstance(filters, dict):
        raise BadQuery("filters", "must be an object")
    for key in filters:
        if key not in _FILTERS:
            raise BadQuery(f"filters.{key}", "is not a filter of this request")
    days = {name: _day(name, filters[name]) for name in _DATE_FILTERS if name in filters}
    include_zero = filters.get("includeZeroCentLineItems", False)
    if not isinstance(include_zero, bool):
        raise BadQuery("filters.includeZeroCentLineItems", "must be true or false")
    ids = {
        name: _strings(name, filters[name], lambda s: HEX24.fullmatch(s) is not None, "24 hex")
        for name in _ID_FILTERS
        if name in filters
    }
    services = (
        _strings("skuServices", filters["skuServices"], SKU_SERVICES.__contains__, "a service")
        if "skuServices" in filters
        else None
    )
    return Query(
        sort_field=sort_field,
        descending=sort_order == "DESCENDING",
        include_zero=include_zero,
        usage=(days.get("usageStartDate"), days.get("usageEndDate")),
        bill=(days.get("billStartDate"), days.get("billEndDate")),
        cluster_ids=ids.get("clusterIds"),
        group_ids=ids.get("groupIds"),
        services=services,
        raw=data,
    )


def search(invoice: ScenarioInvoice, query: Query, now: datetime) -> list[DailyItem]:
    """The invoice's daily line items the query selects, in its order."""
    found = [daily for daily in daily_items(invoice, now) if query.matches(daily)]
    found.sort(key=query.sort_key(), reverse=query.descending)
    return found
