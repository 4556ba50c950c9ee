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
attempt is one aiohttp POST through :class:`invoice_watch.notify.http.Receiver`, as for
every HTTP notifier: redirects never followed, the answer read up to :data:`REPLY_MAX`
bytes (decoded: a gzip bomb stops there), ``trust_env`` off (no ``~/.netrc``), the proxy
from :func:`invoice_watch.proxy.proxy_for`.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urljoin

from aiohttp import hdrs

from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify.base import Recipients
from invoice_watch.notify.http import (
    REPLY_MAX,
    SNIPPET,
    HttpNotifier,
    Reply,
    json_object,
)
from invoice_watch.notify.render.slack import slack_blocks, slack_brief_text, slack_text
from invoice_watch.report.outbox import ReportMessage, slack_escape, slack_summary
from invoice_watch.safe_text import server_text
from invoice_watch.types import AlertEvent, Part

__all__ = ["REPLY_MAX", "SlackBotNotifier", "SlackWebhookNotifier", "classify_slack_status"]

logger = logging.getLogger(__name__)

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


_CHART_OWED = "chart:"  # a report whose chart alone is still owed (SlackBotNotifier)
# A conversation id (public C…, private G…, direct D…), as completeUploadExternal takes.

_FORM_NAMES = ("as blocks", "as plain text", "in its briefest form")  # of _forms, in order


def _forms(events: Sequence[AlertEvent], part: Part | None) -> list[dict[str, Any]]:
    """The message in the forms ``send`` tries, in order: Block Kit with its fallback
    text; plain text; the briefest text
    (:func:`~invoice_watch.notify.render.plain.brief_text`). The ``text`` is
    mrkdwn-escaped (:func:`~invoice_watch.notify.render.slack.slack_text`): Slack shows
    it alone when it refuses the blocks, and it may carry a server's text."""
    text = slack_text(events, part)
    return [
        {"text": text, "blocks": slack_blocks(events, part)},
        {"text": text},
        {"text": slack_brief_text(events, part)},
    ]


def _report_forms(msg: ReportMessage) -> list[dict[str, Any]]:
    """A report's summary in the forms :meth:`_SlackNotifier._send_forms` tries."""
    text, blocks = slack_summary(msg)
    brief = slack_escape(f"{msg.title}: " + "; ".join(f"{k}: {v}" for k, v in msg.facts[:2]))
    return [{"text": text, "blocks": blocks}, {"text": text}, {"text": brief}]


class _SlackNotifier(HttpNotifier):
    """One POST per attempt to ``url`` and what its answer means (module docstring).
    Subclasses say what the body is and how Slack's own answer reads."""

    kind, label, setting = "slack", "Slack", "webhook_url"

    # -- what subclasses say ------------------------------------------------------------

    def _payload(self, form: dict[str, Any]) -> dict[str, Any]:
        return form

    def _headers(self) -> dict[str, str]:
        return {}

    def _slack_says(self, reply: Reply) -> _SlackSays | None:
        """What ``reply`` says if it is Slack's own answer, else None."""
        raise NotImplementedError

    # -- sending ------------------------------------------------------------------------

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        """Post the message (one destination: ``recipients`` does not apply)."""
        await self._send_forms(_forms(events, part))
        logger.debug("slack notifier %r: sent %d event(s)", self.name, len(events))

    async def send_report(
        self, msg: ReportMessage, *, recipients: Sequence[str] | None = None
    ) -> None:
        """Post a report's summary (Block Kit, with its text as fallback): a webhook
        cannot carry the chart (:mod:`invoice_watch.report.outbox`)."""
        await self._send_forms(_report_forms(msg))

    async def _send_forms(self, forms: list[dict[str, Any]]) -> Reply:
        """Post the first of ``forms`` Slack takes (module docstring); its answer."""
        if self._receiver.proxy_problem is not None:
            raise PermanentNotifyError(self._receiver.proxy_problem)
        refusals: list[str] = []  # "as blocks (invalid_blocks)", ...: Slack's, per form
        for form, how in zip(forms, _FORM_NAMES, strict=True):
            reply = await self._post(self._payload(form))
            outcome = self._judge(reply)
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
        return reply

    async def _post(self, payload: dict[str, Any]) -> Reply:
        """One POST; its answer, or :class:`RetryableNotifyError` when none came."""
        # ASCII JSON: any character reaches Slack as an escape, none can fail to encode.
        data = json.dumps(payload, separators=(",", ":"))
        return await self._receiver.post(data, self._headers())

    # -- what an answer means -----------------------------------------------------------

    def _judge(self, reply: Reply) -> _Outcome:
        """What ``reply`` means (module docstring)."""
        receiver, name, status = self._receiver, self.name, reply.status
        says = self._slack_says(reply)
        if says is not None and says.ok and reply.success:
            return _Outcome()
        if 300 <= status < 400:
            return _Outcome(receiver.redirect(reply))
        head = f"slack notifier {name!r}: HTTP {status}"
        if says is not None:
            if says.odd:
                head += f": Slack answered an error code it does not use: {says.odd}"
            elif says.code is None and not says.ok:
                head += ": Slack refused the message without naming an error"
            return _Outcome(self._refused(reply, head, says.code), says.code)
        if status == 407:
            head += f": {receiver.proxy_wants_credentials()}"
            return _Outcome(self._refused(reply, head, None))
        if not reply.success:
            if reply.page:
                head += f" {reply.content_type} ({receiver.quote(reply)}): {receiver.not_ours}"
            return _Outcome(self._refused(reply, head, None))
        if reply.page:
            return _Outcome(receiver.page_in_the_way(reply, head))
        what = reply.cut or f"{reply.content_type}, {len(reply.body)} bytes"
        doubt = (
            f"HTTP {status} with an answer that is not Slack's ({what}: {receiver.quote(reply)})"
        )
        return _Outcome(doubt=doubt)

    def _refused(self, reply: Reply, head: str, code: str | None) -> NotifyError:
        """The error for an answer that is not a success: retry or not by its status and
        Slack's code (:func:`classify_slack_status`), with the hint for that code."""
        kind = classify_slack_status(reply.status, code)
        if kind is None:  # a success status naming no error: not Slack's success either
            kind = PermanentNotifyError
        message = head + (f" {code}" if code else "")
        if hint := _HINTS.get(code or ""):
            message += f": {hint}"
        if kind is RetryableNotifyError:
            return RetryableNotifyError(message, retry_after=self._receiver.retry_after(reply))
        return PermanentNotifyError(message)


