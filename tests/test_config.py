"""Tests of invoice_watch.config: valid files, defaults, interpolation, `_file` secrets,
and a corpus of broken files (tests/data/conf.bad_*.yml) whose leading
`# expect: LINE:COL: PATH: message fragment` comments list every problem they must raise."""

from __future__ import annotations

import itertools
import random
import re
import time
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import pytest
import trustme
import yaml
from pydantic import BaseModel, ValidationError

from invoice_watch import cli, config
from invoice_watch.config import (
    AmountIncreaseRule,
    Config,
    DigestAuth,
    EmailNotifierConfig,
    ForecastRule,
    InvoiceStatusRule,
    PendingAmountRule,
    PollFailureRule,
    Secret,
    ServiceAccountAuth,
    SlackNotifierConfig,
    StatusChangeRule,
    interpolation,
    quantities,
)
from invoice_watch.errors import ConfigError, ConfigProblem
from invoice_watch.proxy import ProxyUrl
from invoice_watch.schedule import PollSchedule
from invoice_watch.types import Severity
from tests.world import World

DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).parent.parent / "config.example.yaml"
CORPUS = sorted(DATA.glob("conf.bad_*.yml"))
EXPECT = re.compile(r"# expect: (\d+):(\d+): ([^\s:]*): ?(.*)")
# The environment every corpus file is loaded with; its values must never leak.
CORPUS_ENV = {"ATLAS_PUBLIC_KEY": "pub-key", "ATLAS_PRIVATE_KEY": "priv-SECRET-value"}

ENV_VARS = (
    "ATLAS_PUBLIC_KEY",
    "ATLAS_PRIVATE_KEY",
    "ATLAS_CLIENT_SECRET",
    "SLACK_WEBHOOK_URL",
    "SLACK_TOKEN",
    "SMTP_HOST",
    "SMTP_PASSWORD",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "INVOICE_WATCH_CONFIG",
)

MINIMAL = """\
atlas:
  auth:
    public_key: pub
    private_key: {private_key}
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


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def load_minimal() -> Config:
    return config.load(MINIMAL.format(private_key="priv"), env={})


def problems_of(text: str, env: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        config.load(text, env=env or {})
    return info.value.problems


# --- valid files ---------------------------------------------------------------------


def test_load_full_config_reads_every_key():
    env = {"ATLAS_PRIVATE_KEY": "pk", "SLACK_TOKEN": "xoxb-1", "SMTP_PASSWORD": "pw"}
    cfg = config.load_file(DATA / "conf.full.yml", env=env)

    assert cfg.source == DATA / "conf.full.yml"
    atlas = cfg.atlas
    assert (atlas.base_url, atlas.ui_url, atlas.api) == (
        "https://atlas.example.test",
        "https://ui.example.test",
        "cloud-manager",
    )
    assert atlas.auth == DigestAuth(public_key="abcdefgh", private_key=Secret("pk"))
    assert (atlas.timeout, atlas.max_concurrency, atlas.retries, atlas.max_backoff) == (
        timedelta(seconds=45),
        8,
        3,
        timedelta(minutes=2),
    )
    assert [(o.id, o.display_name) for o in cfg.organizations] == [
        ("5f1e0c0a9b8d7e6f5a4b3c2d", "Production"),
        ("60a1b2c3d4e5f60718293a4b", "60a1b2c3d4e5f60718293a4b"),
    ]
    assert cfg.poll.interval == timedelta(hours=1, minutes=30)
    assert cfg.poll.jitter == timedelta(minutes=1)
    assert cfg.state.path == DATA / "state" / "watch.db"
    assert cfg.delivery.max_age == timedelta(days=2)
    assert cfg.delivery.max_backoff == timedelta(minutes=5)
    assert cfg.delivery.group_over == 10

    hook, bot, mail = cfg.notifiers["hook"], cfg.notifiers["bot"], cfg.notifiers["mail"]
    assert isinstance(hook, SlackNotifierConfig) and hook.webhook_url is not None
    assert hook.webhook_url.get() == "https://hooks.slack.com/services/T000/B000/XXXX"
    assert isinstance(bot, SlackNotifierConfig) and bot.token == Secret("xoxb-1")
    assert (bot.channel, bot.api_url) == ("#billing", "http://127.0.0.1:8080/api/")
    assert isinstance(mail, EmailNotifierConfig)
    assert (mail.host, mail.port, mail.tls, mail.username) == (
        "smtp.example.test",
        465,
        "implicit",
        "alerts",
    )
    assert mail.password == Secret("pw")
    assert mail.from_addr == "invoice-watch <alerts@example.test>"
    assert mail.to == ["finops@example.test", "oncall@example.test"]
    assert mail.timeout == timedelta(seconds=10)
    assert cfg.notifiers["out"].type == "console"

    failed, pending, closed, jump, forecast, unreadable = cfg.rules
    assert isinstance(failed, InvoiceStatusRule)
    assert failed.statuses == ["FAILED", "FAILED", "PENDING"]
    assert failed.orgs == ["5f1e0c0a9b8d7e6f5a4b3c2d"]
    assert failed.severity is Severity.CRITICAL
    assert failed.repeat == timedelta(days=1)
    assert failed.send_resolved is False
    assert isinstance(pending, PendingAmountRule)
    assert (pending.threshold_cents, pending.enabled) == (500050, False)
    assert isinstance(closed, StatusChangeRule)
    assert (closed.from_statuses, closed.to_statuses) == (["PENDING"], ["CLOSED", "INVOICED"])
    assert isinstance(jump, AmountIncreaseRule)
    assert (jump.threshold_cents, jump.percent, jump.window) == (29, 12.5, timedelta(hours=6))
    assert isinstance(forecast, ForecastRule)
    assert (forecast.budget_cents, forecast.min_elapsed) == (1_200_000, timedelta(days=5))
    assert isinstance(unreadable, PollFailureRule)
    assert unreadable.after == timedelta(minutes=30)

    assert cfg.http is not None and (cfg.http.host, cfg.http.port) == ("::1", 9100)
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")


def test_load_minimal_config_takes_defaults():
    cfg = config.load_file(DATA / "conf.minimal.yml", env={"ATLAS_CLIENT_SECRET": "cs"})

    atlas = cfg.atlas
    assert atlas.base_url == atlas.ui_url == "https://cloud.mongodb.com"
    assert atlas.api == "v2"
    assert atlas.auth == ServiceAccountAuth(client_id="mdb_sa_id_0123", client_secret=Secret("cs"))
    assert (atlas.timeout, atlas.max_concurrency, atlas.retries, atlas.max_backoff) == (
        timedelta(seconds=30),
        4,
        5,
        timedelta(seconds=30),
    )
    assert cfg.poll.interval == timedelta(minutes=15)
    assert cfg.poll.jitter == timedelta(0)
    assert cfg.state.path == DATA / "invoice-watch.db"
    assert cfg.delivery.max_age == timedelta(hours=24)
    assert cfg.delivery.max_backoff == timedelta(seconds=60)
    assert cfg.delivery.group_over == 5
    assert cfg.http is None
    assert (cfg.log.level, cfg.log.format) == ("info", "text")
    failed, jump = cfg.rules
    assert isinstance(failed, InvoiceStatusRule)
    assert failed.statuses == ["FAILED"]
    assert failed.orgs is None
    assert failed.severity is Severity.WARNING
    assert (failed.repeat, failed.send_resolved, failed.enabled) == (None, True, True)
    assert isinstance(jump, AmountIncreaseRule)
    assert (jump.threshold_cents, jump.percent, jump.window) == (None, 10.0, timedelta(hours=24))


def example_credentials(folder: Path) -> str:
    """The secret files config.example.yaml names (by `_file`), in ``folder``."""
    secrets = {
        "atlas-private-key": "priv",
        "slack-webhook-url": "https://hooks.slack.com/services/T000/B000/XXXX",
        "smtp-password": "pw",
    }
    for name, value in secrets.items():
        (folder / name).write_text(value + "\n")
    return str(folder)


def test_load_example_config_is_valid_with_every_rule_type(tmp_path: Path):
    env = {"ATLAS_PUBLIC_KEY": "pub", "CREDENTIALS_DIRECTORY": example_credentials(tmp_path)}
    cfg = config.load_file(EXAMPLE, env=env)

    assert {rule.type for rule in cfg.rules} == {
        "invoice_status",
        "pending_amount",
        "status_change",
        "amount_increase",
        "forecast",
        "poll_failure",
        "usage_anomaly",
    }
    assert set(cfg.notifiers) == {"ops-slack", "ops-mail", "stdout"}


def test_load_empty_optional_sections_mean_defaults():
    cfg = config.load(MINIMAL.format(private_key="p") + "poll:\ndelivery:\nlog:\n", env={})

    assert cfg.poll.interval == timedelta(minutes=15)
    assert cfg.log.level == "info"


def test_load_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ATLAS_PRIVATE_KEY", "from-environ")

    cfg = config.load(MINIMAL.format(private_key="${ATLAS_PRIVATE_KEY}"))

    assert isinstance(cfg.atlas.auth, DigestAuth)
    assert cfg.atlas.auth.private_key.get() == "from-environ"


def test_config_is_frozen():
    cfg = load_minimal()

    with pytest.raises(ValidationError):
        cfg.poll.interval = timedelta(seconds=5)  # type: ignore[misc]


def test_config_org_name_uses_name_else_id():
    cfg = config.load_file(
        DATA / "conf.full.yml",
        env={"ATLAS_PRIVATE_KEY": "pk", "SLACK_TOKEN": "t", "SMTP_PASSWORD": "pw"},
    )

    assert cfg.org_name("5f1e0c0a9b8d7e6f5a4b3c2d") == "Production"
    assert cfg.org_name("60a1b2c3d4e5f60718293a4b") == "60a1b2c3d4e5f60718293a4b"
    assert cfg.org_name("70a1b2c3d4e5f60718293a4b") == "70a1b2c3d4e5f60718293a4b"


def test_config_org_name_of_a_copy_with_other_organizations():
    """org_name looks names up in an index made once (not a scan per call, quadratic
    over a cycle's organizations): a copy with other organizations has its own."""
    cfg = load_minimal()
    org_id = cfg.organizations[0].id
    assert cfg.org_name(org_id) == cfg.organizations[0].display_name  # the index is made
    renamed = cfg.organizations[0].model_copy(update={"name": "Renamed"})
    copy = cfg.model_copy(update={"organizations": [renamed]})

    assert copy.org_name(org_id) == "Renamed"
    assert cfg.org_name(org_id) != "Renamed"


# --- interpolation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${HOST}", {"HOST": "smtp.a.test"}, "smtp.a.test"),
        ("${HOST}", {"HOST": ""}, ""),
        ("${HOST:-smtp.b.test}", {}, "smtp.b.test"),
        ("${HOST:-smtp.b.test}", {"HOST": ""}, "smtp.b.test"),
        ("${HOST:-smtp.b.test}", {"HOST": "smtp.a.test"}, "smtp.a.test"),
        ("${HOST-smtp.b.test}", {}, "smtp.b.test"),
        ("${HOST-smtp.b.test}", {"HOST": ""}, ""),
        ("${HOST-smtp.b.test}", {"HOST": "smtp.a.test"}, "smtp.a.test"),
        ("${HOST:?HOST is required}", {"HOST": "smtp.a.test"}, "smtp.a.test"),
        ("${HOST?HOST is required}", {"HOST": ""}, ""),
        ("${HOST:-}", {}, ""),
        ("cost $$5", {}, "cost $5"),
        ("$$${HOST}$$", {"HOST": "x"}, "$x$"),
        ("a$b and $ alone", {}, "a$b and $ alone"),
        ("${A}.${B:-b}.test", {"A": "a"}, "a.b.test"),
    ],
)
def test_interpolate_compose_forms(value: str, env: dict[str, str], expected: str):
    assert interpolation.interpolate(value, env) == expected


