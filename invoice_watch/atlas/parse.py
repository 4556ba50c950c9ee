"""Atlas's answers -> :class:`~invoice_watch.types.Invoice` and
:class:`~invoice_watch.types.LineItem`: the listing's JSON pages, the pending invoices'
line items, an invoice's CSV. Pure: bytes in, values or a
:class:`~invoice_watch.errors.FetchDataError` out.

What a server sends leaves this module storable and printable, or not at all: ids and
``statusName`` have a grammar (an invoice that breaks it is refused as malformed),
numbers are int64 (else refused), timestamps carry a timezone, line item names are
escaped (:func:`invoice_watch.redact.printable`), ``linkedInvoices`` are nested at most
:data:`_MAX_LINK_DEPTH` deep, and an answer of more JSON values than its bound allows is
refused before it is parsed (:mod:`invoice_watch.atlas.bounds`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import operator
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from invoice_watch.atlas.bounds import BYTES_PER_VALUE, INT64_MAX, MAX_VALUES, json_values
from invoice_watch.atlas.errors import explain
from invoice_watch.constants import INVOICE_STATUSES, ITEMS_PER_PAGE
from invoice_watch.errors import FetchDataError
from invoice_watch.fast_invoice import new_invoice
from invoice_watch.safe_text import clip, one_line
from invoice_watch.types import AMOUNT_ATTRS, Invoice, LineItem, Listed, instant

_HEX24 = re.compile(r"[a-f0-9]{24}")  # fullmatch: `$` would let a trailing newline in
# Atlas's statusName values (PENDING, CLOSED, FORGIVEN, ...): a status it adds later is
# kept as is, provided it is one of these words.
_STATUS = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_KNOWN_STATUSES = frozenset(INVOICE_STATUSES)  # the usual ones need no regex
_INT64_DOLLARS = Decimal(INT64_MAX).scaleb(-2)  # int64 cents, in dollars
# A line item's project, SKU or cluster name is cut to this length (Atlas allows 64).
_LABEL = 120
# Atlas nests linked invoices one level deep; a deeper nesting is refused.
_MAX_LINK_DEPTH = 8


@dataclass(frozen=True, slots=True)
class Page:
    """One page of an invoice listing, parsed."""

    size: int  # entries in `results` (linked invoices not counted)
    total: int | None  # `totalCount`, an estimate, when the API gave one
    invoices: tuple[Invoice, ...]  # linked invoices flattened in, settled ones excepted
    settled: tuple[int, ...] = ()  # keys of the snapshot's settled invoices listed unchanged
    built: int = 0  # invoices parsed anew (those the caller did not hold as listed)
    staged: tuple[str, ...] = ()  # ids of those a paging.Stage took

    @property
    def full(self) -> bool:
        return self.size >= ITEMS_PER_PAGE


def pending_items(
    org_id: str, body: bytes, max_values: int = MAX_VALUES
) -> dict[str, list[LineItem]]:
    """The pending invoices' ``lineItems``, by invoice id (those nested in
    ``linkedInvoices`` too)."""
    items: dict[str, list[LineItem]] = {}
    queue: list[tuple[Any, int]] = [(raw, 0) for raw in _results(org_id, body, max_values)]
    while queue:
        entry, depth = queue.pop()
        if not isinstance(entry, dict):
            continue
        linked = entry.get("linkedInvoices")
        if isinstance(linked, list) and depth < _MAX_LINK_DEPTH:
            queue.extend((nested, depth + 1) for nested in linked)
        line_items = entry.get("lineItems")
        invoice_id = entry.get("id")
        if isinstance(invoice_id, str) and isinstance(line_items, list):
            if not _HEX24.fullmatch(invoice_id):
                continue  # no invoice of the listing has this id: no message asks for it
            items[invoice_id] = _line_items_json(org_id, invoice_id, line_items)
    return items


def _listing(org_id: str, body: bytes, max_values: int = MAX_VALUES) -> dict[str, Any]:
    """A list endpoint's answer, checked to hold a `results` list; FetchDataError for
    an answer of more than ``max_values`` JSON values (:func:`json_values`), before it is
    parsed."""
    if len(body) > max_values and (values := json_values(body)) > max_values:
        raise FetchDataError(
            org_id,
            explain(
                "too_many_values",
                values=f"{values:,}",
                cap=f"{max_values:,}",
                per=str(BYTES_PER_VALUE),
            ),
        )
    try:
        data = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        raise FetchDataError(org_id, "the API answered with a body that is not JSON") from exc
    except RecursionError as exc:
        raise FetchDataError(org_id, "the API answered with JSON nested too deeply") from exc
    if isinstance(data, dict) and "content" in data and "status" in data:
        data = data["content"]  # envelope=true
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FetchDataError(org_id, "the API answer has no `results` list")
    return data


def _results(org_id: str, body: bytes, max_values: int = MAX_VALUES) -> list[Any]:
    results: list[Any] = _listing(org_id, body, max_values)["results"]
    return results


class Known(Protocol):
    """What the caller already holds of the invoices a listing shows (its snapshot,
    :meth:`~invoice_watch.types.Snapshot.held`): asked for each entry with what the entry
    says, it answers with its own object when it holds that invoice as listed (the
    :class:`Invoice` itself, or a settled one's key), else None."""

    def held(self, listed: Listed) -> Invoice | int | None: ...


def parse_page(
    org_id: str, body: bytes, known: Known | None = None, max_values: int = MAX_VALUES
) -> Page:
    """One page of the organization's invoice listing -> :class:`Page`.

    An entry that ``known`` holds as listed comes back as what it holds (an invoice
    as that very object, a settled one as its key), without an invoice being built
    for it: most of a listing is unchanged. FetchDataError for anything malformed,
    and for more than ``max_values`` JSON values (refused before parsing).
    """
    data = _listing(org_id, body, max_values)
    results = data["results"]
    if known is not None and not known:  # holds nothing (a cold cycle's snapshot): no
        known = None  # entry is compared with it (listed_fields: 2 us of an invoice's 9)
    total = data.get("totalCount")
    if type(total) is int and abs(total) > INT64_MAX:
        raise FetchDataError(org_id, "`totalCount` is not an int64")
    invoices: list[Invoice] = []
    settled: list[int] = []
    built = 0
    for item in results:
        built += _flatten(org_id, item, known, invoices, settled)
    return Page(
        size=len(results),
        total=total if type(total) is int else None,
        invoices=tuple(invoices),
        settled=tuple(settled),
        built=built,
    )


def _flatten(
    source_org_id: str,
    item: Any,
    known: Known | None,
    out: list[Invoice],
    settled: list[int],
    depth: int = 0,
) -> int:
    """The invoice and, recursively, the linked invoices nested in it, appended to
    ``out`` (a settled one ``known`` holds: its key, to ``settled``): what ``known``
    holds of it, else the item parsed. ``linkedInvoices`` must be a list, nested at most
    :data:`_MAX_LINK_DEPTH` deep. Returns how many invoices were built."""
    held = None
    if known is not None and type(item) is dict and (listed := listed_fields(item)):
        held = known.held(listed)
    built = 1 if held is None else 0
    if held is None:
        out.append(parse_invoice(source_org_id, item))
    elif isinstance(held, int):
        settled.append(held)
    else:
        out.append(held)
    linked = item.get("linkedInvoices")
    if linked:
        if type(linked) is not list:
            raise FetchDataError(
                source_org_id, f"invoice {item.get('id')!s:.40}: `linkedInvoices` is not a list"
            )
        if depth >= _MAX_LINK_DEPTH:
            raise FetchDataError(source_org_id, "`linkedInvoices` are nested too deeply")
        for nested in linked:
            built += _flatten(source_org_id, nested, known, out, settled, depth + 1)
    return built


def listed_fields(item: dict[str, Any]) -> Listed | None:
    """What ``item`` says of its invoice (:data:`~invoice_watch.types.Listed`), read as
    :func:`parse_invoice` reads it but without building an invoice, or None where
    parse_invoice would refuse the item or might (then it is parsed, and what is wrong
    is reported). Its id, orgId and statusName are not checked: they equal those of an
    invoice that passed the checks, or the item is parsed."""
    invoice_id, owner, status = item.get("id"), item.get("orgId"), item.get("statusName")
    if type(invoice_id) is not str or type(owner) is not str or type(status) is not str:
        return None
    amounts = []
    for api_name in AMOUNT_ATTRS:
        value = item.get(api_name)
        if value is None:
            if api_name == "amountBilledCents":
                return None
            value = 0
        elif type(value) is not int:
            return None
        amounts.append(value)
    start, end = _aware(item.get("startDate")), _aware(item.get("endDate"))
    created, updated = item.get("created"), item.get("updated")
    if start is None or end is None:
        return None
    if created is not None and (created := _aware(created)) is None:
        return None
    if updated is not None and (updated := _aware(updated)) is None:
        return None
    return (invoice_id, owner, status, tuple(amounts), start, end, created, updated)


def _aware(value: Any) -> datetime | None:
    """A timestamp as :func:`parse_invoice` reads it, or None where it would not."""
    if type(value) is not str:
        return None
    try:
        parsed = instant(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _timestamp(org_id: str, item: dict[str, Any], key: str, *, required: bool) -> datetime | None:
    """``item[key]`` as :func:`parse_invoice` takes it (None: absent and not
    ``required``); FetchDataError saying what is wrong with it."""
    value = item.get(key)
    if value is None and not required:
        return None
    checked = _checked_instant(value) if type(value) is str else None
    if type(checked) is datetime:
        return checked
    if checked is None:
        raise FetchDataError(org_id, f"invoice {item.get('id')!s:.40}: `{key}` is missing")
    problem = f"invoice {item.get('id')!s:.40}: `{key}` {checked}"
    if checked == _OUT_OF_RANGE:  # chained to the OverflowError (it quotes nothing)
        try:
            instant(value).astimezone(UTC)
        except OverflowError as exc:
            raise FetchDataError(org_id, problem) from exc
    # Not chained: a ValueError's text quotes the server's as it came, unredacted.
    raise FetchDataError(org_id, problem) from None


@functools.lru_cache(maxsize=4096)
def _checked_instant(value: str) -> datetime | str:
    """The timestamp ``value`` as :func:`parse_invoice` takes it (:func:`instant`), or
    what is wrong with it. Remembered: a listing's invoices share their period bounds, so
    the same few values come back page after page (checked once each)."""
    try:
        parsed = instant(value)
    except ValueError:
        return "is not a timestamp"
    if parsed.tzinfo is None:
        return "has no timezone"
    try:
        parsed.astimezone(UTC)  # later stages work in UTC
    except OverflowError:
        return _OUT_OF_RANGE
    return parsed


_OUT_OF_RANGE = "is out of range"


@functools.lru_cache(maxsize=1024)
def _is_owner(org_id: str) -> bool:
    """An ``orgId`` is 24 hex digits. Remembered: a listing's invoices share a few (a
    dict lookup instead of a regex match: 0.4 us of an invoice's 6)."""
    return _HEX24.fullmatch(org_id) is not None


_AMOUNT_NAMES = tuple(AMOUNT_ATTRS)  # the API's names, in the order Invoice has them
_AMOUNTS = operator.itemgetter(*_AMOUNT_NAMES)  # KeyError when one is absent


def parse_invoice(source_org_id: str, item: Any) -> Invoice:
    """One ``BillingInvoiceMetadata`` object -> :class:`Invoice`, checked field by field.

    The organization id and the status are interned: thousands of invoices share them.
    Each check costs little when it passes (a cold cycle parses every invoice); what
    is wrong is worked out only when one fails.
    """
    org = source_org_id
    if not isinstance(item, dict):
        raise FetchDataError(org, "an entry of `results` is not an object")
    get = item.get
    invoice_id = get("id")
    if type(invoice_id) is not str or not _HEX24.fullmatch(invoice_id):
        raise FetchDataError(org, f"an invoice id is not 24 hex digits: {invoice_id!r:.40}")
    owner = get("orgId")
    if type(owner) is not str or len(owner) != 24 or not _is_owner(owner):
        raise FetchDataError(org, f"invoice {invoice_id}: `orgId` is not 24 hex digits")
    status = get("statusName")
    if type(status) is not str or status not in _KNOWN_STATUSES:
        status = _checked_status(org, invoice_id, status)
    try:  # the six amounts at once (a C call), checked in one loop; else what is wrong
        cents = _AMOUNTS(item)
    except KeyError:
        cents = _checked_cents(org, invoice_id, [get(name) for name in _AMOUNT_NAMES])
    for value in cents:
        if type(value) is not int or not -INT64_MAX <= value <= INT64_MAX:  # bool too
            cents = _checked_cents(org, invoice_id, list(cents))
            break
    billed, paid, credits, tax, balance, subtotal = cents
    # Paid and subtotal are most often the amount billed: one int for the three.
    paid = billed if paid == billed else paid
    subtotal = billed if subtotal == billed else subtotal
    start = _timestamp(org, item, "startDate", required=True)
    end = _timestamp(org, item, "endDate", required=True)
    created = _timestamp(org, item, "created", required=False)
    updated = _timestamp(org, item, "updated", required=False)
    assert start is not None and end is not None
    return new_invoice(  # Invoice(...), faster (fast_invoice.py): 1.5 us less an invoice
        id=invoice_id,
        org_id=sys.intern(owner),
        status=sys.intern(status),
        start_date=start,
        end_date=end,
        amount_billed_cents=billed,
        amount_paid_cents=paid,
        credits_cents=credits,
        sales_tax_cents=tax,
        starting_balance_cents=balance,
        subtotal_cents=subtotal,
        created=created,
        updated=updated,
        source_org_id=source_org_id,
    )


def _checked_status(org_id: str, invoice_id: str, status: object) -> str:
    """A ``statusName`` other than the usual ones: kept when it is a status's word (one
    Atlas adds later), else FetchDataError."""
    if not isinstance(status, str) or not status:
        raise FetchDataError(org_id, f"invoice {invoice_id}: `statusName` is missing")
    if not _STATUS.fullmatch(status):
        raise FetchDataError(
            org_id,
            f"invoice {invoice_id}: `statusName` {status!r:.40} is not a status name "
            "(capital letters, digits and _, as PENDING or FAILED)",
        )
    return status


def _checked_cents(org_id: str, invoice_id: str, cents: list[Any]) -> list[int]:
    """The amounts (``cents``, in :data:`_AMOUNT_NAMES` order) when one is not an
    int64: absent or null is 0 (``amountBilledCents`` excepted: reading it as $0 would
    resolve a pending-amount alert that still holds); else FetchDataError."""
    checked = []
    for api_name, value in zip(_AMOUNT_NAMES, cents, strict=True):
        if value is None:
            if api_name == "amountBilledCents":
                raise FetchDataError(org_id, f"invoice {invoice_id}: `{api_name}` is missing")
            value = 0
        elif type(value) is not int or abs(value) > INT64_MAX:  # bool is not an int here
            raise FetchDataError(org_id, f"invoice {invoice_id}: `{api_name}` is not an int64")
        checked.append(value)
    return checked


def _label(value: object, default: str) -> str:
    """A line item's project, SKU or cluster name as messages show it: printable and
    on one line (:func:`~invoice_watch.safe_text.one_line`), at most :data:`_LABEL`
    characters; ``default`` when empty. Never raises."""
    if value is None or value == "":
        return default
    text = value if isinstance(value, str) else str(value)
    return clip(one_line(text[: 4 * _LABEL]), _LABEL) or default


def line_item_cents(org_id: str, invoice_id: str, entry: dict[str, Any]) -> int:
    """A line item's ``totalPriceCents`` (absent or null: 0); FetchDataError when it
    is not an int64."""
    cents = entry.get("totalPriceCents", 0)
    if cents is None:
        return 0
    if type(cents) is not int or abs(cents) > INT64_MAX:
        raise FetchDataError(
            org_id, f"invoice {invoice_id}: a line item's `totalPriceCents` is not an int64"
        )
    return cents


def _line_items_json(org_id: str, invoice_id: str, raw: list[Any]) -> list[LineItem]:
    """A pending invoice's ``lineItems`` (:func:`line_item_cents`)."""
    items = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        group = entry.get("groupName") or entry.get("groupId")
        group_id = entry.get("groupId")
        items.append(
            LineItem(
                project=_label(group, "—"),
                sku=_label(entry.get("sku"), "—"),
                cluster=_label(entry.get("clusterName"), ""),
                amount_cents=line_item_cents(org_id, invoice_id, entry),
                project_id=group_id if isinstance(group_id, str) and _is_hex24(group_id) else "",
            )
        )
    return items


def csv_items(body: bytes, max_rows: int) -> list[LineItem]:
    """An invoice's CSV answer (UTF-8, perhaps with a BOM): :func:`parse_invoice_csv`."""
    return parse_invoice_csv(body.decode("utf-8-sig"), max_rows)


def parse_invoice_csv(text: str, max_rows: int | None = None) -> list[LineItem]:
    """The invoice CSV: a header block, a blank line, then one row per line item.
    :class:`ValueError` for a malformed one: an amount that is not a number of dollars
    within int64 cents, or more than ``max_rows`` rows (default: as many as
    ``atlas.max_response_size``'s default holds values, :data:`MAX_VALUES`)."""
    limit = MAX_VALUES if max_rows is None else max_rows
    blocks = re.split(r"\r?\n\r?\n", text, maxsplit=1)
    if len(blocks) != 2:
        raise ValueError("no blank line between the header block and the line items")
    items: list[LineItem] = []
    for row in csv.DictReader(io.StringIO(blocks[1])):  # one row at a time
        if _is_total(row):
            continue  # a sum of the rows above, not a line item
        if len(items) >= limit:
            raise ValueError(f"more than {limit:,} line items")
        amount = (row.get("Amount") or "").replace("$", "").replace(",", "").strip()
        try:
            dollars = Decimal(amount or "0")
            if not dollars.is_finite() or abs(dollars) > _INT64_DOLLARS:
                raise InvalidOperation
        except InvalidOperation as exc:
            raise ValueError(f"amount {amount!r:.20} is not a number of dollars") from exc
        project_id = (row.get("Project ID") or "").strip()
        items.append(
            LineItem(
                project=_label((row.get("Project") or "").strip(), "—"),
                sku=_label((row.get("SKU") or "").strip(), "—"),
                cluster=_label((row.get("Cluster") or "").strip(), ""),
                amount_cents=int((dollars * 100).to_integral_value()),
                project_id=project_id if _is_hex24(project_id) else "",
                usage_date=_usage_date(row.get("Usage Date")),
            )
        )
    return items


def _is_hex24(value: str) -> bool:
    """A project's id as Atlas writes it (``groupId``: 24 lowercase hex digits)."""
    return len(value) == 24 and all(c in "0123456789abcdef" for c in value)


_TOTALS = frozenset({"total", "subtotal", "grand total", "total:", "subtotal:"})


def _is_total(row: Mapping[str | None, Any]) -> bool:
    """A row that sums the others (``,,,Total,$5.00``): no SKU, and a cell that says
    Total or Subtotal."""
    if (row.get("SKU") or "").strip():
        return False
    return any(
        isinstance(value, str) and value.strip().lower() in _TOTALS for value in row.values()
    )


def _usage_date(value: str | None) -> date | None:
    """The CSV's ``Usage Date``: the day the usage was of, as ``MM/DD/YYYY`` (its
    digits padded or not), ``YYYY-MM-DD``, ``YYYY/MM/DD``, or an ISO 8601 timestamp
    (its UTC day); None when absent or not a date (a line of the whole period)."""
    text = (value or "").strip()
    if not text or len(text) > 40:
        return None
    for form in ("%m/%d/%Y", "%Y-%m-%d", "%Y/%m/%d"):
        try:
            return datetime.strptime(text, form).date()
        except ValueError:
            continue
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (stamp.astimezone(UTC) if stamp.tzinfo is not None else stamp).date()
