"""PagerDuty: the Events API v2 event of an alert event and its ``dedup_key``
(developer.pagerduty.com "Send an Alert Event"; PagerDuty/api-schema
reference/events-v2/openapiv3.json)."""

from __future__ import annotations

import hashlib
from typing import Any

from invoice_watch.format import usd
from invoice_watch.notify.render import facts
from invoice_watch.types import AlertEvent, EventKind, Severity

_PD_SUMMARY_MAX = 1024  # PagerDuty: payload.summary
_PD_FIELD_MAX = 255  # PagerDuty: dedup_key, source, component, group, class
_PD_SEVERITY = {Severity.CRITICAL: "critical", Severity.WARNING: "warning", Severity.INFO: "info"}


def pagerduty_dedup_key(event: AlertEvent) -> str:
    """The ``dedup_key`` of an event: its alert key, so that a FIRING, its REMINDERs
    and its RESOLVED are one PagerDuty alert (a key longer than PagerDuty's 255
    characters as its SHA-256); a NOTICE's key has its time added, so that each notice
    is an alert of its own."""
    key = event.key
    if event.kind is EventKind.NOTICE:
        key = f"{key}@{facts.iso(event.at)}"
    if len(key) > _PD_FIELD_MAX:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def pagerduty_event(event: AlertEvent) -> dict[str, Any]:
    """The Events API v2 event for ``event``, without its ``routing_key``: a RESOLVED
    resolves its alert; any other kind triggers (or updates) it, with the facts as
    ``custom_details`` and the billing page as a link."""
    dedup_key = pagerduty_dedup_key(event)
    if event.kind is EventKind.RESOLVED:
        return {"event_action": "resolve", "dedup_key": dedup_key}
    org = facts.org(event)
    summary = f"{facts.title(event)} · {facts.org_name(event)}: {facts.summary(event)}"
    details: dict[str, Any] = {"kind": event.kind.value, "summary": facts.summary(event)}
    details.update(facts.table(event))
    details.update(facts.details(event))
    for title, items in facts.breakdown(event):
        details[title] = [
            " ".join(
                p for p in (facts.name(line.name), usd(line.amount_cents), facts.growth(line)) if p
            )
            for line in items
        ]
    details["Alert key"] = facts.machine(event.key, 1000)
    result: dict[str, Any] = {
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": facts.clip(summary, _PD_SUMMARY_MAX),
            "severity": _PD_SEVERITY[event.severity],
            "source": facts.clip(f"MongoDB Atlas organization {org}", _PD_FIELD_MAX),
            "timestamp": facts.iso(event.at),
            "component": facts.clip(f"invoice {facts.invoice_id(event)}", _PD_FIELD_MAX)
            if event.invoice_id
            else "billing",
            "group": facts.clip(facts.org_name(event), _PD_FIELD_MAX),
            "class": facts.clip(facts.name(event.rule_type), _PD_FIELD_MAX),
            "custom_details": details,
        },
        "client": "invoice-watch",
    }
    if link := facts.link(event):
        result["client_url"] = link
        result["links"] = [{"href": link, "text": facts.BUTTON_LABEL}]
    return result
