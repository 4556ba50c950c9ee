"""Slack notifiers: an incoming webhook, or a bot token posting with ``chat.postMessage``.

Both send Block Kit blocks plus the fallback ``text`` from :mod:`.render`, one HTTP POST
per attempt, and turn every outcome into "delivered", :class:`RetryableNotifyError` or
:class:`PermanentNotifyError`. :func:`classify_slack_status` is the one place that
decides whether retrying can help when Slack itself answered.

Why not slack-sdk's clients (its Block Kit models build the blocks in :mod:`.render`):
they read an answer whole whatever its size (a gzip bomb decoding to 1 GiB took the
daemon to 3.2 GB), follow a redirect to any host with the message, fail inside on a
body Slack never sends (``AttributeError`` on a non-JSON 200 from ``chat.postMessage``,
``UnicodeDecodeError`` on a body that is not UTF-8), sleep and retry by themselves, and
read ``HTTPS_PROXY`` without ``NO_PROXY``. What they did for us is one JSON POST. So an
attempt is one aiohttp POST here: redirects never followed, the answer read up to
:data:`REPLY_MAX` bytes (decoded: a gzip bomb stops there), ``trust_env`` off (no
``~/.netrc``), the proxy from :func:`invoice_watch.proxy.proxy_for`.

What an answer means (:meth:`_SlackNotifier._judge`):

- Slack's own answer (a webhook's ``ok`` or error code; the Web API's JSON object with
  a boolean ``ok``): what Slack says, through :func:`classify_slack_status`.
- A page (HTML: a proxy's block page, a captive portal) with a 2xx status: not Slack's
  answer; the message did not reach Slack, so it is retried with backoff ("not Slack's
  answer (a proxy or captive portal?)"). With an error status, the status decides.
- A redirect is never followed (the message would go wherever it points). To another
  host, something is in the way (a captive portal, a proxy's login page): retried. On
  the same host, the address moved: permanent, the setting must change.
- Any other 2xx answer (a body that is not UTF-8 such as ``ok\\xff``, JSON cut short
  such as ``{``, ``ok`` as plain text from the Web API, an empty or oversized body, a
  body that broke off while read): delivered, with a warning. Something took the POST
  and said 2xx without being a page in the way, and Slack posts a message before it
  answers: this is Slack's answer damaged on the way, or a relay that took the message.
  Sending again would post it once more at every backoff until ``delivery.max_age``
  (the resend storm of issue 12); marking it failed would report an alert lost that
  most likely arrived. The warning names the answer, so the channel can be checked.

Every error names the notifier, what happened (host, port, the proxy, the cause) and
what to check. No message carries the webhook URL or the token, and any text taken from
an answer goes through :func:`invoice_watch.safe_text.server_text` (secrets removed,
control characters escaped, bounded), so it can be logged and stored as it is.

Every message fits Slack's limits by construction (:mod:`.render`). Should Slack refuse
one all the same for its size or its blocks (``msg_blocks_too_long``, ``invalid_blocks``,
``msg_too_long``: a limit Slack changed), nothing was posted, so ``send`` posts the same
message again as plain text, then as its briefest form: a size refusal is never the end
of an alert. These fallbacks are the only second POST of a ``send``; the outbox owns
retries and backoff (a 429's ``Retry-After`` comes back as ``retry_after``). A message
that went in a plainer form is logged once, as a WARNING naming Slack's refusal; one
refused in every form raises an error naming each refusal (the same words at every
attempt, which the outbox logs once), never a log line per attempt of its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NamedTuple
from urllib.parse import urljoin

import aiohttp
from aiohttp import hdrs
from yarl import URL

from invoice_watch import __version__
from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify import render
from invoice_watch.proxy import masked, proxy_for
from invoice_watch.retry import parse_retry_after
from invoice_watch.safe_text import server_text
from invoice_watch.types import AlertEvent, Part

logger = logging.getLogger(__name__)

REPLY_MAX = 1 << 20  # bytes of an answer read, decoded; Slack's are at most a few 100 KB
_CHUNK = 64 * 1024
_SNIPPET = 100  # characters of an answer quoted in a message

# Slack error codes worth retrying whatever the HTTP status says.
_RETRYABLE_ERRORS = frozenset(
    {"ratelimited", "rate_limited", "internal_error", "fatal_error", "service_unavailable",
     "request_timeout", "rollup_error"}
)  # fmt: skip

# How to fix the permanent errors people actually hit.
_HINTS = {
    "invalid_auth": "the token is not valid; check the notifier's token",
    "not_authed": "no token was sent; check the notifier's token",
    "token_revoked": "the token was revoked; install the app again and update the token",
    "token_expired": "the token expired; update the notifier's token",
    "account_inactive": "the token's user or app was deactivated; update the token",
    "missing_scope": "the app lacks the chat:write scope; add it and reinstall the app",
    "channel_not_found": "check the notifier's channel, and invite the app to it",
    "not_in_channel": "invite the app to the channel (/invite @app)",
    "is_archived": "the channel is archived; pick another channel",
    "no_service": "the webhook was removed or disabled; create a new one and update webhook_url",
    "invalid_token": "the webhook's token is not valid; create a new webhook",
    "action_prohibited": "a workspace admin restricted this webhook",
    "channel_is_archived": "the webhook's channel is archived; create a new webhook",
    "invalid_payload": "Slack rejected the message format (a bug: please report it)",
    "invalid_blocks": "Slack rejected the message blocks (a bug: please report it)",
    "msg_too_long": "Slack refused the message's length (a bug: please report it)",
}

# Slack's refusals of a message's blocks or size: nothing was posted, and the same
# message in a plainer, shorter form can get through (module docstring).
_REFUSED_FORM = frozenset(
    {"invalid_blocks", "invalid_blocks_format", "msg_blocks_too_long", "msg_too_long",
     "too_many_blocks", "invalid_attachments"}
)  # fmt: skip

# What a Slack error code looks like; anything else in its place is not one.
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_NOT_SLACK = "not Slack's answer (a proxy or captive portal?)"


def classify_slack_status(status: int | None, error_code: str | None) -> type[NotifyError] | None:
    """Decide what one Slack answer means: ``None`` delivered, else the error to raise.

    ``status`` is the HTTP status, ``None`` when no answer came at all (connection refused
    or reset, timeout); ``error_code`` is Slack's ``error`` (Web API) or the webhook's body.
    """
    if status is None or status in (408, 429) or status >= 500:
        return RetryableNotifyError
    if error_code in _RETRYABLE_ERRORS:
        return RetryableNotifyError
    if 200 <= status < 300 and error_code is None:
        return None
    return PermanentNotifyError


@dataclass(frozen=True)
class _Reply:
    """One answer: its status, headers, and body read up to :data:`REPLY_MAX` bytes
    (``cut``: why the body is incomplete, None when it was read whole)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    cut: str | None = None

    @property
    def success(self) -> bool:
        return 200 <= self.status < 300

    @cached_property
    def text(self) -> str:
        return self.body.decode("utf-8", "backslashreplace")

    @property
    def page(self) -> bool:
        """Whether the body is a page (HTML or XML), which Slack never answers here."""
        return self.text.lstrip()[:1] == "<"

    @property
    def content_type(self) -> str:
        value = self.headers.get(hdrs.CONTENT_TYPE, "")
        return value.split(";")[0].strip().lower() or "no Content-Type"


