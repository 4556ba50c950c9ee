"""Fake receivers on 127.0.0.1 (port 0): a generic webhook receiver, PagerDuty's Events
API v2, a Teams Workflows trigger and Alertmanager's API v2, each a real aiohttp server
recording every request and checking it as the real one would:

- :class:`FakeWebhook` validates every body against the JSON Schema the package ships
  (``invoice_watch/notify/webhook-v1.schema.json``) and, given the secret, verifies the
  Standard Webhooks signature with that project's reference library (``standardwebhooks``);
- :class:`FakePagerDuty` validates every event against :data:`PAGERDUTY_EVENT`, our
  transcription of PagerDuty's documented request body (PagerDuty/api-schema
  ``reference/events-v2/openapiv3.json``: ``routing_key``, ``event_action``, a trigger's
  ``payload`` with ``summary``, ``severity`` and ``source``), plus the documented rules
  the schema cannot say (a resolve's ``dedup_key``, a 32-character routing key, a summary
  of at most 1,024 characters), and answers 202 ``{"status":"success",...}``;
- :class:`FakeTeams` takes only the Workflows envelope with an Adaptive Card (not the
  retired MessageCard), refuses a message over 28 KB (Teams' limit), and answers 202
  with an empty body;
- :class:`FakeAlertmanager` validates each ``postableAlert`` as Alertmanager does (labels
  present and well named, ``startsAt`` not after ``endsAt``) and keeps the alerts by
  their label set, so a test can ask what is firing at a time.

A refused request is answered 400 with the reason (what the real service answers), and
recorded in ``refused``; every test that sends through these fakes so proves its
requests well formed. Scripted answers (:class:`Answer`, first in, first out) replace the
service's own, for the tests of retries and permanent errors.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from invoice_watch.notify import webhook
from tests.loopback import LoopbackServer

ROUTING_KEY = "R0123456789abcdefghijklmnopqrstu"  # 32 letters and digits
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # Standard Webhooks' example form
WEBHOOK_HEADER = "X-Api-Key"
WEBHOOK_HEADER_VALUE = "hook-api-key-never-logged"
AM_TOKEN = "am-bearer-token-never-logged"
TEAMS_PATH = "/workflows/abc123/triggers/manual/paths/invoke"
TEAMS_QUERY = "api-version=2016-06-01&sig=teams-sig-never-logged"
TEAMS_MAX = 28 * 1024


@dataclass(frozen=True)
class Answer:
    """One scripted answer: status, body, extra headers."""

    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    raw: bytes
    body: Any  # the JSON, None when it is not JSON


class _Fake(LoopbackServer):
    path = "/"

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.accepted: list[Any] = []  # bodies the service took
        self.refused: list[str] = []  # why the service refused a request
        self._script: deque[Answer] = deque()
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        super().__init__(app)

    @property
    def endpoint(self) -> str:
        return self.url + self.path

    def script(self, *answers: Answer) -> None:
        self._script.extend(answers)

    def problem(self, received: Received) -> str | None:
        """Why the real service would refuse this request (None when it takes it)."""
        raise NotImplementedError

    def success(self, received: Received) -> web.Response:
        return web.Response(status=200)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        received = Received(dict(request.headers), raw, body)
        self.received.append(received)
        if self._script:
            answer = self._script.popleft()
            data = answer.body.encode() if isinstance(answer.body, str) else answer.body
            headers = {"Content-Type": answer.content_type, **answer.headers}
            return web.Response(status=answer.status, body=data, headers=headers)
        problem = "not JSON" if body is None else self.problem(received)
        if problem is not None:
            self.refused.append(problem)
            return web.json_response({"status": "invalid", "message": problem}, status=400)
        self.accepted.append(body)
        return self.success(received)


class FakeWebhook(_Fake):
    path = "/hooks/invoice-watch"

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret
        super().__init__()

    def problem(self, received: Received) -> str | None:
        try:
            jsonschema.validate(received.body, webhook.schema())
        except jsonschema.ValidationError as exc:
            return f"schema: {exc.message}"
        headers = received.headers
        if headers.get("webhook-id") != received.body["id"]:
            return "webhook-id is not the body's id"
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(received.raw, headers)
            except WebhookVerificationError as exc:
                return f"signature: {exc}"
        return None


# Our transcription of PagerDuty's Events API v2 request body (see the module docstring).
PAGERDUTY_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["routing_key", "event_action"],
    "properties": {
        "routing_key": {"type": "string"},
        "event_action": {"enum": ["trigger", "acknowledge", "resolve"]},
        "dedup_key": {"type": "string", "maxLength": 255},
        "client": {"type": "string"},
        "client_url": {"type": "string"},
        "payload": {
            "type": "object",
            "required": ["summary", "severity", "source"],
            "properties": {
                "summary": {"type": "string", "maxLength": 1024},
                "timestamp": {"type": "string", "format": "date-time"},
                "severity": {"enum": ["critical", "warning", "error", "info"]},
                "source": {"type": "string"},
                "component": {"type": "string"},
                "group": {"type": "string"},
                "class": {"type": "string"},
                "custom_details": {"type": "object"},
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["href"],
                "properties": {"href": {"type": "string"}, "text": {"type": "string"}},
            },
        },
    },
}


class FakePagerDuty(_Fake):
    path = "/v2/enqueue"

    def __init__(self, routing_key: str = ROUTING_KEY) -> None:
        self.routing_key = routing_key
        super().__init__()

    def problem(self, received: Received) -> str | None:
        body = received.body
        try:
            jsonschema.validate(body, PAGERDUTY_EVENT)
        except jsonschema.ValidationError as exc:
            return f"Event object is invalid: {exc.message}"
        if body["routing_key"] != self.routing_key:
            return "Invalid routing key"
        if body["event_action"] == "trigger" and "payload" not in body:
            return "'payload' is missing"
        if body["event_action"] != "trigger" and not body.get("dedup_key"):
            return "'dedup_key' is missing"
        return None

    def success(self, received: Received) -> web.Response:
        answer = {"status": "success", "message": "Event processed"}
        return web.json_response(
            {**answer, "dedup_key": received.body.get("dedup_key")}, status=202
        )


_AC_ELEMENTS = {"RichTextBlock", "TextBlock", "ColumnSet", "Column", "FactSet", "ActionSet"}


def _card_problem(value: Any) -> str | None:
    """What in a card (or a part of it) Teams would not render as we mean it: an element
    type we do not use, a TextRun without text."""
    if isinstance(value, list):
        return next((p for item in value if (p := _card_problem(item))), None)
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind == "TextRun" and not (isinstance(value.get("text"), str) and value["text"]):
        return "a TextRun without text"
    if kind == "Action.OpenUrl" and not str(value.get("url", "")).startswith("https://"):
        return "an Action.OpenUrl without an https URL"
    if isinstance(kind, str) and not (
        kind in _AC_ELEMENTS or kind in ("TextRun", "Action.OpenUrl", "AdaptiveCard", "message")
    ):
        return f"unknown element {kind}"
    return next((p for item in value.values() if (p := _card_problem(item))), None)


class FakeTeams(_Fake):
    path = TEAMS_PATH

    @property
    def webhook_url(self) -> str:
        return f"{self.endpoint}?{TEAMS_QUERY}"

    def problem(self, received: Received) -> str | None:
        if len(received.raw) > TEAMS_MAX:
            return f"message of {len(received.raw)} bytes, over 28 KB"
        body = received.body
        if body.get("type") != "message" or not isinstance(body.get("attachments"), list):
            return "not a message with attachments (a MessageCard?)"
        [attachment] = body["attachments"]
        if attachment.get("contentType") != "application/vnd.microsoft.card.adaptive":
            return "not an Adaptive Card"
        card = attachment.get("content") or {}
        if card.get("type") != "AdaptiveCard" or card.get("version") != "1.2":
            return "not an Adaptive Card 1.2"
        if not card.get("body"):
            return "a card without a body"
        return _card_problem(card)

    def success(self, received: Received) -> web.Response:
        return web.Response(status=202)


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass
class Stored:
    """An alert as Alertmanager keeps it."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: datetime
    ends_at: datetime
    generator_url: str | None
    posts: int = 1

    def firing(self, at: datetime) -> bool:
        return self.ends_at > at


