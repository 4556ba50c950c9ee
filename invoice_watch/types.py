"""Domain types shared by every stage: invoices as the API reports them, the alert
events the pipeline produces, and the protocols between stages."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from itertools import count
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from invoice_watch.atlas.paging import Staged

# API field name -> Invoice attribute, for the cents fields the diff compares.
AMOUNT_ATTRS: dict[str, str] = {
    "amountBilledCents": "amount_billed_cents",
    "amountPaidCents": "amount_paid_cents",
    "creditsCents": "credits_cents",
    "salesTaxCents": "sales_tax_cents",
    "startingBalanceCents": "starting_balance_cents",
    "subtotalCents": "subtotal_cents",
}


# What a listing says of an invoice, in the order its settled key reads it: id, orgId,
# statusName, the cents fields (in AMOUNT_ATTRS order), startDate, endDate, created,
# updated (see Invoice.listed and Snapshot.held).
Listed = tuple[str, str, str, tuple[int, ...], datetime, datetime, datetime | None, datetime | None]


@dataclass(frozen=True, slots=True)
class Invoice:
    """One invoice, as listed by the Atlas API (``BillingInvoiceMetadata``).

    ``source_org_id`` is the configured organization whose listing returned it: the
    invoice's own ``org_id`` for its own invoices, the paying org for linked invoices.
    """

    id: str
    org_id: str
    status: str
    start_date: datetime
    end_date: datetime
    amount_billed_cents: int = 0
    amount_paid_cents: int = 0
    credits_cents: int = 0
    sales_tax_cents: int = 0
    starting_balance_cents: int = 0
    subtotal_cents: int = 0
    created: datetime | None = None
    updated: datetime | None = None
    source_org_id: str = ""

    def amounts(self) -> dict[str, int]:
        """The cents fields, keyed by their API names."""
        return {api: getattr(self, attr) for api, attr in AMOUNT_ATTRS.items()}

    def listed(self) -> Listed:
        """What a listing that shows this invoice says of it (:data:`Listed`)."""
        return (
            self.id,
            self.org_id,
            self.status,
            (
                self.amount_billed_cents,
                self.amount_paid_cents,
                self.credits_cents,
                self.sales_tax_cents,
                self.starting_balance_cents,
                self.subtotal_cents,
            ),
            self.start_date,
            self.end_date,
            self.created,
            self.updated,
        )

    def settled_key(self) -> int:
        """This invoice as a settled snapshot keeps it: see :func:`settled_key`."""
        return settled_key(self.listed())


# A settled invoice's key: the day its period starts, then a 40-bit fingerprint. Days to
# this century's take 20 bits: a key under 2**60 is two of CPython's 30-bit int digits,
# 32 bytes (42 bits made it three, 48 bytes): 1.6 MB less for 100k settled invoices.
_FINGERPRINT_BITS = 40
_FINGERPRINT_MASK = (1 << _FINGERPRINT_BITS) - 1
_DAY_ONE = datetime(1, 1, 1, tzinfo=UTC)


def settled_key(listed: Listed) -> int:
    """What the snapshot keeps in memory of a settled invoice (one that can no longer
    change and that no rule watches): one int instead of an :class:`Invoice`.
    ``listed``: what a listing says of it (:data:`Listed`, as :meth:`Invoice.listed`
    gives it).

    Its high bits are the day the invoice's period starts (UTC, so that an incremental
    listing's window applies to it), its low 40 bits a fingerprint of every field
    (``amounts`` in :data:`AMOUNT_ATTRS` order): two invoices that are equal have the
    same key; two that differ have the same key once in 10^12. The fingerprint is
    Python's ``hash``, so keys are only ever compared within one process (the state
    file keeps the invoices themselves). The tuple is hashed as it is: a start computes
    the key of every invoice it lists and of every settled one it loads.
    """
    return ((listed[4] - _DAY_ONE).days << _FINGERPRINT_BITS) | (hash(listed) & _FINGERPRINT_MASK)


def settled_day(key: int) -> int:
    """The day on which the period of the invoice with this settled key starts (UTC),
    as :func:`day_number` counts days."""
    return key >> _FINGERPRINT_BITS


def first_key_of(day: int) -> int:
    """The smallest settled key of an invoice whose period starts on ``day`` (as
    :func:`day_number` counts): ``settled_day(key) >= day`` exactly when ``key >=
    first_key_of(day)``, one int comparison."""
    return day << _FINGERPRINT_BITS


def day_number(day: date) -> int:
    """Days from 0001-01-01 to ``day``: how :func:`settled_day` counts."""
    return day.toordinal() - 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One configured organization's stored invoices, as a cycle holds them in memory.

    ``live``: the invoices that can still change, or whose status a rule watches, as
    :class:`Invoice` objects: what the rules see. ``settled``: the others (PAID,
    FORGIVEN or FREE, and no rule watches that status), most of an organization's
    history, as one int each (:func:`~invoice_watch.types.settled_key`): enough to tell
    that a listing shows one unchanged, or no longer shows it. The state file keeps them
    whole; the few that a read finds changed or gone are read from it
    (:func:`~invoice_watch.diff.settled_to_load`). ``settles``: the statuses kept settled.

    Never changed in place (a cycle may still be looking at it): see :meth:`updated`.
    ``generation``: which ``settled`` this is, one number each (atlas.paging's pages).
    """

    live: dict[str, Invoice] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)
    settles: frozenset[str] = frozenset()
    generation: int = field(default_factory=functools.partial(next, count()), compare=False)
    _since: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.live) + len(self.settled)

    def settled_since(self, lowest: int) -> int:
        """How many settled invoices have a key of ``lowest`` or more (remembered: a
        snapshot never changes, and a steady read asks the same each cycle)."""
        count = self._since.get(lowest)
        if count is None:
            count = self._since[lowest] = sum(key >= lowest for key in self.settled.values())
        return count

    def __contains__(self, invoice_id: object) -> bool:
        return invoice_id in self.live or invoice_id in self.settled

    def __iter__(self) -> Iterator[str]:
        """The ids, live ones first."""
        yield from self.live
        yield from self.settled

    def held(self, listed: Listed) -> Invoice | int | None:
        """What this snapshot holds of the invoice a listing shows as ``listed``, when it
        holds that invoice as listed: the live :class:`Invoice` itself, or a settled
        one's key; else None (an invoice it does not hold, or one that changed). The one
        comparison of a listing with the snapshot: the parser asks it for each entry
        (:func:`invoice_watch.atlas.parse.parse_page`) and builds nothing for one it
        holds, so the diff finds an unchanged invoice as the stored object itself."""
        invoice_id = listed[0]
        before = self.live.get(invoice_id)
        if before is not None:
            return before if before.listed() == listed else None
        key = self.settled.get(invoice_id)
        return key if key is not None and settled_key(listed) == key else None

    def newest_settled_day(self) -> date | None:
        """The (UTC) day on which the newest settled invoice's period starts."""
        if not self.settled:
            return None
        return date.fromordinal(settled_day(max(self.settled.values())) + 1)

    def updated(
        self,
        upserts: Collection[Invoice],
        gone: Collection[str],
        staged: dict[str, int] | None = None,
    ) -> Snapshot:
        """A new snapshot: this one once ``staged`` (settled invoices new to it, id ->
        key: :class:`Staged`) are added, then ``upserts`` stored and ``gone`` deleted."""
        if not upserts and not gone and not staged:
            return self
        live, settled = dict(self.live), self.settled
        if staged:  # a first listing's staged keys become the snapshot's, not copied
            settled = {**settled, **staged} if settled else staged
        if (settled is self.settled or settled is staged) and (
            any(i.status in self.settles or i.id in settled for i in upserts)
            or any(invoice_id in settled for invoice_id in gone)
        ):
            settled = dict(settled)
        for invoice in upserts:
            if invoice.status in self.settles:
                live.pop(invoice.id, None)
                settled[invoice.id] = invoice.settled_key()
            else:
                settled.pop(invoice.id, None)
                live[invoice.id] = invoice
        for invoice_id in gone:
            live.pop(invoice_id, None)
            settled.pop(invoice_id, None)
        if settled is self.settled:
            return Snapshot(live, settled, self.settles, self.generation, self._since)
        return Snapshot(live, settled, self.settles)