class _SlackSays(NamedTuple):
    """Slack's own answer: whether it says ok, its error code (None when it names
    none), and the text in place of a code when that is not one (quoted, safe)."""

    ok: bool
    code: str | None = None
    odd: str = ""


@dataclass(frozen=True)
class _Outcome:
    """What an answer means: delivered (``error`` None; ``doubt`` says why it counts as
    delivered when the answer was not Slack's plain success), or ``error`` to raise;
    ``code`` is Slack's error code when it named one."""

    error: NotifyError | None = None
    code: str | None = None
    doubt: str | None = None


async def _read(response: aiohttp.ClientResponse) -> tuple[bytes, str | None]:
    """The body, decoded, up to :data:`REPLY_MAX` bytes, and why it is incomplete (None
    when read whole). ``read()`` has no bound; the chunks are already decompressed, so a
    gzip bomb stops here (LIBRARIES.md, aiohttp). A body that breaks off or times out
    while read is returned as far as it came."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_chunked(_CHUNK):
            if size + len(chunk) > REPLY_MAX:
                chunks.append(chunk[: REPLY_MAX - size])
                response.close()
                return b"".join(chunks), f"longer than {REPLY_MAX // 1024} KiB, read that far"
            chunks.append(chunk)
            size += len(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return b"".join(chunks), f"it broke off while read ({type(exc).__name__})"
    return b"".join(chunks), None


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, None when it is not one (or not UTF-8)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


_FORM_NAMES = ("as blocks", "as plain text", "in its briefest form")  # of _forms, in order


def _forms(events: Sequence[AlertEvent], part: Part | None) -> list[dict[str, Any]]:
    """The message in the forms ``send`` tries, in order: Block Kit with its fallback
    text; plain text; the briefest text (:func:`render.brief_text`). The ``text`` is
    mrkdwn-escaped (:func:`render.slack_text`): Slack shows it alone when it refuses
    the blocks, and it may carry a server's text."""
    text = render.slack_text(events, part)
    return [
        {"text": text, "blocks": render.slack_blocks(events, part)},
        {"text": text},
        {"text": render.slack_brief_text(events, part)},
    ]


