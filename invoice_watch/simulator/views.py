"""How the simulator writes invoices and errors: the JSON shapes of the official Atlas
spec (``BillingInvoice``, ``BillingInvoiceMetadata``, ``InvoiceLineItem``, ``ApiError``)
and the invoice CSV.

CSV format: the header block of the spec's example (``Invoice Number``, ``Billing
Period``, ``Organization Name``, ``Organization ID``, each row ending in a comma), a blank
line, then one row per line item under the spec's columns. Dates are ``MM/DD/YYYY``;
``Unit Price`` and ``Amount`` are US dollars as plain decimals (``1234.56``).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Any

from invoice_watch.simulator.scenario import ScenarioInvoice, ScenarioLineItem, stable_id

CSV_COLUMNS = (
    "Date",
    "Usage Date",
    "Description",
    "Note",
    "Organization Name",
    "Organization ID",
    "Project",
    "Project ID",
    "SKU",
    "Region",
    "Cluster",
    "Replica Set",
    "Config Server",
    "Application",
    "Unit",
    "Unit Price",
    "Quantity",
    "Discount Percent",
    "Amount",
)

# Invoice status -> the status of its one payment attempt (BillingPayment.statusName).
PAYMENT_STATUS = {"PAID": "PAID", "FAILED": "FAILED", "FORGIVEN": "FORGIVEN"}


def iso(when: datetime) -> str:
    """``2026-11-01T00:00:00Z``: ISO 8601 in UTC, as Atlas writes timestamps."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dollars(cents: int) -> str:
    return f"{Decimal(cents) / 100:.2f}"


def line_item_json(item: ScenarioLineItem, invoice: ScenarioInvoice, v2: bool) -> dict[str, Any]:
    """One ``InvoiceLineItem``; the legacy v1.0 shape has no ``cloudProvider``."""
    data: dict[str, Any] = {
        "clusterName": item.cluster,
        "created": iso(invoice.start),
        "endDate": iso(invoice.end),
        "groupId": item.project_id,
        "groupName": item.project,
        "note": "",
        "quantity": item.quantity,
        "sku": item.sku,
        "startDate": iso(invoice.start),
        "totalPriceCents": item.total_cents,
        "unit": item.unit,
        "unitPriceDollars": item.unit_price_dollars,
    }
    if v2:
        data["cloudProvider"] = item.cloud_provider
    return data


def payments_json(invoice: ScenarioInvoice) -> list[dict[str, Any]]:
    """The payment attempt behind a PAID, FAILED or FORGIVEN invoice."""
    status = PAYMENT_STATUS.get(invoice.status)
    if status is None:
        return []
    assert invoice.updated is not None
    return [
        {
            "amountBilledCents": invoice.amount_billed_cents,
            "amountPaidCents": invoice.amount_paid_cents,
            "created": iso(invoice.updated),
            "currency": "USD",
            "id": stable_id("payment", invoice.id),
            "salesTaxCents": invoice.sales_tax_cents,
            "statusName": status,
            "subtotalCents": invoice.subtotal_cents,
            "unitPrice": "1.00",
            "updated": iso(invoice.updated),
        }
    ]


def invoice_json(
    invoice: ScenarioInvoice,
    *,
    full: bool,
    v2: bool = True,
    self_href: str | None = None,
    linked: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``BillingInvoice`` when ``full`` (line items, payments, refunds), else
    ``BillingInvoiceMetadata``. ``linked`` (already rendered) becomes ``linkedInvoices``."""
    assert invoice.created is not None and invoice.updated is not None
    data: dict[str, Any] = {
        "amountBilledCents": invoice.amount_billed_cents,
        "amountPaidCents": invoice.amount_paid_cents,
        "created": iso(invoice.created),
        "creditsCents": invoice.credits_cents,
        "endDate": iso(invoice.end),
        "id": invoice.id,
    }
    if full:
        data["lineItems"] = [line_item_json(item, invoice, v2) for item in invoice.line_items]
    if linked is not None:
        data["linkedInvoices"] = linked
    if self_href is not None:
        data["links"] = [{"href": self_href, "rel": "self"}]
    data["orgId"] = invoice.org_id
    if full:
        data["payments"] = payments_json(invoice)
        data["refunds"] = []
    data.update(
        {
            "salesTaxCents": invoice.sales_tax_cents,
            "startDate": iso(invoice.start),
            "startingBalanceCents": invoice.starting_balance_cents,
            "statusName": invoice.status,
            "subtotalCents": invoice.subtotal_cents,
            "updated": iso(invoice.updated),
        }
    )
    return data


def api_error(
    status: int,
    error_code: str,
    detail: str,
    *,
    bad_fields: list[tuple[str, str]] | None = None,
    parameters: list[Any] | None = None,
) -> dict[str, Any]:
    """An ``ApiError`` body; ``bad_fields`` (field, why) fill ``badRequestDetail``.
    ``parameters`` is empty unless given: Atlas puts strings and numbers there (the IP
    address refused, the rate-limited path), but the spec types its items as objects, so
    a body with them does not validate (see ``Simulator(atlas_parameters=...)``)."""
    body: dict[str, Any] = {}
    if bad_fields:
        body["badRequestDetail"] = {
            "fields": [{"description": why, "field": name} for name, why in bad_fields]
        }
    body.update(
        {
            "detail": detail,
            "error": status,
            "errorCode": error_code,
            "parameters": list(parameters or ()),
            "reason": HTTPStatus(status).phrase,
        }
    )
    return body


def _long_date(when: datetime) -> str:
    return f"{when:%B} {when.day}, {when.year}"


def invoice_csv(invoice: ScenarioInvoice, org_name: str) -> str:
    """The invoice as Atlas's CSV export (see the module docstring)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Invoice Number", invoice.id, ""])
    writer.writerow(
        ["Billing Period", f"{_long_date(invoice.start)} - {_long_date(invoice.end)}", ""]
    )
    writer.writerow(["Organization Name", org_name, ""])
    writer.writerow(["Organization ID", invoice.org_id, ""])
    out.write("\n")
    writer.writerow(CSV_COLUMNS)
    day = f"{invoice.start:%m/%d/%Y}"
    for item in invoice.line_items:
        writer.writerow(
            [
                day,
                day,
                item.description,
                "",
                org_name,
                invoice.org_id,
                item.project,
                item.project_id,
                item.sku,
                item.region,
                item.cluster,
                f"{item.cluster.lower()}-shard-0",
                "",
                "",
                item.unit,
                format(Decimal(str(item.unit_price_dollars)), "f"),
                f"{item.quantity:.2f}",
                "",
                dollars(item.total_cents),
            ]
        )
    return out.getvalue()
