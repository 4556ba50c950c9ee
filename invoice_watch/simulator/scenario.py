"""Simulator scenarios: the organizations, invoices and timeline of changes that the Atlas
simulator serves, loaded from YAML or built from Python, and the state changes they make.

A scenario is also the simulator's live state: the server renders whatever the scenario
holds, and the timeline and the test helpers mutate it through :meth:`Scenario.apply`,
:meth:`Scenario.set_status`, :meth:`Scenario.set_amount`, :meth:`Scenario.add` and
:meth:`Scenario.remove`.

Amounts are integer cents and always consistent, as the Atlas API documents them:
``subtotalCents`` is the sum of the line items' ``totalPriceCents`` and
``amountBilledCents = subtotalCents + salesTaxCents - startingBalanceCents``. Both are
derived, never stored, so no change can break them.

YAML layout (amounts in USD, ``period`` either ``YYYY-MM`` or a month offset from the
current month, ``0`` being the current month)::

    orgs:
      - {name: Production}                      # id: 24-hex, derived from the name if omitted
      - {name: Analytics, linked_to: Production, forbidden: false}
      - {name: Finance, billing_viewer: true}   # linked invoices hidden, as for that role
    invoices:
      - {name: prod-pending, org: Production, period: 0, status: PENDING, amount: 3900}
      - org: Production
        period: 2026-09
        status: PAID
        sales_tax: 80.50
        line_items:
          - {sku: ATLAS_AWS_INSTANCE_M30, amount: 3000, unit: server hours, unit_price: 0.54}
          # daily usage (lineItems:search): weekdays and weekends alike (flat, the default)
          # or weekends at 60% (weekly); `spike` makes one day cost `times` as much as
          # usual: `day` 1..31, or -1 for the latest day of usage (yesterday), -2 ...
          - {sku: ATLAS_AWS_BACKUP_SNAPSHOT_STORAGE, amount: 90, daily: weekly,
             spike: {day: -1, times: 5}}
    timeline:
      - {at: 5, invoice: prod-pending, set_status: FAILED}
      - {at: 10, invoice: prod-pending, set_amount: 5240}
      - {at: 12, add_invoice: {org: Analytics, period: 0, status: PENDING, amount: 10}}
      - {at: 40, remove_invoice: prod-pending}

Invoices and orgs are referenced by ``name`` or by id. Omitted ids are derived
deterministically (same scenario, same ids).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from invoice_watch.constants import INVOICE_STATUSES
from invoice_watch.files import FileTooLarge, NotARegularFile, read_regular
from invoice_watch.format import usd

HEX24 = re.compile(r"[a-f0-9]{24}")  # fullmatch: `$` would let a trailing newline in
CLUSTER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9-]*")
CLOUD_PROVIDERS = ("AWS", "GCP", "AZURE", "ATLAS")

StepAction = Literal["set_status", "set_amount", "add_invoice", "remove_invoice"]


def stable_id(*parts: str) -> str:
    """A deterministic 24-hex id derived from ``parts``."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


# Scenario.generate goes back at most this many months (a thousand years), then starts
# again from this month: an organization of 50,000 invoices has several a month.
_PERIODS = 12_000


def month_start(when: datetime, offset: int = 0) -> datetime:
    """Midnight UTC on the first day of ``when``'s month, moved by ``offset`` months."""
    index = when.year * 12 + when.month - 1 + offset
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


@dataclass
class ScenarioOrg:
    id: str
    name: str
    linked_to: str | None = None  # id of the paying organization (cross-org billing)
    forbidden: bool = False  # the simulator's credentials lack the billing role here
    # The credentials are only Organization Billing Viewer here: as Atlas does, the
    # listings, the pending invoices and a GET show no invoices of linked organizations
    # (Organization Billing Admin or Owner on the paying organization sees them).
    billing_viewer: bool = False