@dataclass(frozen=True, slots=True)
class LineItem:
    """One line of an invoice's usage (from the CSV, the pending invoice's lineItems, or
    ``lineItems:search``).

    ``project`` is the project's name as messages show it (its id when no name is
    known); ``project_id`` the project's 24-hex id (``groupId``) when the source gives
    it, else empty. ``usage_date``: the (UTC) day of the usage, for the daily line items
    of ``lineItems:search`` (None for a whole period's lines)."""

    project: str
    sku: str
    cluster: str
    amount_cents: int
    project_id: str = ""
    usage_date: date | None = None


class EventKind(enum.StrEnum):
    FIRING = "FIRING"
    REMINDER = "REMINDER"
    RESOLVED = "RESOLVED"
    NOTICE = "NOTICE"  # one-shot events (status_change)


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class BreakdownLine:
    """One row of "what is behind this amount": a project or SKU and its cents."""

    dimension: str  # "project" | "sku"
    name: str
    amount_cents: int
    growth_cents: int | None = None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One thing to tell people: an alert firing, reminding, resolving, or a notice.

    Everything a notifier renders is in here; it is stored as JSON in the outbox, so a
    message sent after a restart says exactly what it would have said before.
    """

    kind: EventKind
    key: str
    rule: str
    rule_type: str
    severity: Severity
    org_id: str
    org_name: str
    billing_url: str
    summary: str
    at: datetime
    invoice_id: str | None = None
    invoice_status: str | None = None
    amount_cents: int | None = None
    period_start: date | None = None
    period_end: date | None = None
    firing_since: datetime | None = None
    details: tuple[tuple[str, str], ...] = ()
    breakdown: tuple[BreakdownLine, ...] = ()
    previous_status: str | None = None

    @property
    def event_id(self) -> str:
        """Stable id of this event: the same event always gets the same id."""
        raw = f"{self.key}|{self.kind}|{self.at.isoformat()}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    @property
    def message_id(self) -> str:
        """RFC 5322 Message-ID, stable per event (so resends thread, not duplicate)."""
        return f"<{self.event_id}@invoice-watch>"

    def to_json(self) -> dict[str, Any]:
        """The event as JSON-ready data (field by field: ``dataclasses.asdict`` deep-copies
        and costs a cold cycle of 900 events a tenth of a second)."""

        def iso(value: date | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "kind": str(self.kind),
            "key": self.key,
            "rule": self.rule,
            "rule_type": self.rule_type,
            "severity": str(self.severity),
            "org_id": self.org_id,
            "org_name": self.org_name,
            "billing_url": self.billing_url,
            "summary": self.summary,
            "at": self.at.isoformat(),
            "invoice_id": self.invoice_id,
            "invoice_status": self.invoice_status,
            "amount_cents": self.amount_cents,
            "period_start": iso(self.period_start),
            "period_end": iso(self.period_end),
            "firing_since": iso(self.firing_since),
            "details": [list(d) for d in self.details],
            "breakdown": [
                {
                    "dimension": b.dimension,
                    "name": b.name,
                    "amount_cents": b.amount_cents,
                    "growth_cents": b.growth_cents,
                }
                for b in self.breakdown
            ],
            "previous_status": self.previous_status,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlertEvent:
        """The event back from :meth:`to_json`. Thousands of stored events share their
        rule, organization, link, times and periods: those are kept once in memory."""

        def dt(value: str | None) -> datetime | None:
            return instant(value) if value else None

        def d(value: str | None) -> date | None:
            return _date(value) if value else None

        def shared(value: str | None) -> str | None:
            return sys.intern(value) if value is not None else None

        at = dt(data["at"])
        assert at is not None
        return cls(
            kind=EventKind(data["kind"]),
            key=data["key"],
            rule=sys.intern(data["rule"]),
            rule_type=sys.intern(data["rule_type"]),
            severity=Severity(data["severity"]),
            org_id=sys.intern(data["org_id"]),
            org_name=sys.intern(data["org_name"]),
            billing_url=sys.intern(data["billing_url"]),
            summary=data["summary"],
            at=at,
            invoice_id=data.get("invoice_id"),
            invoice_status=shared(data.get("invoice_status")),
            amount_cents=data.get("amount_cents"),
            period_start=d(data.get("period_start")),
            period_end=d(data.get("period_end")),
            firing_since=dt(data.get("firing_since")),
            details=tuple((str(k), str(v)) for k, v in data.get("details") or ()),
            breakdown=tuple(BreakdownLine(**b) for b in data.get("breakdown") or ()),
            previous_status=shared(data.get("previous_status")),
        )


@functools.lru_cache(maxsize=4096)
def instant(value: str) -> datetime:
    """``datetime.fromisoformat``, remembered: invoices share their period bounds and a
    cycle's events their time, so the same values come back again and again (parsed
    once, and kept once in memory). One cache for every stage."""
    return datetime.fromisoformat(value)


@functools.lru_cache(maxsize=1024)
def _date(value: str) -> date:
    return date.fromisoformat(value)


def events_from_json(text: str) -> list[AlertEvent]:
    """The events of an outbox row's ``events`` text: none for a report's (a JSON
    object, :mod:`invoice_watch.report.outbox`), which no alert's handling touches."""
    items = json.loads(text)
    if not isinstance(items, list):
        return []
    return [AlertEvent.from_json(item) for item in items]