class SlackWebhookNotifier(_SlackNotifier):
    """Posts to a Slack incoming webhook (``notifiers.<name>.webhook_url``)."""

    def __init__(
        self, name: str, webhook_url: str, *, timeout: float = 10, proxy: str | None = None
    ) -> None:
        super().__init__(name, webhook_url, timeout=timeout, proxy=proxy)  # URL: the secret

    def _slack_says(self, reply: Reply) -> _SlackSays | None:
        """A webhook answers ``ok``, or an error code such as ``no_service``, as text."""
        if reply.cut is not None:
            return None
        text = reply.text.strip()
        if text == "ok":
            return _SlackSays(ok=True)
        if _ERROR_CODE.fullmatch(text):
            return _SlackSays(ok=False, code=text)
        return None


class ChartOwedError(RetryableNotifyError):
    """A report's summary was posted, its chart upload failed for now (``reason``):
    the next attempt uploads the chart alone (``owed``). ``invoice-watch report --send``,
    which queues nothing, says so as it is."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        owed: tuple[str, ...],
        reason: str,
    ) -> None:
        super().__init__(message, retry_after=retry_after, owed=owed)
        self.reason = reason


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
        self._base, self._timeout = base, timeout
        super().__init__(
            name,
            urljoin(base, "chat.postMessage"),
            timeout=timeout,
            proxy=proxy,
            secrets=[token],
        )

    def __repr__(self) -> str:
        return f"SlackBotNotifier(name={self.name!r}, channel={self.channel!r}, token=<secret>)"

    async def send_report(
        self, msg: ReportMessage, *, recipients: Sequence[str] | None = None
    ) -> None:
        """Post a report's Block Kit summary, then upload its chart to the same channel
        with slack-sdk's ``files_upload_v2`` (three calls: ``files.getUploadURLExternal``,
        the upload URL, ``files.completeUploadExternal``; LIBRARIES.md). When the summary
        went and the upload did not, the upload alone is owed (``recipients`` of the next
        attempt: ``chart:<channel id>``), so a retry never posts the summary twice. When
        the summary's answer gave no channel id (an ambiguous answer, counted delivered)
        and ``channel`` is a name, its id is looked up (``conversations.list``)."""
        owed = [r for r in recipients or () if r.startswith(_CHART_OWED)]
        if owed:
            channel = owed[0].removeprefix(_CHART_OWED)
        else:
            reply = await self._send_forms(_report_forms(msg))
            answer = json_object(reply.body) if reply.cut is None else None
            found = answer.get("channel") if answer is not None else None
            # completeUploadExternal takes a channel id; chat.postMessage answers it.
            channel = found if isinstance(found, str) and found else self.channel
        if msg.chart is None:
            return
        from invoice_watch.notify.slack_files import ChartUpload

        upload = ChartUpload(
            self.name,
            self._token,
            self._base,
            self._timeout,
            self._receiver.proxy,
            self._receiver.secrets,
        )
        try:
            await upload.send(msg, channel)
        except RetryableNotifyError as exc:
            raise ChartOwedError(
                f"{exc} (the summary was posted: only the chart is sent again)",
                retry_after=exc.retry_after,
                owed=(_CHART_OWED + channel,),
                reason=str(exc),
            ) from exc  # our own error, already redacted
        except PermanentNotifyError as exc:
            logger.error(
                "slack notifier %r: the report's summary was posted, its chart not: %s",
                self.name,
                exc,
            )

    def _payload(self, form: dict[str, Any]) -> dict[str, Any]:
        return {"channel": self.channel, **form}

    def _headers(self) -> dict[str, str]:
        return {hdrs.AUTHORIZATION: f"Bearer {self._token}"}

    def _slack_says(self, reply: Reply) -> _SlackSays | None:
        """The Web API answers a JSON object with a boolean ``ok`` and, when false, an
        ``error`` code (https://docs.slack.dev/apis/web-api/#responses)."""
        data = json_object(reply.body) if reply.cut is None else None
        if data is None or not isinstance(data.get("ok"), bool):
            return None
        ok: bool = data["ok"]
        error = data.get("error")
        if isinstance(error, str) and _ERROR_CODE.fullmatch(error):
            return _SlackSays(ok, error)
        odd = "" if error is None else server_text(error, SNIPPET, secrets=self._receiver.secrets)
        return _SlackSays(ok, None, f"'{odd}'" if odd else "")