@dataclass
class ScenarioLineItem:
    """One service on an invoice; ``quantity`` follows from the amount and unit price."""

    sku: str
    total_cents: int
    unit: str = "server hours"
    unit_price_dollars: float = 0.54
    project: str = "Project 0"
    project_id: str = ""
    cluster: str = "Cluster0"
    region: str = "US_EAST_1"
    cloud_provider: str = "AWS"
    description: str = ""
    # How its amount spreads over the days of usage (lineItems:search): "flat", or
    # "weekly" (weekends at 60% of weekdays); and one day at `spike_times` the usual
    # (`spike_day` 1..31, or -1 for the latest day of usage, -2 the one before...).
    daily: Literal["flat", "weekly"] = "flat"
    spike_day: int | None = None
    spike_times: float = 1.0

    def __post_init__(self) -> None:
        if self.total_cents < 0:
            raise ValueError(f"line item {self.sku}: amount must not be negative")
        if self.daily not in ("flat", "weekly"):
            raise ValueError(f"line item {self.sku}: daily must be flat or weekly")
        if self.spike_day is not None and not (1 <= self.spike_day <= 31 or self.spike_day < 0):
            raise ValueError(f"line item {self.sku}: spike day must be 1..31, or -1, -2, ...")
        if not 0 < self.spike_times <= 1000:
            raise ValueError(f"line item {self.sku}: spike times must be above 0, at most 1000")
        if not CLUSTER_NAME.fullmatch(self.cluster):
            raise ValueError(f"line item {self.sku}: invalid cluster name {self.cluster!r}")
        if self.cloud_provider not in CLOUD_PROVIDERS:
            raise ValueError(
                f"line item {self.sku}: cloud_provider must be one of {CLOUD_PROVIDERS}"
            )
        if self.unit_price_dollars <= 0:
            raise ValueError(f"line item {self.sku}: unit_price must be positive")
        if not self.project_id:
            self.project_id = stable_id("project", self.project)
        if not self.description:
            words = self.sku.split("_")
            self.description = " ".join(w if w in CLOUD_PROVIDERS else w.title() for w in words)

    @property
    def quantity(self) -> float:
        return round(self.total_cents / (self.unit_price_dollars * 100), 6)

    @property
    def cluster_id(self) -> str:
        """The cluster's 24-hex id (``clusterIds`` filters by it)."""
        return stable_id("cluster", self.project_id, self.cluster)


@dataclass
class ScenarioInvoice:
    """One monthly invoice. ``start`` is midnight UTC on the first day of its month."""

    id: str
    org_id: str
    status: str
    start: datetime
    line_items: list[ScenarioLineItem]
    sales_tax_cents: int = 0
    starting_balance_cents: int = 0
    credits_cents: int = 0
    amount_paid_cents: int = 0
    created: datetime | None = None
    updated: datetime | None = None
    name: str | None = None  # label the timeline can refer to

    def __post_init__(self) -> None:
        if not HEX24.fullmatch(self.id):
            raise ValueError(f"invoice id {self.id!r} is not 24 lowercase hex digits")
        if self.status not in INVOICE_STATUSES:
            raise ValueError(f"invoice {self.id}: unknown status {self.status!r}")
        if not self.line_items:
            raise ValueError(f"invoice {self.id}: needs at least one line item")
        if self.sales_tax_cents < 0:
            raise ValueError(f"invoice {self.id}: sales tax must not be negative")
        self.created = self.created or self.start
        self.updated = self.updated or self.created

    @property
    def end(self) -> datetime:
        return month_start(self.start, 1)

    @property
    def subtotal_cents(self) -> int:
        return sum(item.total_cents for item in self.line_items)

    @property
    def amount_billed_cents(self) -> int:
        return self.subtotal_cents + self.sales_tax_cents - self.starting_balance_cents

    def set_amount(self, cents: int) -> None:
        """Make ``amountBilledCents`` equal ``cents``: subtotal and tax scale together,
        the line items scale with the subtotal, the starting balance stays."""
        gross = cents + self.starting_balance_cents  # = subtotal + sales tax
        if gross < 0:
            raise ValueError(
                f"invoice {self.id}: amount {usd(cents)} is below minus its starting balance"
            )
        old_gross = self.subtotal_cents + self.sales_tax_cents
        subtotal = self.subtotal_cents * gross // old_gross if old_gross else gross
        self.sales_tax_cents = gross - subtotal
        old_subtotal = self.subtotal_cents
        if old_subtotal == 0:  # nothing to scale: the first item takes it all
            self.line_items[0].total_cents = subtotal
            return
        for item in self.line_items:
            item.total_cents = item.total_cents * subtotal // old_subtotal
        largest = max(self.line_items, key=lambda item: item.total_cents)
        largest.total_cents += subtotal - self.subtotal_cents


