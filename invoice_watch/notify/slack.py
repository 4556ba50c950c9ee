"""Slack notifiers: an incoming webhook, or a bot token posting with ``chat.postMessage``.

Both send Block Kit blocks plus the plain-text fallback from :mod:`.render`, and turn
every failure into :class:`RetryableNotifyError` or :class:`PermanentNotifyError` through
:func:`classify_slack_status`, the one place that decides whether retrying can help.

One ``send`` is exactly one HTTP attempt. slack-sdk can retry by itself (its default
handlers retry connection errors, and optional ones sleep on 429 for ``Retry-After``),
but that would sleep inside ``send``, hidden from the outbox, which owns retries and
backoff across all notifiers and restarts (and caps it at ``delivery.max_backoff``). So
the clients get ``retry_handlers=[]`` and a 429 comes back as
``RetryableNotifyError(retry_after=...)`` for the outbox to schedule.

Proxies: each client is given the proxy :func:`invoice_watch.proxy.proxy_for` names
(the notifier's ``proxy``, else ``HTTPS_PROXY``/``HTTP_PROXY`` and ``NO_PROXY``), or none;
slack-sdk's own lookup reads ``HTTPS_PROXY`` but ignores ``NO_PROXY``, and logs the
proxy URL (with its password) at debug level, so it gets a logger that never does.

Every message fits Slack's limits by construction (:mod:`.render`). Should Slack refuse
one all the same for its size or its blocks (``msg_blocks_too_long``, ``invalid_blocks``,
``msg_too_long``: a limit Slack changed), nothing was posted, so ``send`` posts the same
message again as plain text, then as its briefest form: a size refusal is never the end
of an alert. These fallbacks are the only second POST of a ``send``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient
from slack_sdk.webhook.webhook_response import WebhookResponse

from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify import render
from invoice_watch.proxy import proxy_for
from invoice_watch.retry import parse_retry_after
from invoice_watch.types import AlertEvent, Part

logger = logging.getLogger(__name__)

# slack-sdk's webhook client logs the full webhook URL (a secret) at debug level whenever
# its logger's own level is NOTSET or DEBUG. It gets this logger, which never is.
_sdk_logger = logging.getLogger(f"{__name__}.sdk")
_sdk_logger.setLevel(logging.INFO)

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

_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


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


def _error(
    name: str,
    status: int | None,
    error_code: str | None,
    headers: Mapping[str, str] | None = None,
    reason: str = "",
) -> NotifyError | None:
    """The exception for one attempt's outcome, ``None`` if delivered. ``reason`` names
    what went wrong when no answer came. Messages never carry the URL or the token."""
    kind = classify_slack_status(status, error_code)
    if kind is None:
        return None
    if status is None:
        message = f"slack notifier {name!r}: Slack unreachable ({reason})"
    else:
        message = f"slack notifier {name!r}: HTTP {status}"
        if error_code:
            message += f" {error_code}"
        if hint := _HINTS.get(error_code or ""):
            message += f": {hint}"
    if kind is RetryableNotifyError:
        retry_after = parse_retry_after((headers or {}).get("Retry-After"), datetime.now(UTC))
        return RetryableNotifyError(message, retry_after=retry_after)
    return kind(message)


def _webhook_error_code(response: WebhookResponse) -> str | None:
    """A webhook answers ``ok``, or an error code such as ``no_service`` as plain text."""
    body = response.body.strip()
    if body == "ok":  # an error status's body "ok" names no error
        return None
    if _ERROR_CODE.fullmatch(body):
        return body
    return "unexpected_response" if response.status_code == 200 else None


def _seconds(timeout: float) -> int:
    # slack-sdk takes whole seconds.
    return max(1, math.ceil(timeout))


def _proxy(name: str, url: str, configured: str | None) -> tuple[str | None, str | None]:
    """The proxy for ``url`` (None: directly), or the problem with the environment's."""
    try:
        return proxy_for(url, configured), None
    except ValueError as exc:
        return None, f"slack notifier {name!r}: {exc}; fix or unset it"


def _forms(events: Sequence[AlertEvent], part: Part | None) -> list[dict[str, Any]]:
    """The message in the forms ``send`` tries, in order: Block Kit with its fallback
    text; plain text; the briefest text (:func:`render.brief_text`)."""
    limit = render.SLACK_LIMITS.text
    text = render.text(events, part)[:limit]
    return [
        {"text": text, "blocks": render.slack_blocks(events, part)},
        {"text": text},
        {"text": render.brief_text(events, part)[:limit]},
    ]


