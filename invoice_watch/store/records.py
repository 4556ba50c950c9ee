"""What the state holds, as plain values: every backend reads and writes these, and
nothing in them names a database.

- :class:`AlertState`: one alert's entry in the notification log (Alertmanager's
  ``nflog``): whether it fires, since when, when people last heard of it, and where.
- :class:`OrgState`: one configured organization's read state (last attempt, last
  success, failing since, invoices held).
- :class:`OrgWrite`: what one organization's read changes in the snapshot.
- :class:`Delivery`: one outbox message due; :class:`OutboxRow`: one as the operator
  commands list it.
- :class:`UsageRead`, :class:`PeriodUsage`: line items fetched, per organization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from invoice_watch.report.outbox import ReportMessage
from invoice_watch.types import AlertEvent, Invoice, LineItem, Part

if TYPE_CHECKING:
    from invoice_watch.atlas.paging import Staged


@dataclass(frozen=True, slots=True)
class AlertState:
    """The stored state of one alert (its entry in the notification log)."""

    key: str
    rule: str
    org_id: str
    source_org_id: str
    invoice_id: str | None
    firing: bool
    firing_since: datetime
    last_notified: datetime | None
    resolved_at: datetime | None = None
    # The last event sent for it, so a RESOLVED message can say what had fired.
    last_event: AlertEvent | None = None
    # The notifiers its messages went to (its FIRING's, and those its reminders added):
    # a RESOLVED or REMINDER goes to them too, whatever the rule's `notify` says now
    # (:func:`~invoice_watch.alerts.recipients`); () for an alert stored before they were
    # remembered.
    notifiers: tuple[str, ...] = ()
    # Its rule's send_resolved when it fired: whether a RESOLVED is sent once the rule
    # is gone from the configuration.
    send_resolved: bool = True


@dataclass(frozen=True)
class OrgState:
    """One configured organization's read state (times are wall-clock, aware)."""

    org_id: str
    last_attempt: datetime | None = None
    last_success: datetime | None = None
    failing_since: datetime | None = None
    last_error: str | None = None
    invoice_count: int = 0


@dataclass
class OrgWrite:
    """What one organization's read changes in the snapshot, as the cycle decided it
    (:func:`~invoice_watch.plan.step_org`): the store writes it as it is."""

    org_id: str
    ok: bool
    upserts: list[Invoice] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    observations: list[tuple[str, int]] = field(default_factory=list)  # pending amounts seen
    error: str | None = None
    # A failed read: since when the organization's reads fail (its first failed read's
    # time, kept while they keep failing).
    failing_since: datetime | None = None
    # The organization's invoices in the snapshot once this is written (a failed read:
    # as they were).
    invoice_count: int = 0
    # Invoices another configured organization lists too (a linked one: in its own
    # organization's listing and in its payer's), as this read found them changed: that
    # organization's stored copy (``source_org_id``: that organization) is updated with
    # it, when it still holds one, so that the next read through it is no news.
    mirrors: list[Invoice] = field(default_factory=list)
    # Settled invoices new to the snapshot, staged as the listing was read: moved into
    # it with the rest (:mod:`invoice_watch.store.sql.staging`).
    staged: Staged | None = None

    @property
    def changes_snapshot(self) -> bool:
        return bool(self.upserts or self.gone or self.observations or self.mirrors or self.staged)


@dataclass(frozen=True)
class Delivery:
    """One outbox message due: ``id`` is its row's (a group's leader's), ``part`` which
    part it is of a group split for size (None when whole), ``last_error`` what its last
    attempt met (as stored: :func:`~invoice_watch.store.encoding.outbox_error`), ``owed``
    the recipients within the notifier still owed it when an attempt reached only some
    (None: all of them). A report (issue 19 §2) is a message with no events and its
    ``report``."""

    id: int
    notifier: str
    events: list[AlertEvent]
    created_at: datetime
    attempts: int
    part: Part | None = None
    last_error: str | None = None
    owed: tuple[str, ...] | None = None
    report: ReportMessage | None = None


@dataclass(frozen=True)
class OutboxRow:
    """One outbox message as ``status`` and ``history`` list it (a grouped message's
    leader stands for the group)."""

    id: int
    notifier: str
    summary: str
    created_at: datetime
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    done_at: datetime | None


@dataclass(frozen=True)
class Silence:
    """A silence (:mod:`invoice_watch.silences`): mutes the events of ``rule`` (for the
    organization and invoice it names, if any) from ``starts_at`` until ``ends_at``
    (aware times; expiring it sets ``ends_at`` to then)."""

    id: str
    rule: str
    org_id: str | None
    invoice_id: str | None
    starts_at: datetime
    ends_at: datetime
    comment: str
    created_at: datetime


@dataclass(frozen=True)
class Lifted:
    """What :meth:`~invoice_watch.store.protocols.SilenceRepository.lift` did: messages
    made pending (``sent``), muted for good (``muted``), and still silenced
    (``waiting``)."""

    sent: int = 0
    muted: int = 0
    waiting: int = 0


@dataclass(frozen=True)
class UsageRead:
    """When one configured organization's line items were last fetched
    (:class:`~invoice_watch.store.protocols.UsageRepository`): the invoice they are of
    (``invoice_id``, its period's first day ``period_start``, ISO date), how
    (``source``: "search", ``lineItems:search``; "csv", the invoice CSV), when the last
    fetch that worked ended (``fetched_at``; None: none has yet) and when the last one
    was tried (``attempted_at``), with its error when it failed (``last_error``)."""

    org_id: str
    attempted_at: datetime
    fetched_at: datetime | None = None
    invoice_id: str | None = None
    period_start: str | None = None
    source: str | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class PeriodUsage:
    """The line items held of one billing period of an organization: its pending (or
    last) invoice's, each a day of one SKU of one cluster (``usage_date`` None: a line
    of the whole period, from a CSV without the Usage Date column)."""

    org_id: str
    invoice_id: str
    period_start: str  # ISO date, the invoice's startDate's day
    items: tuple[LineItem, ...]