@pytest.mark.parametrize(
    ("value", "env", "message"),
    [
        ("${HOST}", {}, "environment variable HOST is not set; set it, or give a default"),
        ("${HOST:?give the SMTP host}", {}, "HOST: give the SMTP host"),
        ("${HOST:?give the SMTP host}", {"HOST": ""}, "HOST: give the SMTP host"),
        ("${HOST?give the SMTP host}", {}, "HOST: give the SMTP host"),
        ("${HOST:?}", {}, "HOST: environment variable is not set"),
        ("${}", {}, "invalid ${...}"),
        ("${HOST", {}, "invalid ${...}"),
    ],
)
def test_interpolate_errors_say_what_to_set(value: str, env: dict[str, str], message: str):
    with pytest.raises(interpolation.InterpolationError, match=re.escape(message)):
        interpolation.interpolate(value, env)


def test_load_interpolated_values_are_typed_by_the_model():
    text = MINIMAL.format(private_key="p") + (
        "  - name: big\n"
        "    type: pending_amount\n"
        "    threshold: ${BUDGET}\n"
        "    enabled: ${ENABLED:-false}\n"
        "    repeat: ${REPEAT:-2h}\n"
        "    notify: [out]\n"
        "delivery:\n"
        "  group_over: ${GROUP:-7}\n"
    )

    cfg = config.load(text, env={"BUDGET": "1,250.5"})

    rule = cfg.rules[1]
    assert isinstance(rule, PendingAmountRule)
    assert rule.threshold_cents == 125050
    assert rule.enabled is False
    assert rule.repeat == timedelta(hours=2)
    assert cfg.delivery.group_over == 7


def test_load_interpolation_applies_to_values_not_keys():
    text = MINIMAL.format(private_key="p") + "log:\n  ${KEY}: debug\n"

    (problem,) = problems_of(text, {"KEY": "level"})

    assert (problem.line, problem.path) == (15, "log.${KEY}")
    assert "unknown key `${KEY}`" in problem.message


def test_load_unset_variable_is_an_error_at_its_line():
    (problem,) = problems_of(MINIMAL.format(private_key="${ATLAS_PRIVATE_KEY}"))

    assert (problem.line, problem.column, problem.path) == (4, 18, "atlas.auth.private_key")
    assert "ATLAS_PRIVATE_KEY is not set" in problem.message


# --- secrets from files --------------------------------------------------------------


def test_load_secret_files_resolve_against_config_folder():
    cfg = config.load_file(DATA / "conf.secret_files.yml", env={})

    assert isinstance(cfg.atlas.auth, DigestAuth)
    assert cfg.atlas.auth.private_key.get() == "file-secret-value"
    hook, mail = cfg.notifiers["hook"], cfg.notifiers["mail"]
    assert isinstance(hook, SlackNotifierConfig) and hook.webhook_url is not None
    assert hook.webhook_url.get() == "https://hooks.slack.com/services/T000/B000/FILEFILE"
    assert isinstance(mail, EmailNotifierConfig) and mail.password is not None
    assert mail.password.get() == "smtp-file-password"  # CRLF stripped


def test_load_secret_files_resolve_against_credentials_directory(tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "client-secret").write_text("from-credentials\n")
    text = MINIMAL.replace(
        "    public_key: pub\n    private_key: {private_key}",
        "    client_id: sa\n    client_secret_file: client-secret",
    )

    cfg = config.load(text, env={"CREDENTIALS_DIRECTORY": str(credentials)}, base_dir=DATA)

    assert isinstance(cfg.atlas.auth, ServiceAccountAuth)
    assert cfg.atlas.auth.client_secret.get() == "from-credentials"  # one newline dropped


