"""The rules of the configuration (``rules:``, SPEC §6): one model per ``type`` (an
invoice's status, a pending amount, a status change, an amount increase, a forecast, a
poll failure, a usage anomaly), :data:`Rule` their union tagged by ``type``. What each
rule means when it runs is :mod:`invoice_watch.rules`'s."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import Field, model_validator

from invoice_watch.config.base import Model
from invoice_watch.config.quantities import Duration, Flag, Money, Number, at_most
from invoice_watch.config.values import InvoiceStatus, Name, OrgId
from invoice_watch.types import Severity

# A rule's durations: invoices are monthly, so a year covers every use.
RuleDuration = Annotated[
    Duration, at_most(timedelta(days=366), "invoices are monthly; a year covers every use")
]


class _RuleBase(Model):
    name: Name
    notify: Annotated[list[Name], Field(min_length=1)]
    orgs: Annotated[list[OrgId], Field(min_length=1)] | None = None
    severity: Severity = Severity.WARNING
    repeat: RuleDuration | None = None
    send_resolved: Flag = True
    enabled: Flag = True


class InvoiceStatusRule(_RuleBase):
    """Fires while an invoice is in one of ``statuses``."""

    type: Literal["invoice_status"]
    statuses: Annotated[list[InvoiceStatus], Field(min_length=1)] = Field(
        default_factory=lambda: ["FAILED"]
    )


class PendingAmountRule(_RuleBase):
    """Fires while a PENDING invoice's amount is over ``threshold_cents``."""

    type: Literal["pending_amount"]
    threshold_cents: Money = Field(alias="threshold")


class StatusChangeRule(_RuleBase):
    """A one-shot notice when an invoice moves between statuses (None = any)."""

    type: Literal["status_change"]
    from_statuses: Annotated[list[InvoiceStatus], Field(min_length=1)] | None = Field(
        None, alias="from"
    )
    to_statuses: Annotated[list[InvoiceStatus], Field(min_length=1)] | None = Field(
        None, alias="to"
    )


class AmountIncreaseRule(_RuleBase):
    """Fires while a pending invoice grew by more than a threshold or percent in ``window``."""

    type: Literal["amount_increase"]
    threshold_cents: Money | None = Field(None, alias="threshold")
    percent: Number | None = Field(None, gt=0, le=1_000_000)
    window: RuleDuration = timedelta(hours=24)

    @model_validator(mode="after")
    def _threshold_or_percent(self) -> AmountIncreaseRule:
        if self.threshold_cents is None and self.percent is None:
            raise ValueError("set threshold (USD), percent, or both")
        return self


class ForecastRule(_RuleBase):
    """Fires while a pending invoice's linear forecast exceeds ``budget_cents``."""

    type: Literal["forecast"]
    budget_cents: Money = Field(alias="budget")
    min_elapsed: RuleDuration = timedelta(days=3)


class PollFailureRule(_RuleBase):
    """Fires when an organization has been unreadable for ``after``."""

    type: Literal["poll_failure"]
    after: RuleDuration = timedelta(hours=1)


class UsageAnomalyRule(_RuleBase):
    """Fires while a project's, cluster's or SKU's (``by``) latest day of usage is over
    its own recent spend: the median of the trailing ``baseline`` days (a number of days)
    by more than ``min_increase_cents`` and the spread ``sensitivity`` allows
    (:mod:`invoice_watch.anomaly`); and for a new one already over ``min_increase``."""

    type: Literal["usage_anomaly"]
    by: Literal["project", "cluster", "sku"] = "project"
    baseline: int = Field(14, ge=7, le=60)
    min_increase_cents: Money = Field(100_00, alias="min_increase")
    sensitivity: Literal["low", "medium", "high"] = "medium"


Rule = Annotated[
    InvoiceStatusRule
    | PendingAmountRule
    | StatusChangeRule
    | AmountIncreaseRule
    | ForecastRule
    | PollFailureRule
    | UsageAnomalyRule,
    Field(discriminator="type"),
]