@dataclass(frozen=True)
class Step:
    """One timeline change, ``at`` seconds after the timeline starts."""

    at: float
    action: StepAction
    invoice_id: str
    status: str | None = None
    amount_cents: int | None = None
    new_invoice: ScenarioInvoice | None = None


def default_line_items(subtotal_cents: int, project: str) -> list[ScenarioLineItem]:
    """A plausible split of a subtotal: instances 75 %, data transfer 15 %, backup 10 %."""
    transfer = subtotal_cents * 15 // 100
    backup = subtotal_cents * 10 // 100
    return [
        ScenarioLineItem(
            sku="ATLAS_AWS_INSTANCE_M30",
            total_cents=subtotal_cents - transfer - backup,
            unit="server hours",
            unit_price_dollars=0.54,
            project=project,
        ),
        ScenarioLineItem(
            sku="ATLAS_AWS_DATA_TRANSFER_DIFFERENT_REGION",
            total_cents=transfer,
            unit="GB",
            unit_price_dollars=0.02,
            project=project,
        ),
        ScenarioLineItem(
            sku="ATLAS_AWS_BACKUP_SNAPSHOT_STORAGE",
            total_cents=backup,
            unit="GB days",
            unit_price_dollars=0.0047,
            project=project,
        ),
    ]