@dataclass(frozen=True, slots=True)
class Part:
    """Which part a message is of a grouped message too large for one: ``number`` of
    ``count`` (from 1). Each part is a message of its own in the outbox, complete, sent
    and recorded on its own, in order (see ``store.message_parts``)."""

    number: int
    count: int

    def __str__(self) -> str:
        return f"part {self.number} of {self.count}"


class Notifier(Protocol):
    """The one contract every notifier (Slack, email, console, webhook, PagerDuty, Teams,
    Alertmanager) fulfils.

    ``send`` delivers one message holding one event, or several as a grouped message
    (``part``: which part of a larger group it is, said in the message; None when the
    group is whole). The message fits the channel's size limits by construction.
    It raises :class:`~invoice_watch.errors.RetryableNotifyError` for transient
    failures and :class:`~invoice_watch.errors.PermanentNotifyError` when retrying
    cannot help; any other exception is a bug. ``recipients``: the notifier's own
    recipients still owed the message, as an earlier attempt's
    ``RetryableNotifyError.owed`` said (an email's ``to`` some of whom have it); None
    for all of them. A notifier with a single destination (Slack, the console) never
    says ``owed`` and ignores it.
    """

    name: str

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class FiringMirror(Protocol):
    """A notifier that mirrors what is firing (Alertmanager), besides the messages the
    outbox gives it: the deliverer posts it every firing alert whose messages go to it,
    every ``resend_every`` seconds (``repost``, :mod:`invoice_watch.deliver.mirrors`), so that
    the receiver keeps them firing. ``repost`` raises as ``send`` does."""

    name: str
    resend_every: float

    async def repost(self, events: Sequence[AlertEvent]) -> None: ...


