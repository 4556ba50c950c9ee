"""The configuration of spend insight (issue 19): the ``usage_anomaly`` rule, ``usage``
and ``reports``: values, defaults, problems located by line, warnings and the summary.
(The corpus files tests/data/conf.bad_usage_anomaly.yml and conf.bad_report.yml are
checked by tests/test_config.py with the others.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from invoice_watch import config
from invoice_watch.config import ReportConfig, UsageAnomalyRule
from invoice_watch.errors import ConfigError

BASE = """\
atlas:
  auth:
    public_key: pub
    private_key: priv
organizations:
  - id: 5f1e0c0a9b8d7e6f5a4b3c2d
notifiers:
  out:
    type: console
rules:
  - name: failed
    type: invoice_status
    notify: [out]
"""


def load(extra: str) -> config.Config:
    return config.load(BASE + extra, filename="c.yaml", env={})


def problems(extra: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as raised:
        load(extra)
    return [(p.line, p.path, p.message) for p in raised.value.problems]


def line_of(extra: str, fragment: str) -> int:
    return next(n for n, line in enumerate((BASE + extra).splitlines(), 1) if fragment in line)


def test_usage_anomaly_rule_defaults():
    cfg = load("  - name: spikes\n    type: usage_anomaly\n    notify: [out]\n")

    rule = cfg.rules[1]
    assert isinstance(rule, UsageAnomalyRule)
    assert (rule.by, rule.baseline, rule.min_increase_cents, rule.sensitivity) == (
        "project",
        14,
        100_00,
        "medium",
    )
    assert cfg.usage.refresh == timedelta(hours=6)
    assert cfg.reports == []


def test_usage_anomaly_rule_reads_every_key():
    cfg = load(
        "  - name: spikes\n    type: usage_anomaly\n    by: sku\n    baseline: 28\n"
        '    min_increase: "$1,250.50"\n    sensitivity: high\n    notify: [out]\n'
        "usage:\n  refresh: 1d\n"
    )

    rule = cfg.rules[1]
    assert isinstance(rule, UsageAnomalyRule)
    assert (rule.by, rule.baseline, rule.min_increase_cents, rule.sensitivity) == (
        "sku",
        28,
        1250_50,
        "high",
    )
    assert cfg.usage.refresh == timedelta(days=1)


REPORT = """\
reports:
  - name: weekly
    schedule: mon 09:00
    timezone: Europe/Berlin
    notify: [out]
    orgs: [5f1e0c0a9b8d7e6f5a4b3c2d]
    combined: true
  - name: daily
    schedule: daily 08:00
    notify: [out]
