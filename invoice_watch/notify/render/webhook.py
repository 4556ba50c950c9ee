"""The generic webhook's JSON body (version :data:`WEBHOOK_VERSION`,
``invoice_watch/notify/webhook-v1.schema.json``) and a message's stable id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.format import period, usd
from invoice_watch.notify.render import facts, plain
from invoice_watch.types import AlertEvent, Part

WEBHOOK_VERSION = 1
WEBHOOK_TYPE = "invoice_watch.notification"


def message_id(events: Sequence[AlertEvent]) -> str:
    """A stable id for a message: the event's id, or one made of its events' ids (in
    any order) for a grouped message; the same when the message is sent again. Letters,
    digits and ``_`` only (Standard Webhooks' ``webhook-id`` may hold no ``.``)."""
    if len(events) == 1:
        return f"msg_{events[0].event_id}"
    digest = hashlib.sha256("|".join(sorted(e.event_id for e in events)).encode())
    return f"msg_group_{digest.hexdigest()[:32]}"


def _event_data(event: AlertEvent) -> dict[str, Any]:
    """One event of the webhook body (``notify/webhook-v1.schema.json``, ``event``)."""
    invoice = None
    if event.invoice_id:
        invoice = {
            "id": facts.machine(event.invoice_id),
            "status": facts.machine(event.invoice_status) if event.invoice_status else None,
            "previous_status": (
                facts.machine(event.previous_status) if event.previous_status else None
            ),
        }
    amount = None
    if event.amount_cents is not None:
        amount = {"cents": event.amount_cents, "text": usd(event.amount_cents), "currency": "USD"}
    billing_period = None
    if event.period_start is not None and event.period_end is not None:
        billing_period = {
            "start": event.period_start.isoformat(),
            "end": event.period_end.isoformat(),
            "text": period(event.period_start, event.period_end),
        }
    return {
        "id": event.event_id,
        "kind": event.kind.value,
        "alert_key": facts.machine(event.key, 1000),
        "rule": facts.machine(event.rule),
        "rule_type": facts.machine(event.rule_type),
        "severity": event.severity.value,
        "summary": facts.summary(event),
        "at": facts.iso(event.at),
        "firing_since": facts.iso(event.firing_since) if event.firing_since else None,
        "org": {
            "id": facts.machine(event.org_id),
            "name": facts.machine(event.org_name or event.org_id),
        },
        "invoice": invoice,
        "amount": amount,
        "period": billing_period,
        "link": facts.link(event),
        "details": [{"label": label, "value": value} for label, value in facts.details(event)],
        "breakdown": [
            {
                "dimension": facts.machine(line.dimension, facts.NAME_MAX),
                "name": facts.name(line.name),
                "amount_cents": line.amount_cents,
                "amount_text": usd(line.amount_cents),
                "growth_cents": line.growth_cents,
            }
            for _, lines in facts.breakdown(event)
            for line in lines
        ],
    }


def webhook_body(
    events: Sequence[AlertEvent], part: Part | None = None, *, notifier: str
) -> dict[str, Any]:
    """The generic webhook's JSON body for one or more events (version
    :data:`WEBHOOK_VERSION`, described by ``invoice_watch/notify/webhook-v1.schema.json``
    and README "Receivers"): the message's stable ``id`` (also the ``webhook-id``
    header), its ``title`` and plain ``text`` (:func:`~.plain.text`), and each event's facts."""
    shown = events[:MESSAGE_MAX_EVENTS]
    title = facts.title(events[0]) if len(events) == 1 else facts.group_title(events, part)
    return {
        "version": WEBHOOK_VERSION,
        "type": WEBHOOK_TYPE,
        "id": message_id(events),
        "timestamp": facts.iso(max(e.at for e in events)),
        "notifier": facts.machine(notifier),
        "part": {"number": part.number, "count": part.count} if part is not None else None,
        "title": title,
        "text": plain.text(events, part),
        "events": [_event_data(event) for event in shown],
    }
