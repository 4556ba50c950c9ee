"""What the Slack notifiers make of answers Slack never sends, against a real fake Slack
on 127.0.0.1: a proxy's block page, bodies that cannot be read, a gzip bomb, redirects,
error codes carrying secrets or control characters, and no answer at all (issues 12,
13 and 14: A12-3, A12-4, A12-6, A12-14, A13-2, A14-13).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator

import pytest
import yaml
from aiohttp import web

from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify.slack import REPLY_MAX, SlackBotNotifier, SlackWebhookNotifier
from tests.fakes_slack import TOKEN, WEBHOOK_PATH, FakeSlack, Reply
from tests.loopback import LoopbackServer
from tests.test_notify_render import pending_event
from tests.test_reliability_storms import run_delivery
from tests.world import World

Notifier = SlackWebhookNotifier | SlackBotNotifier


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


def webhook(slack: FakeSlack) -> SlackWebhookNotifier:
    return SlackWebhookNotifier("hook", slack.webhook_url)


def bot(slack: FakeSlack) -> SlackBotNotifier:
    return SlackBotNotifier("bot", TOKEN, "#billing", slack.api_url)


def script(slack: FakeSlack, make: object, *replies: Reply) -> None:
    (slack.script_webhook if make is webhook else slack.script_api)(*replies)


def said(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


BLOCK_PAGE = (
    "<!DOCTYPE html><html><head><title>Access denied by policy</title></head>"
    "<body><h1>This site is blocked</h1></body></html>"
)


# -- a page that is not Slack's answer: retried ---------------------------------------


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
@pytest.mark.parametrize("status", [200, 203])
async def test_send_a_2xx_page_is_not_slacks_answer_and_is_retried(
    slack: FakeSlack, make, status: int
) -> None:
    """Issue 13 §2: a proxy's block page or a captive portal answering 200 text/html made
    the alert "failed for good" after one try. The message never reached Slack: it is
    retried, and the error says what answered."""
    script(slack, make, Reply(status, raw=BLOCK_PAGE))
    with pytest.raises(RetryableNotifyError) as info:
        await make(slack).send([pending_event()])
    message = str(info.value)
    assert f"HTTP {status} text/html ('Access denied by policy')" in message
    assert "not Slack's answer (a proxy or captive portal?)" in message
    assert "bug" not in message
    assert slack.accepted == []


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
async def test_send_an_error_page_goes_by_its_status(slack: FakeSlack, make) -> None:
    script(slack, make, Reply(502, raw=BLOCK_PAGE), Reply(403, raw=BLOCK_PAGE))
    with pytest.raises(RetryableNotifyError, match=r"HTTP 502 text/html .*not Slack's answer"):
        await make(slack).send([pending_event()])
    with pytest.raises(PermanentNotifyError, match=r"HTTP 403 text/html .*not Slack's answer"):
        await make(slack).send([pending_event()])


# -- a 2xx that cannot be read: delivered, with a warning ----------------------------


ODD_2XX = [
    # (route, body, Content-Type): what Slack never answers, with a 2xx
    ("webhook", b"ok\xff", "text/plain; charset=utf-8"),  # A12-3: UnicodeDecodeError
    ("webhook", b"", "text/plain"),
    ("webhook", b"\x00\x01\x02 binary", "application/octet-stream"),
    ("bot", b"{", "application/json"),  # A12-3: AttributeError: 'ClientResponse' ... 'data'
    ("bot", b"ok", "text/plain"),  # A13-2: AttributeError: 'str' object has no 'get'
    ("bot", b'{"ok": true, "ts": "1\xff"}', "application/json"),  # not UTF-8
    ("bot", b"[1, 2]", "application/json"),
    ("bot", b'{"ts": "1700000000.0001"}', "application/json"),  # no "ok"
    ("bot", b"", "application/json"),
]


@pytest.mark.parametrize(("route", "body", "content_type"), ODD_2XX)
async def test_send_an_unreadable_2xx_counts_as_delivered_with_a_warning(
    slack: FakeSlack,
    caplog: pytest.LogCaptureFixture,
    route: str,
    body: bytes,
    content_type: str,
) -> None:
    """Issue 12 §3, issue 13 §2: Slack took the message, but its answer could not be read,
    and the deliverer sent it again every backoff (7 identical POSTs in 100 s), or
    `test-notify` said "unexpected error … This is a bug". Something took the POST and
    said 2xx without being a page in the way: the message counts as delivered (sending
    again would post it twice), and one warning says which answer came."""
    make = webhook if route == "webhook" else bot
    script(slack, make, Reply(body=body, content_type=content_type))
    await make(slack).send([pending_event()])
    assert len(slack.received) == 1
    [warning] = said(caplog)
    assert "with an answer that is not Slack's" in warning
    assert "counts as delivered" in warning and "check the channel" in warning


async def test_send_ok_in_an_unknown_charset_is_delivered(
    slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer is read as UTF-8 whatever its charset says (aiohttp's ``text()`` raised
    LookupError on an unknown one)."""
    slack.script_webhook(Reply(body=b"ok", content_type="text/plain; charset=x-no-such"))
    await webhook(slack).send([pending_event()])
    assert said(caplog) == []


