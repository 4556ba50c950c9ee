"""The Microsoft Teams notifier: a channel's Workflows webhook ("When a Teams webhook
request is received", Power Automate), one Adaptive Card per message.

The old Office 365 connectors (MessageCard, what pymsteams sends) are retired, and a
Workflows webhook takes Adaptive Cards only (LIBRARIES.md): the card is
:func:`invoice_watch.notify.render.teams.teams_message`, with the same facts as the Slack
message, within the size Teams takes (about 28 KB). It is one POST through
:class:`~invoice_watch.notify.http.Receiver`: any 2xx is sent (the trigger answers 202
and runs the flow afterwards); 408, 429 (Teams throttles beyond about 4 requests a
second) and 5xx are retried by the outbox; any other status is permanent; a page in
place of the trigger's answer is a proxy's, retried.

The webhook URL holds its signature (``sig=``): it is the secret, never shown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from invoice_watch.notify.base import Recipients
from invoice_watch.notify.http import HttpNotifier
from invoice_watch.notify.render.teams import teams_json, teams_message
from invoice_watch.report.outbox import ReportMessage, teams_summary
from invoice_watch.types import AlertEvent, Part

logger = logging.getLogger(__name__)

_HINTS = {
    400: "the workflow refused the card (a bug: please report it) or the URL is not a "
    "Workflows webhook's: check webhook_url",
    401: "the workflow refused the URL's signature: copy webhook_url again from the workflow",
    403: "the workflow refused the URL's signature: copy webhook_url again from the workflow",
}


class TeamsNotifier(HttpNotifier):
    """Posts each message to a Teams Workflows webhook as an Adaptive Card."""

    kind, label, setting = "msteams", "Teams", "webhook_url"

    def __init__(
        self, name: str, webhook_url: str, *, timeout: float = 10, proxy: str | None = None
    ) -> None:
        super().__init__(name, webhook_url, timeout=timeout, proxy=proxy)  # URL: the secret

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        body = teams_json(teams_message(events, part))
        await self._receiver.deliver(body, json_api=True, hints=_HINTS)
        logger.debug("msteams notifier %r: sent %d event(s)", self.name, len(events))

    async def send_report(
        self, msg: ReportMessage, *, recipients: Sequence[str] | None = None
    ) -> None:
        """Post a report's text summary as a card (a Workflows webhook takes no file)."""
        await self._receiver.deliver(teams_json(teams_summary(msg)), json_api=True, hints=_HINTS)
