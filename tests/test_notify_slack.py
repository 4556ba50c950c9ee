"""Slack notifiers against a real fake Slack on 127.0.0.1: delivery, the retry-or-give-up
table, Retry-After, one attempt per send, and secrets kept out of logs and errors."""

from __future__ import annotations

import asyncio
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from invoice_watch.config import Config
from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify import ConsoleNotifier, build_notifiers
from invoice_watch.notify.render import plain
from invoice_watch.notify.render.slack import slack_blocks
from invoice_watch.notify.slack import (
    SlackBotNotifier,
    SlackWebhookNotifier,
    classify_slack_status,
)
from invoice_watch.types import Part
from tests.fakes_slack import TOKEN, FakeSlack, Reply
from tests.test_notify_render import grouped_events, pending_event, resolved_failed_event

Notifier = SlackWebhookNotifier | SlackBotNotifier


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack-sdk sends every request through a proxy named in the environment.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


def webhook(slack: FakeSlack) -> SlackWebhookNotifier:
    return SlackWebhookNotifier("ops-webhook", slack.webhook_url)


def bot(slack: FakeSlack, token: str = TOKEN) -> SlackBotNotifier:
    return SlackBotNotifier("ops-bot", token, "#billing", slack.api_url)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


@pytest.mark.parametrize(
    ("status", "error_code", "expected"),
    [
        (200, None, None),
        (204, None, None),
        (None, None, RetryableNotifyError),  # refused, reset, timed out
        (408, None, RetryableNotifyError),
        (429, "rate_limited", RetryableNotifyError),
        (429, "ratelimited", RetryableNotifyError),
        (429, None, RetryableNotifyError),
        (500, None, RetryableNotifyError),
        (500, "rollup_error", RetryableNotifyError),
        (502, None, RetryableNotifyError),
        (503, "service_unavailable", RetryableNotifyError),
        (504, None, RetryableNotifyError),
        (200, "internal_error", RetryableNotifyError),
        (200, "fatal_error", RetryableNotifyError),
        (200, "service_unavailable", RetryableNotifyError),
        (200, "request_timeout", RetryableNotifyError),
        (200, "ratelimited", RetryableNotifyError),
        (200, "invalid_auth", PermanentNotifyError),
        (200, "not_authed", PermanentNotifyError),
        (200, "token_revoked", PermanentNotifyError),
        (200, "account_inactive", PermanentNotifyError),
        (200, "missing_scope", PermanentNotifyError),
        (200, "channel_not_found", PermanentNotifyError),
        (200, "not_in_channel", PermanentNotifyError),
        (200, "is_archived", PermanentNotifyError),
        (200, "invalid_blocks", PermanentNotifyError),
        (200, "msg_too_long", PermanentNotifyError),
        (200, "unexpected_response", PermanentNotifyError),
        (400, "invalid_payload", PermanentNotifyError),
        (400, "no_text", PermanentNotifyError),
        (401, None, PermanentNotifyError),
        (403, "invalid_token", PermanentNotifyError),
        (403, "action_prohibited", PermanentNotifyError),
        (404, "no_service", PermanentNotifyError),
        (404, "channel_not_found", PermanentNotifyError),
        (410, "no_service", PermanentNotifyError),
        (410, "channel_is_archived", PermanentNotifyError),
        (302, None, PermanentNotifyError),
    ],
)
def test_classify_slack_status_table(
    status: int | None, error_code: str | None, expected: type[NotifyError] | None
) -> None:
    assert classify_slack_status(status, error_code) is expected


async def test_webhook_send_posts_blocks_and_fallback_text(slack: FakeSlack) -> None:
    events = [pending_event()]
    await webhook(slack).send(events)
    [request] = slack.received
    assert request.route == "webhook"
    assert request.body["text"] == plain.text(events)
    assert request.body["blocks"] == slack_blocks(events)


async def test_bot_send_posts_to_channel_with_bearer_token(slack: FakeSlack) -> None:
    events = grouped_events()
    await bot(slack).send(events)
    [request] = slack.received
    assert request.route == "chat.postMessage"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.body["channel"] == "#billing"
    assert request.body["text"] == plain.text(events)
    assert request.body["blocks"] == slack_blocks(events)


async def test_webhook_send_empty_sends_nothing(slack: FakeSlack) -> None:
    await webhook(slack).send([])
    await bot(slack).send([])
    assert slack.received == []