async def test_send_a_2xx_broken_off_while_read_counts_as_delivered() -> None:
    """The status line and headers came (2xx), the body broke off: Slack answered."""

    async def cut(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/html\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        notifier = SlackWebhookNotifier("w", f"http://127.0.0.1:{port}{WEBHOOK_PATH}")
        await notifier.send([pending_event()])
    finally:
        server.close()
        await server.wait_closed()


# -- bounded answers -----------------------------------------------------------------

BOMB_SIZE = 256 * 2**20  # decoded bytes


@functools.cache
def gzip_bomb() -> bytes:
    """BOMB_SIZE zero bytes, gzipped (about 256 KB), made without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header
    block = bytes(2**20)
    parts = [packer.compress(block) for _ in range(BOMB_SIZE // len(block))]
    return b"".join([*parts, packer.flush()])


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
@pytest.mark.parametrize("status", [200, 500])
async def test_send_a_gzip_bomb_answer_is_read_within_bounds(
    slack: FakeSlack, make, status: int
) -> None:
    """Issue 12 §6: a 1 MB gzip answer decoding to 1 GiB took the daemon to 3.2 GB. The
    answer is read up to REPLY_MAX decoded bytes, whatever it decodes to."""
    headers = {"Content-Encoding": "gzip"}
    script(slack, make, Reply(status, body=gzip_bomb(), content_type="text/plain", headers=headers))
    notifier = make(slack)
    tracemalloc.start()
    try:
        if status == 200:  # not Slack's answer, but 2xx and no page: delivered
            await notifier.send([pending_event()])
        else:
            with pytest.raises(RetryableNotifyError, match="HTTP 500"):
                await notifier.send([pending_event()])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < REPLY_MAX + 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"


async def test_send_an_endless_answer_is_cut_at_reply_max(slack: FakeSlack) -> None:
    script(slack, webhook, Reply(body=b"x" * (REPLY_MAX * 3)))
    await webhook(slack).send([pending_event()])


# -- redirects are never followed ----------------------------------------------------


class Elsewhere(LoopbackServer):
    """Another server, recording whatever reaches it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._hit)
        super().__init__(app)

    async def _hit(self, request: web.Request) -> web.Response:
        self.hits.append(await request.text())
        return web.Response(text="ok")


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_send_never_follows_a_redirect_to_another_host(
    slack: FakeSlack, make, status: int
) -> None:
    """Issue 14 §13: a 302 from the webhook was followed to another host, message and
    all. It is not followed; the error says where it pointed (its origin only) and that
    something is in the way (retried)."""
    async with Elsewhere() as other:
        target = other.url.replace("127.0.0.1", "localhost") + "/login?next=/services/T000"
        script(slack, make, Reply(status, headers={"Location": target}))
        with pytest.raises(RetryableNotifyError) as info:
            await make(slack).send([pending_event()])
    assert other.hits == []
    message = str(info.value)
    assert f"HTTP {status}: the answer is a redirect to http://localhost:" in message
    assert "which invoice-watch does not follow" in message
    assert "/login" not in message and "/services" not in message


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
async def test_send_a_redirect_on_the_same_host_is_permanent(slack: FakeSlack, make) -> None:
    script(slack, make, Reply(301, headers={"Location": "/services/T000/B000/moved"}))
    with pytest.raises(PermanentNotifyError, match="the address moved: update notifiers"):
        await make(slack).send([pending_event()])
    assert len(slack.received) == 1


# -- Slack's error text is checked before it is said ---------------------------------


