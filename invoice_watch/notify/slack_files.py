"""A report's chart, uploaded to Slack with slack-sdk's ``files_upload_v2`` (three
calls: ``files.getUploadURLExternal``, the upload URL, ``files.completeUploadExternal``;
``../shared/LIBRARIES.md``), and the channel id it needs looked up by name
(``conversations.list``) when ``chat.postMessage`` gave none. Used by
:class:`~invoice_watch.notify.slack.SlackBotNotifier` for reports only: slack-sdk is
imported when a chart is uploaded, never by a daemon that sends no report to Slack.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from invoice_watch.errors import PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify.http import SNIPPET
from invoice_watch.notify.slack import _ERROR_CODE, _HINTS, classify_slack_status
from invoice_watch.report.message import CHART_FILENAME
from invoice_watch.report.outbox import ReportMessage
from invoice_watch.retry import parse_retry_after
from invoice_watch.safe_text import clip, server_text

_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{6,}")
_LIST_PAGES = 10  # conversations.list pages (of 1000) read at most to find a channel by name


@dataclass(frozen=True)
class ChartUpload:
    """One notifier's upload of report charts: ``name`` (for messages), the bot
    ``token`` (a secret: never in the repr), the Web API ``base`` URL, ``timeout``
    (seconds), the ``proxy`` its receiver uses (None: direct), and the ``secrets`` its
    messages are redacted of."""

    name: str
    token: str = field(repr=False)
    base: str
    timeout: float
    proxy: str | None
    secrets: Sequence[str] = field(repr=False)

    async def send(self, msg: ReportMessage, channel: str) -> None:
        """Upload the chart; a Slack refusal or a failed connection as a NotifyError."""
        from slack_sdk.errors import SlackApiError, SlackClientError
        from slack_sdk.web.async_client import AsyncWebClient

        assert msg.chart is not None
        client = AsyncWebClient(
            token=self.token,
            base_url=self.base,
            timeout=max(1, round(self.timeout)),
            retry_handlers=[],  # the outbox retries, with its backoff
        )
        # Our proxy, as every notifier's (NO_PROXY honoured, loopback direct): slack-sdk
        # would read HTTPS_PROXY without NO_PROXY when given none.
        client.proxy = self.proxy
        where = f"slack notifier {self.name!r}: uploading the report's chart"
        try:
            if not _CHANNEL_ID.fullmatch(channel):
                channel = await self._channel_id(client, channel, where)
            await client.files_upload_v2(
                channel=channel,
                content=msg.chart,
                filename=CHART_FILENAME,
                title=clip(msg.title, 250),
                alt_txt="Cumulative spend this billing period against the last one",
            )
        except SlackApiError as exc:
            status = exc.response.status_code
            code = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None
            kind = classify_slack_status(status, code) or PermanentNotifyError
            message = f"{where}: HTTP {status}" + (f" {code}" if code else "")
            if code == "missing_scope":
                message += (
                    ": the app lacks the files:write scope (or channels:read and groups:read "
                    "to find a channel given by name); add it and reinstall the app, or set "
                    "`channel` to the channel's id"
                )
            elif hint := _HINTS.get(code or ""):
                message += f": {hint}"
            # Not chained: the cause quotes Slack's whole answer, unredacted.
            if kind is RetryableNotifyError:
                wait = parse_retry_after(exc.response.headers.get("Retry-After"), datetime.now(UTC))
                raise RetryableNotifyError(message, retry_after=wait) from None
            raise PermanentNotifyError(message) from None
        except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            text = server_text(f"{type(exc).__name__}: {exc}", SNIPPET, secrets=self.secrets)
            # Not chained: the cause's text is the library's, unredacted (the message's
            # is redacted).
            raise RetryableNotifyError(f"{where}: {text}") from None

    async def _channel_id(self, client: Any, name: str, where: str) -> str:
        """The id of the channel named ``name`` (``#finops`` or ``finops``), from
        ``conversations.list`` (bounded: :data:`_LIST_PAGES` pages): what the upload
        needs when chat.postMessage's answer gave no id (an ambiguous answer).
        PermanentNotifyError when no channel the app sees has that name."""
        wanted = name.removeprefix("#")
        cursor = None
        for _ in range(_LIST_PAGES):
            page = await client.conversations_list(
                cursor=cursor,
                exclude_archived=True,
                limit=1000,
                types="public_channel,private_channel",
            )
            for found in page.get("channels") or ():
                if isinstance(found, dict) and found.get("name") == wanted:
                    ident = found.get("id")
                    if isinstance(ident, str) and _CHANNEL_ID.fullmatch(ident):
                        return ident
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                break
        raise PermanentNotifyError(
            f"{where}: chat.postMessage's answer gave no channel id, and no channel the "
            f"app sees is named {wanted!r} (conversations.list): set `channel` to the "
            "channel's id (C…)"
        )
