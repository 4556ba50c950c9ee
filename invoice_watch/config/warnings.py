"""The warnings of a valid configuration: settings that are almost surely mistakes
(SMTP port 465 with ``tls: starttls``, a password or token sent over http:// or without
TLS to another machine, polling Atlas every few seconds, a rule that can never fire...).

Each check yields (dotted path, message); keep each one a setting that is almost never
meant (a warning an operator learns to ignore is noise). :func:`find_warnings` locates
them like problems; check-config prints them and exits 0, ``run`` logs them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from datetime import timedelta

from yarl import URL

from invoice_watch import constants
from invoice_watch.config.locations import Loc, Locations, in_file_order, located
from invoice_watch.config.models import (
    Config,
)
from invoice_watch.config.notifiers import (
    AlertmanagerNotifierConfig,
    EmailNotifierConfig,
    PagerDutyNotifierConfig,
    SlackNotifierConfig,
    TeamsNotifierConfig,
    WebhookNotifierConfig,
)
from invoice_watch.config.quantities import config_duration as duration
from invoice_watch.config.rules import (
    ForecastRule,
    InvoiceStatusRule,
    StatusChangeRule,
)
from invoice_watch.errors import ConfigProblem

_Warning = tuple[Loc, str]
_Given = Callable[[Loc], bool]  # whether the file sets this key (not a default)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(url: str) -> str:
    try:
        return URL(url).host or ""
    except ValueError:
        return ""


# (port, tls) pairs that cannot talk: 465 is SMTP over implicit TLS (RFC 8314); 587 and
# 25 start in clear and upgrade with STARTTLS (RFC 6409, RFC 3207).
_SMTP_MISMATCH = {
    (465, "starttls"): "port 465 expects TLS from the first byte (implicit TLS), but tls "
    "is starttls: the connection will hang or fail; use tls: implicit",
    (465, "none"): "port 465 expects TLS from the first byte (implicit TLS), but tls is "
    "none: the connection will hang or fail; use tls: implicit",
    (587, "implicit"): "port 587 starts in clear text and upgrades with STARTTLS, but tls "
    "is implicit: the TLS handshake will fail; use tls: starttls (or port 465)",
    (25, "implicit"): "port 25 starts in clear text and upgrades with STARTTLS, but tls is "
    "implicit: the TLS handshake will fail; use tls: starttls (or port 465)",
}


def _email_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    for name, notifier in config.notifiers.items():
        if not isinstance(notifier, EmailNotifierConfig):
            continue
        loc: Loc = ("notifiers", name)
        mismatch = _SMTP_MISMATCH.get((notifier.port, notifier.tls))
        if mismatch and given((*loc, "port")):
            yield (*loc, "port"), mismatch
        if notifier.tls == "none" and notifier.password and not _is_loopback(notifier.host):
            yield (
                (*loc, "tls"),
                f"tls: none sends the password to {notifier.host} in clear text; use "
                "starttls or implicit (or a relay on localhost)",
            )


def _cleartext_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    """http:// to another machine: the credentials or the invoices travel in clear."""
    if config.atlas.base_url.startswith("http://"):
        host = _url_host(config.atlas.base_url)
        if not _is_loopback(host):
            yield (
                ("atlas", "base_url"),
                f"http:// sends the invoices (and a service account's secret) to {host} "
                "unencrypted; use https://",
            )
    for name, notifier in config.notifiers.items():
        yield from _receiver_cleartext(name, notifier)
        if not isinstance(notifier, SlackNotifierConfig):
            continue
        if notifier.token is not None and notifier.api_url.startswith("http://"):
            host = _url_host(notifier.api_url)
            if not _is_loopback(host):
                yield (
                    ("notifiers", name, "api_url"),
                    f"http:// sends the bot token to {host} unencrypted; use https://",
                )
        if notifier.webhook_url is not None:
            url = notifier.webhook_url.get()
            if url.startswith("http://") and not _is_loopback(_url_host(url)):
                yield (
                    ("notifiers", name, "webhook_url"),
                    "the webhook URL is http://: the URL, which is the webhook's secret, "
                    "travels unencrypted; use the https:// URL Slack gave",
                )


def _receiver_cleartext(name: str, notifier: object) -> Iterator[_Warning]:
    """The receivers' credentials over http:// to another machine."""
    loc: Loc = ("notifiers", name)
    if isinstance(notifier, WebhookNotifierConfig):
        if notifier.headers and _cleartext(notifier.url.get()):
            yield (
                (*loc, "headers"),
                "url is http://: the headers (credentials?) travel unencrypted; use https://",
            )
    elif isinstance(notifier, PagerDutyNotifierConfig) and _cleartext(notifier.url):
        yield (*loc, "url"), "http:// sends the routing key unencrypted; use https://"
    elif isinstance(notifier, TeamsNotifierConfig) and _cleartext(notifier.webhook_url.get()):
        yield (
            (*loc, "webhook_url"),
            "the webhook URL is http://: the URL, which is the webhook's secret, travels "
            "unencrypted; use the https:// URL the workflow gave",
        )
    elif isinstance(notifier, AlertmanagerNotifierConfig):
        what = "token" if notifier.token is not None else "password"
        if (notifier.token or notifier.password) and _cleartext(notifier.url):
            yield (*loc, "url"), f"http:// sends the {what} unencrypted; use https://"


def _cleartext(url: str) -> bool:
    return url.startswith("http://") and not _is_loopback(_url_host(url))


