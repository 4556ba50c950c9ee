"""The alert lifecycle, driven through time with an injected `now`."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from invoice_watch.alerts import Reason, decide
from invoice_watch.rules import OrgView, evaluate
from invoice_watch.store import AlertState
from invoice_watch.types import EventKind
from tests.conftest import NOW, ORG_A, inv
from tests.plans import plan


class Lifecycle:
    """Runs evaluate + plan cycle after cycle, keeping alert state like the store does."""

    def __init__(self, config):
        self.config = config
        self.states: dict[str, AlertState] = {}
        self.now = NOW

    def cycle(self, *invoices, ok=True, baseline=False, advance=timedelta(minutes=15)):
        self.now += advance
        current = {i.id: i for i in invoices}
        view = OrgView(ORG_A, ok=ok, invoices=current, failing_since=None if ok else self.now)
        evaluation = evaluate(self.config.rules, [view], {}, self.now)
        transitions = plan(
            self.config, evaluation, self.states, current, self.now, baseline=baseline
        )
        for t in transitions:
            if t.state.firing:
                self.states[t.state.key] = t.state
            else:
                self.states.pop(t.state.key, None)
        return [t.event.kind for t in transitions if t.event is not None], transitions


def rule(**kw: Any) -> dict[str, Any]:
    return {"name": "failed", "type": "invoice_status", "notify": ["console"], **kw}


def test_lifecycle_fires_once_then_stays_quiet_then_resolves(config_factory):
    life = Lifecycle(config_factory(rules=[rule()]))
    assert life.cycle(inv(1, status="FAILED"))[0] == [EventKind.FIRING]
    for _ in range(100):  # a month-long condition never re-fires because time passed
        assert life.cycle(inv(1, status="FAILED"), advance=timedelta(hours=8))[0] == []
    kinds, transitions = life.cycle(inv(1, status="PAID"))
    assert kinds == [EventKind.RESOLVED]
    resolved = transitions[0].event
    assert resolved is not None and resolved.firing_since == NOW + timedelta(minutes=15)
    assert resolved.invoice_status == "PAID"


def test_lifecycle_repeat_sends_reminders_while_it_holds(config_factory):
    life = Lifecycle(config_factory(rules=[rule(repeat="1h")]))
    assert life.cycle(inv(1, status="FAILED"))[0] == [EventKind.FIRING]
    seen = [life.cycle(inv(1, status="FAILED"))[0] for _ in range(8)]  # 2 hours
    assert seen.count([EventKind.REMINDER]) == 2
    assert seen[3] == [EventKind.REMINDER]  # exactly one hour after the FIRING


def test_lifecycle_refires_after_resolve(config_factory):
    life = Lifecycle(config_factory(rules=[rule()]))
    assert life.cycle(inv(1, status="FAILED"))[0] == [EventKind.FIRING]
    assert life.cycle(inv(1, status="PAID"))[0] == [EventKind.RESOLVED]
    assert life.cycle(inv(1, status="FAILED"))[0] == [EventKind.FIRING]


def test_lifecycle_send_resolved_false_resolves_quietly(config_factory):
    life = Lifecycle(config_factory(rules=[rule(send_resolved=False)]))
    life.cycle(inv(1, status="FAILED"))
    kinds, transitions = life.cycle(inv(1, status="PAID"))
    assert kinds == []
    assert transitions[0].reason is Reason.RESOLVED_QUIETLY
    assert life.states == {}


def test_lifecycle_failed_read_neither_resolves_nor_fires(config_factory):
    life = Lifecycle(config_factory(rules=[rule()]))
    life.cycle(inv(1, status="FAILED"))
    assert life.cycle(ok=False)[0] == []
    assert len(life.states) == 1
    assert life.cycle(inv(1, status="FAILED"))[0] == []


def test_lifecycle_invoice_gone_resolves_with_last_known_facts(config_factory):
    life = Lifecycle(config_factory(rules=[rule()]))
    life.cycle(inv(1, status="FAILED", cents=1234_56))
    kinds, transitions = life.cycle()
    event = transitions[0].event
    assert kinds == [EventKind.RESOLVED]
    assert event is not None and event.invoice_id == inv(1).id
    assert event.amount_cents == 1234_56
    assert "no longer listed" in event.summary


def test_lifecycle_baseline_records_without_sending(config_factory):
    life = Lifecycle(config_factory(rules=[rule()]))
    kinds, transitions = life.cycle(inv(1, status="FAILED"), baseline=True)
    assert kinds == [] and transitions[0].reason is Reason.BASELINE
    assert life.cycle(inv(1, status="FAILED"))[0] == []  # already notified
    assert life.cycle(inv(1, status="PAID"))[0] == [EventKind.RESOLVED]


def test_lifecycle_new_period_is_a_new_alert(config_factory):
    life = Lifecycle(config_factory(rules=[rule()]))
    assert life.cycle(inv(1, status="FAILED"))[0] == [EventKind.FIRING]
    assert life.cycle(inv(1, status="FAILED"), inv(2, status="FAILED"))[0] == [EventKind.FIRING]


@pytest.mark.parametrize(
    ("firing", "holding", "evaluated", "repeat", "since_notified", "expected"),
    [
        (False, True, True, None, None, Reason.NEW),
        (True, True, True, None, timedelta(days=40), Reason.ALREADY_NOTIFIED),
        (True, True, True, timedelta(hours=1), timedelta(minutes=59), Reason.ALREADY_NOTIFIED),
        (True, True, True, timedelta(hours=1), timedelta(hours=1), Reason.REPEAT_DUE),
        (True, False, True, None, None, Reason.RESOLVED),
        (True, False, False, None, None, Reason.NOT_EVALUATED),
        (False, False, True, None, None, None),
    ],
)
def test_decide_table(config_factory, firing, holding, evaluated, repeat, since_notified, expected):
    config = config_factory(rules=[rule()])
    the_rule = config.rules[0]
    if repeat is not None:
        the_rule = the_rule.model_copy(update={"repeat": repeat})
    state = AlertState(
        key="k",
        rule="failed",
        org_id=ORG_A,
        source_org_id=ORG_A,
        invoice_id=None,
        firing=firing,
        firing_since=NOW - timedelta(days=40),
        last_notified=NOW - (since_notified or timedelta(days=40)),
    )
    assert decide(replace(state), holding, evaluated, the_rule, NOW) is expected
