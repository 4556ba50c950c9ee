"""The configuration file (SPEC §6): the frozen pydantic models every stage reads, and
the loader that turns YAML into them. Import from here; the modules are::

    values.py         Secret and the text values (names, logins, hosts, URLs, addresses,
                      time zones...)
    quantities.py     durations (with their bounds), sizes and money
    base.py           the base model: frozen, unknown keys refused, no input in errors
    models.py         Config and its sections (atlas, organizations, poll, state, ha,
                      delivery, usage, reports, http, log)
    notifiers.py      the notifiers (one model per type) and their quiet hours
    rules.py          the rules (one model per type)
    loader.py         load(text) and load_file(path): the pipeline, `<secret>_file`,
                      defaults, cross-references
    yaml_tree.py      the bounded YAML composer, and nodes -> plain data (merge keys)
    interpolation.py  ${VAR} interpolation (Compose spec)
    locations.py      where each value is; pydantic errors mapped back to file:line
    warnings.py       valid settings that are almost surely mistakes
    paths.py          where the config, state and secret files are
    files.py          reading a file the config names without blocking (FIFOs, devices)
    summarize.py      the human summary check-config prints

Money is USD in the file and integer cents in the models (``threshold_cents``, read from
the YAML key ``threshold``); durations are ``90s``/``15m``/``1h``/``1d`` in the file and
``timedelta`` in the models; secrets are :class:`Secret`, which never shows its value.
"""

from __future__ import annotations

from invoice_watch.config.loader import load, load_file
from invoice_watch.config.models import (
    AtlasConfig,
    Config,
    DeliveryConfig,
    DigestAuth,
    HttpConfig,
    LogConfig,
    OrgConfig,
    PollConfig,
    ReportConfig,
    ServiceAccountAuth,
    StateConfig,
    UsageConfig,
)
from invoice_watch.config.notifiers import (
    AlertmanagerNotifierConfig,
    ConsoleNotifierConfig,
    EmailNotifierConfig,
    NotifierConfig,
    PagerDutyNotifierConfig,
    SlackNotifierConfig,
    TeamsNotifierConfig,
    WebhookNotifierConfig,
)
from invoice_watch.config.paths import find_config_file, state_files_elsewhere
from invoice_watch.config.rules import (
    AmountIncreaseRule,
    ForecastRule,
    InvoiceStatusRule,
    PendingAmountRule,
    PollFailureRule,
    Rule,
    StatusChangeRule,
    UsageAnomalyRule,
)
from invoice_watch.config.summarize import summary
from invoice_watch.config.values import Secret
from invoice_watch.config.yaml_tree import MAX_CONFIG_BYTES

__all__ = [
    "MAX_CONFIG_BYTES",
    "AlertmanagerNotifierConfig",
    "AmountIncreaseRule",
    "AtlasConfig",
    "Config",
    "ConsoleNotifierConfig",
    "DeliveryConfig",
    "DigestAuth",
    "EmailNotifierConfig",
    "ForecastRule",
    "HttpConfig",
    "InvoiceStatusRule",
    "LogConfig",
    "NotifierConfig",
    "OrgConfig",
    "PagerDutyNotifierConfig",
    "PendingAmountRule",
    "PollConfig",
    "PollFailureRule",
    "ReportConfig",
    "Rule",
    "Secret",
    "ServiceAccountAuth",
    "SlackNotifierConfig",
    "StateConfig",
    "StatusChangeRule",
    "TeamsNotifierConfig",
    "UsageAnomalyRule",
    "UsageConfig",
    "WebhookNotifierConfig",
    "find_config_file",
    "load",
    "load_file",
    "state_files_elsewhere",
    "summary",
]
