"""Daily usage of an invoice from Atlas's ``lineItems:search`` (v2 only, resource
version 2024-08-05), or from its CSV where that operation is not there: the request,
its answers as :class:`LineItem` s (:func:`search_body`, :func:`parse_usage_page`:
pure, JSON in, line items out) and the fetch (:class:`UsageReader`, on the client's
transport: paged, bounded, its errors those of every other read).

The operation (``searchInvoiceLineItems``, ``../shared/atlas-openapi``): ``GET
{prefix}/orgs/{orgId}/invoices/{invoiceId}/lineItems:search`` with ``Accept`` and
``Content-Type: application/vnd.atlas.2024-08-05+json`` and a JSON body of filters
(``ApiPublicUsageDetailsQueryRequest``; ``{}`` for every line item), paged with
``itemsPerPage`` (1..500) and ``pageNum``. Each result
(``PublicApiUsageDetailsLineItemView``) is one day of one SKU of one cluster:
``usageDate``, ``billDate``, ``groupId`` (the project), ``clusterName``,
``description`` (the SKU's name: the view has no ``sku`` field), ``totalPriceCents``,
``quantity``, ``unitPriceDollars``, ``cloudProvider``. It has no project name: give
``names`` (project id -> name, e.g. from the pending invoice's ``lineItems``).

v1.0 and Cloud Manager have no such operation: their daily usage is the invoice CSV's
``Usage Date`` column (the fallback, also taken when the v2 operation answers 404, 406
or 415: an Atlas that does not serve resource version 2024-08-05 yet).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal

from invoice_watch.atlas.bounds import INT64_MAX, PARSE_INLINE
from invoice_watch.atlas.connection import Body
from invoice_watch.atlas.parse import line_item_cents
from invoice_watch.constants import LINE_ITEM_MAX_CENTS, USAGE_MEDIA_TYPE
from invoice_watch.errors import FetchDataError, FetchStatusError
from invoice_watch.safe_text import clip, one_line
from invoice_watch.types import LineItem

if TYPE_CHECKING:
    from invoice_watch.atlas.transport import Transport

PATH = "/orgs/{orgId}/invoices/{invoiceId}/lineItems:search"
ITEMS_PER_PAGE = 500  # the spec's maximum
# A search never runs past this many pages (500 line items each), whatever
# `totalCount` says: a month of daily line items of 1,000 clusters with 5 SKUs each.
MAX_PAGES = 320
MAX_ITEMS = MAX_PAGES * ITEMS_PER_PAGE
# What an Atlas without the v2 operation (or its resource version) answers it: the CSV
# is read instead.
UNSUPPORTED = frozenset({404, 406, 415})
# How long (seconds) an organization whose search answered one of them is read through
# the CSV before the search is tried again: less than usage.refresh's default (6 h),
# so that its next refresh tries the search again.
FALLBACK_SECONDS = 3600.0
Source = Literal["search", "csv"]
_HEX24 = re.compile(r"[a-f0-9]{24}")
_LABEL = 120  # characters of a project, cluster or SKU name (as atlas/parse.py cuts them)

SortField = Literal["USAGE_DATES", "BILL_DATES", "TOTAL_PRICE_CENTS"]

# The most one line item (one day of one SKU of one cluster) may amount to, either
# sign: USD 100 billion; and the most the line items of one invoice may add up to, their
# amounts taken without sign: USD 10 trillion. Larger is no bill but a broken answer:
# refused, so that no sum the state or a report takes of them can overflow an int64
# (MAX_ITEMS items of MAX_ITEM_CENTS each stay far below INT64_MAX).
MAX_ITEM_CENTS = LINE_ITEM_MAX_CENTS  # the state refuses larger too
MAX_INVOICE_CENTS = 10**15


def check_amounts(org_id: str, invoice_id: str, items: Sequence[LineItem]) -> None:
    """FetchDataError when a line item's amount is over :data:`MAX_ITEM_CENTS`, or all
    of them (without sign) over :data:`MAX_INVOICE_CENTS`: the answer is refused."""
    total = 0
    for item in items:
        if abs(item.amount_cents) > MAX_ITEM_CENTS:
            raise FetchDataError(
                org_id,
                f"invoice {invoice_id}: a line item amounts to more than "
                f"USD {MAX_ITEM_CENTS // 100:,}; the line items were not read",
            )
        total += abs(item.amount_cents)
    if total > MAX_INVOICE_CENTS:
        raise FetchDataError(
            org_id,
            f"invoice {invoice_id}: the line items add up to more than "
            f"USD {MAX_INVOICE_CENTS // 100:,}; the line items were not read",
        )


def search_body(
    *,
    usage_start: date | None = None,
    usage_end: date | None = None,
    group_ids: tuple[str, ...] = (),
    include_zero: bool = False,
    sort_field: SortField = "USAGE_DATES",
) -> dict[str, Any]:
    """The request body (``ApiPublicUsageDetailsQueryRequest``): the line items used
    from ``usage_start`` to ``usage_end`` (both inclusive, UTC days; None: unbounded),
    of the projects ``group_ids`` (all when empty), zero-cent ones only with
    ``include_zero``, oldest first."""
    filters: dict[str, Any] = {"includeZeroCentLineItems": include_zero}
    if usage_start is not None:
        filters["usageStartDate"] = usage_start.isoformat()
    if usage_end is not None:
        filters["usageEndDate"] = usage_end.isoformat()
    if group_ids:
        filters["groupIds"] = sorted(set(group_ids))
    return {"filters": filters, "sortField": sort_field, "sortOrder": "ASCENDING"}


class TooManyLineItems(FetchDataError):
    """The search goes on past :data:`MAX_PAGES`: more line items than are kept. Not
    worth trying again soon (the line items stage backs off)."""


@dataclass(frozen=True)
class UsagePage:
    """One page of a search: its line items, ``totalCount`` (None when absent), and
    whether a next page exists (a ``next`` link, or more in ``totalCount`` than the
    pages so far hold)."""

    items: tuple[LineItem, ...]
    total: int | None
    has_next: bool


def _label(value: object, default: str) -> str:
    if not isinstance(value, str) or not value.strip():
        return default
    return clip(one_line(value[: 4 * _LABEL]), _LABEL) or default


def _day(org_id: str, invoice_id: str, value: object) -> date:
    """``usageDate`` (ISO 8601 date-time, UTC; a bare date accepted) -> its UTC day.
    FetchDataError when it is none, or out of range (a UTC day past year 9999)."""
    if isinstance(value, str) and len(value) <= 40:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                return when.date()
            try:
                return when.astimezone(UTC).date()
            except OverflowError:
                raise FetchDataError(
                    org_id, f"invoice {invoice_id}: a line item's `usageDate` is out of range"
                ) from None
    raise FetchDataError(
        org_id, f"invoice {invoice_id}: a line item's `usageDate` is not an ISO 8601 timestamp"
    )


def parse_usage_page(
    org_id: str,
    invoice_id: str,
    data: Any,
    *,
    page_num: int = 1,
    items_per_page: int = ITEMS_PER_PAGE,
    names: Mapping[str, str] | None = None,
) -> UsagePage:
    """One page of ``lineItems:search`` (``PaginatedPublicApiUsageDetailsLineItemView``,
    already decoded; an ``envelope=true`` answer too) -> :class:`UsagePage`.

    Each result becomes a :class:`LineItem`: ``project`` is ``names[groupId]`` (else
    the id, else "—"), ``project_id`` the ``groupId`` (empty unless 24 hex digits),
    ``cluster`` the ``clusterName``, ``sku`` the ``description``, ``usage_date`` the UTC
    day of ``usageDate``. A result that is not an object is skipped. FetchDataError for
    a body without a ``results`` list, a ``totalPriceCents`` that is not an int64, a
    missing or malformed ``usageDate``, a ``totalCount`` that is not a count."""
    names = names or {}
    if isinstance(data, dict) and "content" in data and "status" in data:
        data = data["content"]  # envelope=true
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FetchDataError(org_id, "the line item search answer has no `results` list")
    total = data.get("totalCount")
    if total is not None and (type(total) is not int or not 0 <= total <= INT64_MAX):
        raise FetchDataError(org_id, "the line item search's `totalCount` is not a count")
    items = []
    for entry in data["results"]:
        if not isinstance(entry, dict):
            continue
        cents = line_item_cents(org_id, invoice_id, entry)
        group = entry.get("groupId")
        project_id = group if isinstance(group, str) and _HEX24.fullmatch(group) else ""
        items.append(
            LineItem(
                project=_label(names.get(project_id) or project_id, "—"),
                sku=_label(entry.get("description"), "—"),
                cluster=_label(entry.get("clusterName"), ""),
                amount_cents=cents,
                project_id=project_id,
                usage_date=_day(org_id, invoice_id, entry.get("usageDate")),
            )
        )
    links = data.get("links")
    has_next = isinstance(links, list) and any(
        isinstance(link, dict) and link.get("rel") == "next" for link in links
    )
    if not has_next and total is not None:
        has_next = page_num * items_per_page < total and len(data["results"]) > 0
    return UsagePage(tuple(items), total, has_next)


@dataclass(frozen=True)
class UsageFetch:
    """An invoice's line items as fetched, and how: ``search`` (``lineItems:search``,
    daily) or ``csv`` (the invoice CSV; daily where it has the Usage Date column)."""

    items: tuple[LineItem, ...]
    source: Source


CsvReader = Callable[[str, str], Awaitable[list[LineItem]]]


class UsageReader:
    """Fetches an invoice's daily line items on the client's ``transport``: every page
    of ``lineItems:search`` (v2), else the CSV (``csv``: the client's reader of
    ``/invoices/{id}/csv``). Where the search answers 404, 406 or 415 (an Atlas without
    it, or a 404 of that one invoice), THAT organization is read through the CSV for
    :data:`FALLBACK_SECONDS` (``monotonic``: the clock's), then the search is tried
    again; other organizations are not touched."""

    def __init__(
        self, transport: Transport, api: str, csv: CsvReader, monotonic: Callable[[], float]
    ) -> None:
        self._transport = transport
        self._csv = csv
        self._monotonic = monotonic
        self.search_served = api == "v2"
        self._csv_until: dict[str, float] = {}  # org -> monotonic end of its fallback

    def search_supported(self, org_id: str) -> bool:
        """Whether the organization's line items are read with the search now."""
        if not self.search_served:
            return False
        until = self._csv_until.get(org_id)
        if until is None:
            return True
        if self._monotonic() >= until:
            del self._csv_until[org_id]
            return True
        return False

    async def fetch(
        self, org_id: str, invoice_id: str, names: Mapping[str, str] | None = None
    ) -> UsageFetch:
        """The invoice's line items (``names``: project id -> name). Raises FetchError
        only, as the other reads do (:mod:`~invoice_watch.atlas.errors`); amounts out
        of bounds too (:func:`check_amounts`)."""
        if self.search_supported(org_id):
            try:
                items = await self.search(org_id, invoice_id, names)
            except FetchStatusError as exc:
                if exc.status not in UNSUPPORTED:
                    raise
                self._csv_until[org_id] = self._monotonic() + FALLBACK_SECONDS
            else:
                check_amounts(org_id, invoice_id, items)
                return UsageFetch(items, "search")
        items = tuple(await self._csv(org_id, invoice_id))
        check_amounts(org_id, invoice_id, items)
        return UsageFetch(items, "csv")

    async def search(
        self, org_id: str, invoice_id: str, names: Mapping[str, str] | None = None
    ) -> tuple[LineItem, ...]:
        """Every page of the invoice's ``lineItems:search``, at most :data:`MAX_PAGES`
        (:class:`TooManyLineItems` past it)."""
        body = Body(json.dumps(search_body()).encode(), USAGE_MEDIA_TYPE)
        path = PATH.format(orgId=org_id, invoiceId=invoice_id)
        items: list[LineItem] = []
        for page_num in range(1, MAX_PAGES + 1):
            raw = await self._transport.get(
                org_id,
                path,
                {"itemsPerPage": str(ITEMS_PER_PAGE), "pageNum": str(page_num)},
                endpoint=PATH,
                json_body=body,
                quiet=True,  # the line items stage logs the outcome once while it lasts
            )
            page = await _parse(org_id, invoice_id, raw, page_num, names)
            items.extend(page.items)
            if not page.has_next or not page.items:
                return tuple(items)
        raise TooManyLineItems(
            org_id,
            f"invoice {invoice_id}: the line item search goes on past {MAX_PAGES} pages "
            f"({MAX_ITEMS:,} line items); the line items were not read",
        )


async def _parse(
    org_id: str, invoice_id: str, raw: bytes, page_num: int, names: Mapping[str, str] | None
) -> UsagePage:
    def run() -> UsagePage:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise FetchDataError(org_id, "the line item search answer is not JSON") from None
        return parse_usage_page(org_id, invoice_id, data, page_num=page_num, names=names)

    if len(raw) > PARSE_INLINE:  # off the event loop
        return await asyncio.to_thread(run)
    return run()
