"""Stage 4, the alert lifecycle: which alerts fire, remind and resolve. Pure.

Given what holds now (:class:`~invoice_watch.rules.Evaluation`) and the stored alert
state, decide for each alert whether people must hear about it, and why
(:class:`Reason`): FIRING once, a REMINDER every ``repeat`` while it holds, RESOLVED
when it stops (if ``send_resolved``). Alert state never expires, so a month-long
condition never re-fires just because time passed; a resolved alert that holds again
fires again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from invoice_watch import format as fmt
from invoice_watch.resolution import resolution_summary
from invoice_watch.rules import Age, Condition, Evaluation, wall_age
from invoice_watch.store.records import AlertState
from invoice_watch.types import AlertEvent, EventKind, Invoice

if TYPE_CHECKING:
    from invoice_watch.config import Config, Rule


class Reason(enum.Enum):
    NEW = "new"  # -> FIRING
    REPEAT_DUE = "repeat due"  # -> REMINDER
    RESOLVED = "resolved"  # -> RESOLVED
    RESOLVED_QUIETLY = "resolved, send_resolved is off"
    ALREADY_NOTIFIED = "already notified"
    NOT_EVALUATED = "organization not read this cycle"
    BASELINE = "baseline: recorded without sending"


class Scope(NamedTuple):
    """What a cycle knows of a firing alert whose condition no read holds any more (see
    :func:`plan_resolved`)."""

    # Whether a successful read evaluated its rule on what it is about this cycle.
    evaluated: bool
    # Its invoice as it stands now (None: no read lists it, or not an invoice alert).
    invoice: Invoice | None = None
    # The configuration no longer names any organization that could read it.
    unconfigured: bool = False
    # For a poll_failure alert: how long its organization has been failing (None: it
    # was read this cycle).
    failing_for: timedelta | None = None
    # For a usage_anomaly alert: what the verdict evaluated says of its dimension's day
    # (its amount, the threshold it is under), for the RESOLVED message.
    recovery: str | None = None


def recipients(config: Config, rule: Rule | None, state: AlertState | None) -> tuple[str, ...]:
    """The notifiers a message about an alert goes to: those that got its earlier
    messages (``state.notifiers``), then the rule's ``notify`` now (``rule``; None when
    the rule is gone), but only notifiers still configured (a message to one that is
    not could never be sent)."""
    before = state.notifiers if state is not None else ()
    now = tuple(rule.notify) if rule is not None else ()
    if before == now or not before:
        names: tuple[str, ...] = now
    else:
        names = before + tuple(name for name in now if name not in before)
    if all(name in config.notifiers for name in names):
        return names
    return tuple(name for name in names if name in config.notifiers)


def decide(
    state: AlertState | None,
    holding: bool,
    evaluated: bool,
    rule: Rule,
    now: datetime,
    age: Age | None = None,
) -> Reason | None:
    """Whether an alert needs a message now; None when nothing is to be done. ``age``:
    how long ago a stored time was (the last notification), measured so that a
    wall-clock step moves no duration (default: on the wall clock)."""
    firing = state is not None and state.firing
    if holding:
        if not firing:
            return Reason.NEW
        assert state is not None
        if rule.repeat is not None and (
            state.last_notified is None
            or (age or wall_age(now))(state.last_notified) >= rule.repeat
        ):
            return Reason.REPEAT_DUE
        return Reason.ALREADY_NOTIFIED
    if not firing:
        return None
    if not evaluated:
        return Reason.NOT_EVALUATED
    return Reason.RESOLVED if rule.send_resolved else Reason.RESOLVED_QUIETLY


@dataclass(frozen=True)
class Transition:
    """A change to one alert's stored state, and the event to send (if any)."""

    state: AlertState
    event: AlertEvent | None
    reason: Reason


