"""The notifiers of the configuration (``notifiers.<name>``, SPEC §6): one model per
``type`` (Slack, email, console, webhook, PagerDuty, Microsoft Teams, Alertmanager),
:data:`NotifierConfig` their union tagged by ``type``, and the quiet hours any of them
may have (:class:`QuietHoursConfig`).

A credential is a :class:`~invoice_watch.config.values.Secret` (or a URL, token or key
built on it), so that no repr, dump or message shows it; a proxy is a
:class:`~invoice_watch.proxy.ProxyUrl`, its user info masked likewise.
"""

from __future__ import annotations

import re
import ssl
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from invoice_watch import constants
from invoice_watch.config.base import Model
from invoice_watch.config.files import FileProblem, check_regular_file
from invoice_watch.config.quantities import Duration, RequestTimeout, Whole, at_most
from invoice_watch.config.values import (
    BearerToken,
    ConfigPath,
    EmailAddress,
    HeaderName,
    HeaderValue,
    Hostname,
    HttpLogin,
    RoutingKey,
    Secret,
    SecretUrl,
    SigningSecret,
    SlackChannel,
    SmtpLogin,
    TimeZoneName,
    Url,
)
from invoice_watch.proxy import ProxyUrl
from invoice_watch.quiet import DAYS as QUIET_DAYS
from invoice_watch.quiet import QuietWindow
from invoice_watch.report.schedule import zone
from invoice_watch.types import Severity


def _clock_time(value: object) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str) and (m := _HHMM.fullmatch(value.strip())):
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour < 24 and minute < 60:
            return time(hour, minute)
    raise ValueError(f'use a 24-hour time "HH:MM" in quotes, e.g. "20:00" (got {value!r})')


