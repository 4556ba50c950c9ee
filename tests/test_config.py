"""Tests of invoice_watch.config: valid files, defaults, interpolation, `_file` secrets,
and a corpus of broken files (tests/data/conf.bad_*.yml) whose leading
`# expect: LINE:COL: PATH: message fragment` comments list every problem they must raise."""

from __future__ import annotations

import itertools
import re
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from invoice_watch import config
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
)
from invoice_watch.errors import ConfigError, ConfigProblem
from invoice_watch.types import Severity

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


def test_load_example_config_is_valid_with_every_rule_type():
    env = {
        "ATLAS_PUBLIC_KEY": "pub",
        "ATLAS_PRIVATE_KEY": "priv",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX",
        "SMTP_PASSWORD": "pw",
    }
    cfg = config.load_file(EXAMPLE, env=env)

    assert {rule.type for rule in cfg.rules} == {
        "invoice_status",
        "pending_amount",
        "status_change",
        "amount_increase",
        "forecast",
        "poll_failure",
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
    assert config._interpolate(value, env) == expected


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
    with pytest.raises(config._InterpolationError, match=re.escape(message)):
        config._interpolate(value, env)


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
    (credentials / "client-secret").write_text("from-credentials\n\n")
    text = MINIMAL.replace(
        "    public_key: pub\n    private_key: {private_key}",
        "    client_id: sa\n    client_secret_file: client-secret",
    )

    cfg = config.load(text, env={"CREDENTIALS_DIRECTORY": str(credentials)}, base_dir=DATA)

    assert isinstance(cfg.atlas.auth, ServiceAccountAuth)
    assert cfg.atlas.auth.client_secret.get() == "from-credentials\n"  # one newline dropped


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
    assert f"cannot read {tmp_path / 'missing'}" in problems[0].message


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
    assert config._parse_duration(text) == expected


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
        config._parse_duration(value)


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
    assert config._parse_money(value) == cents


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
        config._parse_money(value)


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
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
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
    assert "Poll: every 1h 30m, jitter 1m" in text
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
    text = MINIMAL.format(private_key="p") + "x-extra:\n" + bomb

    started = time.perf_counter()
    problems = problems_of(text)
    elapsed = time.perf_counter() - started

    assert [p.path for p in problems] == ["x-extra"]
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
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        config.load_file("/dev/zero", env={})


@pytest.mark.parametrize(
    "text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join("  " * i + "- a:\n" for i in range(1, 200))]
)
def test_load_deep_nesting_is_a_problem_not_a_recursion_error(text: str):
    (problem,) = problems_of(text)

    assert "nested more than 64 levels deep" in problem.message
    assert problem.line >= 1


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