class _SlackNotifier:
    """One POST per attempt to ``url`` and what its answer means (module docstring).
    Subclasses say what the body is and how Slack's own answer reads."""

    setting = "webhook_url"  # the config key of the address, for messages

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float,
        proxy: str | None,
        secrets: Sequence[str],
    ) -> None:
        self.name = name
        self._url = url
        self._timeout = timeout
        self._secrets = tuple(secrets)
        self._proxy: str | None = None
        self._proxy_problem: str | None = None
        try:
            self._proxy = proxy_for(url, proxy)
        except ValueError as exc:
            self._proxy_problem = f"slack notifier {name!r}: {exc}; fix or unset it"

    # -- what subclasses say ------------------------------------------------------------

    def _payload(self, form: dict[str, Any]) -> dict[str, Any]:
        return form

    def _headers(self) -> dict[str, str]:
        return {}

    def _slack_says(self, reply: _Reply) -> _SlackSays | None:
        """What ``reply`` says if it is Slack's own answer, else None."""
        raise NotImplementedError

    # -- sending ------------------------------------------------------------------------

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None:
        """Post the message (one destination: ``recipients`` does not apply)."""
        if not events:
            return
        if self._proxy_problem is not None:
            raise PermanentNotifyError(self._proxy_problem)
        refusals: list[str] = []  # "as blocks (invalid_blocks)", ...: Slack's, per form
        for form, how in zip(_forms(events, part), _FORM_NAMES, strict=True):
            outcome = self._judge(await self._post(self._payload(form)))
            if outcome.code not in _REFUSED_FORM:
                break
            refusals.append(f"{how} ({outcome.code})")
            logger.debug("slack notifier %r: Slack refused the message %s", self.name, refusals[-1])
        else:
            # Even the briefest form: never the end of an alert.
            raise RetryableNotifyError(
                f"{outcome.error}; Slack refused it in every form: {', '.join(refusals)}; "
                "it is kept and sent again"
            )
        if outcome.error is not None:
            raise outcome.error
        if refusals:
            logger.warning(
                "slack notifier %r: Slack refused the message %s: it was sent %s instead",
                self.name,
                ", ".join(refusals),
                _FORM_NAMES[len(refusals)],
            )
        if outcome.doubt is not None:
            logger.warning(
                "slack notifier %r: %s; the message counts as delivered (Slack posts a "
                "message before it answers, and sending it again would post it twice): "
                "check the channel",
                self.name,
                outcome.doubt,
            )
        logger.debug("slack notifier %r: sent %d event(s)", self.name, len(events))

    async def _post(self, payload: dict[str, Any]) -> _Reply:
        """One POST; its answer, or :class:`RetryableNotifyError` when none came."""
        timeout = aiohttp.ClientTimeout(
            total=self._timeout, connect=min(10.0, self._timeout), sock_read=self._timeout
        )
        headers = {
            hdrs.CONTENT_TYPE: "application/json; charset=utf-8",
            hdrs.USER_AGENT: f"invoice-watch/{__version__}",
            **self._headers(),
        }
        # ASCII JSON: any character reaches Slack as an escape, none can fail to encode.
        data = json.dumps(payload, separators=(",", ":"))
        error: str
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            try:
                async with session.post(
                    self._url,
                    data=data,
                    headers=headers,
                    allow_redirects=False,  # the message never follows a redirect
                    proxy=self._proxy,
                ) as response:
                    body, cut = await _read(response)
                    return _Reply(response.status, response.headers.copy(), body, cut)
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = self._unreachable(exc)
        # Raised outside the `except`, without its cause: aiohttp's messages may quote
        # the request URL, which for a webhook is the secret itself.
        raise RetryableNotifyError(error)

    # -- what an answer means -----------------------------------------------------------

    def _where(self) -> str:
        return f"notifiers.{self.name}.{self.setting}"

    def _quote(self, reply: _Reply) -> str:
        """The answer's gist for a message: a page's title, else its first characters."""
        text = reply.text
        if reply.page and (title := _TITLE.search(text[:20_000])) is not None:
            text = title.group(1)
        quoted = server_text(text, _SNIPPET, secrets=self._secrets)
        return f"'{quoted}'" if quoted else "an empty body"

    def _judge(self, reply: _Reply) -> _Outcome:
        """What ``reply`` means (module docstring)."""
        name, status = self.name, reply.status
        says = self._slack_says(reply)
        if says is not None and says.ok and reply.success:
            return _Outcome()
        if 300 <= status < 400:
            return _Outcome(self._redirect(reply))
        head = f"slack notifier {name!r}: HTTP {status}"
        if says is not None:
            if says.odd:
                head += f": Slack answered an error code it does not use: {says.odd}"
            elif says.code is None and not says.ok:
                head += ": Slack refused the message without naming an error"
            return _Outcome(self._refused(reply, head, says.code), says.code)
        if status == 407:
            head += (
                ": the proxy wants credentials it was not given or refused them; check the "
                f"user and password in its URL (notifiers.{name}.proxy, or HTTPS_PROXY/"
                "HTTP_PROXY)"
            )
            return _Outcome(self._refused(reply, head, None))
        if not reply.success:
            if reply.page:
                head += f" {reply.content_type} ({self._quote(reply)}): {_NOT_SLACK}"
            return _Outcome(self._refused(reply, head, None))
        if reply.page:
            message = (
                f"{head} {reply.content_type} ({self._quote(reply)}): {_NOT_SLACK}; the "
                f"message did not reach Slack. Check {self._where()} and the network's "
                f"proxy (notifiers.{name}.proxy, HTTPS_PROXY/HTTP_PROXY)"
            )
            return _Outcome(RetryableNotifyError(message))
        what = reply.cut or f"{reply.content_type}, {len(reply.body)} bytes"
        doubt = f"HTTP {status} with an answer that is not Slack's ({what}: {self._quote(reply)})"
        return _Outcome(doubt=doubt)

    def _refused(self, reply: _Reply, head: str, code: str | None) -> NotifyError:
        """The error for an answer that is not a success: retry or not by its status and
        Slack's code (:func:`classify_slack_status`), with the hint for that code."""
        kind = classify_slack_status(reply.status, code)
        if kind is None:  # a success status naming no error: not Slack's success either
            kind = PermanentNotifyError
        message = head + (f" {code}" if code else "")
        if hint := _HINTS.get(code or ""):
            message += f": {hint}"
        if kind is RetryableNotifyError:
            retry_after = parse_retry_after(reply.headers.get(hdrs.RETRY_AFTER), datetime.now(UTC))
            return RetryableNotifyError(message, retry_after=retry_after)
        return PermanentNotifyError(message)

    def _redirect(self, reply: _Reply) -> NotifyError:
        """A redirect, never followed: to another host something is in the way (retried);
        on the same host the address moved (permanent)."""
        here = URL(self._url)
        try:
            target = here.join(URL(reply.headers.get(hdrs.LOCATION, "")))
        except ValueError:
            target = here
        where = "another address" if target.host is None else str(target.origin())
        where = server_text(where, 120, secrets=self._secrets)
        message = (
            f"slack notifier {self.name!r}: HTTP {reply.status}: the answer is a redirect to "
            f"{where}, which invoice-watch does not follow (the message would go there)"
        )
        if target.host is not None and target.host != here.host:
            return RetryableNotifyError(
                f"{message}: {_NOT_SLACK}; check the network and {self._where()}"
            )
        return PermanentNotifyError(f"{message}; the address moved: update {self._where()}")

    def _unreachable(self, exc: BaseException) -> str:
        """What went wrong when no answer came, and what to check: host and port (of the
        proxy when it is the one that failed), the proxy, the cause."""
        url = URL(self._url)
        host, port = url.host or "?", url.port
        proxy = masked(self._proxy) if self._proxy else None
        via = f", through the proxy {proxy}" if proxy else ""
        os_error = getattr(exc, "os_error", None)
        cause = server_text(
            getattr(os_error, "strerror", None) or os_error or type(exc).__name__,
            120,
            secrets=self._secrets,
        )
        name, where = self.name, self._where()
        proxies = f"notifiers.{name}.proxy, or HTTPS_PROXY/HTTP_PROXY and NO_PROXY"
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            if exc.status == 407:
                detail = (
                    f"the proxy {proxy} wants credentials it was not given or refused them "
                    f"(HTTP 407); check the user and password in its URL ({proxies})"
                )
            else:
                detail = (
                    f"the proxy {proxy} refused to connect to {host}:{port} (HTTP "
                    f"{exc.status}); check {proxies}"
                )
        elif isinstance(exc, aiohttp.ClientProxyConnectionError):
            detail = f"cannot connect to the proxy {proxy} ({cause}); check {proxies}"
        elif isinstance(exc, aiohttp.ClientConnectorDNSError):
            detail = (
                f"the host name {exc.host} does not resolve ({cause}); check {where} and "
                "this machine's DNS"
            )
        elif isinstance(exc, aiohttp.ClientSSLError):
            detail = (
                f"TLS with {host}:{port}{via} failed ({cause}); behind a TLS-inspecting "
                "proxy, add its CA to the system's trust store (or SSL_CERT_FILE); a proxy "
                "URL written https:// for a plain-HTTP proxy must say http://"
            )
        elif isinstance(exc, TimeoutError):
            detail = (
                f"no answer within {self._timeout:g}s from {host}:{port}{via}: Slack or the "
                "network is slow, or a firewall drops the traffic"
            )
        elif isinstance(exc, aiohttp.ClientConnectorError):
            if isinstance(os_error, ConnectionRefusedError):
                detail = (
                    f"cannot connect to {host}:{port}{via}: connection refused (nothing "
                    f"listens there); check {where}"
                )
            else:
                detail = (
                    f"cannot connect to {host}:{port}{via} ({cause}); check the network "
                    "route and firewalls"
                )
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            detail = f"{host}:{port}{via} closed the connection without answering"
        elif isinstance(exc, aiohttp.ClientResponseError):
            detail = f"the answer from {host}:{port}{via} is not valid HTTP ({type(exc).__name__})"
        else:
            detail = f"the connection to {host}:{port}{via} broke off ({cause})"
        return f"slack notifier {name!r}: Slack unreachable: {detail}"