_HHMM = re.compile(r"(\d{1,2}):(\d{2})", re.ASCII)  # 0-9 only, as every number
ClockTime = Annotated[time, BeforeValidator(_clock_time)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class QuietHoursConfig(Model):
    """A notifier's quiet hours (:mod:`invoice_watch.quiet`): from ``from`` to ``to``
    (local times in ``timezone``; across midnight when ``to`` is earlier), on the
    ``days`` a window starts (every day when empty); messages wait and go as one
    summary when the window ends, but those of the severities in ``except``."""

    timezone: TimeZoneName
    from_: ClockTime = Field(alias="from")
    to: ClockTime
    days: Annotated[list[Weekday], Field(max_length=7)] = Field(default_factory=list)
    except_: Annotated[list[Severity], Field(max_length=3)] = Field(
        default_factory=list, alias="except"
    )

    @model_validator(mode="after")
    def _not_always(self) -> QuietHoursConfig:
        always = self.from_ == self.to and len(set(self.days)) in (0, len(QUIET_DAYS))
        if always and set(self.except_) != set(Severity):  # all in except: none is held
            raise ValueError(
                "from equal to to is a whole day: on every day that is quiet for ever "
                "(nothing would ever be sent); name fewer days (e.g. days: [sat, sun]) or "
                "remove quiet_hours"
            )
        return self

    def window(self) -> QuietWindow:
        """The pure window :mod:`invoice_watch.quiet` works with."""
        return QuietWindow(
            tz=zone(self.timezone),
            start=self.from_,
            end=self.to,
            days=frozenset(QUIET_DAYS.index(d) for d in self.days),
            except_=frozenset(self.except_),
            zone_name=self.timezone,
        )


class _NotifierModel(Model):
    """What every notifier may have: ``quiet_hours``."""

    quiet_hours: QuietHoursConfig | None = None


class SlackNotifierConfig(_NotifierModel):
    """Slack by incoming webhook (``webhook_url``) or Web API (``token`` + ``channel``)."""

    type: Literal["slack"]
    webhook_url: SecretUrl | None = None
    token: BearerToken | None = None
    channel: SlackChannel | None = None
    api_url: Url = constants.SLACK_API_URL
    proxy: ProxyUrl | None = None

    @field_validator("api_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        return value + "/"  # slack-sdk joins method names onto it

    @model_validator(mode="after")
    def _one_transport(self) -> SlackNotifierConfig:
        if (self.webhook_url is None) == (self.token is None):
            raise ValueError("set exactly one of webhook_url (incoming webhook) or token (bot)")
        if self.token is not None and self.channel is None:
            raise ValueError('token needs a channel, e.g. channel: "#billing-alerts"')
        if self.webhook_url is not None and self.channel is not None:
            raise ValueError("channel is only used with token: a webhook posts to its own channel")
        if self.webhook_url is not None and not self.webhook_url.get().startswith("http"):
            raise ValueError("webhook_url must be an https:// URL (Slack: Incoming Webhooks)")
        return self


_SMTP_PORTS = {"starttls": 587, "implicit": 465, "none": 25}


def ca_file_problem(path: Path) -> str | None:
    """Why ``ca_file`` cannot serve as the email notifier's CA bundle (None when it
    can): loaded as the notifier loads it (``SSLContext.load_verify_locations``), so
    what check-config accepts works at run time."""
    try:
        check_regular_file(path)
    except FileProblem as exc:
        return f"cannot read the CA file {path}: {exc}; give the path of a PEM bundle"
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return (
            f"CA file {path} holds no certificate OpenSSL can load ({reason}): give a PEM "
            "bundle (-----BEGIN CERTIFICATE----- blocks)"
        )
    return None


class EmailNotifierConfig(_NotifierModel):
    """SMTP; ``port`` defaults by ``tls``: starttls 587, implicit 465, none 25."""

    type: Literal["email"]
    host: Hostname
    port: Whole = Field(_SMTP_PORTS["starttls"], ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    ca_file: ConfigPath | None = None
    username: SmtpLogin | None = None
    password: Secret | None = None
    from_addr: EmailAddress = Field(alias="from")
    to: Annotated[list[EmailAddress], Field(min_length=1, max_length=100)]
    timeout: RequestTimeout = timedelta(seconds=30)

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and "port" not in data and data.get("tls") in _SMTP_PORTS:
            return {**data, "port": _SMTP_PORTS[data["tls"]]}
        return data

    @field_validator("ca_file")
    @classmethod
    def _ca_file_loads(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        reads = not isinstance(info.context, dict) or info.context.get("read_files", True)
        if value is not None and reads and (problem := ca_file_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _login_pair(self) -> EmailNotifierConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        return self


class ConsoleNotifierConfig(_NotifierModel):
    type: Literal["console"]


_HTTP_TIMEOUT = timedelta(seconds=10)


class WebhookNotifierConfig(_NotifierModel):
    """Any HTTP receiver: POSTs the documented JSON body (``notify/webhook-v1.schema.json``),
    signed as Standard Webhooks says when ``secret`` is set; ``headers`` are added to
    every request (their values are secrets: never shown)."""

    type: Literal["webhook"]
    url: SecretUrl
    secret: SigningSecret | None = None
    headers: Annotated[dict[HeaderName, HeaderValue], Field(max_length=20)] = Field(
        default_factory=dict
    )
    # Standard Webhooks recommends 15 to 30 s for a receiver to answer.
    timeout: RequestTimeout = timedelta(seconds=15)
    proxy: ProxyUrl | None = None


class PagerDutyNotifierConfig(_NotifierModel):
    """PagerDuty's Events API v2: FIRING and REMINDER trigger, RESOLVED resolves (the
    alert key is the ``dedup_key``); a NOTICE triggers with its own key, or is skipped."""

    type: Literal["pagerduty"]
    routing_key: RoutingKey
    url: Url = constants.PAGERDUTY_EVENTS_URL
    notices: Literal["send", "skip"] = "send"
    timeout: RequestTimeout = _HTTP_TIMEOUT
    proxy: ProxyUrl | None = None


class TeamsNotifierConfig(_NotifierModel):
    """A Microsoft Teams channel through a Workflows (Power Automate) webhook: an
    Adaptive Card per message."""

    type: Literal["msteams"]
    webhook_url: SecretUrl
    timeout: RequestTimeout = _HTTP_TIMEOUT
    proxy: ProxyUrl | None = None


class AlertmanagerNotifierConfig(_NotifierModel):
    """An Alertmanager (``POST /api/v2/alerts`` under ``url``): firing alerts are posted
    again every ``resend_every``, each valid for four times that, as Prometheus does."""

    type: Literal["alertmanager"]
    url: Url
    username: HttpLogin | None = None
    password: Secret | None = None
    token: BearerToken | None = None
    resend_every: Annotated[
        Duration,
        at_most(timedelta(hours=1), "Alertmanager ends an alert not posted again in time"),
    ] = timedelta(minutes=1)
    notices: Literal["send", "skip"] = "send"
    timeout: RequestTimeout = _HTTP_TIMEOUT
    proxy: ProxyUrl | None = None

    @model_validator(mode="after")
    def _one_login(self) -> AlertmanagerNotifierConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password (HTTP Basic), or neither")
        if self.token is not None and self.username is not None:
            raise ValueError("set either token (Bearer) or username and password, not both")
        return self


NotifierConfig = Annotated[
    SlackNotifierConfig
    | EmailNotifierConfig
    | ConsoleNotifierConfig
    | WebhookNotifierConfig
    | PagerDutyNotifierConfig
    | TeamsNotifierConfig
    | AlertmanagerNotifierConfig,
    Field(discriminator="type"),
]
