"""The generic webhook notifier: one JSON POST per message to any HTTP receiver.

The body is documented and versioned: :func:`invoice_watch.notify.render.webhook.webhook_body`,
described by the JSON Schema shipped beside this module (``webhook-v1.schema.json``,
:func:`schema`; README "Receivers"). The request follows Standard Webhooks 1.0
(standardwebhooks.com, "Signature scheme"), so a receiver can check it with that
project's libraries:

- ``webhook-id``: the message's stable id (the body's ``id``), the same when it is sent
  again (a retry, a restart): the receiver's idempotency key;
- ``webhook-timestamp``: the attempt's time, integer Unix seconds (the receiver refuses
  one too far from its clock: a replayed request);
- ``webhook-signature`` (with ``secret``): ``v1,`` + base64 of HMAC-SHA256 over
  ``id.timestamp.body`` with the key ``secret`` holds (``whsec_`` + base64).

``headers`` are added to every request (an API key the receiver wants). A 2xx is
delivered; 408, 429 and 5xx are retried by the outbox (``Retry-After`` honoured); any
other status is permanent (410 Gone: the receiver wants no more); a redirect is never
followed (:mod:`.http`). Neither the URL (it may hold a token), the secret nor a header's
value is ever shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from invoice_watch.config.values import signing_key
from invoice_watch.notify.base import Recipients
from invoice_watch.notify.http import HttpNotifier, url_secrets
from invoice_watch.notify.render.webhook import webhook_body
from invoice_watch.types import AlertEvent, Part

logger = logging.getLogger(__name__)

SCHEMA_FILE = "webhook-v1.schema.json"

_HINTS = {
    401: "the receiver refused the request's credentials: check the notifier's headers (and "
    "secret)",
    403: "the receiver refused the request: check the notifier's headers and secret",
    410: "the receiver says it wants no more messages (410 Gone): check url",
}


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema of the body (``webhook-v1.schema.json``, shipped in the package)."""
    text = resources.files("invoice_watch.notify").joinpath(SCHEMA_FILE).read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key,
    ``message_id.timestamp.body``))."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookNotifier(HttpNotifier):
    """POSTs each message to ``url`` (module docstring)."""

    kind, label = "webhook", "the receiver"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        secret: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 15,
        proxy: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = signing_key(secret) if secret is not None else None
        self._headers = dict(headers or {})
        self._clock = clock
        secrets = [*url_secrets(url), *self._headers.values()]
        if secret is not None:
            secrets.append(secret)
        super().__init__(name, url, timeout=timeout, proxy=proxy, secrets=secrets)

    def __repr__(self) -> str:
        signed = ", secret=<secret>" if self._key is not None else ""
        headers = f", headers={sorted(self._headers)}" if self._headers else ""
        return f"WebhookNotifier(name={self.name!r}, url=<secret>{signed}{headers})"

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        data = webhook_body(events, part, notifier=self.name)
        # UTF-8 (JSON's own encoding), not ASCII escapes: a non-Latin name is 2 to 4
        # bytes a character, not 6 or 12; the signature covers these very bytes.
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        timestamp = int(self._clock())
        headers = {
            **self._headers,
            "webhook-id": data["id"],
            "webhook-timestamp": str(timestamp),
        }
        if self._key is not None:
            headers["webhook-signature"] = signature(self._key, data["id"], timestamp, body)
        await self._receiver.deliver(body, headers, json_api=False, hints=_HINTS)
        logger.debug("webhook notifier %r: sent %s", self.name, data["id"])
