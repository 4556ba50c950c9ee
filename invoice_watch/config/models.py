"""The frozen pydantic models every stage reads (SPEC §6): :class:`Config` and its
sections (``atlas``, ``organizations``, ``poll``, ``state``, ``delivery``, ``usage``,
``reports``, ``http``, ``log``), the notifiers (a union tagged by ``type``) and the
rules (likewise).

Each field is typed with a value from :mod:`~invoice_watch.config.values` or
:mod:`~invoice_watch.config.quantities`, so that what a model holds is what its consumer
accepts; each duration field has its own upper bound. Unknown keys are refused, and no
error quotes its input (it may be a secret). Checks across sections (notify names,
unique rule names and org ids) are the loader's (:mod:`~invoice_watch.config.loader`).
"""

from __future__ import annotations

import re
import ssl
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from invoice_watch import constants
from invoice_watch.config.files import FileProblem, check_regular_file
from invoice_watch.config.quantities import (
    Duration,
    DurationOrZero,
    Flag,
    Money,
    Number,
    ResponseSize,
    Whole,
    at_most,
)
from invoice_watch.config.values import (
    BearerToken,
    ConfigPath,
    EmailAddress,
    HeaderName,
    HeaderValue,
    Hostname,
    HttpLogin,
    InvoiceStatus,
    Name,
    OrgId,
    RoutingKey,
    Secret,
    SecretUrl,
    SigningSecret,
    SlackChannel,
    SmtpLogin,
    Url,
    split_listen,
)
from invoice_watch.errors import ConfigProblem
from invoice_watch.proxy import ProxyUrl
from invoice_watch.quiet import DAYS as QUIET_DAYS
from invoice_watch.quiet import QuietWindow
from invoice_watch.report.schedule import ReportSchedule, parse_schedule, zone
from invoice_watch.types import Severity

# Upper bounds of durations, by what they time.
_REQUEST_LIMIT = timedelta(minutes=10)
_REQUEST_WHY = "one request or conversation that has not answered by then will not"
_BACKOFF_LIMIT = timedelta(hours=1)
_BACKOFF_WHY = "a longer wait between retries only delays the answer"
_RULE_LIMIT = timedelta(days=366)
_RULE_WHY = "invoices are monthly; a year covers every use"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class DigestAuth(_Model):
    """Programmatic API key, sent with HTTP Digest."""

    public_key: HttpLogin
    private_key: Secret


class ServiceAccountAuth(_Model):
    """Service account, OAuth 2.0 client credentials."""

    client_id: HttpLogin
    client_secret: Secret


def _auth_kind(value: Any) -> str | None:
    if isinstance(value, DigestAuth | ServiceAccountAuth):
        return "digest" if isinstance(value, DigestAuth) else "service_account"
    if isinstance(value, dict):
        digest = {"public_key", "private_key"} & value.keys()
        service_account = {"client_id", "client_secret"} & value.keys()
        if digest and not service_account:
            return "digest"
        if service_account and not digest:
            return "service_account"
    return None  # neither, or both: the error says to pick one