def test_load_secret_file_with_a_line_break_left_is_an_error(tmp_path: Path):
    (tmp_path / "client-secret").write_text("from-credentials\n\n")
    text = MINIMAL.replace(
        "    public_key: pub\n    private_key: {private_key}",
        "    client_id: sa\n    client_secret_file: client-secret",
    )

    (problem,) = problems_of(text, {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert (problem.line, problem.path) == (4, "atlas.auth.client_secret_file")
    assert "contains a line break" in problem.message
    assert "from-credentials" not in str(problem)


def test_load_secret_file_absolute_path_ignores_credentials_directory(tmp_path: Path):
    secret = tmp_path / "pk"
    secret.write_text("absolute")
    text = MINIMAL.replace("private_key: {private_key}", f"private_key_file: {secret}")

    cfg = config.load(text, env={"CREDENTIALS_DIRECTORY": "/nonexistent"})

    assert isinstance(cfg.atlas.auth, DigestAuth)
    assert cfg.atlas.auth.private_key.get() == "absolute"


def test_load_unreadable_secret_file_names_the_key_not_the_content(tmp_path: Path):
    text = MINIMAL.replace("private_key: {private_key}", "private_key_file: missing")

    problems = problems_of(text, {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert [(p.line, p.column, p.path) for p in problems] == [
        (4, 23, "atlas.auth.private_key_file")
    ]
    assert f"cannot read {tmp_path / 'missing'}: no such file" in problems[0].message


# --- the broken corpus ---------------------------------------------------------------


def expectations(path: Path) -> list[tuple[int, int, str, str]]:
    found = []
    for line in path.read_text().splitlines():
        if match := EXPECT.fullmatch(line):
            found.append((int(match[1]), int(match[2]), match[3], match[4]))
    return found


def test_corpus_has_at_least_30_broken_configs_each_with_expectations():
    assert len(CORPUS) >= 30
    assert all(expectations(path) for path in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name.removeprefix("conf.bad_"))
def test_load_corpus_reports_exactly_the_expected_problems(path: Path):
    with pytest.raises(ConfigError) as info:
        config.load_file(path, env=CORPUS_ENV)

    problems = info.value.problems
    got = [(p.line, p.column, p.path) for p in problems]
    assert got == [e[:3] for e in expectations(path)]
    for problem, (*_, fragment) in zip(problems, expectations(path), strict=True):
        assert fragment in problem.message
        assert problem.file == str(path)
        assert "priv-SECRET-value" not in str(problem)


def test_load_reports_every_problem_at_once():
    path = DATA / "conf.bad_many_errors.yml"

    with pytest.raises(ConfigError) as info:
        config.load_file(path, env=CORPUS_ENV)

    sections = {p.path.split(".")[0] for p in info.value.problems}
    assert sections == {"atlas", "organizations", "poll", "notifiers", "rules", "http"}
    assert len(info.value.problems) == 9
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}:11:8: atlas.api: use one of: 'v2', 'v1' or 'cloud-manager'"
    assert len(lines) == 9


def test_load_file_unreadable_is_one_problem_at_line_one(tmp_path: Path):
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        config.load_file(str(missing))

    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.column, problem.path) == (str(missing), 1, 1, "")
    assert "cannot read the configuration file" in problem.message


def test_load_string_problems_name_the_given_filename():
    with pytest.raises(ConfigError) as info:
        config.load("rules: [", filename="inline.yaml", env={})

    assert str(info.value).startswith("inline.yaml:1:9: invalid YAML")


def test_load_errors_chain_their_cause_unless_it_would_show_a_secret(tmp_path: Path):
    """errors.py: `raise ... from exc`; not where the cause quotes the file's text."""
    secret = CORPUS_ENV["ATLAS_PRIVATE_KEY"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(f"private_key: {secret}\n".encode() + b"\xff\n")

    with pytest.raises(ConfigError) as unreadable:
        config.load_file(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError) as bomb:
        config.load(alias_bomb(9), env={})
    with pytest.raises(ConfigError) as invalid:
        config.load(f'atlas:\n  private_key: "{secret}\n  x: [', env={})
    with pytest.raises(ConfigError) as undecodable:
        config.load_file(binary, env={})

    assert isinstance(unreadable.value.__cause__, FileNotFoundError)
    assert "expands to more than" in str(bomb.value.__cause__)
    for quoting in (invalid.value, undecodable.value):
        assert quoting.__cause__ is None and quoting.__suppress_context__
        assert secret not in str(quoting)


# --- values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d 2h", timedelta(days=1, hours=2)),
        ("0s", timedelta(0)),
        (timedelta(minutes=2), timedelta(minutes=2)),
    ],
)
def test_parse_duration_accepts_units(text: object, expected: timedelta):
    assert quantities._parse_duration(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (900, "write `900s` for 900 seconds"),
        (Decimal("1.5"), "invalid duration `1.5`"),
        ("15", "invalid duration `15`"),
        ("15 minutes", "invalid duration"),
        ("m", "invalid duration"),
        ("-5m", "invalid duration"),
        ("1m1h", "invalid duration"),
        (True, "invalid duration"),
        (timedelta(seconds=-1), "cannot be negative"),
    ],
)
def test_parse_duration_rejects_numbers_and_junk(value: object, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        quantities._parse_duration(value)


def test_load_zero_duration_only_where_it_makes_sense():
    ok = config.load(MINIMAL.format(private_key="p") + "poll:\n  jitter: 0s\n", env={})
    assert ok.poll.jitter == timedelta(0)

    (problem,) = problems_of(MINIMAL.format(private_key="p") + "delivery:\n  max_age: 0s\n")
    assert (problem.path, problem.message.split(";")[0]) == (
        "delivery.max_age",
        "must be at least 1s",
    )


def test_load_poll_full_listing_every_defaults_to_a_day_and_is_summarized():
    cfg = config.load(MINIMAL.format(private_key="p"), env={})
    assert cfg.poll.full_listing_every == timedelta(days=1)
    assert "Poll: every 15m, jitter 0s, full listing every 1d and at start" in (config.summary(cfg))
    six = config.load(MINIMAL.format(private_key="p") + "poll:\n  full_listing_every: 6h\n", env={})
    assert six.poll.full_listing_every == timedelta(hours=6)

    (problem,) = problems_of(MINIMAL.format(private_key="p") + "poll:\n  full_listing_every: 0s\n")
    assert (problem.path, problem.line, problem.message.split(";")[0]) == (
        "poll.full_listing_every",
        15,
        "must be at least 1s",
    )


@pytest.mark.parametrize(
    ("value", "cents"),
    [
        (5000, 500000),
        (0, 0),
        (Decimal("5000.50"), 500050),
        (Decimal("0.29"), 29),
        (Decimal("1e3"), 100000),
        ("5000", 500000),
        ("5000.5", 500050),
        ("$5,000.50", 500050),
        ("$1,234,567.89", 123456789),
        (" 12 ", 1200),
    ],
)
def test_parse_money_gives_exact_cents(value: object, cents: int):
    assert quantities._parse_money(value) == cents


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "cannot be negative"),
        ("-$5", "cannot be negative"),
        (Decimal("0.001"), "at most 2 decimals"),
        ("1.234", "at most 2 decimals"),
        ("5,00", "invalid amount"),
        ("$", "invalid amount"),
        ("5000 USD", "invalid amount"),
        (True, "invalid amount"),
        (12.5, "invalid amount"),
        (None, "invalid amount"),
    ],
)
def test_parse_money_rejects_bad_amounts(value: object, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        quantities._parse_money(value)


@pytest.mark.parametrize(("tls", "port"), [("starttls", 587), ("implicit", 465), ("none", 25)])
def test_email_port_defaults_by_tls(tls: str, port: int):
    mail = EmailNotifierConfig.model_validate(
        {"type": "email", "host": "h", "tls": tls, "from": "a@b.test", "to": ["c@d.test"]}
    )

    assert mail.port == port


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:9100", "127.0.0.1", 9100), ("[::1]:0", "::1", 0), ("0.0.0.0:80", "0.0.0.0", 80)],
)
def test_http_listen_splits_host_and_port(listen: str, host: str, port: int):
    http = config.HttpConfig(listen=listen)

    assert (http.host, http.port) == (host, port)


@pytest.mark.parametrize("listen", ["9100", ":9100", "localhost", "host:http", "host:70000"])
def test_http_listen_rejects_non_host_port(listen: str):
    with pytest.raises(ValidationError, match="is not HOST:PORT"):
        config.HttpConfig(listen=listen)


def test_load_state_path_defaults_to_state_directory():
    cfg = config.load(MINIMAL.format(private_key="p"), env={"STATE_DIRECTORY": "/var/lib/iw"})

    assert cfg.state.path == Path("/var/lib/iw/state.db")


def test_load_state_path_defaults_beside_the_config_file(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL.format(private_key="p"))

    cfg = config.load_file(path, env={})

    assert cfg.state.path == tmp_path / "invoice-watch.db"


@pytest.mark.parametrize(
    ("value", "expected"), [("db/x.db", "/etc/iw/db/x.db"), ("/srv/x.db", "/srv/x.db")]
)
def test_load_state_path_resolves_against_config_folder(value: str, expected: str):
    text = MINIMAL.format(private_key="p") + f"state:\n  path: {value}\n"

    cfg = config.load(text, env={"STATE_DIRECTORY": "/ignored"}, base_dir=Path("/etc/iw"))

    assert cfg.state.path == Path(expected)


def test_load_ca_file_resolves_against_config_folder(tmp_path: Path):
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = MINIMAL.format(private_key="p").replace(
        "    type: console\n",
        "    type: console\n  mail:\n    type: email\n    host: h\n    ca_file: ca.pem\n"
        "    from: a@b.test\n    to: [c@d.test]\n",
    )

    cfg = config.load(text, env={}, base_dir=tmp_path)

    mail = cfg.notifiers["mail"]
    assert isinstance(mail, EmailNotifierConfig)
    assert mail.ca_file == tmp_path / "ca.pem"


def test_load_normalises_urls():
    text = MINIMAL.format(private_key="p").replace(
        "atlas:\n", "atlas:\n  base_url: http://127.0.0.1:8000//\n"
    )

    cfg = config.load(text, env={})

    assert cfg.atlas.base_url == "http://127.0.0.1:8000"


def test_load_status_names_are_case_insensitive():
    text = MINIMAL.format(private_key="p").replace(
        "notify: [out]", "notify: [out]\n    statuses: [failed, Paid]"
    )

    rule = config.load(text, env={}).rules[0]

    assert isinstance(rule, InvoiceStatusRule)
    assert rule.statuses == ["FAILED", "PAID"]


def test_find_config_file_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    env = {"INVOICE_WATCH_CONFIG": "/env/config.yaml"}

    assert config.find_config_file("given.yaml", env) == Path("given.yaml")
    assert config.find_config_file(None, env) == Path("/env/config.yaml")
    assert config.find_config_file(None, {}) == Path("/etc/invoice-watch/config.yaml")
    (tmp_path / "config.yaml").write_text("")
    assert config.find_config_file(None, {}) == Path("config.yaml")


# --- secrets -------------------------------------------------------------------------


def test_secret_hides_its_value():
    secret = Secret("hunter2")

    assert secret.get() == "hunter2"
    assert repr(secret) == str(secret) == f"{secret}" == "<secret>"
    assert secret == Secret("hunter2")
    assert secret != Secret("other")
    assert secret != "hunter2"
    assert hash(secret) == hash(Secret("hunter2"))


