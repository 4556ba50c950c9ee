"""The Alertmanager notifier: alerts forwarded to an Alertmanager that people already
run, so that invoice alerts go through its routing, silences, inhibitions and receivers.

Each event is a ``postableAlert`` posted to ``<url>/api/v2/alerts`` (Alertmanager's API
v2, ``api/v2/openapi.yaml``;
:func:`invoice_watch.notify.render.alertmanager.alertmanager_alert`): the labels
``alertname`` (``AtlasInvoiceStatus``...: the rule's type), ``rule``, ``org_id``,
``org``, ``invoice_id`` and ``severity`` identify the alert, the text is in the
annotations, ``startsAt`` is when it began to fire and ``generatorURL`` the
billing page.

Alertmanager ends an alert at its ``endsAt``, and one posted without it after its
``resolve_timeout``: a firing alert must be posted again before then, as Prometheus
does. So a FIRING (or REMINDER) says ``endsAt`` = now + 4 x ``resend_every``, and while
the alert fires the deliverer posts it again every ``resend_every``
(:meth:`AlertmanagerNotifier.repost`, driven by :mod:`invoice_watch.deliver.mirrors` from the
alert state, so a restart picks it up). A RESOLVED says ``endsAt`` = when it resolved:
Alertmanager resolves it at once. Should invoice-watch stop, its alerts end in
Alertmanager 4 x ``resend_every`` later, as a stopped Prometheus's do. A NOTICE (a
one-shot status change) fires for that long too, with a ``transition`` label, or is
skipped (``notices: skip``).

Answers: 200 accepted; 400 (an alert Alertmanager refuses) permanent; 408, 429 and 5xx
retried by the outbox; a page in place of Alertmanager's answer is a proxy's (retried).
Credentials, for an Alertmanager behind authentication (its ``web.config`` basic auth,
or a proxy): ``username`` and ``password`` (HTTP Basic) or ``token`` (Bearer); never shown.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import hdrs

from invoice_watch.notify.base import Recipients
from invoice_watch.notify.http import HttpNotifier
from invoice_watch.notify.render.alertmanager import alertmanager_alert
from invoice_watch.types import AlertEvent, EventKind, Part

logger = logging.getLogger(__name__)

API_PATH = "/api/v2/alerts"
VALIDITY = 4  # a firing alert's endsAt is this many resend_every ahead
REPOST_BATCH = 200  # alerts per POST of a re-post

_HINTS = {
    400: "Alertmanager refused the alerts, its answer says why (a bug: please report it)",
    401: "Alertmanager refused the credentials: check token, or username and password",
    403: "Alertmanager refused the credentials: check token, or username and password",
    404: "no Alertmanager API v2 there: check url (Alertmanager's own address, such as "
    "http://alertmanager:9093, without /api/v2)",
}


def _now() -> datetime:
    """The wall clock, as Alertmanager reads ``endsAt`` (tests replace it)."""
    return datetime.now(UTC)


class AlertmanagerNotifier(HttpNotifier):
    """Posts alerts to an Alertmanager (module docstring)."""

    kind, label = "alertmanager", "Alertmanager"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        resend_every: float = 60,
        notices: str = "send",
        timeout: float = 10,
        proxy: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.resend_every = resend_every
        self.notices = notices
        self._clock = clock
        self._headers: dict[str, str] = {}
        if token is not None:
            self._headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        elif username is not None:
            basic = aiohttp.encode_basic_auth(username, password or "")
            self._headers[hdrs.AUTHORIZATION] = basic
        secrets = [s for s in (token, password) if s]
        self._login = "token" if token else f"user {username}" if username else None
        url = url.rstrip("/") + API_PATH
        super().__init__(name, url, timeout=timeout, proxy=proxy, secrets=secrets)

    def __repr__(self) -> str:
        login = f", {self._login}, <secret>" if self._login else ""
        return f"AlertmanagerNotifier(name={self.name!r}, url={self._receiver.url!r}{login})"

    def _alerts(self, events: Sequence[AlertEvent]) -> list[dict[str, Any]]:
        """The alerts of ``events``: a firing one valid for 4 x ``resend_every`` from
        now (from its event, should the wall clock have been set back since)."""
        now = self._clock() if self._clock is not None else _now()
        validity = timedelta(seconds=VALIDITY * self.resend_every)
        return [
            alertmanager_alert(event, ends_at=max(now, event.at) + validity)
            for event in events
            if not (event.kind is EventKind.NOTICE and self.notices == "skip")
        ]

    async def _post(self, alerts: list[dict[str, Any]]) -> None:
        data = json.dumps(alerts, separators=(",", ":"))
        await self._receiver.deliver(data, self._headers, json_api=True, hints=_HINTS)

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        alerts = self._alerts(events)
        if alerts:
            await self._post(alerts)
            logger.debug("alertmanager notifier %r: posted %d alert(s)", self.name, len(alerts))

    async def repost(self, events: Sequence[AlertEvent]) -> None:
        """Post the alerts of ``events`` (the firing ones) again, each valid for
        4 x ``resend_every`` more, in batches of :data:`REPOST_BATCH`. Raises as
        :meth:`send` does."""
        for start in range(0, len(events), REPOST_BATCH):
            alerts = self._alerts(events[start : start + REPOST_BATCH])
            if alerts:
                await self._post(alerts)
        logger.debug("alertmanager notifier %r: posted %d alert(s) again", self.name, len(events))