@dataclass(frozen=True, slots=True)
class OrgRead:
    """The outcome of reading one configured organization in one cycle."""

    org_id: str
    # Every invoice listed, but the settled ones listed unchanged: their keys, ascending.
    invoices: tuple[Invoice, ...] = ()
    settled: Sequence[int] = ()
    # The settled invoices new to the snapshot that a long listing staged (None: none).
    staged: Staged | None = None
    error: str | None = None
    requests: int = 0
    listed: int = 0  # invoices listed (linked ones included)
    linked: int = 0  # of those, nested in another's ``linkedInvoices``
    # Failed because Atlas refuses the request itself (401/403, another 4xx): any other
    # listing of the organization would be refused too.
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def outcome(self) -> OrgRead:
        """This read without what it listed (once that is taken): ok or not, why,
        requests sent, how many invoices it listed (and how many of them linked)."""
        return replace(self, invoices=(), settled=(), staged=None)


USAGE_BY = ("project", "cluster", "sku")


def usage_subject(key: str, rule: str, org_id: str) -> str | None:
    """What a ``usage_anomaly`` alert is about, from its key
    (:func:`~invoice_watch.rules.usage_key`: ``rule/org/by:dimension``): ``cluster
    5f1e…/orders``, ``sku ATLAS_AWS_INSTANCE_M40``; None for another alert's key."""
    prefix = f"{rule}/{org_id}/"
    if not key.startswith(prefix):
        return None
    by, sep, dimension = key[len(prefix) :].partition(":")
    if not sep or by not in USAGE_BY or not dimension:
        return None
    return f"{by} {dimension}"
