"""A fake Slack: a real aiohttp server on 127.0.0.1 (port 0) with an incoming-webhook
route and the Web API's ``chat.postMessage``, recording every request it receives.

    async with FakeSlack() as slack:
        notifier = SlackWebhookNotifier("ops", slack.webhook_url)
        slack.script_webhook(Reply(500), Reply(429, headers={"Retry-After": "3"}))
        ...
        assert slack.received[-1].body["text"]

Answers are scripted per route (first in, first out); when the script is empty the
route answers like Slack on success. A scripted ``Reply`` may also answer what Slack
never does (``raw`` HTML, any ``body`` bytes with any headers: a gzip bomb, ``ok\xff``),
for the tests of what the notifiers make of an answer. ``chat.postMessage`` checks the
bearer token like Slack does (``not_authed`` / ``invalid_auth``, HTTP 200), and both
routes refuse a message that breaks Slack's documented limits as Slack does
(:func:`slack_problem`: ``invalid_blocks``, ``msg_blocks_too_long``, ``msg_too_long``),
counted in UTF-16 code units as Slack may count them (an emoji counts twice), so that
every test that sends through this fake also proves its messages fit.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from tests.loopback import LoopbackServer

Route = Literal[
    "webhook",
    "chat.postMessage",
    "files.getUploadURLExternal",
    "upload",
    "files.completeUploadExternal",
    "conversations.list",
]

WEBHOOK_PATH = "/services/T000/B000/XXXX"
TOKEN = "xoxb-0000-fake-token"


@dataclass(frozen=True)
class Reply:
    """One scripted answer: HTTP status, Slack error code, extra headers.

    For the webhook, ``error`` is the plain-text body (``ok`` when None). For the Web
    API, the body is ``{"ok": false, "error": error}``; ``raw`` replaces either body with
    an HTML page (what a proxy or load balancer in front of Slack answers), ``body``
    with these bytes as they are, sent with ``content_type`` and ``headers`` (a
    ``Content-Encoding`` among them is not applied: ``body`` is already encoded).
    """

    status: int = 200
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: str | None = None
    body: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Received:
    route: Route
    headers: dict[str, str]
    body: dict[str, Any]


# Slack's documented limits (docs.slack.dev: reference/block-kit/blocks, the blocks'
# pages, reference/methods/chat.postMessage). BLOCK_TEXT_MAX: all the text of a message's
# blocks together; Slack refuses about 13,000 characters (msg_blocks_too_long, as Slack
# users report); the fake refuses above 12,000, the budget the renderer keeps to.
TEXT_MAX = 40_000
BLOCKS_MAX = 50
HEADER_MAX = 150
SECTION_MAX = 3000
FIELDS_MAX = 10
FIELD_MAX = 2000
CONTEXT_ELEMENTS_MAX = 10
ACTIONS_ELEMENTS_MAX = 25
BUTTON_TEXT_MAX = 75
URL_MAX = 3000
BLOCK_TEXT_MAX = 12_000


def units(text: str) -> int:
    """``text``'s length in UTF-16 code units (JavaScript's ``length``): how Slack may
    count its limits, never less than the characters."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def block_text(blocks: list[dict[str, Any]]) -> int:
    """Code units of every text object in ``blocks`` (what msg_blocks_too_long counts)."""
    total = 0

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, dict):
            if value.get("type") in ("plain_text", "mrkdwn") and isinstance(value.get("text"), str):
                total += units(value["text"])
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(blocks)
    return total


