"""The notifiers (Slack, email, console, webhook, PagerDuty, Teams, Alertmanager) and the
one factory that builds them from the ``notifiers:`` section of the configuration.
Rendering lives in :mod:`.render`; what every notifier does alike (``send`` of no events,
``aclose``) in :mod:`.base`; one HTTP POST and the reading of its answer, shared by every
HTTP notifier, and the base they are built on (:class:`.http.HttpNotifier`), in
:mod:`.http`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from invoice_watch.config import NotifierConfig
    from invoice_watch.notify.alertmanager import AlertmanagerNotifier
    from invoice_watch.notify.console import ConsoleNotifier
    from invoice_watch.notify.email import EmailNotifier
    from invoice_watch.notify.msteams import TeamsNotifier
    from invoice_watch.notify.pagerduty import PagerDutyNotifier
    from invoice_watch.notify.slack import SlackBotNotifier, SlackWebhookNotifier
    from invoice_watch.notify.webhook import WebhookNotifier
    from invoice_watch.types import Notifier

# Each notifier's module is imported when a notifier of its type is built (or its class
# named here): a config with the console notifier only does not import slack_sdk,
# aiosmtplib or the other receivers' renderers (about 0.1 s of a start's CPU).
_MODULES = {
    "AlertmanagerNotifier": "alertmanager",
    "ConsoleNotifier": "console",
    "EmailNotifier": "email",
    "PagerDutyNotifier": "pagerduty",
    "SlackBotNotifier": "slack",
    "SlackWebhookNotifier": "slack",
    "TeamsNotifier": "msteams",
    "WebhookNotifier": "webhook",
}


def __getattr__(name: str) -> Any:
    """The notifier classes, imported on first use (PEP 562)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "AlertmanagerNotifier",
    "ConsoleNotifier",
    "EmailNotifier",
    "PagerDutyNotifier",
    "SlackBotNotifier",
    "SlackWebhookNotifier",
    "TeamsNotifier",
    "WebhookNotifier",
    "build_notifier",
    "build_notifiers",
]


def build_notifier(name: str, config: NotifierConfig) -> Notifier:
    """The notifier for one ``notifiers.<name>`` entry."""
    if config.type == "console":
        from invoice_watch.notify.console import ConsoleNotifier

        return ConsoleNotifier(name)
    if config.type == "email":
        from invoice_watch.notify.email import EmailNotifier

        return EmailNotifier(
            name,
            host=config.host,
            port=config.port,
            tls=config.tls,
            ca_file=config.ca_file,
            username=config.username,
            password=config.password.get() if config.password is not None else None,
            from_addr=config.from_addr,
            to=config.to,
            timeout=config.timeout.total_seconds(),
        )
    proxy = config.proxy.url if config.proxy is not None else None
    if config.type == "slack":
        from invoice_watch.notify.slack import SlackBotNotifier, SlackWebhookNotifier

        if config.webhook_url is not None:
            return SlackWebhookNotifier(name, config.webhook_url.get(), proxy=proxy)
        # config/notifiers.py guarantees a token (with a channel) when there is no webhook_url.
        assert config.token is not None and config.channel is not None
        return SlackBotNotifier(
            name, config.token.get(), config.channel, config.api_url, proxy=proxy
        )
    timeout = config.timeout.total_seconds()
    if config.type == "webhook":
        from invoice_watch.notify.webhook import WebhookNotifier

        return WebhookNotifier(
            name,
            config.url.get(),
            secret=config.secret.get() if config.secret is not None else None,
            headers={key: value.get() for key, value in config.headers.items()},
            timeout=timeout,
            proxy=proxy,
        )
    if config.type == "pagerduty":
        from invoice_watch.notify.pagerduty import PagerDutyNotifier

        return PagerDutyNotifier(
            name,
            config.routing_key.get(),
            url=config.url,
            notices=config.notices,
            timeout=timeout,
            proxy=proxy,
        )
    if config.type == "msteams":
        from invoice_watch.notify.msteams import TeamsNotifier

        return TeamsNotifier(name, config.webhook_url.get(), timeout=timeout, proxy=proxy)
    from invoice_watch.notify.alertmanager import AlertmanagerNotifier

    return AlertmanagerNotifier(
        name,
        config.url,
        username=config.username,
        password=config.password.get() if config.password is not None else None,
        token=config.token.get() if config.token is not None else None,
        resend_every=config.resend_every.total_seconds(),
        notices=config.notices,
        timeout=timeout,
        proxy=proxy,
    )


def build_notifiers(configs: Mapping[str, NotifierConfig]) -> dict[str, Notifier]:
    """One notifier per configured name."""
    return {name: build_notifier(name, config) for name, config in configs.items()}