@pytest.mark.parametrize(
    "error",
    [
        "ratelimited\ud800",  # A12-14: a mark that could not be stored
        "invalid_auth\x1b[2J\x1b]0;pwned\x07",
        "invalid_auth got " + TOKEN,  # A12-4: the token echoed back
        "x" * 5000,
    ],
    ids=["surrogate", "terminal-escapes", "token-echoed", "long"],
)
async def test_bot_error_code_slack_never_uses_is_escaped_and_redacted(
    slack: FakeSlack, error: str
) -> None:
    """Issue 12 §4 and §14: the bot's ``error`` went into logs, `status` and the state
    file as it came: a token it echoed, a surrogate no row can store (so the "failed"
    mark failed and the message was sent again forever), terminal escapes."""
    slack.script_api(Reply(error=error))
    with pytest.raises(PermanentNotifyError) as info:
        await bot(slack).send([pending_event()])
    message = str(info.value)
    message.encode("utf-8")  # storable
    assert "Slack answered an error code it does not use" in message
    assert TOKEN not in message and "\x1b" not in message and len(message) < 400


async def test_webhook_text_echoing_its_url_is_redacted(slack: FakeSlack) -> None:
    slack.script_webhook(Reply(500, raw=f"<html>POST {slack.webhook_url} failed</html>"))
    with pytest.raises(RetryableNotifyError) as info:
        await webhook(slack).send([pending_event()])
    assert WEBHOOK_PATH not in str(info.value) and "<secret>" in str(info.value)


# -- no answer: what happened and what to check --------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


def at(kind: str, base: str, **kw: object) -> Notifier:
    if kind == "webhook":
        return SlackWebhookNotifier("w", base + WEBHOOK_PATH, **kw)  # type: ignore[arg-type]
    return SlackBotNotifier("b", TOKEN, "#c", base + "/api/", **kw)  # type: ignore[arg-type]


async def unreachable(notifier: Notifier) -> str:
    with pytest.raises(RetryableNotifyError) as info:
        await notifier.send([pending_event()])
    message = str(info.value)
    assert "Slack is unreachable: " in message and WEBHOOK_PATH not in message
    return message


@pytest.mark.parametrize("kind", ["webhook", "bot"])
async def test_unreachable_connection_refused_names_host_port_and_setting(
    closed_port: int, kind: str
) -> None:
    message = await unreachable(at(kind, f"http://127.0.0.1:{closed_port}"))
    setting = "webhook_url" if kind == "webhook" else "api_url"
    assert f"cannot connect to 127.0.0.1:{closed_port}: connection refused" in message
    assert f"check notifiers.{'w' if kind == 'webhook' else 'b'}.{setting}" in message


async def test_unreachable_through_a_proxy_that_is_down_names_the_proxy(closed_port: int) -> None:
    proxy = f"http://relay:proxy-secret-123@127.0.0.1:{closed_port}"
    notifier = SlackWebhookNotifier("w", "http://hooks.example" + WEBHOOK_PATH, proxy=proxy)
    message = await unreachable(notifier)
    assert f"cannot connect to the proxy http://<secret>@127.0.0.1:{closed_port}" in message
    assert "notifiers.w.proxy, or HTTPS_PROXY/HTTP_PROXY and NO_PROXY" in message
    assert "proxy-secret-123" not in message


async def test_unreachable_no_answer_in_time_says_how_long_and_where() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        message = await unreachable(at("webhook", f"http://127.0.0.1:{port}", timeout=0.3))
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
    assert f"no answer within 0.3s from 127.0.0.1:{port}" in message


async def test_unreachable_not_http_says_so() -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        message = await unreachable(at("bot", f"http://127.0.0.1:{port}"))
    finally:
        server.close()
        await server.wait_closed()
    assert f"the answer from 127.0.0.1:{port} is not valid HTTP" in message


async def test_unreachable_tls_failure_says_what_to_check(slack: FakeSlack) -> None:
    """https:// to a plain-HTTP server: the TLS handshake fails."""
    message = await unreachable(at("webhook", slack.url.replace("http://", "https://")))
    assert "TLS with 127.0.0.1:" in message and "trust store" in message


# -- every error is a NotifyError ----------------------------------------------------


