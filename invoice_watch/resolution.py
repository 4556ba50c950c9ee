"""What a RESOLVED message says happened, and why its alert resolved (SPEC §4, the
"resolves when" column): the invoice as it is now, the rule as configured now,
and the alert's last message. Pure: text out, no I/O.

A reload may have changed a rule since its alert fired: the message then says what
changed (its type, the organizations it covers, its limits), not that the amount fell.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from invoice_watch import format as fmt
from invoice_watch.rules import PENDING, applies, forecast, increase_limits
from invoice_watch.types import AlertEvent, Invoice

if TYPE_CHECKING:
    from invoice_watch.config import Rule


def resolution_summary(
    rule: Rule,
    invoice: Invoice | None,
    fired: AlertEvent | None,
    now: datetime,
    *,
    org_id: str | None = None,
    org_name: str | None = None,
    failing_for: timedelta | None = None,
    recovery: str | None = None,
) -> str:
    """What a RESOLVED message says happened, and why the alert resolved: from the
    invoice as it is now, ``rule`` as configured now, and ``fired``, the alert's last
    message (the amount and the limits it named). A reload may have changed the rule
    since it fired: then the message says the rule changed (its type, the organizations
    it covers, its limits), not that the amount fell. ``org_id``: the alert's
    organization (the invoice's own, or the one poll_failure watches), ``org_name`` its
    name; ``failing_for``: for poll_failure, how long that organization has been failing
    (None: it was read); ``recovery``: for usage_anomaly, what the verdict says of the
    dimension's latest judged day (:func:`~invoice_watch.rules.usage_recovery`)."""
    org = org_name or org_id or "this organization"
    if fired is not None and fired.rule_type and fired.rule_type != rule.type:
        return (
            f"The rule {rule.name} is now a {rule.type} rule (it was {fired.rule_type}): "
            "this alert of the old rule ends."
        )
    if org_id is not None and not applies(rule, org_id):
        return (
            f"The rule no longer covers {org} (its `orgs` changed): this alert ends"
            f"{_as_it_stands(invoice)}."
        )
    if rule.type == "poll_failure":
        if failing_for is not None:
            return (
                f"The rule's `after` is now {fmt.duration(rule.after)}: {org} has failed "
                f"to be read for {fmt.duration(failing_for)}, not that long yet."
            )
        return "Invoices can be read again."
    if rule.type == "usage_anomaly":
        said = dict(fired.details) if fired is not None else {}
        what = said.get("Dimension") or _dimension_said(said)
        usual = said.get("Usual")
        was = f" (it was {said.get('Spend that day')} against a usual {usual})" if usual else ""
        if recovery is not None:
            return f"The daily spend is back under the anomaly threshold{was}: {recovery}"
        return f"The daily spend of {what} is back under the anomaly threshold{was}."
    if invoice is None:
        return "The invoice is no longer listed by Atlas."
    said = dict(fired.details) if fired is not None else {}
    if rule.type == "invoice_status":
        if fired is not None and fired.invoice_status == invoice.status:
            return (
                f"The rule no longer watches {invoice.status} invoices (its statuses "
                f"changed); invoice {invoice.id} is still {invoice.status}."
            )
        return f"Invoice {invoice.id} is now {invoice.status}."
    if invoice.status != PENDING:
        return f"Invoice {invoice.id} is now {invoice.status}: the period is closed."
    amount = invoice.amount_billed_cents
    if rule.type == "pending_amount":
        limit = fmt.usd(rule.threshold_cents)
        before = fmt.parse_usd(said.get("Threshold", ""))
        if before is not None and before != rule.threshold_cents and amount > before:
            return (
                f"The rule's threshold changed from {fmt.usd(before)} to {limit}: the pending "
                f"invoice ({fmt.usd(amount)}) is under the new one{_was(fired, amount)}."
            )
        return f"Pending invoice is {fmt.usd(amount)}, back under the {limit} threshold."
    if rule.type == "forecast":
        budget = fmt.usd(rule.budget_cents)
        if now - invoice.start_date < rule.min_elapsed:
            return (
                f"The rule now forecasts only after {fmt.duration(rule.min_elapsed)} of the "
                "period (its min_elapsed changed)."
            )
        projected = forecast(invoice, now)
        before = fmt.parse_usd(said.get("Budget", ""))
        pace = f" ({fmt.usd(projected)} at this pace)" if projected is not None else ""
        if (
            before is not None
            and before != rule.budget_cents
            and projected is not None
            and projected > before
        ):
            return (
                f"The rule's budget changed from {fmt.usd(before)} to {budget}: the forecast "
                f"for this period{pace} is under the new one."
            )
        return f"The forecast for this period{pace} is back under the {budget} budget."
    if rule.type == "amount_increase":
        limits = dict(increase_limits(rule))
        if fired is not None and {k: said.get(k) for k in limits} != limits:
            return (
                f"The rule's limits changed ({_limits_text(said)} -> {_limits_text(limits)}): "
                "the growth within the window is not over the new ones."
            )
        return "The growth within the window is back under the threshold."
    return "The condition no longer holds."


def _dimension_said(said: Mapping[str, str]) -> str:
    """The project, cluster or SKU a usage_anomaly FIRING's details named."""
    named = [f"{k.lower()} {said[k]}" for k in ("Cluster", "SKU", "Project") if said.get(k)]
    return " of ".join(named) or "the dimension"


def _as_it_stands(invoice: Invoice | None) -> str:
    """``, though invoice X is still FAILED ($1.00)``: the invoice now, for a message
    whose alert ended for another reason than the invoice."""
    if invoice is None:
        return ""
    return (
        f", though invoice {invoice.id} is still {invoice.status} "
        f"({fmt.usd(invoice.amount_billed_cents)})"
    )


def _was(fired: AlertEvent | None, amount: int) -> str:
    """``, though it rose from $X`` when the amount grew since the alert's message."""
    if fired is None or fired.amount_cents is None or amount <= fired.amount_cents:
        return ""
    return f", though it rose from {fmt.usd(fired.amount_cents)}"


def _limits_text(limits: Mapping[str, str]) -> str:
    over = [limits[k] for k in ("Threshold", "Threshold %") if limits.get(k)]
    return f"over {' or '.join(over) or 'nothing'} within {limits.get('Window', '?')}"
