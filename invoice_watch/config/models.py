"""The frozen pydantic models every stage reads (SPEC §6): :class:`Config` and its
sections (``atlas``, ``organizations``, ``poll``, ``state``, ``ha``, ``delivery``,
``usage``, ``reports``, ``http``, ``log``). The notifiers are
:mod:`~invoice_watch.config.notifiers`'s, the rules :mod:`~invoice_watch.config.rules`'s
(each a union tagged by ``type``).

Each field is typed with a value from :mod:`~invoice_watch.config.values` or
:mod:`~invoice_watch.config.quantities`, so that what a model holds is what its consumer
accepts; each duration field has its own upper bound. Unknown keys are refused, and no
error quotes its input (it may be a secret): :class:`~invoice_watch.config.base.Model`.
Checks across sections (notify names, unique rule names and org ids) are the loader's
(:mod:`~invoice_watch.config.loader`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)
from yarl import URL

from invoice_watch import constants
from invoice_watch.config.base import Model
from invoice_watch.config.notifiers import NotifierConfig
from invoice_watch.config.quantities import (
    Duration,
    DurationOrZero,
    RequestTimeout,
    ResponseSize,
    Whole,
    at_least,
    at_most,
)
from invoice_watch.config.rules import Rule
from invoice_watch.config.values import (
    ConfigPath,
    HttpLogin,
    Name,
    OrgId,
    Secret,
    TimeZoneName,
    Url,
    split_listen,
)
from invoice_watch.errors import ConfigProblem
from invoice_watch.proxy import ProxyUrl
from invoice_watch.quiet import QuietWindow
from invoice_watch.report.schedule import ReportSchedule, parse_schedule

# The longest wait between two retries (Atlas, delivery).
_BackoffCap = Annotated[
    Duration, at_most(timedelta(hours=1), "a longer wait between retries only delays the answer")
]


class DigestAuth(Model):
    """Programmatic API key, sent with HTTP Digest."""

    public_key: HttpLogin
    private_key: Secret


class ServiceAccountAuth(Model):
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


class AtlasConfig(Model):
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
    timeout: RequestTimeout = timedelta(seconds=30)
    max_concurrency: Whole = Field(4, ge=1, le=64)
    retries: Whole = Field(5, ge=0, le=20)
    max_backoff: _BackoffCap = timedelta(seconds=30)
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


class OrgConfig(Model):
    id: OrgId
    name: Name | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.id


class PollConfig(Model):
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
        # Not chained: the cause may quote the URL, and with it the password.
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


class StateConfig(Model):
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


class HaConfig(Model):
    """Replicas sharing one PostgreSQL state (``state.url``): the lease."""

    # How long the leader's lease lasts unless renewed (it renews every third of it);
    # a standby takes over at most this long after the leader died.
    lease_ttl: Annotated[
        Duration,
        at_least(timedelta(seconds=3), "the leader renews it every third of it"),
        at_most(timedelta(minutes=10), "a dead leader would be replaced too late"),
    ] = timedelta(seconds=30)


class DeliveryConfig(Model):
    max_age: Annotated[
        Duration, at_most(timedelta(days=30), "an alert older than that is no news")
    ] = timedelta(hours=24)
    max_backoff: _BackoffCap = timedelta(seconds=60)
    group_over: Whole = Field(5, ge=1, le=10_000)
    # Sent and failed notifications, resolved alerts, cycle records and amount observations
    # older than this are pruned from the state file (deliver/retention.py, Store.prune); pending
    # messages and firing alerts never are.
    retention: Annotated[
        Duration, at_most(timedelta(days=3650), "ten years of history is plenty")
    ] = timedelta(days=180)


def _check_schedule(value: str) -> str:
    parse_schedule(value)  # the zone is checked on its own (`timezone`)
    return value


# A report schedule ("mon 09:00", "daily 08:00", "monthly 1 09:00") and an IANA zone.
ScheduleText = Annotated[str, AfterValidator(_check_schedule)]


class UsageConfig(Model):
    """Daily line items (``lineItems:search``, or the invoice CSV for v1 and Cloud
    Manager): read at most once per organization per ``refresh``."""

    refresh: Annotated[
        Duration,
        at_least(
            timedelta(hours=1),
            "line items post once a day, and reading them every poll would cost one "
            "request per page; the default is 6h",
        ),
        at_most(timedelta(days=7), "line items post once a day; 6h is the default"),
    ] = timedelta(hours=6)


class ReportConfig(Model):
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


class HttpConfig(Model):
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


class LogConfig(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(Model):
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
    reports: Annotated[list[ReportConfig], Field(max_length=100)] = Field(default_factory=list)
    http: HttpConfig | None = None
    ha: HaConfig = Field(default_factory=HaConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    _source: Path | None = PrivateAttr(default=None)
    _warnings: tuple[ConfigProblem, ...] = PrivateAttr(default=())
    _secrets_read: bool = PrivateAttr(default=True)
    # org_name's index: the organizations list it was made of, and id -> name.
    _org_names: tuple[list[OrgConfig], dict[str, str]] | None = PrivateAttr(default=None)

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
        names = self._org_names
        if names is None or names[0] is not self.organizations:  # (a model_copy's own)
            by_id = {org.id: org.display_name for org in reversed(self.organizations)}
            names = self._org_names = (self.organizations, by_id)  # not a scan per call
        return names[1].get(org_id, org_id)
