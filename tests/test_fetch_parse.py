"""Pure parts of the Atlas client: the retry table, body validation, CSV, backoff."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

import pytest

from invoice_watch.atlas.errors import Decision, classify_status
from invoice_watch.atlas.parse import Page, parse_invoice, parse_invoice_csv
from invoice_watch.errors import FetchDataError
from invoice_watch.redact import printable
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
        # Text that SQLite, a log line or a terminal cannot take raw (attack 12, A12-1):
        # ids and statusName have a grammar, checked whole.
        (good(id="1" * 24 + "\n"), "not 24 hex"),
        (good(orgId=ORG_A + "\n"), "orgId"),
        (good(statusName="FAILED\ud800"), "not a status name"),
        (good(statusName="PENDING\x00\x1b[31m"), "not a status name"),
        (good(statusName="PAID\u202e"), "not a status name"),
        (good(statusName="X" * 100_000), "not a status name"),
        (good(statusName="paid"), "not a status name"),
    ],
)
def test_parse_invoice_rejects_malformed_items(item, message):
    with pytest.raises(FetchDataError, match=message) as info:
        parse_invoice(ORG_A, item)
    assert info.value.org_id == ORG_A


def complete(**overrides: Any) -> dict[str, Any]:
    """An entry as Atlas sends it, every amount there: what the parser checks at least
    cost (``good()`` lacks four amounts, which the parser reads as 0 the long way)."""
    amounts = {"creditsCents": 0, "salesTaxCents": 0, "startingBalanceCents": 0}
    return good(
        **{**amounts, "subtotalCents": 1234, "updated": "2026-11-02T00:00:00Z", **overrides}
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"id": "1" * 23 + "G"}, "not 24 hex"),
        ({"orgId": ORG_A.upper()}, "orgId"),
        ({"orgId": ORG_A + "0"}, "orgId"),
        ({"orgId": 12}, "orgId"),
        ({"statusName": ""}, "statusName` is missing"),
        ({"statusName": ["PAID"]}, "statusName` is missing"),
        ({"statusName": "paid"}, "not a status name"),
        ({"amountBilledCents": None}, "amountBilledCents` is missing"),
        ({"amountPaidCents": False}, "amountPaidCents` is not an int64"),
        ({"creditsCents": "0"}, "creditsCents` is not an int64"),
        ({"salesTaxCents": 2**63}, "salesTaxCents` is not an int64"),
        ({"subtotalCents": -(2**63)}, "subtotalCents` is not an int64"),
        ({"startingBalanceCents": 1.0}, "startingBalanceCents` is not an int64"),
        ({"startDate": 20261101}, "startDate` is missing"),
        ({"created": "2026-11-01T00:00:00"}, "created` has no timezone"),
        ({"updated": "later"}, "updated` is not a timestamp"),
        ({"updated": "0001-01-01T00:00:00+01:00"}, "updated` is out of range"),
    ],
)
def test_parse_invoice_refuses_in_a_complete_entry_what_it_refuses_in_any(overrides, message):
    """An entry with every field there takes the parser's quick path (the amounts read
    at once, the timestamps remembered): each check still holds there, with its words."""
    assert parse_invoice(ORG_A, complete()).subtotal_cents == 1234  # the quick path takes it
    with pytest.raises(FetchDataError, match=message) as info:
        parse_invoice(ORG_A, complete(**overrides))
    assert info.value.org_id == ORG_A


def test_parse_invoice_reads_a_complete_entry_as_the_long_way_does():
    """The quick path and the long one (an amount absent or null: read as 0) build the
    same invoice; int64's bounds are taken, equal amounts share one int."""
    big = 2**63 - 1
    quick = parse_invoice(ORG_A, complete(amountBilledCents=big, amountPaidCents=big))
    slow = parse_invoice(
        ORG_A,
        complete(amountBilledCents=big, amountPaidCents=big, creditsCents=None, salesTaxCents=...),
    )
    assert quick == slow and quick.amount_paid_cents is quick.amount_billed_cents
    assert parse_invoice(ORG_A, complete(amountBilledCents=-big)).amount_billed_cents == -big
    assert quick.updated is not None and quick.updated.isoformat() == "2026-11-02T00:00:00+00:00"


