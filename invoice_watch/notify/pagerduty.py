"""The PagerDuty notifier: PagerDuty's Events API v2, one event per alert event.

A FIRING and its REMINDERs are ``trigger`` events and its RESOLVED a ``resolve``, all
with the alert key as ``dedup_key``
(:func:`invoice_watch.notify.render.pagerduty.pagerduty_event`), so that the incident
an alert opens closes by itself when it resolves. A NOTICE triggers an alert of its own
(its key and time), which people resolve, or is skipped (``notices: skip``). Severities
map one to one (``critical``, ``warning``, ``info``); the facts are the event's
``custom_details`` and the billing page its link.

PagerDuty's own client is synchronous and refuses a plain-http URL (LIBRARIES.md), so
an event is one POST through :class:`~invoice_watch.notify.http.Receiver` to ``url``
(``https://events.pagerduty.com/v2/enqueue``). Its answers (PagerDuty/api-schema,
``reference/events-v2/openapiv3.json``, "API Response Codes & Retry Logic"): 202
accepted; 400 a bad event, not retried; 429 and 5xx retried with backoff (by the outbox).
A page in place of PagerDuty's JSON is a proxy's: retried.

A grouped message (``delivery.group_over``) is its events posted one by one, in order.
Should one fail, the message is retried whole: the events PagerDuty already took are
posted again, which PagerDuty deduplicates by ``dedup_key`` (a trigger updates the
open alert, a resolve of a resolved alert changes nothing).

The routing key is never shown: not in a message, a log line or a repr.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from invoice_watch import constants
from invoice_watch.notify.base import Recipients
from invoice_watch.notify.http import HttpNotifier
from invoice_watch.notify.render.pagerduty import pagerduty_event
from invoice_watch.types import AlertEvent, EventKind, Part

logger = logging.getLogger(__name__)

_HINTS = {
    400: "PagerDuty refused the event, its answer says why: check routing_key (an Events "
    "API v2 integration's Integration Key)",
    401: "PagerDuty refused the routing key: check routing_key",
    403: "PagerDuty refused the routing key: check routing_key",
    404: f"no Events API at that address: check url (default {constants.PAGERDUTY_EVENTS_URL})",
}


class PagerDutyNotifier(HttpNotifier):
    """Sends each event to PagerDuty's Events API v2 (module docstring)."""

    kind, label = "pagerduty", "PagerDuty"

    def __init__(
        self,
        name: str,
        routing_key: str,
        *,
        url: str = constants.PAGERDUTY_EVENTS_URL,
        notices: str = "send",
        timeout: float = 10,
        proxy: str | None = None,
    ) -> None:
        self.notices = notices
        self._routing_key = routing_key
        super().__init__(name, url, timeout=timeout, proxy=proxy, secrets=[routing_key])

    def __repr__(self) -> str:
        return (
            f"PagerDutyNotifier(name={self.name!r}, url={self._receiver.url!r}, "
            "routing_key=<secret>)"
        )

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        for event in events:
            if event.kind is EventKind.NOTICE and self.notices == "skip":
                continue
            body = {"routing_key": self._routing_key, **pagerduty_event(event)}
            data = json.dumps(body, separators=(",", ":"))
            await self._receiver.deliver(data, json_api=True, hints=_HINTS)
            logger.debug(
                "pagerduty notifier %r: %s %s", self.name, body["event_action"], body["dedup_key"]
            )