def test_secrets_never_appear_in_repr_dump_summary_or_errors():
    secrets = {
        "ATLAS_PRIVATE_KEY": "pk-0f9e8d7c",
        "SLACK_TOKEN": "xoxb-5a4b3c2d",
        "SMTP_PASSWORD": "pw-1a2b3c4d",
    }
    cfg = config.load_file(DATA / "conf.full.yml", env=secrets)
    hook = cfg.notifiers["hook"]
    assert isinstance(hook, SlackNotifierConfig) and hook.webhook_url is not None
    webhook = hook.webhook_url.get()
    shown = [
        repr(cfg),
        str(cfg),
        config.summary(cfg),
        cfg.model_dump_json(),
        str(cfg.model_dump()),
    ]
    # The same file, broken around every secret: the errors must not quote them either.
    text = (DATA / "conf.full.yml").read_text()
    broken = text.replace("tls: implicit", "tls: ssl").replace("group_over: 10", "group_over: 0")
    broken = broken.replace("public_key: abcdefgh", "public_key: abcdefgh\n    client_secret: x")
    broken = broken.replace("webhook_url: https://", "webhook_url: ftp://")
    with pytest.raises(ConfigError) as info:
        config.load(broken, env=secrets)
    shown.append(str(info.value))
    with pytest.raises(ConfigError) as info:
        config.load(MINIMAL.format(private_key="[pk-0f9e8d7c]"), env={})
    shown.append(str(info.value))

    for text in shown:
        for secret in [*secrets.values(), webhook]:
            assert secret not in text
    assert "<secret>" in config.summary(cfg)


# --- summary -------------------------------------------------------------------------


def test_summary_lists_orgs_notifiers_and_one_line_per_rule():
    env = {"ATLAS_PRIVATE_KEY": "pk", "SLACK_TOKEN": "t", "SMTP_PASSWORD": "pw"}
    cfg = config.load_file(DATA / "conf.full.yml", env=env)

    text = config.summary(cfg)

    assert f"Configuration: {DATA / 'conf.full.yml'}" in text
    assert "  - Production (5f1e0c0a9b8d7e6f5a4b3c2d)" in text
    assert "Poll: every 1h30m, jitter 1m" in text  # as the file writes durations
    assert f"State: {DATA / 'state' / 'watch.db'}" in text
    assert "  - hook: slack webhook <secret>" in text
    assert (
        "  - mail: email via smtp.example.test:465 (implicit, user alerts password <secret>)"
        in text
    )
    rule_lines = [line for line in text.splitlines() if line.startswith("  - ") and "->" in line]
    assert rule_lines == [
        "  - failed [invoice_status] statuses FAILED|FAILED|PENDING -> hook, mail"
        " (critical, orgs 5f1e0c0a9b8d7e6f5a4b3c2d, repeat 1d, no resolved)",
        "  - pending-over [pending_amount] pending amount over $5,000.50 -> bot"
        " (warning, DISABLED)",
        "  - closed [status_change] from PENDING to CLOSED|INVOICED -> out (info)",
        "  - jump [amount_increase] growth over $0.29 or 12.5% within 6h -> hook (warning)",
        "  - forecast [forecast] forecast over $12,000.00 after 5d -> mail (warning)",
        "  - unreadable [poll_failure] reads failing for 30m -> out (warning)",
    ]
    assert "HTTP: [::1]:9100" in text


# --- YAML bounds: size, nesting, alias bombs (issue 12 §3) --------------------------