class Scenario:
    """Organizations, invoices and a timeline; also the simulator's live state.

    ``now`` anchors relative periods (``period=0`` is ``now``'s month); it defaults to
    the wall clock when the scenario is built.
    """

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)
        self.orgs: list[ScenarioOrg] = []
        self.timeline: list[Step] = []
        # Indexes, so that scenarios of 100k invoices stay fast to build and serve.
        self._org_refs: dict[str, ScenarioOrg] = {}  # by id and by name
        self._invoices: dict[str, ScenarioInvoice] = {}  # by id, in order of addition
        self._invoice_names: dict[str, ScenarioInvoice] = {}
        self._by_org: dict[str, list[ScenarioInvoice]] = {}
        # Ids of invoices removed: never given to a new invoice (Atlas never reuses one),
        # though a caller may add an invoice back under its own id.
        self._removed: set[str] = set()

    @property
    def invoices(self) -> list[ScenarioInvoice]:
        """Every current invoice (a new list: change the set with add and remove)."""
        return list(self._invoices.values())

    # ---- building -------------------------------------------------------------------

    def add_org(
        self,
        name: str,
        *,
        id: str | None = None,
        linked_to: str | None = None,
        forbidden: bool = False,
        billing_viewer: bool = False,
    ) -> ScenarioOrg:
        org_id = id or stable_id("org", name)
        if not HEX24.fullmatch(org_id):
            raise ValueError(f"org {name!r}: id {org_id!r} is not 24 lowercase hex digits")
        if org_id in self._org_refs or name in self._org_refs:
            raise ValueError(f"org {name!r} ({org_id}) is defined twice")
        payer = self.org(linked_to).id if linked_to is not None else None
        org = ScenarioOrg(
            id=org_id,
            name=name,
            linked_to=payer,
            forbidden=forbidden,
            billing_viewer=billing_viewer,
        )
        self.orgs.append(org)
        self._org_refs[org_id] = self._org_refs[name] = org
        return org

    def new_invoice(
        self,
        org: str,
        *,
        period: int | str | datetime = 0,
        status: str = "PENDING",
        amount_cents: int | None = None,
        line_items: list[ScenarioLineItem] | None = None,
        sales_tax_cents: int = 0,
        starting_balance_cents: int = 0,
        credits_cents: int = 0,
        amount_paid_cents: int | None = None,
        id: str | None = None,
        name: str | None = None,
    ) -> ScenarioInvoice:
        """Build an invoice for ``org`` (name or id) without adding it.

        Give either ``amount_cents`` (``amountBilledCents``; the subtotal is split into
        default line items) or ``line_items`` (the subtotal is their sum), or neither
        for a zero invoice. ``amount_paid_cents`` defaults to the billed amount for PAID
        invoices, else 0.
        """
        owner = self.org(org)
        start = self._period_start(period)
        if amount_cents is not None and line_items is not None:
            raise ValueError(f"invoice {name or id}: give amount or line items, not both")
        if line_items is None:
            subtotal = (amount_cents or 0) - sales_tax_cents + starting_balance_cents
            if subtotal < 0:
                raise ValueError(f"invoice {name or id}: amount is below tax minus balance")
            line_items = default_line_items(subtotal, f"{owner.name} Project")
        if id is None:
            id = self._free_invoice_id(owner.id, name or f"{start:%Y-%m}")
        if name is not None and self._find_invoice(name) is not None:
            raise ValueError(f"invoice name {name!r} is used twice")
        invoice = ScenarioInvoice(
            id=id,
            org_id=owner.id,
            status=status,
            start=start,
            line_items=line_items,
            sales_tax_cents=sales_tax_cents,
            starting_balance_cents=starting_balance_cents,
            credits_cents=credits_cents,
            name=name,
        )
        if amount_paid_cents is None:
            amount_paid_cents = invoice.amount_billed_cents if status == "PAID" else 0
        invoice.amount_paid_cents = amount_paid_cents
        return invoice

    def add_invoice(self, org: str, **kwargs: Any) -> ScenarioInvoice:
        """Build an invoice (see :meth:`new_invoice`) and add it to the scenario."""
        invoice = self.new_invoice(org, **kwargs)
        self.add(invoice)
        return invoice

    def schedule(
        self,
        at: float,
        invoice: str | ScenarioInvoice,
        *,
        set_status: str | None = None,
        set_amount_cents: int | None = None,
        remove: bool = False,
    ) -> Step:
        """Append one timeline step. Pass a :class:`ScenarioInvoice` (from
        :meth:`new_invoice`) to add it at ``at``; or a name/id and exactly one change."""
        if at < 0:
            raise ValueError("timeline steps cannot happen before t+0")
        if isinstance(invoice, ScenarioInvoice):
            step = Step(at, "add_invoice", invoice.id, new_invoice=invoice)
        else:
            target = self._find_invoice(invoice) or self._find_scheduled(invoice)
            if target is None:
                raise ValueError(f"timeline: unknown invoice {invoice!r}")
            changes = [set_status is not None, set_amount_cents is not None, remove]
            if sum(changes) != 1:
                raise ValueError("timeline: each step makes exactly one change")
            if set_status is not None and set_status not in INVOICE_STATUSES:
                raise ValueError(f"timeline: unknown status {set_status!r}")
            if set_status is not None:
                step = Step(at, "set_status", target.id, status=set_status)
            elif set_amount_cents is not None:
                step = Step(at, "set_amount", target.id, amount_cents=set_amount_cents)
            else:
                step = Step(at, "remove_invoice", target.id)
        self.timeline.append(step)
        return step

    @classmethod
    def generate(
        cls,
        orgs: int,
        invoices_per_org: int,
        seed: int = 0,
        now: datetime | None = None,
        *,
        monthly: bool = False,
    ) -> Scenario:
        """A big deterministic scenario for benchmarks: per org, one PENDING invoice for
        the current month and older ones (mostly PAID, some FAILED or CLOSED), each with
        one to four line items, some with sales tax or a starting balance.

        ``monthly``: the statuses real organizations have, month after month: this
        month's PENDING, last month's CLOSED in one org of 5 (not paid yet) or FAILED in
        one of 30 (its charge failed), every older one PAID."""
        rng = random.Random(seed)
        scenario = cls(now=now)
        skus = [
            ("ATLAS_AWS_INSTANCE_M10", "server hours", 0.08),
            ("ATLAS_AWS_INSTANCE_M30", "server hours", 0.54),
            ("ATLAS_GCP_INSTANCE_M40", "server hours", 1.04),
            ("ATLAS_AWS_DATA_TRANSFER_DIFFERENT_REGION", "GB", 0.02),
            ("ATLAS_AWS_BACKUP_SNAPSHOT_STORAGE", "GB days", 0.0047),
        ]
        for n in range(orgs):
            org = scenario.add_org(f"Org {n + 1:04d}", id=f"{rng.getrandbits(96):024x}")
            for age in range(invoices_per_org):
                if age == 0:
                    status = "PENDING"
                elif monthly:
                    draw = rng.random() if age == 1 else 1.0
                    status = "FAILED" if draw < 1 / 30 else "CLOSED" if draw < 0.2 else "PAID"
                else:
                    status = rng.choices(["PAID", "FAILED", "CLOSED"], weights=[90, 5, 5])[0]
                items = [
                    ScenarioLineItem(
                        sku=sku,
                        total_cents=rng.randint(1_000, 500_000),
                        unit=unit,
                        unit_price_dollars=price,
                        project=f"{org.name} project-{rng.randint(1, 3)}",
                        cluster=f"Cluster{rng.randint(0, 2)}",
                        cloud_provider=sku.split("_")[1],
                    )
                    for sku, unit, price in rng.sample(skus, rng.randint(1, 4))
                ]
                subtotal = sum(item.total_cents for item in items)
                scenario.add_invoice(
                    org.id,
                    id=f"{rng.getrandbits(96):024x}",
                    period=-(age % _PERIODS),  # more: several invoices a month
                    status=status,
                    line_items=items,
                    sales_tax_cents=subtotal * 8 // 100 if rng.random() < 0.3 else 0,
                    starting_balance_cents=rng.randint(0, subtotal // 10)
                    if rng.random() < 0.1
                    else 0,
                )
        return scenario

    # ---- lookups --------------------------------------------------------------------

    def org(self, ref: str) -> ScenarioOrg:
        """The org named ``ref`` or with id ``ref``."""
        org = self._org_refs.get(ref)
        if org is None:
            raise ValueError(f"unknown organization {ref!r}")
        return org

    def find_org(self, org_id: str) -> ScenarioOrg | None:
        org = self._org_refs.get(org_id)
        return org if org is not None and org.id == org_id else None

    def invoice(self, ref: str) -> ScenarioInvoice:
        """The current invoice with id or name ``ref``."""
        invoice = self._find_invoice(ref)
        if invoice is None:
            raise KeyError(f"unknown invoice {ref!r}")
        return invoice

    def find_invoice(self, invoice_id: str) -> ScenarioInvoice | None:
        return self._invoices.get(invoice_id)

    def invoices_of(self, org_id: str) -> list[ScenarioInvoice]:
        """The org's own current invoices, in order of addition."""
        return list(self._by_org.get(org_id, ()))

    def linked_orgs(self, payer_id: str) -> list[ScenarioOrg]:
        """The orgs whose invoices ``payer_id`` pays (cross-organization billing)."""
        return [org for org in self.orgs if org.linked_to == payer_id]

    def _find_invoice(self, ref: str) -> ScenarioInvoice | None:
        return self._invoices.get(ref) or self._invoice_names.get(ref)

    def _find_scheduled(self, ref: str) -> ScenarioInvoice | None:
        for step in self.timeline:
            if step.new_invoice is not None and ref in (step.new_invoice.id, step.new_invoice.name):
                return step.new_invoice
        return None

    def _free_invoice_id(self, org_id: str, label: str) -> str:
        scheduled = {step.invoice_id for step in self.timeline}
        taken = (self._invoices, self._removed, scheduled)
        n = 0
        while True:
            candidate = stable_id("invoice", org_id, label, str(n))
            if not any(candidate in ids for ids in taken):
                return candidate
            n += 1

    def _period_start(self, period: int | str | datetime) -> datetime:
        if isinstance(period, datetime):
            return month_start(period)
        if isinstance(period, int):
            return month_start(self.now, period)
        match = re.fullmatch(r"(\d{4})-(\d{2})", period)
        if match is None or not 1 <= int(match[2]) <= 12:
            raise ValueError(f"period {period!r} is not YYYY-MM or a month offset")
        return datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)

    # ---- changes --------------------------------------------------------------------

    def add(self, invoice: ScenarioInvoice) -> None:
        if self.find_org(invoice.org_id) is None:
            raise ValueError(f"invoice {invoice.id}: unknown organization {invoice.org_id}")
        if invoice.id in self._invoices:
            raise ValueError(f"invoice {invoice.id} exists already")
        if invoice.name is not None and invoice.name in self._invoice_names:
            raise ValueError(f"invoice name {invoice.name!r} is used twice")
        self._invoices[invoice.id] = invoice
        self._by_org.setdefault(invoice.org_id, []).append(invoice)
        if invoice.name is not None:
            self._invoice_names[invoice.name] = invoice

    def remove(self, invoice_id: str) -> ScenarioInvoice:
        invoice = self.invoice(invoice_id)
        del self._invoices[invoice.id]
        self._removed.add(invoice.id)
        self._by_org[invoice.org_id].remove(invoice)
        if invoice.name is not None:
            del self._invoice_names[invoice.name]
        return invoice

    def set_status(self, invoice_id: str, status: str, now: datetime) -> str:
        """Change an invoice's status; PAID also records the billed amount as paid."""
        if status not in INVOICE_STATUSES:
            raise ValueError(f"unknown invoice status {status!r}")
        invoice = self.invoice(invoice_id)
        old = invoice.status
        invoice.status = status
        if status == "PAID":
            invoice.amount_paid_cents = invoice.amount_billed_cents
        invoice.updated = now
        return f"{self._label(invoice)}: status {old} -> {status}"

    def set_amount(self, invoice_id: str, cents: int, now: datetime) -> str:
        invoice = self.invoice(invoice_id)
        old = invoice.amount_billed_cents
        invoice.set_amount(cents)
        invoice.updated = now
        return f"{self._label(invoice)}: amount {usd(old)} -> {usd(cents)}"

    def apply(self, step: Step, now: datetime) -> str:
        """Apply one timeline step; returns what changed, for people."""
        if step.action == "set_status":
            assert step.status is not None
            return self.set_status(step.invoice_id, step.status, now)
        if step.action == "set_amount":
            assert step.amount_cents is not None
            return self.set_amount(step.invoice_id, step.amount_cents, now)
        if step.action == "add_invoice":
            assert step.new_invoice is not None
            step.new_invoice.created = step.new_invoice.updated = now
            self.add(step.new_invoice)
            invoice = step.new_invoice
            return (
                f"{self._label(invoice)}: added ({invoice.status}, "
                f"{usd(invoice.amount_billed_cents)})"
            )
        return f"{self._label(self.remove(step.invoice_id))}: removed"

    def _label(self, invoice: ScenarioInvoice) -> str:
        org = self.find_org(invoice.org_id)
        org_name = org.name if org else invoice.org_id
        return f"{org_name} {invoice.start:%Y-%m} invoice {invoice.id}"