@pytest.mark.parametrize("make", [webhook, bot], ids=["webhook", "bot"])
@pytest.mark.parametrize(
    "reply",
    [
        Reply(body=b"\xff\xfe<\x00h\x00t\x00m\x00l\x00>", content_type="text/html"),
        Reply(418, body=b"\x1b[2J", content_type="text/plain"),
        Reply(429, body=b"{", headers={"Retry-After": "nan"}),
        Reply(200, body=b'{"ok": false, "error": 5}', content_type="application/json"),
        Reply(200, body=b'{"ok": false}', content_type="application/json"),
        Reply(200, body=b'{"ok": "yes"}', content_type="application/json"),
        Reply(599, body=b"", content_type=""),
        Reply(302),
        Reply(307, headers={"Location": "http://[::1"}),
    ],
)
async def test_send_any_answer_is_delivered_or_a_notify_error(
    slack: FakeSlack, make, reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever comes back, send returns (delivered) or raises a NotifyError: never an
    exception the deliverer would log as "unexpected … a bug"."""
    script(slack, make, reply)
    try:
        await make(slack).send([pending_event()])
    except NotifyError as exc:
        str(exc).encode("utf-8")
    for text in said(caplog, logging.DEBUG):
        text.encode("utf-8")


# -- through the outbox: no resend storm, no "failed for good" -----------------------


def slack_config(world: World, bot_token: bool) -> Config:
    data = world.config_data()
    if bot_token:
        data["notifiers"]["slack"] = {
            "type": "slack",
            "token": TOKEN,
            "channel": "#billing",
            "api_url": world.slack.api_url,
        }
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


@pytest.mark.parametrize("bot_token", [False, True], ids=["webhook", "bot"])
async def test_deliver_an_unreadable_2xx_is_posted_once(
    world: World, bot_token: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 §3: 7 identical FIRING POSTs in 100 s (9 in 30 s for the bot), a
    traceback each, ~1,440 duplicates a day. Now each message is posted once, recorded
    as sent, with one warning and no error."""
    reply = (
        Reply(body=b"{", content_type="application/json") if bot_token else Reply(body=b"ok\xff")
    )
    (world.slack.script_api if bot_token else world.slack.script_webhook)(*[reply] * 100)
    async with App(slack_config(world, bot_token), clock=world.clock) as app:
        await app.run_cycle()
        assert await app.deliverer.drain(100) == 0
        assert await app.store.outbox.counts() == {"sent": 4}
    assert len(world.slack.received) == 2  # one per message, never again
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [] and "Traceback" not in caplog.text
    warnings = [m for m in said(caplog) if "counts as delivered" in m]
    assert len(warnings) == 2


@pytest.mark.parametrize("bot_token", [False, True], ids=["webhook", "bot"])
async def test_deliver_a_block_page_is_retried_until_slack_answers(
    world: World, bot_token: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13 §2: `200 text/html` from a proxy made both alerts "failed for good" after
    one try. They stay pending, retried with backoff (one warning), and go out once
    Slack is reachable again."""
    page = Reply(raw=BLOCK_PAGE)
    (world.slack.script_api if bot_token else world.slack.script_webhook)(*[page] * 1000)
    async with App(slack_config(world, bot_token), clock=world.clock) as app:
        await app.run_cycle()
        await run_delivery(app, world.clock, seconds=300)
        counts = await app.store.outbox.counts()
        assert counts == {"pending": 2, "sent": 2}  # Slack's two; the email went out
        tries = len(world.slack.received)
        assert 2 <= tries <= 20  # backoff, not a storm
        world.slack.clear_scripts()
        await run_delivery(
            app, world.clock, seconds=120, until=lambda: len(world.slack.accepted) == 2
        )
        assert await app.store.outbox.counts() == {"sent": 4}
    warnings = [m for m in said(caplog) if "not Slack's answer" in m]
    assert len(warnings) == 1  # once per message and error: the group of two waits as one


async def test_test_notify_with_a_non_json_answer_is_not_a_bug(world: World) -> None:
    """Issue 13 §2: `test-notify bot` ended in "unexpected error: AttributeError … This is
    a bug" when chat.postMessage answered 200 text/plain."""
    world.slack.script_api(Reply(body=b"ok", content_type="text/plain"))
    data = world.config_data()
    data["notifiers"] = {
        "bot": {"type": "slack", "token": TOKEN, "channel": "#c", "api_url": world.slack.api_url}
    }
    data["rules"] = [{"name": "r", "type": "invoice_status", "notify": ["bot"]}]
    path = world.tmp / "bot.yaml"
    path.write_text(yaml.safe_dump(data))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "invoice_watch", "test-notify", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.decode() == "bot: sent\n"
    assert "counts as delivered" in err.decode() and "bug" not in err.decode()
    assert len(world.slack.received) == 1
