"""One HTTP POST to a receiver, and the parts of its answer every HTTP notifier reads the
same way: Slack (:mod:`.slack`), the generic webhook (:mod:`.webhook`), PagerDuty
(:mod:`.pagerduty`), Teams (:mod:`.msteams`) and Alertmanager (:mod:`.alertmanager`).

An attempt is one aiohttp POST (:meth:`Receiver.post`; :meth:`Receiver.deliver` posts
and raises what a receiver that answers by its status means):

- redirects are never followed (the message, and the headers that carry a secret,
  would go wherever the redirect points): :meth:`Receiver.redirect` says what it means.
  To another host, something is in the way (a captive portal, a proxy's login page):
  retried. On the same host, the address moved: permanent, the setting must change;
- the answer is read up to :data:`REPLY_MAX` bytes, decoded (a gzip bomb stops there;
  ``read()`` has no bound, LIBRARIES.md "aiohttp 3.14.5");
- ``trust_env`` is off (aiohttp would read ``~/.netrc`` and send its password), and the
  proxy is :func:`invoice_watch.proxy.proxy_for`'s (``notifiers.<name>.proxy``, else
  ``HTTPS_PROXY``/``HTTP_PROXY`` and ``NO_PROXY``, never for loopback);
- no answer at all (refused, reset, timed out, DNS, TLS, a proxy that refused) is a
  :class:`~invoice_watch.errors.RetryableNotifyError` naming the host, port, proxy and
  cause, and what to check (:meth:`Receiver.unreachable`), raised without its cause:
  aiohttp's messages may quote the request URL, which for a webhook is the secret.

:func:`classify_status` is the HTTP half of every receiver's retry-or-give-up table:
2xx sent; 408, 429 and 5xx retried (with the receiver's ``Retry-After``, RFC 9110,
through :func:`invoice_watch.retry.parse_retry_after`); any other status permanent.

:class:`HttpNotifier` is what the HTTP notifiers are built on: its name and its
:class:`Receiver`, made from what the notifier says it is (``kind``, ``label``,
``setting``).

Every text taken from an answer goes through :func:`invoice_watch.safe_text.server_text`
(the receiver's secrets removed, control characters escaped, bounded) before it is put in
an error, which is then logged and stored as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, ClassVar

import aiohttp
from aiohttp import hdrs
from yarl import URL

from invoice_watch import __version__
from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify.base import BaseNotifier
from invoice_watch.proxy import masked, proxy_for
from invoice_watch.retry import parse_retry_after
from invoice_watch.safe_text import server_text

REPLY_MAX = 1 << 20  # bytes of an answer read, decoded; receivers answer a few KB at most
_CHUNK = 64 * 1024
SNIPPET = 100  # characters of an answer quoted in a message
USER_AGENT = f"invoice-watch/{__version__}"

_SECRET_MIN = 6  # characters: shorter pieces of a URL are not its secret (redact.py)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Reply:
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
        """Whether the body is a page (HTML or XML): what a proxy, a captive portal or a
        load balancer answers in a receiver's place; no JSON API answers one."""
        return self.text.lstrip()[:1] == "<"

    @property
    def content_type(self) -> str:
        value = self.headers.get(hdrs.CONTENT_TYPE, "")
        return value.split(";")[0].strip().lower() or "no Content-Type"


async def read_body(response: aiohttp.ClientResponse) -> tuple[bytes, str | None]:
    """The body, decoded, up to :data:`REPLY_MAX` bytes, and why it is incomplete (None
    when read whole). The chunks are already decompressed, so a gzip bomb stops here. A
    body that breaks off or times out while read is returned as far as it came."""
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


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, None when it is not one (or not UTF-8)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def url_secrets(url: str) -> list[str]:
    """What of a secret URL (a webhook's, which holds its token) an answer may echo
    apart from the URL itself: its path and its query string, and each query value
    (Teams' ``sig=``), those long enough to be a secret (as :mod:`~invoice_watch.redact`
    counts)."""
    try:
        parts = URL(url)
        pieces = [url, parts.path, parts.query_string, *parts.query.values()]
    except (ValueError, TypeError):
        pieces = [url]
    return [piece for piece in dict.fromkeys(pieces) if len(piece) >= _SECRET_MIN]


def classify_status(status: int | None) -> type[NotifyError] | None:
    """What an HTTP status means for a receiver that answers by status alone: ``None``
    delivered (2xx), else the error to raise. ``status`` None: no answer came at all.
    408, 429 and 5xx can pass; any other status needs a change of settings."""
    if status is None or status in (408, 429) or status >= 500:
        return RetryableNotifyError
    if 200 <= status < 300:
        return None
    return PermanentNotifyError