# ---- YAML -----------------------------------------------------------------------------


def _cents(value: Decimal, what: str) -> int:
    cents = value * 100
    if cents != cents.to_integral_value():
        raise ValueError(f"{what}: {value} has more than two decimals")
    return int(cents)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OrgIn(_Model):
    name: str
    id: str | None = None
    linked_to: str | None = None
    forbidden: bool = False
    billing_viewer: bool = False


class _SpikeIn(_Model):
    day: int
    times: float


class _LineItemIn(_Model):
    sku: str
    amount: Decimal
    unit: str = "server hours"
    unit_price: float = 0.54
    project: str | None = None
    cluster: str = "Cluster0"
    region: str = "US_EAST_1"
    cloud_provider: str = "AWS"
    description: str = ""
    daily: Literal["flat", "weekly"] = "flat"
    spike: _SpikeIn | None = None


class _InvoiceIn(_Model):
    org: str
    period: int | str = 0
    status: str = "PENDING"
    name: str | None = None
    id: str | None = None
    amount: Decimal | None = None
    line_items: list[_LineItemIn] | None = None
    sales_tax: Decimal = Decimal(0)
    starting_balance: Decimal = Decimal(0)
    credits: Decimal = Decimal(0)
    amount_paid: Decimal | None = None

    @field_validator("status")
    @classmethod
    def _known_status(cls, value: str) -> str:
        if value not in INVOICE_STATUSES:
            raise ValueError(f"must be one of {', '.join(INVOICE_STATUSES)}")
        return value