def test_parse_invoice_error_text_is_storable_and_printable():
    """The message that refuses a bad statusName quotes it escaped: it is stored (the
    org's last error) and printed by `status`."""
    with pytest.raises(FetchDataError) as info:
        parse_invoice(ORG_A, good(statusName="FAILED\ud800\x1b[2J"))
    text = str(info.value)
    text.encode("utf-8")  # no lone surrogate
    assert "\x1b" not in text and printable(text) == text


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


def test_parse_invoice_csv_reads_the_usage_date_and_project_id():
    """The CSV is the daily usage where lineItems:search is not served (v1, Cloud
    Manager): its Usage Date column is each line's day, its Project ID the project's."""
    [item] = parse_invoice_csv(CSV)
    assert (item.usage_date, item.project_id) == (date(2024, 6, 1), "666acb8787ba43606905dca0")
    undated = CSV.replace("06/02/2024,06/01/2024,", "06/02/2024,,")
    assert parse_invoice_csv(undated)[0].usage_date is None


def test_parse_invoice_csv_of_the_spec_example_has_no_items():
    header_only = CSV.split("06/02/2024")[0]
    assert parse_invoice_csv(header_only) == []


def test_parse_invoice_csv_without_the_blank_line_is_an_error():
    with pytest.raises(ValueError, match="blank line"):
        parse_invoice_csv("Invoice Number,1,\nDate,Amount\n")


CSV_ROW = (
    "06/02/2024,06/01/2024,M30,,Test 2,666acb8787ba43606905dcac,{project},"
    "666acb8787ba43606905dca0,{sku},US_EAST_1,{cluster},,,,server hours,0.54,24,,{amount}\n"
)


def csv_with(**row: str) -> str:
    fields = {"project": "shop", "sku": "SKU", "cluster": "orders", "amount": "1.00", **row}
    return CSV.split("06/02/2024")[0] + CSV_ROW.format(**fields)


@pytest.mark.parametrize("amount", ["1e999999", "-1e30", "Infinity", "NaN", "9" * 4300])
def test_parse_invoice_csv_refuses_amounts_outside_int64_cents(amount: str):
    with pytest.raises(ValueError, match="not a number of dollars"):
        parse_invoice_csv(csv_with(amount=amount))


def test_parse_invoice_csv_names_are_printable():
    [item] = parse_invoice_csv(csv_with(project="shop\x1b[2J\u202e", sku="SKU\x00", cluster="c"))
    assert (item.project, item.sku) == ("shop\\x1b[2J\\u202e", "SKU\\x00")


def test_parse_invoice_csv_rows_are_bounded():
    text = csv_with() + CSV_ROW.format(project="p", sku="s", cluster="c", amount="1") * 20
    assert len(parse_invoice_csv(text, max_rows=21)) == 21
    with pytest.raises(ValueError, match="more than 20 line items"):
        parse_invoice_csv(text, max_rows=20)


def pending_body(*line_items: dict[str, Any]) -> bytes:
    import json

    return json.dumps({"results": [{"id": "2" * 24, "lineItems": list(line_items)}]}).encode()


@pytest.mark.parametrize(
    "cents",
    [2**63, -(2**63), 10**4299, True, 12.5, "100"],
    ids=["2**63", "-2**63", "4300 digits", "true", "a float", "a string"],
)
def test_pending_line_items_refuse_amounts_that_are_not_int64(cents: Any):
    """Attack 12, A12-2: a 4,300-digit totalPriceCents is that org's FetchDataError,
    never passed on to a message (where json.dumps of it failed the whole commit)."""
    from invoice_watch.atlas.parse import pending_items

    body = pending_body({"groupName": "p", "sku": "s", "totalPriceCents": cents})
    with pytest.raises(FetchDataError, match="totalPriceCents` is not an int64") as info:
        pending_items(ORG_A, body)
    assert info.value.org_id == ORG_A