async def test_webhook_send_server_errors_are_retryable_one_attempt_each(slack: FakeSlack) -> None:
    slack.script_webhook(Reply(500, "rollup_error"), Reply(502, raw="<html>Bad gateway</html>"))
    notifier = webhook(slack)
    for _ in range(2):
        with pytest.raises(RetryableNotifyError) as info:
            await notifier.send([pending_event()])
        assert info.value.retry_after is None
    await notifier.send([pending_event()])
    assert len(slack.received) == 3  # no hidden retries inside send


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
async def test_send_rate_limited_is_retryable_with_retry_after(slack: FakeSlack, make) -> None:
    reply = Reply(429, "ratelimited", headers={"Retry-After": "3"})
    slack.script_webhook(reply)
    slack.script_api(reply)
    with pytest.raises(RetryableNotifyError) as info:
        await make(slack).send([pending_event()])
    assert info.value.retry_after == 3.0
    assert len(slack.received) == 1  # the outbox waits, not the notifier


@pytest.mark.parametrize(
    ("reply", "hint"),
    [
        (Reply(404, "no_service"), "create a new one and update webhook_url"),
        (Reply(410, "no_service"), "create a new one and update webhook_url"),
        (Reply(403, "invalid_token"), "create a new webhook"),
        (Reply(404, "channel_not_found"), "check the notifier's channel"),
        (Reply(400, "invalid_payload"), "rejected the message format"),
    ],
)
async def test_webhook_send_refusals_are_permanent(
    slack: FakeSlack, reply: Reply, hint: str
) -> None:
    slack.script_webhook(reply)
    with pytest.raises(PermanentNotifyError) as info:
        await webhook(slack).send([pending_event()])
    message = str(info.value)
    assert f"HTTP {reply.status} {reply.error}" in message
    assert hint in message


def _refusal(kind: str, code: str) -> Reply:
    """How each route refuses a message's form: the webhook with HTTP 400 and the code
    as its body, the Web API with HTTP 200 and ``ok: false``."""
    return Reply(400, code) if kind == "webhook" else Reply(error=code)