class SlackWebhookNotifier(_SlackNotifier):
    """Posts to a Slack incoming webhook (``notifiers.<name>.webhook_url``)."""

    def __init__(
        self, name: str, webhook_url: str, *, timeout: float = 10, proxy: str | None = None
    ) -> None:
        # The URL is the secret; its path alone is too (an answer may echo it).
        path = URL(webhook_url).path
        secrets = [webhook_url] + ([path] if len(path) > 1 else [])
        super().__init__(name, webhook_url, timeout=timeout, proxy=proxy, secrets=secrets)

    def __repr__(self) -> str:
        return f"SlackWebhookNotifier(name={self.name!r}, webhook_url=<secret>)"

    def _slack_says(self, reply: _Reply) -> _SlackSays | None:
        """A webhook answers ``ok``, or an error code such as ``no_service``, as text."""
        if reply.cut is not None:
            return None
        text = reply.text.strip()
        if text == "ok":
            return _SlackSays(ok=True)
        if _ERROR_CODE.fullmatch(text):
            return _SlackSays(ok=False, code=text)
        return None

    async def aclose(self) -> None:
        """Nothing to close: each attempt opens and closes its own connection."""


class SlackBotNotifier(_SlackNotifier):
    """Posts with a bot token through the Web API's ``chat.postMessage``."""

    setting = "api_url"

    def __init__(
        self,
        name: str,
        token: str,
        channel: str,
        api_url: str,
        *,
        timeout: float = 10,
        proxy: str | None = None,
    ) -> None:
        base = api_url if api_url.endswith("/") else api_url + "/"
        self._token = token
        self.channel = channel
        super().__init__(
            name,
            urljoin(base, "chat.postMessage"),
            timeout=timeout,
            proxy=proxy,
            secrets=[token],
        )

    def __repr__(self) -> str:
        return f"SlackBotNotifier(name={self.name!r}, channel={self.channel!r}, token=<secret>)"

    def _payload(self, form: dict[str, Any]) -> dict[str, Any]:
        return {"channel": self.channel, **form}

    def _headers(self) -> dict[str, str]:
        return {hdrs.AUTHORIZATION: f"Bearer {self._token}"}

    def _slack_says(self, reply: _Reply) -> _SlackSays | None:
        """The Web API answers a JSON object with a boolean ``ok`` and, when false, an
        ``error`` code (https://docs.slack.dev/apis/web-api/#responses)."""
        data = _json_object(reply.body) if reply.cut is None else None
        if data is None or not isinstance(data.get("ok"), bool):
            return None
        ok: bool = data["ok"]
        error = data.get("error")
        if isinstance(error, str) and _ERROR_CODE.fullmatch(error):
            return _SlackSays(ok, error)
        odd = "" if error is None else server_text(error, _SNIPPET, secrets=self._secrets)
        return _SlackSays(ok, None, f"'{odd}'" if odd else "")

    async def aclose(self) -> None:
        """Nothing to close: each attempt opens and closes its own connection."""