def test_pending_line_items_text_is_printable():
    from invoice_watch.atlas.parse import pending_items

    body = pending_body(
        {"groupName": "proj\ud800", "sku": "SKU\u0000\u001b[31m", "totalPriceCents": 5000},
        {"groupName": "x" * 1000, "clusterName": "c\u202e", "totalPriceCents": 1},
        {"totalPriceCents": 2**63 - 1},
    )
    items = pending_items(ORG_A, body)["2" * 24]
    assert [(i.project, i.sku, i.cluster, i.amount_cents) for i in items] == [
        ("proj\\ud800", "SKU\\x00\\x1b[31m", "", 5000),
        ("x" * 119 + "…", "—", "c\\u202e", 1),
        ("—", "—", "", 2**63 - 1),
    ]


# A field of a listed invoice, changed to something else (valid or not), or removed.
_CHANGES: list[tuple[str, Any]] = [
    ("statusName", "PAID"),
    ("statusName", ""),
    ("statusName", 7),
    ("statusName", "PAID\ud800"),
    ("statusName", "PA ID"),
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

    from invoice_watch.atlas.parse import parse_page

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


def test_parse_page_asks_nothing_of_a_snapshot_that_holds_nothing():
    """A cold cycle's snapshot holds nothing: its entries are built without being read
    for comparison first; a snapshot holding one is asked about each entry."""
    import json

    from invoice_watch.atlas.parse import parse_page

    class Empty:
        asked = 0

        def __len__(self) -> int:
            return 0

        def held(self, listed: Any) -> None:
            self.asked += 1

    class Holding(Empty):
        def __len__(self) -> int:
            return 1

    body = json.dumps({"results": [complete(), complete(id="2" * 24)]}).encode()
    empty, holding = Empty(), Holding()
    assert parse_page(ORG_A, body, empty).built == 2 and empty.asked == 0
    assert parse_page(ORG_A, body, holding).built == 2 and holding.asked == 2


def test_parse_errors_chain_their_cause_unless_it_quotes_the_server():
    """errors.py: a FetchError raised for another exception is chained to it (``raise
    ... from exc``), except where the cause would quote the server's text unredacted."""
    import json

    from invoice_watch.atlas.parse import parse_page

    with pytest.raises(FetchDataError, match="not JSON") as not_json:
        parse_page(ORG_A, b"{not json")
    assert isinstance(not_json.value.__cause__, ValueError)
    with pytest.raises(FetchDataError, match="out of range") as overflow:
        parse_invoice(ORG_A, good(startDate="9999-12-31T23:00:00-05:00"))
    assert isinstance(overflow.value.__cause__, OverflowError)
    with pytest.raises(ValueError, match="not a number of dollars") as amount:
        parse_invoice_csv("Invoice,1\n\nProject,Amount\np,$1x\n")
    assert amount.value.__cause__ is not None
    body = json.dumps({"results": [good(startDate="token s3cret-value-1234")]}).encode()
    with pytest.raises(FetchDataError, match="is not a timestamp") as quoted:
        parse_page(ORG_A, body)
    assert quoted.value.__cause__ is None and quoted.value.__suppress_context__


def test_parse_invoice_csv_takes_an_iso_usage_date_and_skips_a_total_row():
    """An ISO 8601 Usage Date (2024-06-01) is the day too (it fell out of the daily
    series, silently); a trailing Total row is no line item (it was counted as one)."""
    iso = CSV.replace("06/02/2024,06/01/2024,", "2024-06-02,2024-06-01,")
    total = iso + ',,,,,,,,,,,,,,,,Total,,"$1,012.96"\n'
    [item] = parse_invoice_csv(total)
    assert (item.usage_date, item.amount_cents) == (date(2024, 6, 1), 101296)


@pytest.mark.parametrize(
    "usage_date",
    ["6/1/2024", "2024/06/01", "2024-06-01T00:00:00Z", "2024-06-01T03:00:00+02:00"],
)
def test_parse_invoice_csv_takes_every_usual_spelling_of_the_usage_date(usage_date: str):
    """A Usage Date unpadded, with slashes, or as a timestamp (its UTC day) is the day
    too: such a row fell out of the daily series silently (re-attack of issue 19)."""
    text = CSV.replace("06/02/2024,06/01/2024,", f"06/02/2024,{usage_date},")
    [item] = parse_invoice_csv(text)
    assert item.usage_date == date(2024, 6, 1)
