"""Pure parts of the Atlas client: the retry table, body validation, CSV, backoff."""

from __future__ import annotations

import re
from typing import Any

import pytest

from invoice_watch.errors import FetchDataError
from invoice_watch.fetch import (
    Decision,
    Page,
    classify_status,
    parse_invoice,
    parse_invoice_csv,
)
from invoice_watch.types import Invoice, Snapshot
from tests.conftest import ORG_A, ORG_B


@pytest.mark.parametrize(
    ("status", "decision"),
    [
        (200, Decision.OK),
        (204, Decision.OK),
        (400, Decision.FAIL),
        (401, Decision.AUTH),
        (403, Decision.AUTH),
        (404, Decision.FAIL),
        (406, Decision.FAIL),
        (408, Decision.BACKOFF),
        (409, Decision.FAIL),
        (429, Decision.RETRY_AFTER),
        (500, Decision.BACKOFF),
        (502, Decision.BACKOFF),
        (503, Decision.RETRY_AFTER),
        (504, Decision.BACKOFF),
    ],
)
def test_classify_status_table(status, decision):
    assert classify_status(status) is decision


def good(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": "1" * 24,
        "orgId": ORG_A,
        "statusName": "PENDING",
        "startDate": "2026-11-01T00:00:00Z",
        "endDate": "2026-12-01T00:00:00Z",
        "amountBilledCents": 1234,
        "amountPaidCents": 0,
    }
    item.update(overrides)
    return {k: v for k, v in item.items() if v is not ...}


def test_parse_invoice_reads_fields_and_keeps_source_org():
    invoice = parse_invoice(ORG_B, good(salesTaxCents=34, created="2026-11-01T03:00:00Z"))
    assert invoice.org_id == ORG_A and invoice.source_org_id == ORG_B
    assert invoice.amount_billed_cents == 1234 and invoice.sales_tax_cents == 34
    assert invoice.start_date.isoformat() == "2026-11-01T00:00:00+00:00"


def test_parse_invoice_accepts_an_unknown_status_as_is():
    # A status Atlas adds later must not blind the whole organization.
    assert parse_invoice(ORG_A, good(statusName="DISPUTED")).status == "DISPUTED"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("not an object", "not an object"),
        (good(id="XYZ"), "not 24 hex"),
        (good(id=...), "not 24 hex"),
        (good(orgId="nope"), "orgId"),
        (good(statusName=...), "statusName"),
        (good(startDate=...), "startDate"),
        (good(endDate="yesterday"), "not a timestamp"),
        (good(endDate="2026-12-01T00:00:00"), "no timezone"),
        (good(amountBilledCents=...), "amountBilledCents` is missing"),
        (good(amountBilledCents=None), "amountBilledCents` is missing"),
        (good(amountBilledCents="12.00"), "not an int64"),
        (good(amountBilledCents=1.5), "not an int64"),
        (good(amountBilledCents=True), "not an int64"),
        (good(amountBilledCents=2**70), "not an int64"),
    ],
)
def test_parse_invoice_rejects_malformed_items(item, message):
    with pytest.raises(FetchDataError, match=message) as info:
        parse_invoice(ORG_A, item)
    assert info.value.org_id == ORG_A


def test_parse_invoice_accepts_negative_amounts():
    assert parse_invoice(ORG_A, good(amountBilledCents=-500)).amount_billed_cents == -500


CSV = (
    "Invoice Number,666acb8787ba43606905dcae,\n"
    'Billing Period,"June 1, 2024 - July 1, 2024",\n'
    "Organization Name,Test 2,\n"
    "Organization ID,666acb8787ba43606905dcac,\n"
    "\n"
    "Date,Usage Date,Description,Note,Organization Name,Organization ID,Project,Project ID,"
    "SKU,Region,Cluster,Replica Set,Config Server,Application,Unit,Unit Price,Quantity,"
    "Discount Percent,Amount\n"
    "06/02/2024,06/01/2024,M30,,Test 2,666acb8787ba43606905dcac,shop,"
    "666acb8787ba43606905dca0,ATLAS_AWS_INSTANCE_M30,US_EAST_1,orders,,,,server hours,"
    '0.54,24,,"1,012.96"\n'
)