def _block_problem(block: dict[str, Any]) -> bool:
    """Whether one block breaks its type's limits (or is not a block we know)."""
    kind = block.get("type")
    text = (block.get("text") or {}).get("text")
    if kind == "header":
        return not isinstance(text, str) or not 0 < units(text) <= HEADER_MAX
    if kind == "section":
        fields = block.get("fields") or []
        if text is None and not fields:
            return True
        if text is not None and not 0 < units(text) <= SECTION_MAX:
            return True
        return len(fields) > FIELDS_MAX or any(
            not 0 < units(f.get("text", "")) <= FIELD_MAX for f in fields
        )
    if kind == "context":
        elements = block.get("elements") or []
        return not 0 < len(elements) <= CONTEXT_ELEMENTS_MAX or any(
            units(e.get("text", "")) > SECTION_MAX for e in elements
        )
    if kind == "actions":
        elements = block.get("elements") or []
        return not 0 < len(elements) <= ACTIONS_ELEMENTS_MAX or any(
            units(e.get("text", {}).get("text", "")) > BUTTON_TEXT_MAX
            or units(e.get("url", "")) > URL_MAX
            for e in elements
        )
    return kind != "divider"


def slack_problem(body: dict[str, Any]) -> str | None:
    """The error Slack answers to this message body, or None when it fits."""
    blocks = body.get("blocks") or []
    text = body.get("text") or ""
    if not text and not blocks:
        return "no_text"
    if units(text) > TEXT_MAX:
        return "msg_too_long"
    if not isinstance(blocks, list) or len(blocks) > BLOCKS_MAX:
        return "invalid_blocks"
    if any(not isinstance(b, dict) or _block_problem(b) for b in blocks):
        return "invalid_blocks"
    if block_text(blocks) > BLOCK_TEXT_MAX:
        return "msg_blocks_too_long"
    return None


def _as_is(reply: Reply) -> web.Response | None:
    """The answer of a reply that is not Slack's own (``raw`` or ``body``), else None."""
    if reply.raw is not None:
        return web.Response(
            status=reply.status, text=reply.raw, content_type="text/html", headers=reply.headers
        )
    if reply.body is not None:
        headers = {"Content-Type": reply.content_type, **reply.headers}
        return web.Response(status=reply.status, body=reply.body, headers=headers)
    return None