class EventFactory:
    """Builds AlertEvents with the facts people need (org name, billing link)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._orgs: dict[str, tuple[str, str]] = {}  # org id -> (name, billing link)

    def org_name(self, org_id: str) -> str:
        return self._org(org_id)[0]

    def _org(self, org_id: str) -> tuple[str, str]:
        """The organization's name and billing link, made once for all its events."""
        facts = self._orgs.get(org_id)
        if facts is None:
            config = self._config
            facts = (config.org_name(org_id), fmt.billing_url(config.atlas.ui_url, org_id))
            self._orgs[org_id] = facts
        return facts

    def event(
        self,
        kind: EventKind,
        rule: Rule,
        condition: Condition,
        now: datetime,
        firing_since: datetime | None = None,
        *,
        told: AlertEvent | None = None,
    ) -> AlertEvent:
        """The event of ``kind`` for ``condition``. ``told``: for an invoice no longer
        listed, the alert's last message, whose facts of the invoice (status, amount,
        period) the event keeps."""
        invoice = condition.invoice
        org_name, billing_url = self._org(condition.org_id)
        if told is not None:
            invoice_id, status, cents = told.invoice_id, told.invoice_status, told.amount_cents
            start, end = told.period_start, told.period_end
        elif invoice is not None:
            invoice_id, status, cents = invoice.id, invoice.status, invoice.amount_billed_cents
            start, end = invoice.start_date.date(), fmt.end_day(invoice.end_date)
        else:
            invoice_id = status = cents = start = end = None
        return AlertEvent(
            kind=kind,
            key=condition.key,
            rule=rule.name,
            rule_type=rule.type,
            severity=rule.severity,
            org_id=condition.org_id,
            org_name=org_name,
            billing_url=billing_url,
            summary=condition.summary,
            at=now,
            invoice_id=invoice_id,
            invoice_status=status,
            amount_cents=cents,
            period_start=start,
            period_end=end,
            firing_since=firing_since,
            details=condition.details,
            previous_status=condition.previous_status,
        )


def plan_holding(
    config: Config,
    evaluation: Evaluation,
    states: Mapping[str, AlertState],
    now: datetime,
    *,
    baseline: bool = False,
    age: Age | None = None,
) -> list[Transition]:
    """The FIRING, REMINDER and NOTICE transitions: what the conditions that
    hold (and the notices) of ``evaluation`` change. A cycle can run it organization by
    organization, as each one is read, keeping ``states`` up to date in between.
    ``age``: as for :func:`decide`."""
    rules = {rule.name: rule for rule in config.rules}
    factory = EventFactory(config)
    transitions: list[Transition] = []

    for key, condition in evaluation.holding.items():
        rule = rules[condition.rule]
        state = states.get(key)
        reason = decide(state, True, True, rule, now, age)
        if reason is Reason.NEW:
            event = factory.event(EventKind.FIRING, rule, condition, now, firing_since=now)
            new_state = _new_state(condition, event, now, firing=True, rule=rule, config=config)
            if baseline:
                # No message went anywhere: no notifier has it yet (a mirror such as
                # Alertmanager learns of it with its first message, deliver/mirrors.py).
                baselined = replace(new_state, notifiers=())
                transitions.append(Transition(baselined, None, Reason.BASELINE))
            else:
                transitions.append(Transition(new_state, event, reason))
        elif reason is Reason.REPEAT_DUE:
            assert state is not None
            event = factory.event(
                EventKind.REMINDER, rule, condition, now, firing_since=state.firing_since
            )
            sent = None if baseline else event
            reminded = replace(
                state,
                last_notified=now,
                last_event=event,
                notifiers=recipients(config, rule, state),
                send_resolved=rule.send_resolved,
            )
            transitions.append(Transition(reminded, sent, reason))

    for notice in evaluation.notices:
        rule = rules[notice.rule]
        event = factory.event(EventKind.NOTICE, rule, notice, now)
        state = _new_state(notice, event, now, firing=False, rule=rule, config=config)
        transitions.append(Transition(state, None if baseline else event, Reason.NEW))
    return transitions