class AtlasConfig(_Model):
    base_url: Url = constants.ATLAS_BASE_URL
    ui_url: Url = constants.ATLAS_UI_URL
    api: Literal["v2", "v1", "cloud-manager"] = "v2"
    auth: Annotated[
        Annotated[DigestAuth, Tag("digest")]
        | Annotated[ServiceAccountAuth, Tag("service_account")],
        Discriminator(
            _auth_kind,
            custom_error_type="auth_kind",
            custom_error_message="set either public_key and private_key (API key), "
            "or client_id and client_secret (service account)",
        ),
    ]
    timeout: Annotated[Duration, at_most(_REQUEST_LIMIT, _REQUEST_WHY)] = timedelta(seconds=30)
    max_concurrency: Whole = Field(4, ge=1, le=64)
    retries: Whole = Field(5, ge=0, le=20)
    max_backoff: Annotated[Duration, at_most(_BACKOFF_LIMIT, _BACKOFF_WHY)] = timedelta(seconds=30)
    max_response_size: ResponseSize = constants.MAX_RESPONSE_SIZE
    proxy: ProxyUrl | None = None

    @field_validator("base_url")
    @classmethod
    def _no_api_path(cls, value: str) -> str:
        """``https://cloud.mongodb.com/api/atlas/v2`` (copied from Atlas's documentation)
        would send every request to ``…/api/atlas/v2/api/atlas/v2/orgs/…``: a 404 that
        blames the organization id."""
        path = URL(value).path.rstrip("/")
        if path == "/api" or path.startswith("/api/"):
            root = str(URL(value).with_path("/")).rstrip("/")
            raise ValueError(
                f"`{value}` has the API's path, which invoice-watch adds itself (it "
                f"would ask {value}/api/atlas/v2/orgs/…): write {root}"
            )
        return value

    @field_validator("ui_url")
    @classmethod
    def _no_ui_path(cls, value: str) -> str:
        path = URL(value).path.rstrip("/")
        if path.endswith("/v2"):
            root = str(URL(value).with_path("/")).rstrip("/")
            raise ValueError(
                f"`{value}` ends with /v2, which invoice-watch adds itself to link to "
                f"the billing page ({value}/v2#/org/…): write {root}"
            )
        return value


class OrgConfig(_Model):
    id: OrgId
    name: Name | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.id


class PollConfig(_Model):
    interval: Annotated[
        Duration,
        at_most(timedelta(days=7), "invoices change a few times a day; poll every 15m to 1d"),
    ] = timedelta(minutes=15)
    jitter: Annotated[
        DurationOrZero, at_most(timedelta(days=1), "it must also stay below interval")
    ] = timedelta(0)
    # How often each organization's listing is a full one (every invoice, however old)
    # instead of an incremental one (from its oldest invoice that can still change):
    # what sees a refund or any late change to a settled invoice. Also at every start.
    full_listing_every: Annotated[
        Duration,
        at_most(timedelta(days=31), "a late change to an old invoice must not wait longer"),
    ] = timedelta(days=1)

    @model_validator(mode="after")
    def _jitter_below_interval(self) -> PollConfig:
        if self.jitter >= self.interval:
            raise ValueError("jitter must be shorter than interval")
        return self


# libpq's sslmode values (https://www.postgresql.org/docs/current/libpq-ssl.html).
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_state_url(value: Secret) -> Secret:
    """A PostgreSQL URL (``state.url``); its password is a secret, and no message
    shows the URL."""
    from urllib.parse import parse_qs, unquote, urlsplit

    encode = (
        "percent-encode the user and password in it (@ is %40, / is %2F, # is %23, "
        "% is %25, : is %3A, ? is %3F, + is %2B; a ${VAR} there is encoded for you), "
        "or put the password in state.password_file"
    )
    try:
        parts = urlsplit(value.get())
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"the URL is not a valid postgresql:// URL: {encode}") from None
    if "@" in parts.netloc.rpartition("@")[0]:  # libpq would split at the first one
        raise ValueError(f"the URL's user or password has an @: {encode}")
    if "@" in parts.path + parts.fragment:  # a password with / or # cut the URL short
        raise ValueError(f"the URL has an @ after its host: {encode}")
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            "the URL must start with postgresql:// (for an SQLite file set state.path instead)"
        )
    if not parts.hostname:
        raise ValueError(
            f"the URL names no host: postgresql://user@host:5432/dbname (if a password "
            f"in it has / ? or #: {encode})"
        )
    if parts.path.strip("/") == "":
        raise ValueError("the URL names no database: postgresql://user@host:5432/dbname")
    for mode in parse_qs(parts.query).get("sslmode", []):
        if mode not in _SSLMODES:
            raise ValueError(f"sslmode must be one of {', '.join(_SSLMODES)} (libpq's)")
    if parts.password:
        for secret in (parts.password, unquote(parts.password)):
            Secret(secret)  # registered: redacted from every message
    return value


StateDbUrl = Annotated[Secret, AfterValidator(_check_state_url)]