"""


def test_reports_read_every_key_and_default_to_utc_per_organization():
    cfg = load(REPORT)

    weekly, daily = cfg.reports
    assert isinstance(weekly, ReportConfig)
    assert (weekly.name, weekly.schedule, weekly.timezone, weekly.combined) == (
        "weekly",
        "mon 09:00",
        "Europe/Berlin",
        True,
    )
    assert weekly.orgs == ["5f1e0c0a9b8d7e6f5a4b3c2d"]
    assert (daily.timezone, daily.orgs, daily.combined, daily.enabled) == ("UTC", None, False, True)
    # The parsed schedule, in its zone: Monday 2026-11-23 09:00 in Berlin is 08:00 UTC.
    assert weekly.when.next_after(datetime(2026, 11, 20, tzinfo=UTC)) == datetime(
        2026, 11, 23, 8, 0, tzinfo=UTC
    )


def test_empty_reports_and_usage_sections_mean_their_defaults():
    cfg = load("usage:\nreports:\n")

    assert cfg.reports == [] and cfg.usage.refresh == timedelta(hours=6)


@pytest.mark.parametrize(
    ("extra", "fragment", "path", "message"),
    [
        (
            "  - {name: s, type: usage_anomaly, notify: [out], baseline: 3}\n",
            "baseline: 3",
            "rules.1.baseline",
            "must be at least 7",
        ),
        (
            "  - {name: s, type: usage_anomaly, notify: [out], baseline: 14d}\n",
            "baseline: 14d",
            "rules.1.baseline",
            "",
        ),
        (
            "  - {name: s, type: usage_anomaly, notify: [out], min_increase: 0.001}\n",
            "min_increase",
            "rules.1.min_increase",
            "at most 2 decimals",
        ),
        ("usage:\n  refresh: 8d\n", "refresh", "usage.refresh", "must be at most 7d"),
        ("usage:\n  refresh: 6\n", "refresh", "usage.refresh", "needs a unit"),
        ("usage:\n  interval: 6h\n", "interval", "usage.interval", "unknown key `interval`"),
        (
            "reports:\n  - {name: r, schedule: 'mon 9am', notify: [out]}\n",
            "mon 9am",
            "reports.0.schedule",
            "invalid schedule 'mon 9am'",
        ),
        (
            "reports:\n  - {name: r, schedule: 'mon 09:00', timezone: CET-ish, notify: [out]}\n",
            "CET-ish",
            "reports.0.timezone",
            "unknown time zone 'CET-ish'",
        ),
        (
            "reports:\n  - {name: r, schedule: 'mon 09:00', notify: [nobody]}\n",
            "nobody",
            "reports.0.notify.0",
            "unknown notifier `nobody`",
        ),
        (
            "reports:\n  - {name: r, schedule: 'mon 09:00'}\n",
            "name: r",
            "reports.0.notify",
            "missing required key `notify`",
        ),
        ("reports: {weekly: x}\n", "reports:", "reports", "list"),
    ],
)
def test_bad_insight_setting_is_one_problem_at_its_line(
    extra: str, fragment: str, path: str, message: str
):
    ((line, got_path, got_message),) = problems(extra)

    assert (line, got_path) == (line_of(extra, fragment), path)
    assert message in got_message


def test_load_usage_anomaly_rule_is_acted_on_and_warns_nothing():
    """usage_anomaly rules are evaluated (the line items stage, usage_watch.py): the
    warning that they never fire is gone."""
    assert load("  - {name: s, type: usage_anomaly, notify: [out]}\n").warnings == ()


def test_an_enabled_report_is_acted_on_so_load_does_not_warn_about_it():
    cfg = load("reports:\n  - {name: r, schedule: 'mon 09:00', notify: [out]}\n")

    assert not cfg.warnings


def test_a_report_to_a_notifier_that_cannot_carry_one_is_a_problem_at_its_line():
    extra = (
        "  - {name: page, type: invoice_status, notify: [pd]}\n"
        "reports:\n"
        "  - name: r\n"
        "    schedule: 'mon 09:00'\n"
        "    notify:\n"
        "      - out\n"
        "      - pd\n"
    )
    text = BASE.replace(
        "notifiers:\n",
        "notifiers:\n  pd:\n    type: pagerduty\n    routing_key: " + "r" * 32 + "\n",
    )
    with pytest.raises(ConfigError) as raised:
        config.load(text + extra, filename="c.yaml", env={})
    ((line, path, message),) = [(p.line, p.path, p.message) for p in raised.value.problems]
    assert path == "reports.0.notify.1"
    assert line == (text + extra).splitlines().index("      - pd") + 1
    assert "cannot carry a report" in message and "(pagerduty)" in message


def test_load_warns_of_a_report_org_that_is_not_configured():
    cfg = load(
        "reports:\n  - {name: r, schedule: 'mon 09:00', notify: [out], enabled: false,"
        " orgs: [60a1b2c3d4e5f60718293a4b]}\n"
    )

    (warning,) = cfg.warnings
    assert warning.path == "reports.0.orgs.0"
    assert "is not under organizations" in warning.message


def test_disabled_insight_settings_do_not_warn():
    cfg = load(
        "  - {name: s, type: usage_anomaly, notify: [out], enabled: false}\n"
        "reports:\n  - {name: r, schedule: 'mon 09:00', notify: [out], enabled: false}\n"
    )

    assert cfg.warnings == ()


def test_summary_shows_the_rule_usage_and_reports():
    text = config.summary(
        load("  - {name: s, type: usage_anomaly, by: cluster, notify: [out]}\n" + REPORT)
    )

    assert (
        "  - s [usage_anomaly] daily spend by cluster over its 14-day baseline by more than "
        "$100.00, medium sensitivity -> out (warning)"
    ) in text
    assert "Usage: daily line items read at most every 6h" in text
    assert "  - weekly: mon 09:00 Europe/Berlin, one for 5f1e0c0a9b8d7e6f5a4b3c2d -> out" in text
    assert "  - daily: daily 08:00 UTC, one per organization (every organization) -> out" in text
    assert "Reports: none" in config.summary(load(""))