def _log_fallback(name: str, code: str | None, forms_left: int) -> None:
    how = "as plain text" if forms_left == 2 else "in its briefest form"
    logger.warning(
        "slack notifier %r: Slack refused the message (%s); sending it %s", name, code, how
    )


class SlackWebhookNotifier:
    """Posts to a Slack incoming webhook (``notifiers.<name>.webhook_url``)."""

    def __init__(
        self, name: str, webhook_url: str, *, timeout: float = 10, proxy: str | None = None
    ) -> None:
        self.name = name
        resolved, self._proxy_problem = _proxy(name, webhook_url, proxy)
        # retry_handlers=[]: one send is one attempt, the outbox retries (module docstring).
        self._client = AsyncWebhookClient(
            webhook_url,
            timeout=_seconds(timeout),
            logger=_sdk_logger,
            retry_handlers=[],
            proxy=resolved,
        )
        self._client.proxy = resolved  # None too: its own lookup ignores NO_PROXY

    def __repr__(self) -> str:
        return f"SlackWebhookNotifier(name={self.name!r}, webhook_url=<secret>)"

    async def send(self, events: Sequence[AlertEvent], *, part: Part | None = None) -> None:
        if not events:
            return
        if self._proxy_problem is not None:
            raise PermanentNotifyError(self._proxy_problem)
        forms = _forms(events, part)
        while True:
            form = forms.pop(0)
            try:
                response = await self._client.send(**form)
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = _error(self.name, None, None, reason=type(exc).__name__)
                break
            code = _webhook_error_code(response)
            if code in _REFUSED_FORM and forms:
                _log_fallback(self.name, code, len(forms))
                continue
            error = _error(self.name, response.status_code, code, response.headers)
            if code in _REFUSED_FORM:  # even the briefest form: never the end of an alert
                error = RetryableNotifyError(str(error))
            break
        if error is not None:
            # Raised outside the `except` and without `from`: aiohttp's messages may quote
            # the request URL, which for a webhook is the secret itself, and a logged
            # traceback would show the cause.
            raise error
        logger.debug("slack notifier %r: sent %d event(s) by webhook", self.name, len(events))

    async def aclose(self) -> None:
        """Nothing to close: slack-sdk opens and closes a session per request."""


class SlackBotNotifier:
    """Posts with a bot token through the Web API's ``chat.postMessage``."""

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
        self.name = name
        self.channel = channel
        resolved, self._proxy_problem = _proxy(name, api_url, proxy)
        # retry_handlers=[]: one send is one attempt, the outbox retries (module docstring).
        self._client = AsyncWebClient(
            token=token,
            base_url=api_url,
            timeout=_seconds(timeout),
            retry_handlers=[],
            proxy=resolved,
            logger=_sdk_logger,
        )
        self._client.proxy = resolved  # None too: its own lookup ignores NO_PROXY

    def __repr__(self) -> str:
        return f"SlackBotNotifier(name={self.name!r}, channel={self.channel!r}, token=<secret>)"

    async def send(self, events: Sequence[AlertEvent], *, part: Part | None = None) -> None:
        if not events:
            return
        if self._proxy_problem is not None:
            raise PermanentNotifyError(self._proxy_problem)
        forms = _forms(events, part)
        while True:
            form = forms.pop(0)
            cause: Exception | None = None
            try:
                await self._client.chat_postMessage(channel=self.channel, **form)
            except SlackApiError as exc:
                cause = exc
                response = exc.response
                data = response.data if isinstance(response.data, dict) else {}
                code = data.get("error") if isinstance(data.get("error"), str) else None
                if code is None and response.status_code == 200:
                    code = "unexpected_response"
                if code in _REFUSED_FORM and forms:
                    _log_fallback(self.name, code, len(forms))
                    continue
                error = _error(self.name, response.status_code, code, response.headers)
                if code in _REFUSED_FORM and error is not None:
                    error = RetryableNotifyError(str(error))
            except (aiohttp.ClientError, TimeoutError) as exc:
                cause = exc
                error = _error(self.name, None, None, reason=type(exc).__name__)
            else:
                error = None
            break
        if error is not None:
            raise error from cause
        logger.debug(
            "slack notifier %r: sent %d event(s) to %s", self.name, len(events), self.channel
        )

    async def aclose(self) -> None:
        """Nothing to close: slack-sdk opens and closes a session per request."""