class _StepIn(_Model):
    at: float
    invoice: str | None = None
    set_status: str | None = None
    set_amount: Decimal | None = None
    add_invoice: _InvoiceIn | None = None
    remove_invoice: str | None = None

    @model_validator(mode="after")
    def _one_change(self) -> _StepIn:
        changes = [self.set_status, self.set_amount, self.add_invoice, self.remove_invoice]
        if sum(change is not None for change in changes) != 1:
            raise ValueError(
                "give exactly one of set_status, set_amount, add_invoice, remove_invoice"
            )
        if (self.set_status is not None or self.set_amount is not None) and not self.invoice:
            raise ValueError("set_status and set_amount need `invoice`")
        return self


class _ScenarioIn(_Model):
    orgs: list[_OrgIn]
    invoices: list[_InvoiceIn] = []
    timeline: list[_StepIn] = []


def _build_invoice(scenario: Scenario, spec: _InvoiceIn) -> ScenarioInvoice:
    items = None
    if spec.line_items is not None:
        owner = scenario.org(spec.org)
        items = [
            ScenarioLineItem(
                sku=item.sku,
                total_cents=_cents(item.amount, f"line item {item.sku}"),
                unit=item.unit,
                unit_price_dollars=item.unit_price,
                project=item.project or f"{owner.name} Project",
                cluster=item.cluster,
                region=item.region,
                cloud_provider=item.cloud_provider,
                description=item.description,
                daily=item.daily,
                spike_day=item.spike.day if item.spike is not None else None,
                spike_times=item.spike.times if item.spike is not None else 1.0,
            )
            for item in spec.line_items
        ]
    return scenario.new_invoice(
        spec.org,
        period=spec.period,
        status=spec.status,
        amount_cents=None if spec.amount is None else _cents(spec.amount, "amount"),
        line_items=items,
        sales_tax_cents=_cents(spec.sales_tax, "sales_tax"),
        starting_balance_cents=_cents(spec.starting_balance, "starting_balance"),
        credits_cents=_cents(spec.credits, "credits"),
        amount_paid_cents=None
        if spec.amount_paid is None
        else _cents(spec.amount_paid, "amount_paid"),
        id=spec.id,
        name=spec.name,
    )