def alias_bomb(levels: int) -> str:
    """The "billion laughs": 9 levels of 9 aliases each expand to 9^levels strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in itertools.pairwise("abcdefghijklmnop"[: levels + 1]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_load_alias_bomb_is_one_problem_at_once(tmp_path: Path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))  # 9^9 strings once expanded; 565 bytes in the issue
    assert len(path.read_bytes()) < 600

    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        config.load_file(path, env={})
    elapsed = time.perf_counter() - started

    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.column) == (str(path), 6, 4)
    assert "expands to more than 100,000 values through aliases" in problem.message
    assert elapsed < 1.0


def test_load_aliases_within_the_bound_are_walked_once_each(tmp_path: Path):
    """Aliases expanding to ~60,000 values: valid YAML, but nothing walks it for long."""
    bomb = "".join(f"  {line}\n" for line in alias_bomb(4).splitlines())
    text = MINIMAL.format(private_key="p") + "extra:\n" + bomb

    started = time.perf_counter()
    problems = problems_of(text)
    elapsed = time.perf_counter() - started

    assert [p.path for p in problems] == ["extra"]
    assert elapsed < 2.0


def test_load_file_larger_than_1_mib_is_refused_unread(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text(MINIMAL.format(private_key="p") + "#" * config.MAX_CONFIG_BYTES)

    with pytest.raises(ConfigError) as info:
        config.load_file(path, env={})

    (problem,) = info.value.problems
    assert (problem.line, problem.column, problem.path) == (1, 1, "")
    assert "larger than 1024 KiB" in problem.message
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        config.load(path.read_text(), env={})


def test_load_file_endless_device_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="not a regular file but a character device"):
        config.load_file("/dev/zero", env={})


@pytest.mark.parametrize(
    "text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join("  " * i + "- a:\n" for i in range(1, 200))]
)
def test_load_deep_nesting_is_a_problem_not_a_recursion_error(text: str):
    (problem,) = problems_of(text)

    assert "nested more than 64 levels deep" in problem.message
    assert problem.line >= 1


@pytest.mark.parametrize(
    "text",
    ['atlas: {base_url: "\\udc80"}\n', "atlas: {base_url: '${BAD}'}\n"],
    ids=["escape", "var"],
)
def test_load_a_lone_surrogate_is_a_problem_at_its_line_not_a_traceback(text: str):
    """A YAML escape or a ${VAR} (an undecodable byte in the environment, as Python
    decodes it) can make a lone surrogate, which no field can encode: a problem at its
    line (validating it raised UnicodeEncodeError: "This is a bug")."""
    (problem,) = [
        p for p in problems_of(text, env={"BAD": "x\udc80"}) if p.path == "atlas.base_url"
    ]
    assert problem.line == 1
    assert "lone surrogate U+DC80" in problem.message


@pytest.mark.parametrize(
    ("where", "char", "line", "column"),
    [
        ("a comment", "\x00", 11, 3),
        ("a value", "\x7f", 9, 18),
        ("a value", "\ufffe", 9, 18),
        ("a comment", "\x9b", 11, 3),
    ],
)
def test_load_a_character_yaml_refuses_is_a_problem_at_its_line(
    where: str, char: str, line: int, column: int
):
    """A control character anywhere in the file, a comment included, is refused by
    PyYAML's reader as the loader is made: a problem at its line and column (it was
    "unexpected error: ReaderError ... This is a bug", exit 1)."""
    text = MINIMAL.format(private_key="priv")
    if where == "a comment":
        text = text.replace("rules:\n", f"rules:\n# {char} oops\n")
    else:
        text = text.replace("type: console", f"type: console{char}")
    (problem,) = problems_of(text)
    assert (problem.line, problem.column) == (line, column)
    assert f"U+{ord(char):04X} is not allowed" in problem.message


def test_load_an_escaped_surrogate_pair_is_the_character_it_encodes():
    """JSON's way to write an emoji, two 16-bit escapes, is read as the emoji; a lone
    surrogate stays a problem (test_load_a_lone_surrogate_...)."""
    text = MINIMAL.format(private_key="priv").replace(
        "  - id: 5f1e0c0a9b8d7e6f5a4b3c2d\n",
        '  - id: 5f1e0c0a9b8d7e6f5a4b3c2d\n    name: "\\ud83d\\ude00 Prod"\n',
    )
    cfg = config.load(text, env={})
    assert cfg.organizations[0].name == "\U0001f600 Prod"


def nested_through_aliases(anchors: int, levels: int, *, mapping: bool = False) -> str:
    """AD-4: ``anchors`` top-level anchors of ``levels`` levels each, every one holding
    an alias of the one before: each under MAX_DEPTH, together ``anchors * levels``."""
    lines = []
    for n in range(anchors):
        inner = f"*l{n - 1}" if n else "1"
        if mapping:
            value = "{a: " * levels + inner + "}" * levels
        else:
            value = "[" * levels + inner + "]" * levels
        lines.append(f"x-l{n}: &l{n} {value}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("mapping", [False, True], ids=["sequences", "mappings"])
def test_load_nesting_through_aliases_is_one_problem_at_its_line(tmp_path: Path, mapping: bool):
    """Ten anchors of 60 levels (2 KB): each under the bound, 600 deep through aliases,
    which ended in a RecursionError ("This is a bug"). One problem at the alias that
    goes past 64 levels, as for nesting written out."""
    path = tmp_path / "deep.yaml"
    path.write_text(
        nested_through_aliases(10, 60, mapping=mapping) + MINIMAL.format(private_key="p")
    )

    with pytest.raises(ConfigError) as info:
        config.load_file(path, env={})

    (problem,) = info.value.problems
    assert problem.line == 2  # where *l0 is nested 61 levels in
    assert "nested more than 64 levels deep through aliases" in problem.message


def test_load_nesting_through_aliases_within_the_bound_loads():
    text = nested_through_aliases(2, 30) + MINIMAL.format(private_key="p")

    assert config.load(text, env={}).organizations


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0100", "`0100` has a leading 0, which YAML reads as an octal number (64): write the "
         "decimal number 100"),
        ("010", "`010` has a leading 0, which YAML reads as an octal number (8): write the "
         "decimal number 10"),
        ("08", "`08` has a leading 0, which YAML reads as an octal number: write the decimal "
         "number 8"),
        ("0x1388", "`0x1388` is a hexadecimal number (5000) in YAML: write the decimal number "
         "5000"),
        ("0b1010", "`0b1010` is a binary number (10) in YAML"),
        ("1:23:20", "`1:23:20` is a base-60 number in YAML 1.1 (1:04 is 64): write the decimal "
         "number"),
    ],
    ids=["octal", "octal-small", "leading-zero", "hex", "binary", "base-60"],
)  # fmt: skip
@pytest.mark.parametrize("key", ["threshold", "repeat_count"])
def test_load_yaml_1_1_numbers_are_refused_at_their_line(value: str, says: str, key: str):
    """AD-7: `threshold: 0100` alerted over $64.00 (octal), `retries: 010` made 8 and
    `08` made 8, `0x1388` and `1:23:20` made 5000, all silently. Each is one problem at
    its line, saying which decimal to write."""
    text = MINIMAL.format(private_key="p") + (
        "  - name: pending\n"
        "    type: pending_amount\n"
        f"    threshold: {value if key == 'threshold' else 100}\n"
        "    notify: [out]\n"
    )
    if key == "repeat_count":  # a count: atlas.retries
        text = text.replace("  auth:\n", f"  retries: {value}\n  auth:\n")

    (problem,) = problems_of(text)

    assert problem.line == (16 if key == "threshold" else 2)
    assert problem.path == ("rules.1.threshold" if key == "threshold" else "atlas.retries")
    assert problem.message.startswith(says)


def test_load_decimal_numbers_and_quoted_texts_that_look_like_numbers_are_taken():
    text = MINIMAL.format(private_key="p").replace("  auth:\n", "  retries: 1_0\n  auth:\n")
    text += "  - name: pending\n    type: pending_amount\n    threshold: 0.50\n    notify: [out]\n"
    text = text.replace("name: failed", 'name: "0100"')

    cfg = config.load(text, env={})

    assert cfg.atlas.retries == 10 and cfg.rules[0].name == "0100"
    assert isinstance(cfg.rules[1], PendingAmountRule) and cfg.rules[1].threshold_cents == 50


def test_load_secret_file_endless_device_is_refused():
    text = MINIMAL.replace("private_key: {private_key}", "private_key_file: /dev/zero")

    (problem,) = problems_of(text)

    assert problem.path == "atlas.auth.private_key_file"
    assert "not a regular file but a character device" in problem.message


# --- YAML merge keys (issue 14 §2) ---------------------------------------------------

MERGED_RULES = MINIMAL.format(private_key="p") + (
    "  - &pending\n"  # 14
    "    name: pending-a\n"
    "    type: pending_amount\n"
    "    threshold: 100\n"
    "    notify: [out]\n"
    "    severity: critical\n"  # 19
    "  - <<: *pending\n"  # 20
    "    name: pending-b\n"
    "    threshold: 200\n"
)


def test_load_merge_key_takes_the_anchor_and_local_keys_override():
    cfg = config.load(MERGED_RULES, env={})

    a, b = cfg.rules[1:]
    assert isinstance(a, PendingAmountRule) and isinstance(b, PendingAmountRule)
    assert (a.name, a.threshold_cents, a.severity) == ("pending-a", 10000, Severity.CRITICAL)
    assert (b.name, b.threshold_cents, b.severity) == ("pending-b", 20000, Severity.CRITICAL)
    assert b.notify == ["out"]


def test_load_merge_key_list_earlier_mapping_wins():
    text = MINIMAL.format(private_key="p") + (
        "  - <<: [{type: pending_amount, threshold: 1}, {threshold: 2, notify: [out]}]\n"
        "    name: merged\n"
    )

    rule = config.load(text, env={}).rules[1]

    assert isinstance(rule, PendingAmountRule)
    assert (rule.threshold_cents, rule.notify) == (100, ["out"])


def test_load_merge_key_errors_point_at_the_merged_or_the_local_value():
    text = MERGED_RULES.replace("threshold: 100", "threshold: lots").replace(
        "    threshold: 200\n", "    threshold: 200\n    severity: critcal\n"
    )

    problems = problems_of(text)

    assert [(p.line, p.path) for p in problems] == [
        (17, "rules.1.threshold"),  # the anchor's own value
        (23, "rules.2.severity"),  # the local override
    ]


def test_load_merge_key_error_in_a_merged_value_is_reported_where_it_is_used():
    text = MERGED_RULES.replace("threshold: 100", "threshold: lots").replace(
        "    threshold: 200\n", ""
    )

    problems = problems_of(text)

    assert [(p.line, p.path) for p in problems] == [
        (17, "rules.1.threshold"),
        (17, "rules.2.threshold"),  # merged from line 17
    ]


def test_load_merge_key_real_duplicate_is_still_an_error():
    text = MERGED_RULES + "    name: pending-c\n"

    (problem,) = problems_of(text)

    assert (problem.line, problem.column, problem.path) == (23, 5, "rules.2.name")
    assert "duplicate key `name` (first at line 21)" in problem.message


def test_load_merge_key_of_a_scalar_is_a_problem():
    text = MINIMAL.format(private_key="p").replace("  out:\n", "  out:\n    <<: 5\n")

    (problem,) = problems_of(text)

    assert (problem.line, problem.column, problem.path) == (9, 9, "notifiers.out")
    assert "`<<` merges a mapping" in problem.message


def test_load_anchor_merging_into_itself_is_a_problem():
    text = MINIMAL.format(private_key="p").replace(
        "  out:\n    type: console\n", "  out: &out\n    type: console\n    x:\n      <<: *out\n"
    )

    problems = problems_of(text)

    assert [p.path for p in problems] == ["notifiers.out.x.x"]
    assert "an alias cannot refer to a node that holds it" in problems[0].message


# --- every value as its consumer takes it (issue 12 §6) ------------------------------

# Every field of every model, each as a `{placeholder}`; FIELD_VALUES holds good values.
EVERY_FIELD = """\
atlas:
  base_url: {base_url}
  ui_url: {ui_url}
  api: {api}
  auth:
    public_key: {public_key}
    private_key: {private_key}
  timeout: {atlas_timeout}
  max_concurrency: {max_concurrency}
  retries: {retries}
  max_backoff: {atlas_max_backoff}
organizations:
  - id: {org_id}
    name: {org_name}
poll:
  interval: {interval}
  jitter: {jitter}
  full_listing_every: {full_listing_every}
state:
  path: {state_path}
delivery:
  max_age: {max_age}
  max_backoff: {delivery_max_backoff}
  group_over: {group_over}
notifiers:
  {notifier_name}:
    type: slack
    webhook_url: {webhook_url}
  bot:
    type: slack
    token: {token}
    channel: {channel}
    api_url: {api_url}
  mail:
    type: email
    host: {host}
    port: {port}
    tls: {tls}
    username: {username}
    password: {password}
    from: {from_addr}
    to: [{to}]
    timeout: {email_timeout}
rules:
  - name: {rule_name}
    type: invoice_status
    statuses: [{status}]
    notify: [{notify}]
    orgs: [{rule_org}]
    severity: {severity}
    repeat: {repeat}
    send_resolved: {send_resolved}
    enabled: {enabled}
  - name: jump
    type: amount_increase
    threshold: {threshold}
    percent: {percent}
    window: {window}
    notify: [hook]
  - name: forecast
    type: forecast
    budget: {budget}
    min_elapsed: {min_elapsed}
    notify: [hook]
  - name: unreadable
    type: poll_failure
    after: {after}
    notify: [hook]
http:
  listen: {listen}
  max_connections: {max_connections}
  idle_timeout: {idle_timeout}
log:
  level: {level}
  format: {format}