def plan_resolved(
    config: Config,
    states: Mapping[str, AlertState],
    held: Collection[str],
    scope: Callable[[AlertState], Scope],
    now: datetime,
    *,
    baseline: bool = False,
) -> list[Transition]:
    """The RESOLVED transitions, once the whole cycle is known: a firing alert
    whose condition no ``held`` key holds any more, and that was evaluated this cycle.
    ``scope`` tells what the cycle knows of an alert (:class:`Scope`: whether a
    successful read evaluated its rule on what it is about, and its invoice as it
    stands now, for the RESOLVED message).

    An alert whose rule was removed (a renamed rule is a removed one and a new one) or
    disabled, or whose organizations are all gone from the configuration, can never be
    evaluated again: it resolves now, its message saying why (sent unless the rule's
    ``send_resolved`` was false). Each RESOLVED goes to the notifiers the alert's
    messages went to, and to its rule's ``notify`` now (:func:`recipients`)."""
    rules = {rule.name: rule for rule in config.rules}
    factory = EventFactory(config)
    transitions: list[Transition] = []
    for key, state in states.items():
        if not state.firing or key in held:
            continue
        stored_rule = rules.get(state.rule)
        if stored_rule is None or not stored_rule.enabled:
            transitions.append(_ended(config, state, stored_rule, now, baseline=baseline))
            continue
        known = scope(state)
        if known.unconfigured:
            transitions.append(_ended(config, state, stored_rule, now, baseline=baseline))
            continue
        reason = decide(state, False, known.evaluated, stored_rule, now)
        if reason not in (Reason.RESOLVED, Reason.RESOLVED_QUIETLY):
            continue
        resolved = replace(
            state,
            firing=False,
            resolved_at=now,
            notifiers=recipients(config, stored_rule, state),
        )
        resolved_event = None
        if reason is Reason.RESOLVED and not baseline:
            now_invoice = known.invoice if state.invoice_id else None
            resolved_event = _resolved_event(
                factory, stored_rule, state, now_invoice, now, known.failing_for, known.recovery
            )
        transitions.append(Transition(resolved, resolved_event, reason))
    return transitions


def _ended(
    config: Config, state: AlertState, rule: Rule | None, now: datetime, *, baseline: bool
) -> Transition:
    """A firing alert that no cycle can evaluate any more (its rule removed or disabled,
    its organizations no longer configured), resolved now, saying why."""
    if rule is None:
        why = (
            f"The rule {state.rule} is no longer in the configuration (removed, or renamed: "
            "a renamed rule is a new one): this alert ends with it."
        )
        send = state.send_resolved
    elif not rule.enabled:
        why = f"The rule {rule.name} was disabled (enabled: false): this alert ends with it."
        send = rule.send_resolved
    else:
        org = state.last_event.org_name if state.last_event else state.source_org_id
        why = (
            f"The organization {org} is no longer under `organizations:` in the "
            "configuration: its alerts end."
        )
        send = rule.send_resolved
    notifiers = recipients(config, rule, state)
    resolved = replace(state, firing=False, resolved_at=now, notifiers=notifiers)
    last = state.last_event
    if not send or baseline or last is None or not notifiers:
        return Transition(resolved, None, Reason.RESOLVED_QUIETLY)
    event = replace(
        last,
        kind=EventKind.RESOLVED,
        summary=why,
        at=now,
        firing_since=state.firing_since,
        details=(),
        breakdown=(),
        previous_status=None,
    )
    return Transition(resolved, event, Reason.RESOLVED)


def _new_state(
    condition: Condition,
    event: AlertEvent,
    now: datetime,
    *,
    firing: bool,
    rule: Rule,
    config: Config,
) -> AlertState:
    """The state of an alert notified now: firing, or (a one-shot notice) already over."""
    return AlertState(
        key=condition.key,
        rule=condition.rule,
        org_id=condition.org_id,
        source_org_id=condition.source_org_id,
        invoice_id=condition.invoice.id if condition.invoice else None,
        firing=firing,
        firing_since=now,
        last_notified=now,
        resolved_at=None if firing else now,
        last_event=event,
        notifiers=recipients(config, rule, None),
        send_resolved=rule.send_resolved,
    )


def _resolved_event(
    factory: EventFactory,
    rule: Rule,
    state: AlertState,
    invoice: Invoice | None,
    now: datetime,
    failing_for: timedelta | None = None,
    recovery: str | None = None,
) -> AlertEvent:
    # The invoice gone from the listing: the event keeps the facts of the last message.
    gone = bool(state.invoice_id) and invoice is None
    condition = Condition(
        key=state.key,
        rule=rule.name,
        org_id=state.org_id,
        source_org_id=state.source_org_id,
        summary=resolution_summary(
            rule,
            invoice,
            state.last_event,
            now,
            org_id=state.org_id,
            org_name=factory.org_name(state.org_id),
            failing_for=failing_for,
            recovery=recovery,
        ),
        invoice=invoice,
    )
    return factory.event(
        EventKind.RESOLVED,
        rule,
        condition,
        now,
        state.firing_since,
        told=state.last_event if gone else None,
    )
