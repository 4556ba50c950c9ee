"""The receivers of issue 18 (webhook, PagerDuty, Teams, Alertmanager), each against a
real fake of its service on 127.0.0.1 (tests/fakes_receivers.py): the wire format, the
retry-or-give-up table (429 and 5xx retried with Retry-After, 4xx permanent), redirects
never followed, an unreachable receiver named, and the webhook body checked against the
JSON Schema the package ships."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed
import pytest
from hypothesis import HealthCheck, given, settings
from standardwebhooks import Webhook

from invoice_watch.errors import PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify import (
    AlertmanagerNotifier,
    PagerDutyNotifier,
    TeamsNotifier,
    WebhookNotifier,
    webhook,
)
from invoice_watch.notify.http import HttpNotifier
from invoice_watch.notify.render import facts
from invoice_watch.notify.render.alertmanager import alertmanager_alert
from invoice_watch.notify.render.pagerduty import pagerduty_event
from invoice_watch.notify.render.teams import TEAMS_MAX_BYTES, teams_json, teams_message
from invoice_watch.notify.render.webhook import WEBHOOK_VERSION, message_id, webhook_body
from invoice_watch.types import AlertEvent, EventKind, Notifier, Part, Severity
from tests.fakes_receivers import (
    AM_TOKEN,
    PAGERDUTY_EVENT,
    ROUTING_KEY,
    WEBHOOK_HEADER,
    WEBHOOK_HEADER_VALUE,
    WEBHOOK_SECRET,
    Answer,
    FakeAlertmanager,
    FakePagerDuty,
    FakeTeams,
    FakeWebhook,
    Received,
    _Fake,
)
from tests.test_notify_render import (
    AT,
    any_event,
    any_message,
    grouped_events,
    notice_event,
    pending_event,
    poll_failure_event,
    resolved_failed_event,
)

# -- one table for the four receivers ------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A receiver: how to start its fake, and a notifier that sends to it."""

    name: str
    fake: Callable[[], _Fake]
    notifier: Callable[[Any], Notifier]
    json_api: bool  # a service that never answers a page: a 2xx page is a proxy's


def _webhook(fake: FakeWebhook) -> WebhookNotifier:
    return WebhookNotifier(
        "hook",
        fake.endpoint,
        secret=WEBHOOK_SECRET,
        headers={WEBHOOK_HEADER: WEBHOOK_HEADER_VALUE},
    )


def _pagerduty(fake: FakePagerDuty) -> PagerDutyNotifier:
    return PagerDutyNotifier("pd", ROUTING_KEY, url=fake.endpoint)


def _teams(fake: FakeTeams) -> TeamsNotifier:
    return TeamsNotifier("teams", fake.webhook_url)


def _alertmanager(fake: FakeAlertmanager) -> AlertmanagerNotifier:
    return AlertmanagerNotifier("am", fake.url, token=AM_TOKEN, clock=lambda: AT)