def _path_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    """A path before Atlas's own (``/api/atlas/v2/...``): an API path is refused (see
    AtlasConfig), any other is a gateway's, or a mistake."""
    base = URL(config.atlas.base_url)
    if base.path.strip("/"):
        yield (
            ("atlas", "base_url"),
            f"{config.atlas.base_url} has a path: requests go to {config.atlas.base_url}"
            f"{constants.API_PREFIXES[config.atlas.api]}/orgs/…, while Atlas has none before "
            f"/api; write {base.with_path('/')} unless a gateway in front of Atlas needs it",
        )


def _http_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    """``http.max_connections`` above what this machine lets a process open: the
    daemon holds fewer (http_endpoint.connection_cap), which check-config says here."""
    if config.http is None:
        return
    from invoice_watch.http_endpoint import FD_RESERVE, fd_limits

    _, hard = fd_limits()
    most = hard - FD_RESERVE - 32  # 32: about what the daemon has open before it listens
    if config.http.max_connections > most:
        yield (
            ("http", "max_connections"),
            f"{config.http.max_connections} connections are more than a process may open "
            f"here (RLIMIT_NOFILE hard limit {hard}, less {FD_RESERVE} kept for Atlas, the "
            f"notifiers, the state file and connections being accepted): the daemon will "
            f"hold at most about {max(1, most)}; raise LimitNOFILE= in the systemd unit "
            "(or `ulimit -Hn`), or lower http.max_connections",
        )


_FAST_POLL = timedelta(minutes=1)


def _poll_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    interval = config.poll.interval
    if interval < _FAST_POLL and not _is_loopback(_url_host(config.atlas.base_url)):
        yield (
            ("poll", "interval"),
            f"polling Atlas every {duration(interval)}: invoices change a few times a day, "
            "and the Administration API is rate-limited (429s would delay every "
            "organization's read); poll every 15m (the default) or at least every 1m",
        )


def _rule_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    listed = {org.id for org in config.organizations}
    interval = config.poll.interval
    for i, rule in enumerate(config.rules):
        loc: Loc = ("rules", i)
        if isinstance(rule, StatusChangeRule):
            if given((*loc, "repeat")):
                yield (
                    (*loc, "repeat"),
                    "a status_change rule sends one-shot notices: repeat has no effect; remove it",
                )
            if given((*loc, "send_resolved")) and rule.send_resolved:
                yield (
                    (*loc, "send_resolved"),
                    "a status_change rule sends one-shot notices that never resolve: "
                    "send_resolved has no effect; remove it",
                )
            if (
                rule.from_statuses
                and rule.to_statuses
                and (len(set(rule.from_statuses) | set(rule.to_statuses)) == 1)
            ):
                yield (
                    (*loc, "to"),
                    f"from and to are both {rule.to_statuses[0]}: an invoice never moves "
                    "from a status to the same one, so this rule never fires",
                )
        elif rule.repeat is not None and rule.repeat < interval:
            yield (
                (*loc, "repeat"),
                f"repeat {duration(rule.repeat)} is shorter than poll.interval "
                f"{duration(interval)}: conditions are checked once per poll, so reminders "
                f"come every {duration(interval)} at most; set repeat to "
                f"{duration(interval)} or more",
            )
        if isinstance(rule, ForecastRule) and rule.min_elapsed > _LONGEST_PERIOD:
            yield (
                (*loc, "min_elapsed"),
                f"min_elapsed {duration(rule.min_elapsed)} is longer than any billing "
                "period (a month): this rule can never fire; the default is 3d",
            )
        if isinstance(rule, InvoiceStatusRule) and given((*loc, "statuses")):
            for j, status in enumerate(rule.statuses):
                if status in constants.FINAL_STATUSES:
                    yield (
                        (*loc, "statuses", j),
                        f"{status} is final: this rule fires once for every {status} "
                        "invoice, past months included, and never resolves; to hear "
                        f"about new ones, use a status_change rule with to: [{status}]",
                    )
        for j, org_id in enumerate(rule.orgs or []):
            if org_id not in listed:
                yield (
                    (*loc, "orgs", j),
                    f"organization {org_id} is not under organizations: this rule sees "
                    "its invoices only if a listed organization pays them (linked "
                    "invoices); check the id",
                )
    if not any(rule.enabled for rule in config.rules):
        yield ("rules",), "every rule has enabled: false: nothing will ever be sent"


def _insight_warnings(config: Config, given: _Given) -> Iterator[_Warning]:
    """A report names organizations that are configured (issue 19 §2)."""
    listed = {org.id for org in config.organizations}
    for i, report in enumerate(config.reports):
        for j, org_id in enumerate(report.orgs or []):
            if org_id not in listed:
                yield (
                    ("reports", i, "orgs", j),
                    f"organization {org_id} is not under organizations: a report reads only "
                    "the organizations listed there; check the id",
                )


_LONGEST_PERIOD = timedelta(days=31)
_WARNING_CHECKS: tuple[Callable[[Config, _Given], Iterator[_Warning]], ...] = (
    _email_warnings,
    _cleartext_warnings,
    _path_warnings,
    _http_warnings,
    _poll_warnings,
    _rule_warnings,
    _insight_warnings,
)


def find_warnings(config: Config, where: Locations) -> tuple[ConfigProblem, ...]:
    """The warnings of a valid configuration, located like problems (the key when the
    file sets it, else the closest enclosing value), in file order."""
    found = []
    for check in _WARNING_CHECKS:
        for loc, message in check(config, where.marks.__contains__):
            at = next((loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in where.marks), ())
            found.append(located(where.filename, where.marks.get(at), loc, f"warning: {message}"))
    return tuple(in_file_order(found))