def parse_scenario(
    data: Any, *, source: str = "<scenario>", now: datetime | None = None
) -> Scenario:
    """Build a scenario from parsed YAML data; any problem raises ``ValueError``."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: not a scenario: a scenario is a mapping of orgs, invoices and "
            "timeline (see invoice_watch/simulator/scenarios/demo.yaml)"
        )
    try:
        spec = _ScenarioIn.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"{source}: {problems}") from None
    scenario = Scenario(now=now)
    try:
        for org in spec.orgs:  # payers may be listed after the orgs they pay for
            scenario.add_org(
                org.name, id=org.id, forbidden=org.forbidden, billing_viewer=org.billing_viewer
            )
        for org in spec.orgs:
            if org.linked_to is not None:
                scenario.org(org.name).linked_to = scenario.org(org.linked_to).id
        for invoice in spec.invoices:
            scenario.add(_build_invoice(scenario, invoice))
        for step in spec.timeline:
            if step.add_invoice is not None:
                scenario.schedule(step.at, _build_invoice(scenario, step.add_invoice))
            elif step.remove_invoice is not None:
                scenario.schedule(step.at, step.remove_invoice, remove=True)
            else:
                assert step.invoice is not None
                amount = None if step.set_amount is None else _cents(step.set_amount, "set_amount")
                scenario.schedule(
                    step.at, step.invoice, set_status=step.set_status, set_amount_cents=amount
                )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    return scenario


# A scenario file is read up to this size (the demo's is 3 KiB).
MAX_SCENARIO_BYTES = 4 * 2**20


def load_scenario(path: str | Path, *, now: datetime | None = None) -> Scenario:
    """Load a scenario YAML file, a regular file of at most :data:`MAX_SCENARIO_BYTES`
    (never a FIFO or device read without end); a problem raises ``ValueError`` naming
    the file."""
    source = str(path)
    try:
        raw = read_regular(Path(path), MAX_SCENARIO_BYTES)
        data = yaml.safe_load(raw.decode("utf-8"))
    except OSError as exc:
        raise ValueError(f"{source}: cannot read scenario: {exc.strerror}") from None
    except NotARegularFile as exc:
        raise ValueError(
            f"{source}: cannot read scenario: it is {exc.kind}, not a file; name a scenario "
            "YAML file"
        ) from None
    except FileTooLarge as exc:
        raise ValueError(
            f"{source}: cannot read scenario: it is larger than {exc.limit // 2**20} MiB"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not a scenario: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML: {problem}") from None
    return parse_scenario(data, source=source, now=now)


def demo_scenario(now: datetime | None = None) -> Scenario:
    """The built-in demo: alerts fire and resolve within about 35 seconds."""
    text = resources.files(__package__).joinpath("scenarios/demo.yaml").read_text("utf-8")
    return parse_scenario(yaml.safe_load(text), source="demo.yaml", now=now)