class StateConfig(_Model):
    path: ConfigPath
    # A PostgreSQL database instead of the file (replicas share it: ``ha``). Its
    # password inside it (as ``${VAR}``), or in ``password`` / ``password_file``;
    # ``sslmode``/``sslrootcert`` as libpq names them, in the URL's query.
    url: StateDbUrl | None = None
    password: Secret | None = None
    # Where ``path`` came from: "state.path" when the file sets it, else what
    # default_state_path chose (shown by check-config).
    _origin: str = PrivateAttr(default="state.path")

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def explicit(self) -> bool:
        """Whether the configuration file sets ``state.path`` itself."""
        return self._origin == "state.path"

    @model_validator(mode="after")
    def _one_password(self) -> StateConfig:
        from urllib.parse import urlsplit

        if self.password is not None and self.url is None:
            raise ValueError("password (or password_file) is for state.url; set state.url too")
        if self.password is not None and self.url is not None and urlsplit(self.url.get()).password:
            raise ValueError(
                "the password is in state.url and in password (or password_file): keep one"
            )
        return self


class HaConfig(_Model):
    """Replicas sharing one PostgreSQL state (``state.url``): the lease."""

    # How long the leader's lease lasts unless renewed (it renews every third of it);
    # a standby takes over at most this long after the leader died.
    lease_ttl: Annotated[
        Duration, at_most(timedelta(minutes=10), "a dead leader would be replaced too late")
    ] = timedelta(seconds=30)

    @field_validator("lease_ttl")
    @classmethod
    def _long_enough(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=3):
            raise ValueError("must be at least 3s: the leader renews it every third of it")
        return value


class DeliveryConfig(_Model):
    max_age: Annotated[
        Duration, at_most(timedelta(days=30), "an alert older than that is no news")
    ] = timedelta(hours=24)
    max_backoff: Annotated[Duration, at_most(_BACKOFF_LIMIT, _BACKOFF_WHY)] = timedelta(seconds=60)
    group_over: Whole = Field(5, ge=1, le=10_000)
    # Sent and failed notifications, resolved alerts, cycle records and amount observations
    # older than this are pruned from the state file (deliver.py, Store.prune); pending
    # messages and firing alerts never are.
    retention: Annotated[
        Duration, at_most(timedelta(days=3650), "ten years of history is plenty")
    ] = timedelta(days=180)


def _check_zone(value: str) -> str:
    zone(value)
    return value


TimeZoneName = Annotated[str, AfterValidator(_check_zone)]


def _clock_time(value: object) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str) and (m := _HHMM.fullmatch(value.strip())):
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour < 24 and minute < 60:
            return time(hour, minute)
    raise ValueError(f'use a 24-hour time "HH:MM" in quotes, e.g. "20:00" (got {value!r})')