def _script(slack: FakeSlack, kind: str, *replies: Reply) -> None:
    (slack.script_webhook if kind == "webhook" else slack.script_api)(*replies)


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
@pytest.mark.parametrize("code", ["msg_blocks_too_long", "invalid_blocks", "msg_too_long"])
async def test_send_refused_for_size_falls_back_to_plain_text(
    slack: FakeSlack, make, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Slack refusing a message's blocks or size (a limit it changed) is never the end of
    an alert: nothing was posted, so the same message goes again as plain text."""
    kind = "webhook" if make is webhook else "bot"
    _script(slack, kind, _refusal(kind, code))
    events = grouped_events()
    part = Part(2, 3)
    await make(slack).send(events, part=part)
    first, second = slack.received
    assert "blocks" in first.body and "blocks" not in second.body
    assert second.body["text"] == plain.text(events, part)
    assert slack.accepted == [second.body]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"Slack refused the message as blocks ({code}): it was sent as plain text" in warning


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
async def test_send_refused_in_every_form_logs_nothing_of_its_own(
    slack: FakeSlack, make, caplog: pytest.LogCaptureFixture
) -> None:
    """NEW-3: every attempt logged two WARNING lines ("sending it as plain text", "in
    its briefest form"), about 2,900 a day for one message. The notifier now logs no
    failure of its own: its error names each refusal, in the same words every time,
    and the outbox logs it once."""
    kind = "webhook" if make is webhook else "bot"
    notifier = make(slack)
    errors = []
    for _ in range(3):
        _script(slack, kind, *[_refusal(kind, "msg_too_long")] * 3)
        with pytest.raises(RetryableNotifyError) as info:
            await notifier.send([pending_event()])
        errors.append(str(info.value))
    assert errors[0] == errors[1] == errors[2]
    assert (
        "Slack refused it in every form: as blocks (msg_too_long), as plain text "
        "(msg_too_long), in its briefest form (msg_too_long)" in errors[0]
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
async def test_send_refused_in_every_form_is_retryable_not_failed(slack: FakeSlack, make) -> None:
    kind = "webhook" if make is webhook else "bot"
    _script(
        slack,
        kind,
        _refusal(kind, "msg_blocks_too_long"),
        _refusal(kind, "msg_too_long"),
        _refusal(kind, "msg_too_long"),
    )
    with pytest.raises(RetryableNotifyError, match="msg_too_long"):
        await make(slack).send([pending_event()])
    texts = [r.body["text"] for r in slack.received]
    assert len(texts) == 3 and texts[2] == plain.brief_text([pending_event()])
    assert len(texts[2]) < len(texts[1])
    await make(slack).send([pending_event()])  # Slack takes it again: delivered
    assert len(slack.accepted) == 1


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
async def test_send_says_which_part_of_a_split_group_it_is(slack: FakeSlack, make) -> None:
    events = grouped_events()
    await make(slack).send(events, part=Part(2, 3))
    [body] = slack.accepted
    assert body["blocks"][0]["text"]["text"].endswith(
        "12 alerts: 9 FIRING, 3 RESOLVED (part 2 of 3)"
    )
    assert body["text"].startswith("12 alerts: 9 FIRING, 3 RESOLVED (part 2 of 3)\n")


async def test_bot_send_wrong_token_is_permanent(slack: FakeSlack) -> None:
    with pytest.raises(PermanentNotifyError, match=r"HTTP 200 invalid_auth: the token is not"):
        await bot(slack, token="xoxb-wrong-token").send([pending_event()])


@pytest.mark.parametrize(
    ("reply", "expected", "text"),
    [
        (Reply(error="not_authed"), PermanentNotifyError, "HTTP 200 not_authed"),
        (Reply(error="channel_not_found"), PermanentNotifyError, "invite the app"),
        (Reply(error="internal_error"), RetryableNotifyError, "HTTP 200 internal_error"),
        (Reply(503, "service_unavailable"), RetryableNotifyError, "HTTP 503"),
        (Reply(500, raw="<html>oops</html>"), RetryableNotifyError, "HTTP 500"),
        (Reply(200, raw="<html>captive portal</html>"), RetryableNotifyError, "not Slack's answer"),
    ],
)
async def test_bot_send_errors_map_to_exceptions(
    slack: FakeSlack, reply: Reply, expected: type[NotifyError], text: str
) -> None:
    slack.script_api(reply)
    with pytest.raises(expected) as info:
        await bot(slack).send([resolved_failed_event()])
    assert type(info.value) is expected
    assert text in str(info.value)


async def test_bot_send_missing_channel_is_permanent(slack: FakeSlack) -> None:
    notifier = SlackBotNotifier("ops-bot", TOKEN, "", slack.api_url)
    with pytest.raises(PermanentNotifyError, match="channel_not_found"):
        await notifier.send([pending_event()])


@pytest.mark.parametrize("kind", ["webhook", "bot"])
async def test_send_connection_refused_is_retryable(closed_port: int, kind: str) -> None:
    base = f"http://127.0.0.1:{closed_port}"
    notifier: Notifier = (
        SlackWebhookNotifier("w", base + "/services/T000/B000/XXXX")
        if kind == "webhook"
        else SlackBotNotifier("b", TOKEN, "#billing", base + "/api/")
    )
    with pytest.raises(RetryableNotifyError, match="Slack is unreachable"):
        await notifier.send([pending_event()])


async def test_webhook_send_connection_dropped_is_retryable() -> None:
    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        notifier = SlackWebhookNotifier("w", f"http://127.0.0.1:{port}/services/T000/B000/XXXX")
        closed = r"Slack is unreachable: 127.0.0.1:\d+ closed the connection without answering"
        with pytest.raises(RetryableNotifyError, match=closed):
            await notifier.send([pending_event()])
    finally:
        server.close()
        await server.wait_closed()


def _everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def test_webhook_url_and_token_never_leak(
    slack: FakeSlack, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    refused_url = f"http://127.0.0.1:{closed_port}/services/T000/B000/XXXX"
    secrets = [slack.webhook_url, "/services/T000/B000/XXXX", TOKEN, "xoxb-wrong-token"]
    notifiers: list[Notifier] = [
        webhook(slack),
        bot(slack),
        bot(slack, token="xoxb-wrong-token"),
        SlackWebhookNotifier("w", refused_url),
        SlackBotNotifier("b", TOKEN, "#c", f"http://127.0.0.1:{closed_port}/api/"),
    ]
    slack.script_webhook(Reply(404, "no_service"))
    errors: list[BaseException] = []
    for notifier in notifiers:
        for events in ([pending_event()], grouped_events()):
            try:
                await notifier.send(events)
            except NotifyError as exc:
                errors.append(exc)
    assert len(errors) == 7
    said = [r.getMessage() for r in caplog.records]
    said += [_everything_said(e) for e in errors]
    said += [repr(n) for n in notifiers]
    for secret in secrets:
        assert not [text for text in said if secret in text], secret


async def test_build_notifiers_slack_from_config_delivers(
    slack: FakeSlack, config_factory: Callable[..., Config]
) -> None:
    config = config_factory(
        notifiers={
            "hook": {"type": "slack", "webhook_url": slack.webhook_url},
            "bot": {
                "type": "slack",
                "token": TOKEN,
                "channel": "#billing",
                "api_url": slack.api_url,
            },
            "console": {"type": "console"},
        }
    )
    notifiers = build_notifiers(config.notifiers)
    assert isinstance(notifiers["hook"], SlackWebhookNotifier)
    assert isinstance(notifiers["bot"], SlackBotNotifier)
    assert isinstance(notifiers["console"], ConsoleNotifier)
    assert [n.name for n in notifiers.values()] == ["hook", "bot", "console"]
    await notifiers["hook"].send([pending_event()])
    await notifiers["bot"].send([pending_event()])
    assert [r.route for r in slack.received] == ["webhook", "chat.postMessage"]
    for notifier in notifiers.values():
        await notifier.aclose()