"""
FIELD_VALUES = {
    "base_url": "https://cloud.mongodb.com",
    "ui_url": "https://cloud.mongodb.com",
    "api": "v2",
    "public_key": "abcdefgh",
    "private_key": "0f9e8d7c-6b5a-4321-8765-43210fedcba9",
    "atlas_timeout": "30s",
    "max_concurrency": "4",
    "retries": "5",
    "atlas_max_backoff": "30s",
    "org_id": "5f1e0c0a9b8d7e6f5a4b3c2d",
    "org_name": "Production",
    "interval": "15m",
    "jitter": "30s",
    "full_listing_every": "1d",
    "state_path": "state.db",
    "max_age": "24h",
    "delivery_max_backoff": "60s",
    "group_over": "5",
    "notifier_name": "hook",
    "webhook_url": "https://hooks.slack.com/services/T000/B000/XXXX",
    "token": "xoxb-1234-5678-abcdef",
    "channel": '"#billing-alerts"',
    "api_url": "https://slack.com/api/",
    "host": "smtp.example.com",
    "port": "587",
    "tls": "starttls",
    "username": "alerts@example.com",
    "password": "pw-1a2b3c4d",
    "from_addr": "invoice-watch <alerts@example.com>",
    "to": "finops@example.com",
    "email_timeout": "30s",
    "rule_name": "failed-charge",
    "status": "FAILED",
    "notify": "hook",
    "rule_org": "5f1e0c0a9b8d7e6f5a4b3c2d",
    "severity": "critical",
    "repeat": "1d",
    "send_resolved": "true",
    "enabled": "true",
    "threshold": "500",
    "percent": "20",
    "window": "24h",
    "budget": "12000",
    "min_elapsed": "3d",
    "after": "1h",
    "listen": "127.0.0.1:9100",
    "max_connections": "64",
    "idle_timeout": "10s",
    "level": "info",
    "format": "text",
}
SECRET_VALUE = "s3cr3t-9f8e7d"


def every_field(**values: str) -> str:
    return EVERY_FIELD.format(**{**FIELD_VALUES, **values})


def line_of(placeholder: str) -> int:
    return next(
        n for n, line in enumerate(EVERY_FIELD.splitlines(), 1) if f"{{{placeholder}}}" in line
    )


def test_every_field_template_is_valid_and_covers_every_field():
    cfg = config.load(every_field(), env={})

    assert len(cfg.rules) == 4
    assert set(FIELD_VALUES) == set(re.findall(r"\{(\w+)\}", EVERY_FIELD))


def test_numbers_and_booleans_from_variables_are_read_as_the_file_would_write_them():
    """`${VAR}` gives text: ASCII digits and true/false in it are taken, so that the
    strict checks of numbers and booleans (no YAML true as 1) leave the variables be."""
    env = {"PORT": "465", "N": "8", "PCT": "12.5", "ON": "false", "MAX": "1000"}
    cfg = config.load(
        every_field(
            port="${PORT}",
            tls="implicit",
            max_concurrency="${N}",
            percent="${PCT}",
            enabled="${ON}",
            max_connections="${MAX}",
            listen='"[::1]:9100"',
            threshold="5.00",
            budget="12000.5",
        ),
        env=env,
    )

    mail = cfg.notifiers["mail"]
    assert isinstance(mail, EmailNotifierConfig) and mail.port == 465
    assert cfg.atlas.max_concurrency == 8 and cfg.rules[0].enabled is False
    jump = cfg.rules[1]
    assert isinstance(jump, AmountIncreaseRule) and jump.percent == 12.5
    assert jump.threshold_cents == 500
    assert cfg.http is not None and (cfg.http.host, cfg.http.port) == ("::1", 9100)
    assert cfg.http.max_connections == 1000


@pytest.mark.parametrize("user", ["ab,c=d;e", 'a"b,c=d', "a\\b"])
async def test_digest_user_name_punctuation_is_escaped_on_the_wire(user: str):
    """What a Digest user name with `"`, `\\`, `,` or `=` does against a server: aiohttp's
    DigestAuthMiddleware escapes it in `username="..."` (RFC 7616 §3.4) and the
    simulator (urllib's parser) undoes it: each logs in. So `"` and `\\` are refused in
    public_key (BAD_VALUES) as stray characters (no Atlas key has them: 8 lowercase
    letters), not because they break the header. The config is built past validation."""
    from invoice_watch.atlas.client import AtlasClient
    from invoice_watch.simulator import Simulator
    from tests.world import PROD, scenario

    async with Simulator(scenario(), public_key=user, private_key="pk-1") as sim:
        atlas = config.AtlasConfig(
            base_url=sim.base_url, auth={"public_key": "placeholder", "private_key": "pk-1"}
        )
        auth = atlas.auth.model_copy(update={"public_key": user})
        async with AtlasClient(atlas.model_copy(update={"auth": auth, "retries": 0})) as client:
            assert (await client.read_org(PROD)).invoices


BAD_VALUES = [
    # (placeholder, value, environment, path, message fragment) - one per kind of value
    ("public_key", '"abc:def"', {}, "atlas.auth.public_key", "cannot be an HTTP user name"),
    (
        "public_key",
        "${PK}",
        {"PK": "abc\r\n"},
        "atlas.auth.public_key",
        "from ${PK} contains a line",
    ),
    ("public_key", "abcdéfgh", {}, "atlas.auth.public_key", "printable ASCII"),
    ("private_key", "${PK}", {"PK": SECRET_VALUE + "\n"}, "atlas.auth.private_key", "line break"),
    ("private_key", f'"{SECRET_VALUE}\\t"', {}, "atlas.auth.private_key", "a tab"),
    ("org_name", '"Prod\\u2028uction"', {}, "organizations.0.name", "a line break"),
    ("org_name", '"  "', {}, "organizations.0.name", "must not be empty"),
    ("rule_name", "x" * 201, {}, "rules.0.name", "keep it under 200"),
    ("notify", '"hook\\x85"', {}, "rules.0.notify.0", "a line break"),
    ("token", f'"{SECRET_VALUE} x"', {}, "notifiers.bot.token", "Authorization: Bearer"),
    ("token", "${T}", {"T": SECRET_VALUE + "é"}, "notifiers.bot.token", "Authorization"),
    (
        "webhook_url",
        f'"https://hooks.slack.com/{SECRET_VALUE} x"',
        {},
        "notifiers.hook.webhook_url",
        "contains a space",
    ),
    (
        "webhook_url",
        f"https://h:99999/{SECRET_VALUE}",
        {},
        "notifiers.hook.webhook_url",
        "check the host name and the port",
    ),
    ("webhook_url", f"ftp://{SECRET_VALUE}", {}, "notifiers.hook.webhook_url", "https://"),
    ("base_url", "https://cloud.mongodb.com/?x=1", {}, "atlas.base_url", "a query"),
    ("base_url", "https://user:pw@cloud.mongodb.com", {}, "atlas.base_url", "user:password@"),
    ("ui_url", '"https://cloud mongodb.com"', {}, "atlas.ui_url", "contains a space"),
    ("ui_url", "https://-bad-.test", {}, "atlas.ui_url", "no valid host name"),
    ("api_url", "https://slack.com:0/api/", {}, "notifiers.bot.api_url", "port 0"),
    ("api_url", "slack.com/api/", {}, "notifiers.bot.api_url", "does not start with https://"),
    ("host", '"smtp example.com"', {}, "notifiers.mail.host", "is not a host name"),
    ("channel", '"#billing alerts"', {}, "notifiers.bot.channel", "is not a Slack channel"),
    ("username", "u" * 257, {}, "notifiers.mail.username", "1 to 256 characters"),
    ("password", "${PW}", {"PW": "\r" + SECRET_VALUE}, "notifiers.mail.password", "line break"),
    ("from_addr", "alerts@", {}, "notifiers.mail.from", "is not an email address"),
    ("from_addr", '"a@example.com, b@example.com"', {}, "notifiers.mail.from", "one address"),
    (
        "to",
        '"${TO}"',
        {"TO": "a@example.com\r\nBcc: x@evil.test"},
        "notifiers.mail.to.0",
        "a line break",
    ),
    ("to", "é@example.com", {}, "notifiers.mail.to.0", "non-ASCII"),
    ("to", "a@-example.com", {}, "notifiers.mail.to.0", "invalid domain"),
    ("interval", "${IV}", {"IV": "99999999999d"}, "poll.interval", "must be at most 7d"),
    ("interval", "3000000d", {}, "poll.interval", "must be at most 7d"),
    ("jitter", "2d", {}, "poll.jitter", "must be at most 1d"),
    ("full_listing_every", "32d", {}, "poll.full_listing_every", "must be at most 31d"),
    ("atlas_timeout", "11m", {}, "atlas.timeout", "must be at most 10m"),
    ("atlas_max_backoff", "2h", {}, "atlas.max_backoff", "must be at most 1h"),
    ("max_age", "31d", {}, "delivery.max_age", "must be at most 30d"),
    ("delivery_max_backoff", "1d", {}, "delivery.max_backoff", "must be at most 1h"),
    ("email_timeout", "1h", {}, "notifiers.mail.timeout", "must be at most 10m"),
    ("repeat", "400d", {}, "rules.0.repeat", "must be at most 366d"),
    ("window", "9999999999999999999999999d", {}, "rules.1.window", "must be at most 366d"),
    ("min_elapsed", "367d", {}, "rules.2.min_elapsed", "must be at most 366d"),
    ("after", "1000d", {}, "rules.3.after", "must be at most 366d"),
    ("group_over", "9" * 30, {}, "delivery.group_over", "at most 10000"),
    ("max_concurrency", "9" * 5000, {}, "atlas.max_concurrency", "far too large"),
    ("port", "70000", {}, "notifiers.mail.port", "at most 65535"),
    ("percent", ".inf", {}, "rules.1.percent", "finite"),
    ("percent", "1e7", {}, "rules.1.percent", "at most 1000000"),
    ("threshold", "2000000000000", {}, "rules.1.threshold", "at most $1,000,000,000,000.00"),
    ("budget", '"' + "9" * 5000 + '"', {}, "rules.2.budget", "at most $1,000,000,000,000.00"),
    ("state_path", '"state\\0.db"', {}, "state.path", "U+0000"),
    ("idle_timeout", "2h", {}, "http.idle_timeout", "must be at most 1h"),
    ("listen", '"local host:9100"', {}, "http.listen", "is not HOST:PORT"),
    ("listen", '"[::1]:99999"', {}, "http.listen", "is not HOST:PORT"),
    ("status", '"FAILED\\n"', {}, "rules.0.statuses.0", "a line break"),
    ("rule_org", '"${ORG}"', {"ORG": "5f1e0c0a9b8d7e6f5a4b3c2d\n"}, "rules.0.orgs.0", "line break"),
    # Digits are 0-9 (issue 12): other scripts' digits are digits to \d and int().
    ("interval", "'\uff15s'", {}, "poll.interval", "invalid duration"),
    ("window", "${W}", {"W": "\u0662h"}, "rules.1.window", "invalid duration"),
    ("threshold", '"\uff15000"', {}, "rules.1.threshold", "invalid amount"),
    ("port", '"\uff15\uff18\uff17"', {}, "notifiers.mail.port", "digits 0-9"),
    ("percent", '"\uff12\uff10"', {}, "rules.1.percent", "digits 0-9"),
    ("listen", '"127.0.0.1:\uff19\uff11"', {}, "http.listen", "is not HOST:PORT"),
    # A YAML true is no number, and a number no boolean (issue 12).
    ("max_concurrency", "true", {}, "atlas.max_concurrency", "a whole number, not true"),
    ("retries", "false", {}, "atlas.retries", "a whole number, not false"),
    ("group_over", "true", {}, "delivery.group_over", "a whole number, not true"),
    ("port", "true", {}, "notifiers.mail.port", "a whole number, not true"),
    ("max_connections", "true", {}, "http.max_connections", "a whole number, not true"),
    ("percent", "true", {}, "rules.1.percent", "a number, not true"),
    ("max_concurrency", "4.0", {}, "atlas.max_concurrency", "expected a whole number"),
    ("retries", '"1_000"', {}, "atlas.retries", "expected a whole number"),
    ("enabled", "1", {}, "rules.0.enabled", "expected true or false"),
    ("send_resolved", '"yes"', {}, "rules.0.send_resolved", "expected true or false"),
    # An IPv6 address in brackets, whole (issue 12).
    ("listen", '"[::1:18790"', {}, "http.listen", "an IPv6 address goes in brackets"),
    ("listen", '"::1:9100"', {}, "http.listen", "an IPv6 address goes in brackets"),
    ("listen", '"[localhost]:9100"', {}, "http.listen", "is not HOST:PORT"),
    # A stray `"` or `\` (a YAML quoting slip): no Atlas key has one (8 lowercase
    # letters), though aiohttp escapes it (test_digest_user_name_punctuation_*).
    ("public_key", "'a\"b,c=d'", {}, "atlas.auth.public_key", 'without spaces, `:`, `"`'),
    ("public_key", "'a\\b'", {}, "atlas.auth.public_key", "cannot be an HTTP user name"),
    # 5.000: five thousand where a point groups thousands, five in the US (issue 14).
    ("threshold", "5.000", {}, "rules.1.threshold", 'write 5000 (or "5,000")'),
    ("threshold", '"5.000"', {}, "rules.1.threshold", "or 5.00 for $5.00"),
    ("budget", "12.500", {}, "rules.2.budget", "3 decimals, so it is ambiguous"),
    ("threshold", "0.500", {}, "rules.1.threshold", "at most 2 decimals (cents), e.g."),
    # The API's path is invoice-watch's to add (issue 14).
    (
        "base_url",
        "https://cloud.mongodb.com/api/atlas/v2",
        {},
        "atlas.base_url",
        "would ask https://cloud.mongodb.com/api/atlas/v2/api/atlas/v2/orgs/…): write "
        "https://cloud.mongodb.com",
    ),
    ("base_url", "https://cloud.mongodb.com/api/", {}, "atlas.base_url", "the API's path"),
    ("ui_url", "https://cloud.mongodb.com/v2", {}, "atlas.ui_url", "ends with /v2"),
]


@pytest.mark.parametrize(
    ("placeholder", "value", "env", "path", "fragment"),
    BAD_VALUES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD_VALUES)],
)
def test_load_bad_value_is_one_problem_at_its_line(
    placeholder: str, value: str, env: dict[str, str], path: str, fragment: str
):
    (problem,) = problems_of(every_field(**{placeholder: value}), env)

    assert (problem.line, problem.path) == (line_of(placeholder), path)
    assert fragment in problem.message
    assert SECRET_VALUE not in str(problem)
    assert "\n" not in str(problem) and "\r" not in str(problem)


def _models(tp: object, found: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from ``tp``'s annotations."""
    if isinstance(tp, type) and issubclass(tp, BaseModel) and tp.__name__ not in found:
        found[tp.__name__] = tp
        for info in tp.model_fields.values():
            _models(info.annotation, found)
    for arg in get_args(tp):
        _models(arg, found)
    return found


MODELS = _models(config.Config, {})


def _leaves(tp: object) -> set[object]:
    """The innermost types of an annotation (lists, unions, Optional unwrapped)."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is Literal or not args:
        return {tp}
    if get_origin(tp) is Annotated:
        return _leaves(args[0])
    return set().union(*(_leaves(a) for a in args))


# A hostile value per leaf type; every field of that type must refuse it.
HOSTILE: dict[object, object] = {
    str: "a\r\nb",
    Secret: "a\r\nb",
    Path: "a\nb",
    timedelta: "3660d",
    clock_time: "a\r\nb",
    int: 2**63,
    float: float("inf"),
    ProxyUrl: "http://proxy\r\nX-Injected: 1@x:3128",
}


def test_models_cover_every_model_class():
    assert set(MODELS) >= {"Config", "AtlasConfig", "DigestAuth", "EmailNotifierConfig"}
    assert {"InvoiceStatusRule", "PollFailureRule", "HttpConfig", "LogConfig"} <= set(MODELS)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        (name, info.alias or key)
        for name, model in MODELS.items()
        for key, info in model.model_fields.items()
    ],
)
def test_every_field_refuses_what_its_consumer_cannot_take(model: str, key: str):
    """Walks every field of every model: each text refuses a CR/LF, each duration a
    decade, each integer more than int64, each float infinity."""
    cls = MODELS[model]
    info = next(i for k, i in cls.model_fields.items() if (i.alias or k) == key)
    leaves = _leaves(info.annotation)
    hostile = [HOSTILE[leaf] for leaf in leaves if leaf in HOSTILE]
    if key == "notifiers":  # a mapping: the names are the keys
        hostile = [{"a\r\nb": {"type": "console"}}]
    elif get_origin(info.annotation) is list or any(
        get_origin(a) is list for a in get_args(info.annotation)
    ):
        hostile = [[value] for value in hostile]
    for value in hostile:
        with pytest.raises(ValidationError) as raised:
            cls.model_validate({key: value}, context={"base_dir": Path()})
        assert any(e["loc"][:1] == (key,) for e in raised.value.errors()), (model, key, value)
    others = leaves - set(HOSTILE) - {bool, Severity, type(None)}
    # The rest: Literal choices, nested models (walked themselves) and dicts of them.
    for leaf in others:
        assert get_origin(leaf) is Literal or (
            isinstance(leaf, type) and issubclass(leaf, BaseModel)
        ), leaf


def test_load_key_with_a_control_character_is_a_problem_at_the_key():
    text = every_field(notifier_name='"ho\\x00ok"')

    problems = problems_of(text)

    assert (problems[0].line, problems[0].path) == (line_of("notifier_name"), "notifiers")
    assert problems[0].message == "the key contains the control character U+0000; remove it"
    assert {p.message for p in problems[1:]} == {
        "unknown notifier `hook`; the notifiers defined under `notifiers:` are: bot, mail"
    }


def _duration_bounds() -> dict[str, timedelta]:
    """The upper bound of every duration field, by "Model.field"."""
    return {
        f"{name}.{key}": meta.func.limit
        for name, model in MODELS.items()
        for key, info in model.model_fields.items()
        for meta in [*info.metadata, *(m for a in get_args(info.annotation) for m in get_args(a))]
        if isinstance(getattr(meta, "func", None), quantities._Bound) and not meta.func.lower
    }


def test_every_duration_field_has_an_upper_bound_its_consumers_can_add():
    bounds = _duration_bounds()
    durations = {
        f"{name}.{key}"
        for name, model in MODELS.items()
        for key, info in model.model_fields.items()
        if timedelta in _leaves(info.annotation)
    }

    assert set(bounds) == durations
    now = datetime.now(UTC)
    for limit in bounds.values():
        assert now + limit < datetime.max.replace(tzinfo=UTC)
        assert now - limit > datetime.min.replace(tzinfo=UTC)
    # The scheduler arms the longest poll interval (3000000d crashed `run`).
    schedule = PollSchedule(
        bounds["PollConfig.interval"], bounds["PollConfig.jitter"], random.Random(0)
    )
    schedule.started(time.monotonic())
    assert (
        0
        < schedule.wait(time.monotonic())
        <= (bounds["PollConfig.interval"] + bounds["PollConfig.jitter"]).total_seconds()
    )


async def test_extreme_values_the_config_accepts_reach_atlas_slack_and_smtp(world: World):
    """What check-config passes, the consumers take: a Digest user name with every
    punctuation it allows, 200-character names in email subjects and Slack headers."""
    data = world.config_data(
        rules=[
            {
                "name": "ü" * 200,
                "type": "invoice_status",
                "notify": ["slack", "mail"],
            }
        ]
    )
    data["atlas"]["auth"]["public_key"] = "!#$%&'()*+,-./;<=>?@[]^_`{|}~"
    data["organizations"][0]["name"] = "Prod 🚀 " + "x" * 190
    data["notifiers"]["mail"]["from"] = "Ünïcode Sender <alerts@[127.0.0.1]>"
    cfg = config.load(yaml.safe_dump(data), env={}, base_dir=world.tmp)

    assert await world.run_once(cfg) == 1  # Atlas refuses the key: a failed read, no crash

    data["atlas"]["auth"]["public_key"] = world.sim.public_key
    cfg = config.load(yaml.safe_dump(data), env={}, base_dir=world.tmp)
    assert await world.run_once(cfg) == 0
    assert world.slack.accepted and world.sink.envelopes


# --- warnings: valid but almost surely wrong (issue 14 §2) ---------------------------

MAIL = (
    "  mail:\n    type: email\n    host: {host}\n{extra}"
    "    from: a@example.com\n    to: [b@example.com]\n"
)


def with_notifier(host: str = "smtp.example.com", **keys: str) -> str:
    extra = "".join(f"    {key}: {value}\n" for key, value in keys.items())
    return MINIMAL.format(private_key="p").replace(
        "    type: console\n", "    type: console\n" + MAIL.format(host=host, extra=extra)
    )


def with_rule(**keys: str) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in keys.items())
    return MINIMAL.format(private_key="p") + f"  - name: extra\n    notify: [out]\n{lines}"


def with_atlas(line: str) -> str:
    return MINIMAL.format(private_key="p").replace("atlas:\n", f"atlas:\n  {line}\n")


WARNINGS = [
    # (text, path, message fragment)
    (with_notifier(port="465", tls="starttls"), "notifiers.mail.port", "use tls: implicit"),
    (with_notifier(port="465", tls="none"), "notifiers.mail.port", "use tls: implicit"),
    (with_notifier(port="587", tls="implicit"), "notifiers.mail.port", "use tls: starttls"),
    (with_notifier(port="25", tls="implicit"), "notifiers.mail.port", "use tls: starttls"),
    (
        with_notifier(tls="none", username="u", password="pw"),
        "notifiers.mail.tls",
        "sends the password to smtp.example.com in clear text",
    ),
    (with_atlas("base_url: http://atlas.example.test"), "atlas.base_url", "unencrypted"),
    (
        MINIMAL.format(private_key="p").replace(
            "    type: console\n",
            "    type: slack\n    token: xoxb-1\n    channel: C1\n"
            "    api_url: http://slack.example.test/api/\n",
        ),
        "notifiers.out.api_url",
        "sends the bot token to slack.example.test unencrypted",
    ),
    (
        MINIMAL.format(private_key="p").replace(
            "    type: console\n", "    type: slack\n    webhook_url: http://hooks.example.test/x\n"
        ),
        "notifiers.out.webhook_url",
        "the webhook URL is http://",
    ),
    (MINIMAL.format(private_key="p") + "poll:\n  interval: 30s\n", "poll.interval", "429"),
    (with_rule(type="invoice_status", repeat="5m"), "rules.1.repeat", "shorter than poll"),
    (with_rule(type="status_change", repeat="1d"), "rules.1.repeat", "no effect"),
    (with_rule(type="status_change", send_resolved="true"), "rules.1.send_resolved", "no effect"),
    (
        with_rule(type="status_change", **{"from": "[PAID]", "to": "[paid]"}),
        "rules.1.to",
        "never fires",
    ),
    (
        with_rule(type="forecast", budget="1", min_elapsed="32d"),
        "rules.1.min_elapsed",
        "never fire",
    ),
    (with_rule(type="invoice_status", statuses="[FAILED, PAID]"), "rules.1.statuses.1", "final"),
    (
        with_rule(type="invoice_status", orgs="[60a1b2c3d4e5f60718293a4b]"),
        "rules.1.orgs.0",
        "is not under organizations",
    ),
    (
        MINIMAL.format(private_key="p") + "    enabled: false\n",
        "rules",
        "nothing will ever be sent",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment"), WARNINGS, ids=[w[1] for w in WARNINGS])
def test_load_warns_of_a_valid_setting_almost_surely_wrong(text: str, path: str, fragment: str):
    cfg = config.load(text, filename="c.yaml", env={})

    (warning,) = cfg.warnings
    assert warning.path == path
    assert warning.message.startswith("warning: ")
    assert fragment in warning.message
    line = text.splitlines()[warning.line - 1]
    assert line[warning.column - 1 :].strip(), "points at a value"


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL.format(private_key="p"),
        with_notifier(port="465", tls="implicit"),
        with_notifier(port="587"),
        with_notifier(port="25", tls="starttls"),
        with_notifier(port="2525", tls="implicit"),
        with_notifier(host="127.0.0.1", tls="none", username="u", password="pw"),
        with_notifier(host="localhost", tls="none", username="u", password="pw"),
        with_atlas("base_url: http://127.0.0.1:8080") + "poll:\n  interval: 2s\n",  # the simulator
        with_rule(type="status_change", send_resolved="false"),
        with_rule(type="invoice_status", repeat="15m"),
        with_rule(type="status_change", **{"from": "[PAID, FAILED]", "to": "[PAID, FAILED]"}),
        with_rule(type="forecast", budget="1", min_elapsed="31d"),
        with_rule(type="invoice_status", orgs="[5f1e0c0a9b8d7e6f5a4b3c2d]"),
        MINIMAL.format(private_key="p") + "  - name: paused\n    type: forecast\n    budget: 1\n"
        "    notify: [out]\n    enabled: false\n",
    ],
)
def test_load_does_not_warn_of_sensible_settings(text: str):
    assert config.load(text, env={}).warnings == ()


def test_load_example_and_full_configs_have_no_warnings(tmp_path: Path):
    env = {
        "CREDENTIALS_DIRECTORY": example_credentials(tmp_path),
        "ATLAS_PUBLIC_KEY": "pub",
        "ATLAS_PRIVATE_KEY": "priv",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX",
        "SLACK_TOKEN": "xoxb-1",
        "SMTP_PASSWORD": "pw",
    }

    assert config.load_file(EXAMPLE, env=env).warnings == ()
    assert config.load_file(DATA / "conf.full.yml", env=env).warnings == ()


def test_check_config_prints_warnings_on_stderr_and_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "config.yaml"
    path.write_text(with_notifier(port="465", tls="starttls"))

    assert cli.main(["check-config", "-c", str(path)]) == 0

    out, err = capsys.readouterr()
    assert out.endswith("configuration OK\n")
    assert err.splitlines() == [
        f"{path}:13:11: notifiers.mail.port: warning: port 465 expects TLS from the first "
        "byte (implicit TLS), but tls is starttls: the connection will hang or fail; use "
        "tls: implicit"
    ]


def test_run_logs_the_warnings_once_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "config.yaml"
    text = with_rule(type="invoice_status", repeat="5m").replace(
        "atlas:\n", "atlas:\n  base_url: http://127.0.0.1:9\n  retries: 0\n  timeout: 1s\n"
    )
    path.write_text(text + f"state:\n  path: {tmp_path / 'state.db'}\n")

    assert cli.main(["run", "--once", "-c", str(path)]) == 1  # Atlas is unreachable

    _, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0]
    assert f"{path}:20:13: rules.1.repeat: warning: repeat 5m is shorter" in warnings[0]


@pytest.mark.parametrize("section", ["rules", "reports"])
def test_a_notifier_listed_twice_in_notify_is_a_problem_at_its_line(section: str):
    """``notify: [out, out]`` would send every alert or report twice: refused at the
    second one's line."""
    text = MINIMAL.format(private_key="priv").replace(
        "notify: [out]", "notify:\n      - out\n      - out"
    )
    if section == "reports":
        text += (
            "reports:\n  - name: weekly\n    schedule: mon 09:00\n"
            "    notify:\n      - out\n      - out\n"
        )
        text = text.replace("notify:\n      - out\n      - out\nreports", "notify: [out]\nreports")
    (problem,) = problems_of(text)
    lines = text.splitlines()
    second = max(i for i, line in enumerate(lines) if line.strip() == "- out") + 1
    assert (problem.line, problem.path) == (second, f"{section}.0.notify.1")
    assert problem.message == (
        f"duplicate notifier `out` in `notify` (first at line {second - 1}); "
        "list each notifier once"
    )
