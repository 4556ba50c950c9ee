"""The alert lifecycle of one cycle in one call, for the tests that drive
:mod:`invoice_watch.alerts` cycle after cycle without a store: the FIRING, REMINDER and
NOTICE transitions, then the RESOLVED ones, as the daemon's cycle plans them
(:class:`invoice_watch.plan.CyclePlan`) for one organization."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from invoice_watch.alerts import Scope, Transition, plan_holding, plan_resolved
from invoice_watch.config import Config
from invoice_watch.rules import Evaluation
from invoice_watch.store import AlertState
from invoice_watch.types import Invoice


def plan(
    config: Config,
    evaluation: Evaluation,
    states: Mapping[str, AlertState],
    invoices: Mapping[str, Invoice],
    now: datetime,
    *,
    baseline: bool = False,
) -> list[Transition]:
    """Every alert-state change of this cycle, with the events to send.

    ``invoices``: every invoice as it stands now, by id (for RESOLVED messages).
    ``baseline``: record what fires as notified, but send nothing.
    """
    transitions = plan_holding(config, evaluation, states, now, baseline=baseline)
    held = set(evaluation.holding)
    transitions += plan_resolved(
        config,
        states,
        held,
        lambda state: Scope(
            (state.rule, state.source_org_id) in evaluation.evaluated,
            invoices.get(state.invoice_id or ""),
        ),
        now,
        baseline=baseline,
    )
    return transitions