_HHMM = re.compile(r"(\d{1,2}):(\d{2})")
ClockTime = Annotated[time, BeforeValidator(_clock_time)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class QuietHoursConfig(_Model):
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


class _NotifierModel(_Model):
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
    timeout: Annotated[Duration, at_most(_REQUEST_LIMIT, _REQUEST_WHY)] = timedelta(seconds=30)

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
    timeout: Annotated[Duration, at_most(_REQUEST_LIMIT, _REQUEST_WHY)] = timedelta(seconds=15)
    proxy: ProxyUrl | None = None


class PagerDutyNotifierConfig(_NotifierModel):
    """PagerDuty's Events API v2: FIRING and REMINDER trigger, RESOLVED resolves (the
    alert key is the ``dedup_key``); a NOTICE triggers with its own key, or is skipped."""

    type: Literal["pagerduty"]
    routing_key: RoutingKey
    url: Url = constants.PAGERDUTY_EVENTS_URL
    notices: Literal["send", "skip"] = "send"
    timeout: Annotated[Duration, at_most(_REQUEST_LIMIT, _REQUEST_WHY)] = _HTTP_TIMEOUT
    proxy: ProxyUrl | None = None


class TeamsNotifierConfig(_NotifierModel):
    """A Microsoft Teams channel through a Workflows (Power Automate) webhook: an
    Adaptive Card per message."""

    type: Literal["msteams"]
    webhook_url: SecretUrl
    timeout: Annotated[Duration, at_most(_REQUEST_LIMIT, _REQUEST_WHY)] = _HTTP_TIMEOUT
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
    timeout: Annotated[Duration, at_most(_REQUEST_LIMIT, _REQUEST_WHY)] = _HTTP_TIMEOUT
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


class _RuleBase(_Model):
    name: Name
    notify: Annotated[list[Name], Field(min_length=1)]
    orgs: Annotated[list[OrgId], Field(min_length=1)] | None = None
    severity: Severity = Severity.WARNING
    repeat: Annotated[Duration, at_most(_RULE_LIMIT, _RULE_WHY)] | None = None
    send_resolved: Flag = True
    enabled: Flag = True


class InvoiceStatusRule(_RuleBase):
    """Fires while an invoice is in one of ``statuses``."""

    type: Literal["invoice_status"]
    statuses: Annotated[list[InvoiceStatus], Field(min_length=1)] = ["FAILED"]


class PendingAmountRule(_RuleBase):
    """Fires while a PENDING invoice's amount is over ``threshold_cents``."""

    type: Literal["pending_amount"]
    threshold_cents: Money = Field(alias="threshold")


class StatusChangeRule(_RuleBase):
    """A one-shot notice when an invoice moves between statuses (None = any)."""

    type: Literal["status_change"]
    from_statuses: Annotated[list[InvoiceStatus], Field(min_length=1)] | None = Field(
        None, alias="from"
    )
    to_statuses: Annotated[list[InvoiceStatus], Field(min_length=1)] | None = Field(
        None, alias="to"
    )


class AmountIncreaseRule(_RuleBase):
    """Fires while a pending invoice grew by more than a threshold or percent in ``window``."""

    type: Literal["amount_increase"]
    threshold_cents: Money | None = Field(None, alias="threshold")
    percent: Number | None = Field(None, gt=0, le=1_000_000)
    window: Annotated[Duration, at_most(_RULE_LIMIT, _RULE_WHY)] = timedelta(hours=24)

    @model_validator(mode="after")
    def _threshold_or_percent(self) -> AmountIncreaseRule:
        if self.threshold_cents is None and self.percent is None:
            raise ValueError("set threshold (USD), percent, or both")
        return self


class ForecastRule(_RuleBase):
    """Fires while a pending invoice's linear forecast exceeds ``budget_cents``."""

    type: Literal["forecast"]
    budget_cents: Money = Field(alias="budget")
    min_elapsed: Annotated[Duration, at_most(_RULE_LIMIT, _RULE_WHY)] = timedelta(days=3)


class PollFailureRule(_RuleBase):
    """Fires when an organization has been unreadable for ``after``."""

    type: Literal["poll_failure"]
    after: Annotated[Duration, at_most(_RULE_LIMIT, _RULE_WHY)] = timedelta(hours=1)


class UsageAnomalyRule(_RuleBase):
    """Fires while a project's, cluster's or SKU's (``by``) latest day of usage is over
    its own recent spend: the median of the trailing ``baseline`` days (a number of days)
    by more than ``min_increase_cents`` and the spread ``sensitivity`` allows
    (:mod:`invoice_watch.anomaly`); and for a new one already over ``min_increase``."""

    type: Literal["usage_anomaly"]
    by: Literal["project", "cluster", "sku"] = "project"
    baseline: int = Field(14, ge=7, le=60)
    min_increase_cents: Money = Field(100_00, alias="min_increase")
    sensitivity: Literal["low", "medium", "high"] = "medium"


Rule = Annotated[
    InvoiceStatusRule
    | PendingAmountRule
    | StatusChangeRule
    | AmountIncreaseRule
    | ForecastRule
    | PollFailureRule
    | UsageAnomalyRule,
    Field(discriminator="type"),
]


def _check_schedule(value: str) -> str:
    parse_schedule(value)  # the zone is checked on its own (`timezone`)
    return value


# A report schedule ("mon 09:00", "daily 08:00", "monthly 1 09:00") and an IANA zone.
ScheduleText = Annotated[str, AfterValidator(_check_schedule)]


class UsageConfig(_Model):
    """Daily line items (``lineItems:search``, or the invoice CSV for v1 and Cloud
    Manager): read at most once per organization per ``refresh``."""

    refresh: Annotated[
        Duration, at_most(timedelta(days=7), "line items post once a day; 6h is the default")
    ] = timedelta(hours=6)

    @field_validator("refresh")
    @classmethod
    def _at_least_an_hour(cls, value: timedelta) -> timedelta:
        if value < timedelta(hours=1):
            raise ValueError(
                "must be at least 1h: line items post once a day, and reading them every "
                "poll would cost one request per page; the default is 6h"
            )
        return value


class ReportConfig(_Model):
    """A spend report on a ``schedule`` in ``timezone``, to ``notify``: one per
    organization of ``orgs`` (default: every configured one), or one for them all
    (``combined``)."""

    name: Name
    schedule: ScheduleText
    timezone: TimeZoneName = "UTC"
    notify: Annotated[list[Name], Field(min_length=1)]
    orgs: Annotated[list[OrgId], Field(min_length=1)] | None = None
    combined: bool = False
    enabled: bool = True

    @property
    def when(self) -> ReportSchedule:
        """The parsed schedule, in its zone."""
        return parse_schedule(self.schedule, self.timezone)


class HttpConfig(_Model):
    listen: str
    # Bounds against a flood or slow clients (issue 12 §3): connections open at once
    # (beyond, new ones are closed at once), and how long a connection may stay without
    # a complete request (from its start, or from its last answer).
    max_connections: Whole = Field(64, ge=1, le=10_000)
    idle_timeout: Annotated[
        Duration, at_most(timedelta(hours=1), "a request takes seconds to arrive")
    ] = timedelta(seconds=10)

    @field_validator("listen", mode="before")
    @classmethod
    def _host_port(cls, value: object) -> str:
        split_listen(str(value))  # `listen: 9100` reads as a number
        return str(value)

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(_Model):
    """The whole configuration. Cross-references between sections (notify names, unique
    rule names and org ids) are checked by :func:`load`."""

    atlas: AtlasConfig
    organizations: Annotated[list[OrgConfig], Field(min_length=1)]
    poll: PollConfig = Field(default_factory=PollConfig)
    state: StateConfig
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    notifiers: Annotated[dict[Name, NotifierConfig], Field(min_length=1)]
    rules: Annotated[list[Rule], Field(min_length=1)]
    usage: UsageConfig = Field(default_factory=UsageConfig)
    reports: Annotated[list[ReportConfig], Field(max_length=100)] = []
    http: HttpConfig | None = None
    ha: HaConfig = Field(default_factory=HaConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    _source: Path | None = PrivateAttr(default=None)
    _warnings: tuple[ConfigProblem, ...] = PrivateAttr(default=())
    _secrets_read: bool = PrivateAttr(default=True)

    @property
    def source(self) -> Path | None:
        """The file this configuration was loaded from (None for ``load(text)``)."""
        return self._source

    @property
    def warnings(self) -> tuple[ConfigProblem, ...]:
        """Settings that are valid but almost surely wrong, found by :func:`load`; each
        message starts with ``warning:``. check-config prints them, ``run`` logs them."""
        return self._warnings

    @property
    def secrets_read(self) -> bool:
        """False when loaded without its secrets (``load(secrets=False)``, the read-only
        commands): each secret is a placeholder, and nothing may be sent with it."""
        return self._secrets_read

    def quiet_windows(self) -> dict[str, QuietWindow]:
        """Each notifier's quiet hours that has them, by name."""
        return {
            name: notifier.quiet_hours.window()
            for name, notifier in self.notifiers.items()
            if notifier.quiet_hours is not None
        }

    def org_name(self, org_id: str) -> str:
        """The display name of a configured organization, else the id itself."""
        for org in self.organizations:
            if org.id == org_id:
                return org.display_name
        return org_id
