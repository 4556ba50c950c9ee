"""Daily usage of an invoice from Atlas's ``lineItems:search`` (v2 only, resource
version 2024-08-05): the request it takes and its answer as :class:`LineItem` s. Pure:
JSON in, line items out; the HTTP client that sends the request and walks the pages
is the fetch stage's.

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
``Usage Date`` column (the fallback).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from invoice_watch.atlas.bounds import INT64_MAX
from invoice_watch.atlas.parse import line_item_cents
from invoice_watch.errors import FetchDataError
from invoice_watch.safe_text import clip, one_line
from invoice_watch.types import LineItem

PATH = "/orgs/{orgId}/invoices/{invoiceId}/lineItems:search"
ITEMS_PER_PAGE = 500  # the spec's maximum
# A search never runs past this many pages (500 line items each), whatever
# `totalCount` says: a month of daily line items of 1,000 clusters with 5 SKUs each.
MAX_PAGES = 320
_HEX24 = re.compile(r"[a-f0-9]{24}")
_LABEL = 120  # characters of a project, cluster or SKU name (as atlas/parse.py cuts them)

SortField = Literal["USAGE_DATES", "BILL_DATES", "TOTAL_PRICE_CENTS"]


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
    """``usageDate`` (ISO 8601 date-time, UTC; a bare date accepted) -> its UTC day."""
    if isinstance(value, str) and len(value) <= 40:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if when.tzinfo is not None:
                return when.astimezone(UTC).date()
            return when.date()
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
