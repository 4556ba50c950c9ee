"""The human summary of a configuration that ``invoice-watch check-config`` prints:
one line per section, organization, notifier and rule, every default made visible;
secrets show as ``<secret>`` and a proxy's password masked.
"""

from __future__ import annotations

from invoice_watch.config.models import (
    Config,
    DigestAuth,
    ReportConfig,
)
from invoice_watch.config.notifiers import (
    AlertmanagerNotifierConfig,
    EmailNotifierConfig,
    NotifierConfig,
    PagerDutyNotifierConfig,
    SlackNotifierConfig,
    TeamsNotifierConfig,
    WebhookNotifierConfig,
)
from invoice_watch.config.quantities import config_duration as duration
from invoice_watch.config.rules import (
    AmountIncreaseRule,
    ForecastRule,
    InvoiceStatusRule,
    PendingAmountRule,
    Rule,
    StatusChangeRule,
    UsageAnomalyRule,
)
from invoice_watch.format import usd
from invoice_watch.proxy import ProxyUrl
from invoice_watch.quiet import longest


def _via(proxy: ProxyUrl | None) -> str:
    return f", proxy {proxy}" if proxy is not None else ""  # its password masked


def _notifier_line(name: str, notifier: NotifierConfig) -> str:
    if isinstance(notifier, SlackNotifierConfig):
        if notifier.webhook_url is not None:
            return f"{name}: slack webhook {notifier.webhook_url}{_via(notifier.proxy)}"
        return (
            f"{name}: slack {notifier.api_url} channel {notifier.channel}, token {notifier.token}"
            f"{_via(notifier.proxy)}"
        )
    if isinstance(notifier, EmailNotifierConfig):
        login = (
            f", user {notifier.username} password {notifier.password}" if notifier.username else ""
        )
        ca = f", CA {notifier.ca_file}" if notifier.ca_file else ""
        return (
            f"{name}: email via {notifier.host}:{notifier.port} ({notifier.tls}{ca}{login}), "
            f"from {notifier.from_addr} to {', '.join(notifier.to)}"
        )
    if isinstance(notifier, WebhookNotifierConfig):
        signed = "signed (Standard Webhooks)" if notifier.secret else "unsigned"
        headers = f", headers {', '.join(notifier.headers)}" if notifier.headers else ""
        return (
            f"{name}: webhook {notifier.url}, {signed}{headers}, timeout "
            f"{duration(notifier.timeout)}{_via(notifier.proxy)}"
        )
    if isinstance(notifier, PagerDutyNotifierConfig):
        return (
            f"{name}: pagerduty {notifier.url}, routing key {notifier.routing_key}, notices "
            f"{notifier.notices}{_via(notifier.proxy)}"
        )
    if isinstance(notifier, TeamsNotifierConfig):
        return f"{name}: msteams workflow {notifier.webhook_url}{_via(notifier.proxy)}"
    if isinstance(notifier, AlertmanagerNotifierConfig):
        login = (
            f", token {notifier.token}"
            if notifier.token
            else f", user {notifier.username} password {notifier.password}"
            if notifier.username
            else ""
        )
        return (
            f"{name}: alertmanager {notifier.url}/api/v2/alerts{login}, firing alerts "
            f"posted again every {duration(notifier.resend_every)}, notices "
            f"{notifier.notices}{_via(notifier.proxy)}"
        )
    return f"{name}: console (stdout)"


def _quiet(notifier: NotifierConfig) -> str:
    """``; quiet hours ...`` for a notifier that has them, else nothing."""
    quiet = notifier.quiet_hours
    if quiet is None:
        return ""
    days = f" on {', '.join(quiet.days)}" if quiet.days else " every day"
    through = f", {', '.join(quiet.except_)} at once" if quiet.except_ else ""
    return (
        f"; quiet hours {quiet.from_:%H:%M}-{quiet.to:%H:%M} {quiet.timezone}{days}{through} "
        f"(longest {duration(longest(quiet.window()))}, not counted toward max_age)"
    )