class FakeSlack(LoopbackServer):
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.received: list[Received] = []  # every request, answered or refused
        self.accepted: list[dict[str, Any]] = []  # bodies of the messages Slack took
        self._scripts: dict[Route, deque[Reply]] = {
            "webhook": deque(),
            "chat.postMessage": deque(),
        }
        app = web.Application()
        app.router.add_post(WEBHOOK_PATH, self._webhook)
        app.router.add_post("/api/chat.postMessage", self._post_message)
        # files_upload_v2 (slack-sdk): getUploadURLExternal, the upload URL, complete.
        app.router.add_post("/api/files.getUploadURLExternal", self._upload_url)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_post("/api/files.completeUploadExternal", self._complete_upload)
        # Finding a channel's id by its name (the upload takes an id).
        app.router.add_get("/api/conversations.list", self._conversations)
        self.channels = {"finops": "C0000000000"}  # name -> id of the channels the app sees
        self.uploads: dict[str, bytes] = {}  # file id -> bytes uploaded
        self.files: list[dict[str, Any]] = []  # completed uploads: id, title, channel_id, bytes
        self.upload_replies: deque[int] = deque()  # scripted statuses of the upload URL
        super().__init__(app)

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def webhook_url(self) -> str:
        return self.base_url + WEBHOOK_PATH

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/"

    def script_webhook(self, *replies: Reply) -> None:
        self._scripts["webhook"].extend(replies)

    def script_api(self, *replies: Reply) -> None:
        self._scripts["chat.postMessage"].extend(replies)

    def clear_scripts(self) -> None:
        """Forget the scripted replies still queued: Slack is healthy again."""
        for script in self._scripts.values():
            script.clear()

    def _next(self, route: Route) -> Reply | None:
        script = self._scripts[route]
        return script.popleft() if script else None

    async def _record(self, route: Route, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(await request.text())
        self.received.append(Received(route, dict(request.headers), body))
        return body

    async def _webhook(self, request: web.Request) -> web.Response:
        body = await self._record("webhook", request)
        reply = self._next("webhook")
        if reply is None:
            problem = slack_problem(body)
            reply = Reply(400, problem) if problem else Reply()
        if reply.status == 200 and reply.raw is None and reply.body is None and reply.error is None:
            self.accepted.append(body)
        if (answer := _as_is(reply)) is not None:
            return answer
        return web.Response(status=reply.status, text=reply.error or "ok", headers=reply.headers)

    async def _post_message(self, request: web.Request) -> web.Response:
        body = await self._record("chat.postMessage", request)
        reply = self._next("chat.postMessage")
        if reply is None:
            auth = request.headers.get("Authorization")
            if auth is None:
                reply = Reply(error="not_authed")
            elif auth != f"Bearer {self.token}":
                reply = Reply(error="invalid_auth")
            elif not body.get("channel"):
                reply = Reply(error="channel_not_found")
            else:
                problem = slack_problem(body)
                reply = Reply(error=problem) if problem else Reply()
        if (as_is := _as_is(reply)) is not None:
            return as_is
        if reply.error is not None:
            answer: dict[str, Any] = {"ok": False, "error": reply.error}
        else:
            if reply.status == 200:
                self.accepted.append(body)
            answer = {"ok": True, "channel": "C0000000000", "ts": "1700000000.000100"}
        return web.json_response(answer, status=reply.status, headers=reply.headers)

    # -- files_upload_v2 -------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _upload_url(self, request: web.Request) -> web.Response:
        """``files.getUploadURLExternal``: ``filename`` and ``length`` in the query."""
        self.received.append(Received("files.getUploadURLExternal", dict(request.headers),
                                      dict(request.query)))  # fmt: skip
        if not self._authorized(request):
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if not request.query.get("filename") or not request.query.get("length", "").isdigit():
            return web.json_response({"ok": False, "error": "invalid_arguments"})
        file_id = f"F{len(self.uploads) + 1:010d}"
        self.uploads[file_id] = b""
        url = f"{self.base_url}/upload/{file_id}?length={request.query['length']}"
        return web.json_response({"ok": True, "file_id": file_id, "upload_url": url})

    async def _upload(self, request: web.Request) -> web.Response:
        """The upload URL: the raw bytes, no Authorization."""
        data = await request.read()
        self.received.append(Received("upload", dict(request.headers), {"length": len(data)}))
        status = self.upload_replies.popleft() if self.upload_replies else 200
        if status != 200:
            return web.Response(status=status, text="upload failed")
        file_id = request.match_info["file_id"]
        if file_id not in self.uploads or "Authorization" in request.headers:
            return web.Response(status=400, text="bad upload")
        if str(len(data)) != request.query.get("length"):
            return web.Response(status=400, text="length differs")
        self.uploads[file_id] = data
        return web.Response(text="OK - " + str(len(data)))

    async def _conversations(self, request: web.Request) -> web.Response:
        """``conversations.list``: one page of every channel (no cursor)."""
        query = dict(request.query)
        self.received.append(Received("conversations.list", dict(request.headers), query))
        if not self._authorized(request):
            return web.json_response({"ok": False, "error": "invalid_auth"})
        channels = [{"id": i, "name": n} for n, i in self.channels.items()]
        return web.json_response(
            {"ok": True, "channels": channels, "response_metadata": {"next_cursor": ""}}
        )

    async def _complete_upload(self, request: web.Request) -> web.Response:
        """``files.completeUploadExternal``: ``files`` (JSON), ``channel_id``, ... in
        the query."""
        query = dict(request.query)
        self.received.append(Received("files.completeUploadExternal", dict(request.headers), query))
        if not self._authorized(request):
            return web.json_response({"ok": False, "error": "invalid_auth"})
        files = json.loads(query.get("files", "[]"))
        channel = query.get("channel_id", "")
        if not channel.startswith("C"):  # an id, not a name
            return web.json_response({"ok": False, "error": "invalid_channel"})
        done = []
        for item in files:
            data = self.uploads.get(item.get("id", ""))
            if not data:
                return web.json_response({"ok": False, "error": "file_not_found"})
            self.files.append({**item, "channel_id": channel, "bytes": data})
            done.append({"id": item["id"], "title": item.get("title")})
        return web.json_response({"ok": True, "files": done})