KINDS = [
    Kind("webhook", lambda: FakeWebhook(WEBHOOK_SECRET), _webhook, json_api=False),
    Kind("pagerduty", FakePagerDuty, _pagerduty, json_api=True),
    Kind("msteams", FakeTeams, _teams, json_api=True),
    Kind("alertmanager", lambda: FakeAlertmanager(AM_TOKEN), _alertmanager, json_api=True),
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[tuple[_Fake, Notifier]]:
    kind: Kind = request.param
    async with kind.fake() as fake:
        yield fake, kind.notifier(fake)


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


async def test_receiver_takes_every_kind_of_message(receiver: tuple[_Fake, Notifier]) -> None:
    """One event of each kind, and a grouped message: the service takes every request
    (each fake refuses what its service refuses)."""
    fake, notifier = receiver
    for events in (
        [pending_event()],
        [resolved_failed_event()],
        [notice_event()],
        [poll_failure_event()],
        grouped_events(),
    ):
        await notifier.send(events)
    assert fake.refused == []
    assert fake.accepted


async def test_receiver_a_message_of_no_events_posts_nothing(
    receiver: tuple[_Fake, Notifier],
) -> None:
    """``send`` of no events is nothing to send (the one ``BaseNotifier.send``): no
    request reaches the service, and nothing is raised."""
    fake, notifier = receiver
    await notifier.send([])
    assert fake.accepted == [] and fake.refused == []


@pytest.mark.parametrize("status", [429, 503])
async def test_receiver_429_and_5xx_are_retried_with_retry_after(
    receiver: tuple[_Fake, Notifier], status: int
) -> None:
    fake, notifier = receiver
    fake.script(Answer(status, '{"status":"throttled"}', headers={"Retry-After": "7"}))
    with pytest.raises(RetryableNotifyError, match=f"HTTP {status}") as raised:
        await notifier.send([pending_event()])
    assert raised.value.retry_after == 7
    await notifier.send([pending_event()])  # the service works again: delivered
    assert len(fake.accepted) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_receiver_other_4xx_are_permanent_and_say_what_to_check(
    receiver: tuple[_Fake, Notifier], status: int
) -> None:
    fake, notifier = receiver
    fake.script(Answer(status, '{"message":"no such thing"}'))
    with pytest.raises(PermanentNotifyError, match=f"HTTP {status}") as raised:
        await notifier.send([pending_event()])
    message = str(raised.value)
    assert '\'{"message":"no such thing"}\'' in message  # the answer, quoted
    assert any(word in message for word in ("check", "report", "copy"))


async def test_receiver_never_follows_a_redirect(receiver: tuple[_Fake, Notifier]) -> None:
    """To another host: something is in the way (retried); the message never goes there."""
    fake, notifier = receiver
    fake.script(Answer(302, headers={"Location": "http://portal.example/login"}))
    with pytest.raises(RetryableNotifyError, match=r"redirect to http://portal\.example"):
        await notifier.send([pending_event()])
    assert len(fake.received) == 1


async def test_receiver_a_2xx_page_is_a_proxys_for_json_services(
    receiver: tuple[_Fake, Notifier], request: pytest.FixtureRequest
) -> None:
    """PagerDuty, Teams and Alertmanager never answer HTML: a 200 page is a captive
    portal's, and the message is retried. Any receiver may sit behind a webhook: a 2xx
    is delivered whatever its body."""
    fake, notifier = receiver
    page = "<html><title>Login to the guest Wi-Fi</title></html>"
    fake.script(Answer(200, page, content_type="text/html"))
    kind = next(k for k in KINDS if k.name in request.node.callspec.id)
    if kind.json_api:
        with pytest.raises(RetryableNotifyError, match="'Login to the guest Wi-Fi'"):
            await notifier.send([pending_event()])
    else:
        await notifier.send([pending_event()])


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_receiver_unreachable_names_host_port_and_setting(
    kind: Kind, closed_port: int
) -> None:
    class Closed:
        url = f"http://127.0.0.1:{closed_port}"
        endpoint = url + "/hook"
        webhook_url = endpoint + "?sig=x"

    notifier = kind.notifier(Closed())
    with pytest.raises(RetryableNotifyError) as raised:
        await notifier.send([pending_event()])
    message = str(raised.value)
    assert isinstance(notifier, HttpNotifier)
    assert f"'{notifier.name}': {notifier.label} is unreachable: " in message  # a sentence
    assert f"127.0.0.1:{closed_port}: connection refused" in message
    assert f"notifiers.{notifier.name}." in message


# -- webhook -------------------------------------------------------------------------


async def test_webhook_posts_the_versioned_body_with_standard_webhooks_headers() -> None:
    async with FakeWebhook(WEBHOOK_SECRET) as fake:
        await _webhook(fake).send([pending_event()])
    [request] = fake.received
    assert fake.refused == []  # schema-valid, signature verified by standardwebhooks
    body = request.body
    assert body["version"] == 1 and body["type"] == "invoice_watch.notification"
    assert request.headers["webhook-id"] == body["id"] == message_id([pending_event()])
    assert request.headers[WEBHOOK_HEADER] == WEBHOOK_HEADER_VALUE
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    [event] = body["events"]
    assert event == {
        "id": pending_event().event_id,
        "kind": "FIRING",
        "alert_key": pending_event().key,
        "rule": "pending-over-budget",
        "rule_type": "pending_amount",
        "severity": "warning",
        "summary": "The pending invoice is $6,000.00, over the $5,000.00 threshold.",
        "at": "2026-11-15T12:00:00Z",
        "firing_since": None,
        "org": {"id": pending_event().org_id, "name": "Production"},
        "invoice": {"id": "66a0f1c2e4b0a1b2c3d4e5f6", "status": "PENDING", "previous_status": None},
        "amount": {"cents": 600_000, "text": "$6,000.00", "currency": "USD"},
        "period": {"start": "2026-11-01", "end": "2026-12-01", "text": "2026-11-01 – 2026-11-30"},
        "link": pending_event().billing_url,
        "details": [{"label": "Threshold", "value": "$5,000.00"}],
        "breakdown": event["breakdown"],
    }
    assert [line["name"] for line in event["breakdown"]] == [
        "analytics",
        "web",
        "ATLAS_AWS_INSTANCE_M30",
        "ATLAS_AWS_DATA_TRANSFER",
    ]


async def test_webhook_a_wrong_secret_fails_the_receivers_check() -> None:
    """The fake verifies with the reference library: a signature made with another key
    is refused (so the passing tests prove the signature, not its presence)."""
    other = "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()
    async with FakeWebhook(WEBHOOK_SECRET) as fake:
        with pytest.raises(PermanentNotifyError, match="HTTP 400"):
            await WebhookNotifier("hook", fake.endpoint, secret=other).send([pending_event()])
    assert fake.refused == ["signature: No matching signature found"]


def test_webhook_signature_is_the_reference_librarys() -> None:
    body = b'{"version":1}'
    when = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
    ours = webhook.signature(key, "msg_abc", int(when.timestamp()), body)
    assert ours == Webhook(WEBHOOK_SECRET).sign("msg_abc", when, body.decode())


async def test_webhook_id_is_stable_across_retries_and_the_timestamp_is_the_attempts() -> None:
    times = iter([1_700_000_000.0, 1_700_000_090.0])
    async with FakeWebhook() as fake:
        notifier = WebhookNotifier("hook", fake.endpoint, clock=lambda: next(times))
        fake.script(Answer(503))
        with pytest.raises(RetryableNotifyError):
            await notifier.send(grouped_events())
        await notifier.send(list(reversed(grouped_events())))
    first, second = fake.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.headers["webhook-id"].startswith("msg_group_")
    assert (first.headers["webhook-timestamp"], second.headers["webhook-timestamp"]) == (
        "1700000000",
        "1700000090",
    )
    assert "webhook-signature" not in first.headers  # no secret, no signature


def test_webhook_schema_is_shipped_in_the_package_and_is_a_valid_schema() -> None:
    schema = webhook.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["version"] == {
        "const": WEBHOOK_VERSION,
        "description": "The version of this body's schema.",
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_webhook_every_body_validates_against_the_schema(
    message: tuple[list[AlertEvent], Part | None],
) -> None:
    events, part = message
    body = webhook_body(events, part, notifier="hook")
    validator = jsonschema.Draft202012Validator(
        webhook.schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(json.loads(json.dumps(body)))


# -- PagerDuty -----------------------------------------------------------------------


async def test_pagerduty_firing_triggers_and_resolved_resolves_the_same_alert() -> None:
    firing = replace(resolved_failed_event(), kind=EventKind.FIRING, firing_since=None)
    async with FakePagerDuty() as fake:
        notifier = _pagerduty(fake)
        await notifier.send([firing])
        await notifier.send([resolved_failed_event()])
    trigger, resolve = fake.accepted
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == firing.key
    payload = trigger["payload"]
    assert payload["severity"] == "critical"
    assert payload["summary"].startswith("FIRING: failed-charge · Staging: ")
    assert payload["source"] == f"MongoDB Atlas organization Staging ({firing.org_id})"
    assert payload["custom_details"]["Amount"] == "$1,234.56"
    assert payload["custom_details"]["Status"] == "PAID"
    assert trigger["links"] == [{"href": firing.billing_url, "text": "Open billing in Atlas"}]
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": firing.key,
    }


@pytest.mark.parametrize(
    ("severity", "expected"),
    [(Severity.CRITICAL, "critical"), (Severity.WARNING, "warning"), (Severity.INFO, "info")],
)
def test_pagerduty_severity_mapping(severity: Severity, expected: str) -> None:
    event = pagerduty_event(pending_event(severity=severity))
    assert event["payload"]["severity"] == expected


async def test_pagerduty_a_notice_is_an_alert_of_its_own_or_skipped() -> None:
    async with FakePagerDuty() as fake:
        await _pagerduty(fake).send([notice_event()])
        skip = PagerDutyNotifier("pd", ROUTING_KEY, url=fake.endpoint, notices="skip")
        await skip.send([notice_event()])
    [notice] = fake.accepted
    assert notice["event_action"] == "trigger"
    assert notice["dedup_key"] == f"{notice_event().key}@2026-11-15T12:00:00Z"


async def test_pagerduty_a_group_is_one_event_per_alert_in_order() -> None:
    events = grouped_events()
    async with FakePagerDuty() as fake:
        await _pagerduty(fake).send(events)
    assert [body["dedup_key"] for body in fake.accepted] == [e.key for e in events]


def test_pagerduty_a_key_longer_than_pagerduty_takes_is_hashed() -> None:
    event = pending_event(key="r/" + "x" * 300)
    key = pagerduty_event(event)["dedup_key"]
    assert key.startswith("sha256:") and len(key) <= 255
    assert key == pagerduty_event(replace(event, kind=EventKind.RESOLVED))["dedup_key"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_event())
def test_pagerduty_every_event_is_one_pagerduty_takes(event: AlertEvent) -> None:
    body = {"routing_key": ROUTING_KEY, **pagerduty_event(event)}
    jsonschema.validate(body, PAGERDUTY_EVENT)
    assert body["dedup_key"]


# -- Teams ---------------------------------------------------------------------------


def _runs(card: Any) -> list[str]:
    """The text of every TextRun of a card, in order."""
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("type") == "TextRun":
                out.append(value["text"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(card)
    return out


async def test_teams_card_carries_the_facts_of_the_slack_message() -> None:
    event = pending_event()
    async with FakeTeams() as fake:
        await _teams(fake).send([event])
    [message] = fake.accepted
    card = message["attachments"][0]["content"]
    runs = _runs(card)
    assert runs[0] == "FIRING: pending-over-budget"
    assert event.summary in runs
    for label, value in facts.table(event) + facts.details(event):
        assert runs[runs.index(label) + 1] == value, label
    assert "• analytics  " in runs and "$4,000.00 (up $1,200.00)" in runs
    assert card["actions"] == [
        {"type": "Action.OpenUrl", "title": "Open billing in Atlas", "url": event.billing_url}
    ]


async def test_teams_group_card_has_a_line_per_event_linking_its_organization() -> None:
    events = grouped_events()
    async with FakeTeams() as fake:
        await _teams(fake).send(events)
    [message] = fake.accepted
    runs = _runs(message)
    assert runs[0] == "12 alerts: 9 FIRING, 3 RESOLVED"
    assert sum(1 for text in runs if text in ("FIRING  ", "RESOLVED  ")) == 12


def test_teams_server_text_never_reaches_markdown() -> None:
    """Markdown in an event's text (a link, emphasis) is shown as it is: every value is
    a TextRun, which renders no Markdown; no TextBlock or FactSet holds event text."""
    event = pending_event(
        summary="[click me](https://evil.example) **now**", org_name="_Acme_ [x](y)"
    )
    body = json.dumps(teams_message([event]))
    assert '"TextBlock"' not in body and '"FactSet"' not in body
    assert "[click me](https://evil.example) **now**" in _runs(teams_message([event]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_teams_message_fits_28_kb_whatever_the_values(
    message: tuple[list[AlertEvent], Part | None],
) -> None:
    events, part = message
    sent = teams_json(teams_message(events, part))
    assert len(sent) <= TEAMS_MAX_BYTES
    assert FakeTeams().problem(Received({}, sent, json.loads(sent))) is None


# -- Alertmanager --------------------------------------------------------------------


async def test_alertmanager_posts_labels_annotations_and_times() -> None:
    event = pending_event()
    async with FakeAlertmanager(AM_TOKEN) as fake:
        await _alertmanager(fake).send([event])
    [alerts] = fake.accepted
    [alert] = alerts
    assert alert["labels"] == {
        "alertname": "AtlasPendingAmount",
        "rule": "pending-over-budget",
        "org_id": event.org_id,
        "org": "Production",
        "invoice_id": "66a0f1c2e4b0a1b2c3d4e5f6",
        "severity": "warning",
    }
    assert alert["annotations"]["summary"] == f"pending-over-budget · Production ({event.org_id})"
    assert alert["annotations"]["description"] == event.summary
    assert alert["annotations"]["amount"] == "$6,000.00"
    assert alert["startsAt"] == "2026-11-15T12:00:00Z"
    assert alert["endsAt"] == "2026-11-15T12:04:00Z"  # 4 x resend_every (1m)
    assert alert["generatorURL"] == event.billing_url


async def test_alertmanager_resolved_ends_the_same_alert_at_its_time() -> None:
    firing = replace(
        resolved_failed_event(), kind=EventKind.FIRING, at=AT - timedelta(hours=3, minutes=5)
    )
    resolved = resolved_failed_event()
    async with FakeAlertmanager(AM_TOKEN) as fake:
        notifier = _alertmanager(fake)
        await notifier.send([firing])
        assert len(fake.firing(AT)) == 1
        await notifier.send([resolved])
    [stored] = fake.alerts.values()
    assert stored.posts == 2
    assert stored.ends_at == resolved.at and not stored.firing(AT)


async def test_alertmanager_notice_ends_by_itself_or_is_skipped() -> None:
    async with FakeAlertmanager() as fake:
        await AlertmanagerNotifier("am", fake.url, clock=lambda: AT).send([notice_event()])
        skip = AlertmanagerNotifier("am", fake.url, notices="skip", clock=lambda: AT)
        await skip.send([notice_event()])
    [stored] = fake.alerts.values()
    assert stored.labels["transition"] == "PENDING->FAILED"
    assert stored.ends_at == AT + timedelta(minutes=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_event())
def test_alertmanager_every_alert_is_one_alertmanager_takes(event: AlertEvent) -> None:
    alerts = [alertmanager_alert(event, ends_at=AT + timedelta(minutes=4))]
    received = Received({}, b"", json.loads(json.dumps(alerts)))
    assert FakeAlertmanager().problem(received) is None


async def test_alertmanager_sends_basic_or_bearer_credentials() -> None:
    async with FakeAlertmanager() as fake:
        await AlertmanagerNotifier("am", fake.url, username="iw", password="pw-123456").send(
            [pending_event()]
        )
        await AlertmanagerNotifier("am", fake.url, token=AM_TOKEN).send([pending_event()])
    basic, bearer = (r.headers["Authorization"] for r in fake.received)
    assert basic == "Basic " + base64.b64encode(b"iw:pw-123456").decode()
    assert bearer == f"Bearer {AM_TOKEN}"


# -- reprs ---------------------------------------------------------------------------


def test_reprs_show_no_secret() -> None:
    notifiers = [
        WebhookNotifier(
            "h",
            "https://hooks.example/t0ken-in-path",
            secret=WEBHOOK_SECRET,
            headers={WEBHOOK_HEADER: WEBHOOK_HEADER_VALUE},
        ),
        PagerDutyNotifier("p", ROUTING_KEY),
        TeamsNotifier("t", "https://x.example/wf?sig=teams-sig-never-logged"),
        AlertmanagerNotifier("a", "https://am.example", token=AM_TOKEN),
        AlertmanagerNotifier("b", "https://am.example", username="u", password="pw-123456"),
    ]
    secrets = [
        "t0ken-in-path",
        WEBHOOK_SECRET,
        WEBHOOK_HEADER_VALUE,
        ROUTING_KEY,
        "teams-sig-never-logged",
        AM_TOKEN,
        "pw-123456",
    ]
    for notifier in notifiers:
        assert [s for s in secrets if s in repr(notifier)] == [], repr(notifier)


# -- configuration -------------------------------------------------------------------

CONFIG = """\
atlas:
  auth: {{public_key: pub, private_key: pk-123456}}
organizations: [{{id: aaaaaaaaaaaaaaaaaaaaaaaa}}]
state: {{path: state.db}}
notifiers:
  hook:
    type: webhook
    url: https://hooks.example/in/t0ken-in-path?key=query-secret-value
    secret_file: hook-secret
    headers: {{{header}: {header_value}}}
  pd:
    type: pagerduty
    routing_key_file: pd-key
    notices: {notices}
  teams:
    type: msteams
    webhook_url: {teams_url}
  am:
    type: alertmanager
    url: {am_url}
    token: {am_token}
    resend_every: {resend_every}
rules:
  - {{name: r, type: invoice_status, notify: [hook, pd, teams, am]}}
"""
GOOD = {
    "header": WEBHOOK_HEADER,
    "header_value": WEBHOOK_HEADER_VALUE,
    "notices": "skip",
    "teams_url": "https://x.example/workflows/1/invoke?sig=teams-sig-never-logged",
    "am_url": "http://alertmanager:9093",
    "am_token": AM_TOKEN,
    "resend_every": "2m",
}


def load_receivers(tmp_path: Any, **changes: str) -> Any:
    from invoice_watch.config import load

    (tmp_path / "hook-secret").write_text(WEBHOOK_SECRET + "\n")
    (tmp_path / "pd-key").write_text(ROUTING_KEY)
    return load(CONFIG.format(**{**GOOD, **changes}), filename="c.yaml", env={}, base_dir=tmp_path)


def test_config_loads_the_four_receivers_and_shows_no_secret(tmp_path: Any) -> None:
    from invoice_watch.config import summary
    from invoice_watch.notify import build_notifiers

    cfg = load_receivers(tmp_path)
    notifiers = build_notifiers(cfg.notifiers)
    assert [type(n).__name__ for n in notifiers.values()] == [
        "WebhookNotifier",
        "PagerDutyNotifier",
        "TeamsNotifier",
        "AlertmanagerNotifier",
    ]
    assert notifiers["am"].resend_every == 120  # type: ignore[attr-defined]
    assert notifiers["pd"].notices == "skip"  # type: ignore[attr-defined]
    text = summary(cfg)
    assert "hook: webhook <secret>, signed (Standard Webhooks), headers X-Api-Key" in text
    assert "pd: pagerduty https://events.pagerduty.com/v2/enqueue, routing key <secret>" in text
    assert "am: alertmanager http://alertmanager:9093/api/v2/alerts, token <secret>" in text
    shown = text + repr(cfg) + cfg.model_dump_json() + repr(notifiers)
    secrets = [
        "t0ken-in-path",
        "query-secret-value",
        WEBHOOK_SECRET,
        WEBHOOK_HEADER_VALUE,
        ROUTING_KEY,
        "teams-sig-never-logged",
        AM_TOKEN,
    ]
    assert [s for s in secrets if s in shown] == []


def test_config_a_secret_urls_parts_are_redacted_wherever_they_show(tmp_path: Any) -> None:
    """A receiver may echo its URL's token alone (a path, a query value): each is
    registered as a secret when the configuration is loaded."""
    from invoice_watch.redact import redact

    load_receivers(tmp_path)
    text = redact("saw /in/t0ken-in-path and key=query-secret-value and sig=teams-sig-never-logged")
    assert "t0ken-in-path" not in text and "query-secret-value" not in text
    assert "teams-sig-never-logged" not in text


@pytest.mark.parametrize(
    ("changes", "line", "message"),
    [
        (
            {"header": "Content-Type"},
            10,
            "`Content-Type` is set by invoice-watch itself; remove it",
        ),
        ({"header_value": '"a\\tb"'}, 10, "contains a tab; remove it"),
        ({"header_value": "clé-secrète"}, 10, "a header value must be printable ASCII"),
        ({"notices": "maybe"}, 14, "use one of: 'send' or 'skip'"),
        ({"teams_url": "ftp://x.example/y"}, 17, "does not start with https://"),
        ({"am_url": "http://am:9093/api/v2?x=1"}, 20, "has a query (?...)"),
        ({"am_token": '"has space"'}, 21, "cannot be sent as `Authorization: Bearer`"),
        ({"resend_every": "2h"}, 22, "Alertmanager ends an alert not posted again in time"),
    ],
)
def test_config_receiver_mistakes_are_problems_at_their_line(
    tmp_path: Any, changes: dict[str, str], line: int, message: str
) -> None:
    from invoice_watch.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_receivers(tmp_path, **changes)
    [problem] = raised.value.problems
    assert (problem.file, problem.line) == ("c.yaml", line), problem
    assert message in problem.message, problem


@pytest.mark.parametrize(
    ("name", "content", "line", "message"),
    [
        ("hook-secret", "not-a-whsec-secret", 9, "is not a Standard Webhooks signing secret"),
        ("hook-secret", "whsec_c2hvcnQ=", 9, "holds 5 bytes"),
        ("pd-key", "short", 13, "a PagerDuty routing key is the 32 letters and digits"),
    ],
)
def test_config_secret_files_are_checked_without_quoting_them(
    tmp_path: Any, name: str, content: str, line: int, message: str
) -> None:
    from invoice_watch.config import load
    from invoice_watch.errors import ConfigError

    load_receivers(tmp_path)  # writes both files
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as raised:
        load(CONFIG.format(**GOOD), filename="c.yaml", env={}, base_dir=tmp_path)
    [problem] = raised.value.problems
    assert problem.line == line and message in problem.message, problem
    assert content not in problem.message


def test_config_alertmanager_takes_one_login(tmp_path: Any) -> None:
    from invoice_watch.config import load
    from invoice_watch.errors import ConfigError

    text = CONFIG.format(**GOOD).replace(
        f"    token: {AM_TOKEN}\n", f"    token: {AM_TOKEN}\n    username: iw\n"
    )
    (tmp_path / "hook-secret").write_text(WEBHOOK_SECRET)
    (tmp_path / "pd-key").write_text(ROUTING_KEY)
    with pytest.raises(ConfigError) as raised:
        load(text, filename="c.yaml", env={}, base_dir=tmp_path)
    messages = [p.message for p in raised.value.problems]
    assert "set both username and password (HTTP Basic), or neither" in messages[0]


def test_config_warns_of_receiver_credentials_over_plain_http(tmp_path: Any) -> None:
    cfg = load_receivers(
        tmp_path,
        teams_url="http://x.example/wf?sig=teams-sig-never-logged",
        am_url="http://am.example:9093",
    )
    warnings = {(w.line, w.message) for w in cfg.warnings}
    assert any(line == 17 and "webhook's secret, travels unencrypted" in m for line, m in warnings)
    assert (20, "warning: http:// sends the token unencrypted; use https://") in warnings


def test_config_example_receivers_load_when_uncommented(tmp_path: Any) -> None:
    """config.example.yaml shows each receiver commented out: uncommented (the lines
    that are keys), they load, with their secrets from the files they name."""
    import re
    from pathlib import Path

    from invoice_watch.config import load

    example = (Path(__file__).parent.parent / "config.example.yaml").read_text()
    head, _, rest = example.partition("\nnotifiers:\n")
    section, _, tail = rest.partition("\nrules:\n")
    key = re.compile(r"^  # (  )?([a-z][a-z0-9_-]*:.*)$")
    section = "\n".join(
        f"  {m.group(1) or ''}{m.group(2)}" if (m := key.match(line)) else line
        for line in section.splitlines()
    )
    text = f"{head}\nnotifiers:\n{section}\nrules:\n{tail}"
    files = {
        "atlas-private-key": "priv",
        "slack-webhook-url": "https://hooks.slack.com/services/T000/B000/XXXX",
        "slack-bot-token": "xoxb-0000",
        "smtp-password": "pw",
        "webhook-url": "https://hooks.example/in/t0ken",
        "webhook-secret": WEBHOOK_SECRET,
        "pagerduty-routing-key": ROUTING_KEY,
        "teams-webhook-url": "https://x.example/workflows/1/invoke?sig=abcdefgh",
        "alertmanager-token": AM_TOKEN,
    }
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")
    env = {"ATLAS_PUBLIC_KEY": "pub", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    cfg = load(text, filename="config.example.yaml", env=env, base_dir=tmp_path)
    types = {name: n.type for name, n in cfg.notifiers.items()}
    assert {"webhook", "pagerduty", "msteams", "alertmanager"} <= set(types.values()), types