def test_parse_invoice_csv_reads_line_items():
    [item] = parse_invoice_csv(CSV)
    assert (item.project, item.sku, item.cluster, item.amount_cents) == (
        "shop",
        "ATLAS_AWS_INSTANCE_M30",
        "orders",
        101296,
    )


def test_parse_invoice_csv_of_the_spec_example_has_no_items():
    header_only = CSV.split("06/02/2024")[0]
    assert parse_invoice_csv(header_only) == []


def test_parse_invoice_csv_without_the_blank_line_is_an_error():
    with pytest.raises(ValueError, match="blank line"):
        parse_invoice_csv("Invoice Number,1,\nDate,Amount\n")


# A field of a listed invoice, changed to something else (valid or not), or removed.
_CHANGES: list[tuple[str, Any]] = [
    ("statusName", "PAID"),
    ("statusName", ""),
    ("statusName", 7),
    ("orgId", ORG_B),
    ("orgId", "nope"),
    ("startDate", "2026-10-01T00:00:00Z"),
    ("startDate", "2026-11-01T01:00:00+01:00"),  # the same instant, another offset
    ("startDate", "2026-11-01T00:00:00"),
    ("startDate", "yesterday"),
    ("startDate", 20261101),
    ("endDate", ...),
    ("created", "2026-11-01T00:00:00Z"),
    ("created", None),
    ("updated", "2026-11-02T00:00:00Z"),
    ("updated", "garbage"),
    ("amountBilledCents", 1235),
    ("amountBilledCents", ...),
    ("amountBilledCents", True),
    ("amountBilledCents", 1234.0),
    ("amountPaidCents", ...),
    ("amountPaidCents", 1),
    ("amountPaidCents", None),
    ("creditsCents", 0),
    ("creditsCents", 5),
    ("salesTaxCents", False),
    ("subtotalCents", 2**70),
]


@pytest.mark.parametrize("kept", ["live", "settled"])
@pytest.mark.parametrize(("field", "value"), _CHANGES, ids=[f"{f}={v!r}" for f, v in _CHANGES])
def test_parse_page_with_known_invoices_reads_exactly_what_parse_invoice_reads(field, value, kept):
    """A listed invoice that equals the stored one comes back as that very object (a
    live one) or as its key (a settled one), without being parsed again; any change,
    valid or not, reads as parse_invoice reads it."""
    import json

    from invoice_watch.fetch import parse_page

    stored = parse_invoice(ORG_A, good(created="2026-11-01T00:00:00Z", updated=None))
    key = stored.settled_key()
    if kept == "live":
        known = Snapshot(live={stored.id: stored})
    else:
        known = Snapshot(settled={stored.id: key}, settles=frozenset({stored.status}))

    def listed(page: Page) -> Invoice | int:
        found: list[Invoice | int] = [*page.invoices, *page.settled]
        assert len(found) == 1
        return found[0]

    unchanged = parse_page(
        ORG_A, json.dumps({"results": [good(created="2026-11-01T00:00:00Z")]}).encode(), known
    )
    assert listed(unchanged) is (stored if kept == "live" else key)

    item = good(**{"created": "2026-11-01T00:00:00Z", field: value})
    body = json.dumps({"results": [item]}).encode()
    try:
        expected = parse_invoice(ORG_A, item)
    except FetchDataError as exc:
        with pytest.raises(FetchDataError, match=re.escape(str(exc).split(": ", 1)[-1])):
            parse_page(ORG_A, body, known)
        return
    got = listed(parse_page(ORG_A, body, known))
    if expected != stored:
        assert got == expected and got is not stored
    else:
        assert got is (stored if kept == "live" else key)
