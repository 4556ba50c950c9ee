"""The parser's fast Invoice constructor (invoice_watch/fast_invoice.py) builds the same
value as ``Invoice(...)``, and what it builds stays frozen."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from invoice_watch.atlas.parse import parse_invoice
from invoice_watch.fast_invoice import new_invoice
from invoice_watch.types import Invoice
from tests.conftest import ORG_A, ORG_B

START = datetime(2026, 11, 1, tzinfo=UTC)


def fields() -> dict[str, Any]:
    """Every field, each a value no other field has: a setter that wrote one field's
    value into another would show."""
    return {
        "id": "1" * 24,
        "org_id": ORG_A,
        "status": "FAILED",
        "start_date": START,
        "end_date": START + timedelta(days=30),
        "amount_billed_cents": 101,
        "amount_paid_cents": 102,
        "credits_cents": 103,
        "sales_tax_cents": 104,
        "starting_balance_cents": 105,
        "subtotal_cents": 106,
        "created": START + timedelta(hours=1),
        "updated": START + timedelta(hours=2),
        "source_org_id": ORG_B,
    }


def test_new_invoice_equals_what_the_constructor_builds():
    built, ordinary = new_invoice(**fields()), Invoice(**fields())
    assert type(built) is Invoice
    assert built == ordinary and hash(built) == hash(ordinary) and repr(built) == repr(ordinary)
    assert dataclasses.astuple(built) == tuple(fields().values())
    assert new_invoice(*fields().values()) == ordinary


def test_a_new_invoice_refuses_assignment_and_copies_as_any_invoice():
    invoice = new_invoice(**fields())
    with pytest.raises(dataclasses.FrozenInstanceError):
        invoice.status = "PAID"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del invoice.amount_billed_cents
    assert invoice.status == "FAILED" and invoice.amount_billed_cents == 101
    moved = dataclasses.replace(invoice, source_org_id=ORG_A)
    assert moved.source_org_id == ORG_A and moved.id == invoice.id
    assert pickle.loads(pickle.dumps(invoice)) == invoice == copy.deepcopy(invoice)


def test_parse_invoice_builds_the_invoice_the_constructor_would():
    item = {
        "id": "1" * 24,
        "orgId": ORG_A,
        "statusName": "FAILED",
        "startDate": "2026-11-01T00:00:00Z",
        "endDate": "2026-12-01T00:00:00Z",
        "created": "2026-11-01T01:00:00Z",
        "updated": "2026-11-01T02:00:00Z",
        **{
            name: cents
            for cents, name in enumerate(
                (
                    "amountBilledCents",
                    "amountPaidCents",
                    "creditsCents",
                    "salesTaxCents",
                    "startingBalanceCents",
                    "subtotalCents",
                ),
                start=101,
            )
        },
    }
    parsed = parse_invoice(ORG_B, item)
    assert type(parsed) is Invoice and parsed == Invoice(**fields())