def _rule_params(rule: Rule) -> str:
    def statuses(values: list[str] | None) -> str:
        return "|".join(values) if values else "any"

    if isinstance(rule, InvoiceStatusRule):
        return f"statuses {statuses(rule.statuses)}"
    if isinstance(rule, PendingAmountRule):
        return f"pending amount over {usd(rule.threshold_cents)}"
    if isinstance(rule, StatusChangeRule):
        return f"from {statuses(rule.from_statuses)} to {statuses(rule.to_statuses)}"
    if isinstance(rule, AmountIncreaseRule):
        limits = [usd(rule.threshold_cents)] if rule.threshold_cents is not None else []
        limits += [f"{rule.percent:g}%"] if rule.percent is not None else []
        return f"growth over {' or '.join(limits)} within {duration(rule.window)}"
    if isinstance(rule, ForecastRule):
        return f"forecast over {usd(rule.budget_cents)} after {duration(rule.min_elapsed)}"
    if isinstance(rule, UsageAnomalyRule):
        return (
            f"daily spend by {rule.by} over its {rule.baseline}-day baseline by more than "
            f"{usd(rule.min_increase_cents)}, {rule.sensitivity} sensitivity"
        )
    return f"reads failing for {duration(rule.after)}"


def _report_line(report: ReportConfig) -> str:
    orgs = ", ".join(report.orgs) if report.orgs else "every organization"
    scope = f"one for {orgs}" if report.combined else f"one per organization ({orgs})"
    disabled = " (DISABLED)" if not report.enabled else ""
    return (
        f"{report.name}: {report.schedule} {report.timezone}, {scope} -> "
        f"{', '.join(report.notify)}{disabled}"
    )


def _state_line(config: Config) -> str:
    """Where the state is: the file, or the PostgreSQL URL without its password (with
    the lease's TTL: replicas share it)."""
    if config.state.url is not None:
        from invoice_watch.store.postgres.url import display

        return (
            f"State: {display(config.state.url.get())} (PostgreSQL; replicas: lease TTL "
            f"{duration(config.ha.lease_ttl)})"
        )
    return f"State: {config.state.path}" + (
        "" if config.state.explicit else f" (default: {config.state.origin})"
    )


def summary(config: Config) -> str:
    """A human summary for ``invoice-watch check-config``; secrets show as ``<secret>``."""
    atlas = config.atlas
    auth = atlas.auth
    credentials = (
        f"API key {auth.public_key} / {auth.private_key}"
        if isinstance(auth, DigestAuth)
        else f"service account {auth.client_id} / {auth.client_secret}"
    )
    lines = [
        f"Configuration: {config.source or '<string>'}",
        f"Atlas: {atlas.base_url} (api {atlas.api}), {credentials}",
        f"  timeout {duration(atlas.timeout)}, concurrency {atlas.max_concurrency}, "
        f"retries {atlas.retries}, max backoff {duration(atlas.max_backoff)}, "
        f"max response {atlas.max_response_size // 2**10:,} KiB{_via(atlas.proxy)}",
        f"Organizations ({len(config.organizations)}):",
        *(f"  - {org.display_name} ({org.id})" for org in config.organizations),
        f"Poll: every {duration(config.poll.interval)}, jitter {duration(config.poll.jitter)}, "
        f"full listing every {duration(config.poll.full_listing_every)} and at start",
        _state_line(config),
        f"Delivery: give up after {duration(config.delivery.max_age)}, max backoff "
        f"{duration(config.delivery.max_backoff)}, group over {config.delivery.group_over}, "
        f"keep history {duration(config.delivery.retention)}",
        f"Notifiers ({len(config.notifiers)}):",
        *(f"  - {_notifier_line(name, n)}{_quiet(n)}" for name, n in config.notifiers.items()),
        f"Rules ({len(config.rules)}):",
    ]
    for rule in config.rules:
        options = [rule.severity.value]
        options += [f"orgs {', '.join(rule.orgs)}"] if rule.orgs else []
        options += [f"repeat {duration(rule.repeat)}"] if rule.repeat else []
        options += [] if rule.send_resolved else ["no resolved"]
        options += [] if rule.enabled else ["DISABLED"]
        lines.append(
            f"  - {rule.name} [{rule.type}] {_rule_params(rule)} -> {', '.join(rule.notify)}"
            f" ({', '.join(options)})"
        )
    lines.append(f"Usage: daily line items read at most every {duration(config.usage.refresh)}")
    lines.append(f"Reports ({len(config.reports)}):" if config.reports else "Reports: none")
    lines.extend(f"  - {_report_line(report)}" for report in config.reports)
    lines.append(
        f"HTTP: {config.http.listen} (at most {config.http.max_connections} connections, "
        f"idle timeout {duration(config.http.idle_timeout)})"
        if config.http
        else "HTTP: off"
    )
    lines.append(f"Log: {config.log.level}, {config.log.format}")
    return "\n".join(lines)