class FakeAlertmanager(_Fake):
    path = "/api/v2/alerts"

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.alerts: dict[frozenset[tuple[str, str]], Stored] = {}
        super().__init__()

    def problem(self, received: Received) -> str | None:
        auth = received.headers.get("Authorization")
        if self.token is not None and auth != f"Bearer {self.token}":
            return "unauthorized"
        body = received.body
        if not isinstance(body, list):
            return "the body is not a list of alerts"
        for alert in body:
            labels = alert.get("labels")
            if not isinstance(labels, dict) or not labels:
                return "at least one label pair required"
            for name, value in labels.items():
                if not _LABEL_NAME.fullmatch(name) or not isinstance(value, str) or not value:
                    return f"invalid label {name!r}"
            if not isinstance(alert.get("annotations", {}), dict):
                return "annotations are not a label set"
            try:
                starts = datetime.fromisoformat(alert["startsAt"])
                ends = datetime.fromisoformat(alert["endsAt"])
            except (KeyError, ValueError):
                return "startsAt and endsAt must be RFC 3339 times"
            if ends < starts:
                return "start time must be before end time"
        return None

    def success(self, received: Received) -> web.Response:
        for alert in received.body:
            key = frozenset(alert["labels"].items())
            stored = Stored(
                dict(alert["labels"]),
                dict(alert.get("annotations", {})),
                datetime.fromisoformat(alert["startsAt"]),
                datetime.fromisoformat(alert["endsAt"]),
                alert.get("generatorURL"),
            )
            if key in self.alerts:
                stored.posts = self.alerts[key].posts + 1
                stored.starts_at = min(stored.starts_at, self.alerts[key].starts_at)
            self.alerts[key] = stored
        return web.Response(status=200)

    def firing(self, at: datetime) -> list[Stored]:
        return [alert for alert in self.alerts.values() if alert.firing(at)]