class Receiver:
    """One receiver's address, for one notifier: posts to it and says, in the
    notifier's words, what went wrong.

    ``kind`` names the notifier type in messages (``slack notifier 'ops'``), ``label``
    the receiver (``Slack is unreachable``), ``setting`` the config key of the address,
    ``secrets`` the values no message may show beyond the registered ones (a webhook's
    URL and its path, which an answer may echo)."""

    def __init__(
        self,
        *,
        kind: str,
        label: str,
        name: str,
        url: str,
        setting: str,
        timeout: float,
        proxy: str | None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.label = label
        self.name = name
        self.url = url
        self.setting = setting
        self.timeout = timeout
        self.secrets = tuple(secrets)
        self.proxy: str | None = None
        self.proxy_problem: str | None = None
        try:
            self.proxy = proxy_for(url, proxy)
        except ValueError as exc:
            self.proxy_problem = f"{self.who}: {exc}; fix or unset it"

    @property
    def who(self) -> str:
        """How messages name the notifier: ``slack notifier 'ops'``."""
        return f"{self.kind} notifier {self.name!r}"

    @property
    def where(self) -> str:
        """The config key of the address: ``notifiers.ops.webhook_url``."""
        return f"notifiers.{self.name}.{self.setting}"

    @property
    def not_ours(self) -> str:
        return f"not {self.label}'s answer (a proxy or captive portal?)"

    async def post(self, data: str | bytes, headers: Mapping[str, str] | None = None) -> Reply:
        """One POST of ``data`` (JSON unless ``headers`` say otherwise); its answer, or
        :class:`RetryableNotifyError` when none came (:meth:`unreachable`)."""
        if self.proxy_problem is not None:
            raise PermanentNotifyError(self.proxy_problem)
        timeout = aiohttp.ClientTimeout(
            total=self.timeout, connect=min(10.0, self.timeout), sock_read=self.timeout
        )
        sent = {
            hdrs.CONTENT_TYPE: "application/json; charset=utf-8",
            hdrs.USER_AGENT: USER_AGENT,
            **(headers or {}),
        }
        error: str
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            try:
                async with session.post(
                    self.url,
                    data=data,
                    headers=sent,
                    allow_redirects=False,  # the message never follows a redirect
                    proxy=self.proxy,
                ) as response:
                    body, cut = await read_body(response)
                    return Reply(response.status, response.headers.copy(), body, cut)
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = self.unreachable(exc)
        # Raised outside the `except`, without its cause: aiohttp's messages may quote
        # the request URL, which for a webhook is the secret itself.
        raise RetryableNotifyError(error)

    async def deliver(
        self,
        data: str | bytes,
        headers: Mapping[str, str] | None = None,
        *,
        json_api: bool,
        hints: Mapping[int, str] | None = None,
    ) -> None:
        """One POST (:meth:`post`) of a receiver that answers by its status: returns
        when it was delivered, else raises what the answer means (:meth:`judge`)."""
        error = self.judge(await self.post(data, headers), json_api=json_api, hints=hints)
        if error is not None:
            raise error

    def quote(self, reply: Reply) -> str:
        """The answer's gist for a message: a page's title, else its first characters,
        made safe (:func:`server_text`)."""
        text = reply.text
        if reply.page and (title := _TITLE.search(text[:20_000])) is not None:
            text = title.group(1)
        quoted = server_text(text, SNIPPET, secrets=self.secrets)
        return f"'{quoted}'" if quoted else "an empty body"

    def retry_after(self, reply: Reply) -> float | None:
        """The seconds the answer's ``Retry-After`` asks to wait (RFC 9110), or None."""
        return parse_retry_after(reply.headers.get(hdrs.RETRY_AFTER), datetime.now(UTC))

    def refused(self, reply: Reply, head: str, hint: str = "") -> NotifyError:
        """The error for an answer that is not a success, by its status alone
        (:func:`classify_status`): ``head`` says what happened, ``hint`` what to do."""
        kind = classify_status(reply.status) or PermanentNotifyError
        message = f"{head}: {hint}" if hint else head
        if kind is RetryableNotifyError:
            return RetryableNotifyError(message, retry_after=self.retry_after(reply))
        return PermanentNotifyError(message)

    def proxy_wants_credentials(self) -> str:
        return (
            "the proxy wants credentials it was not given or refused them; check the "
            f"user and password in its URL (notifiers.{self.name}.proxy, or HTTPS_PROXY/"
            "HTTP_PROXY)"
        )

    def judge(
        self, reply: Reply, *, json_api: bool, hints: Mapping[int, str] | None = None
    ) -> NotifyError | None:
        """What an answer means for a receiver that answers by its status: None
        delivered, else the error to raise, saying what to check (``hints``: by status).

        A 2xx is delivered, but for a ``json_api`` (a service that never answers a page)
        a 2xx page is a proxy's or a captive portal's: the message did not get there, so
        it is retried. A redirect is never followed (:meth:`redirect`); 407 is the
        proxy's; any other status goes by :func:`classify_status`, the answer quoted."""
        status = reply.status
        if 300 <= status < 400:
            return self.redirect(reply)
        head = f"{self.who}: HTTP {status}"
        if status == 407:
            return self.refused(reply, head, self.proxy_wants_credentials())
        if reply.success:
            return self.page_in_the_way(reply, head) if json_api and reply.page else None
        head += f" {reply.content_type} ({self.quote(reply)})"
        if reply.page:
            head += f": {self.not_ours}"
        hint = (hints or {}).get(status, "")
        if not hint and status in (404, 410):
            hint = f"nothing takes messages at that address: check {self.where}"
        elif not hint and 400 <= status < 500 and status not in (408, 429):
            hint = f"{self.label} refused the message; check {self.where} and its settings"
        return self.refused(reply, head, hint)

    def page_in_the_way(self, reply: Reply, head: str) -> RetryableNotifyError:
        """The error for a 2xx page in place of the receiver's answer (``head``: what
        happened): a proxy's or a captive portal's, so the message did not get there
        and is retried."""
        return RetryableNotifyError(
            f"{head} {reply.content_type} ({self.quote(reply)}): {self.not_ours}; the "
            f"message did not reach {self.label}. Check {self.where} and the network's "
            f"proxy (notifiers.{self.name}.proxy, HTTPS_PROXY/HTTP_PROXY)"
        )

    def redirect(self, reply: Reply) -> NotifyError:
        """A redirect, never followed: to another host something is in the way (retried);
        on the same host the address moved (permanent)."""
        here = URL(self.url)
        try:
            target = here.join(URL(reply.headers.get(hdrs.LOCATION, "")))
        except ValueError:
            target = here
        where = "another address" if target.host is None else str(target.origin())
        where = server_text(where, 120, secrets=self.secrets)
        message = (
            f"{self.who}: HTTP {reply.status}: the answer is a redirect to {where}, which "
            "invoice-watch does not follow (the message would go there)"
        )
        if target.host is not None and target.host != here.host:
            return RetryableNotifyError(
                f"{message}: {self.not_ours}; check the network and {self.where}"
            )
        return PermanentNotifyError(f"{message}; the address moved: update {self.where}")

    def unreachable(self, exc: BaseException) -> str:
        """What went wrong when no answer came, and what to check: host and port (of the
        proxy when it is the one that failed), the proxy, the cause."""
        url = URL(self.url)
        host, port = url.host or "?", url.port
        proxy = masked(self.proxy) if self.proxy else None
        via = f", through the proxy {proxy}" if proxy else ""
        os_error = getattr(exc, "os_error", None)
        cause = server_text(
            getattr(os_error, "strerror", None) or os_error or type(exc).__name__,
            120,
            secrets=self.secrets,
        )
        name, where = self.name, self.where
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
                f"no answer within {self.timeout:g}s from {host}:{port}{via}: {self.label} "
                "or the network is slow, or a firewall drops the traffic"
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
        return f"{self.who}: {self.label} is unreachable: {detail}"


class HttpNotifier(BaseNotifier):
    """A notifier that posts to one receiver's ``url`` through its :class:`Receiver`
    (``self._receiver``). Subclasses name it: ``kind`` (the notifier type, in
    messages), ``label`` (the receiver), ``setting`` (the config key of ``url``); and
    say how a message goes (:meth:`BaseNotifier._send`). ``secrets``: what no message
    may show (:class:`Receiver`); None when the URL is the secret (a webhook's, which
    holds its token): it, and the parts of it an answer may echo (:func:`url_secrets`),
    and then the repr shows ``<secret>`` in its place."""

    kind: ClassVar[str]
    label: ClassVar[str]
    setting: ClassVar[str] = "url"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float,
        proxy: str | None,
        secrets: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self._secret_url = secrets is None
        if secrets is None:
            secrets = url_secrets(url)
        self._receiver = Receiver(
            kind=self.kind,
            label=self.label,
            name=name,
            url=url,
            setting=self.setting,
            timeout=timeout,
            proxy=proxy,
            secrets=secrets,
        )

    def __repr__(self) -> str:
        url = "<secret>" if self._secret_url else repr(self._receiver.url)
        return f"{type(self).__name__}(name={self.name!r}, {self.setting}={url})"
