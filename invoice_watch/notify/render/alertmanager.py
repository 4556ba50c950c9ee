"""Alertmanager: the ``postableAlert`` of an alert event, its labels and its
``alertname`` (Alertmanager API v2, prometheus/alertmanager ``api/v2/openapi.yaml``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from invoice_watch.notify.render import facts
from invoice_watch.types import AlertEvent, EventKind

_AM_VALUE_MAX = 2000  # an Alertmanager annotation: no limit is documented; ours


def alertname(rule_type: str) -> str:
    """The ``alertname`` label of a rule type: ``invoice_status`` -> ``AtlasInvoiceStatus``."""
    return "Atlas" + "".join(word.capitalize() for word in rule_type.split("_"))


def alertmanager_labels(event: AlertEvent) -> dict[str, str]:
    """The labels that identify an event's alert in Alertmanager (the same for its
    FIRING, REMINDERs and RESOLVED): ``alertname``, ``rule``, ``org_id``, ``org``,
    ``invoice_id`` (when it is about one), ``severity``; a NOTICE adds ``transition``
    (``PENDING->CLOSED``). Empty values are left out, as Alertmanager ignores them."""
    labels = {
        "alertname": alertname(facts.machine(event.rule_type)),
        "rule": facts.machine(event.rule),
        "org_id": facts.machine(event.org_id),
        "org": facts.machine(event.org_name or event.org_id),
        "invoice_id": facts.machine(event.invoice_id or ""),
        "severity": event.severity.value,
    }
    if event.kind is EventKind.NOTICE and event.previous_status:
        labels["transition"] = facts.machine(
            f"{event.previous_status}->{event.invoice_status or '?'}"
        )
    return {name: value for name, value in labels.items() if value}


def alertmanager_alert(event: AlertEvent, *, ends_at: datetime) -> dict[str, Any]:
    """The ``postableAlert`` for ``event``: its labels, the text as annotations
    (``summary``, ``description``, and one per fact), ``startsAt`` when it began to fire,
    ``endsAt`` (``ends_at``: the caller's; a RESOLVED's is its own time), and the billing
    page as ``generatorURL``."""
    starts = event.firing_since or event.at
    ends = event.at if event.kind is EventKind.RESOLVED else ends_at
    annotations = {
        "summary": facts.clip(f"{facts.name(event.rule)} · {facts.org(event)}", _AM_VALUE_MAX),
        "description": facts.summary(event),
        "alert_key": facts.machine(event.key, 1000),
    }
    for label, value in (*facts.table(event), *facts.details(event)):
        annotations[_annotation_name(label)] = facts.clip(value, _AM_VALUE_MAX)
    alert: dict[str, Any] = {
        "labels": alertmanager_labels(event),
        "annotations": {name: value for name, value in annotations.items() if value},
        "startsAt": facts.iso(starts),
        "endsAt": facts.iso(max(ends, starts)),
    }
    if link := facts.link(event):
        alert["generatorURL"] = link
    return alert


def _annotation_name(label: str) -> str:
    """A fact's label as an annotation name: ``Fired for`` -> ``fired_for``."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in label.lower()).strip("_")
    return name if name and not name[0].isdigit() else f"fact_{name}"
