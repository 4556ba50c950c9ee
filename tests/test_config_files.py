"""The files a configuration names, and the bounds of reading it (issues 12 and 14): the
configuration file and `<secret>_file` secrets are regular files, read without ever
waiting on a FIFO or a device; a missing or empty secret file is one problem that says
where it was looked for; the read-only commands read no secret; `ca_file` is loaded as
the email notifier loads it; aliases and `${VAR}` cannot expand a small file into
gigabytes; top-level `x-` keys hold anchors."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from invoice_watch import cli, config
from invoice_watch.app import App
from invoice_watch.config import EmailNotifierConfig, SlackNotifierConfig
from invoice_watch.errors import ConfigError, ConfigProblem

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
WEBHOOK = """\
  hook:
    type: slack
    webhook_url_file: slack-webhook-url
"""


def problems_of(text: str, env: dict[str, str] | None = None, **kw: object) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        config.load(text, env=env or {}, **kw)  # type: ignore[arg-type]
    return info.value.problems


def within(seconds: float, function: Callable[[], object]) -> object:
    """``function()`` in a daemon thread; fails (instead of hanging the test run) when
    it has not returned within ``seconds``: the old loader blocked in open()."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds}s"
    return outcome[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO no one writes to. Afterwards a writer opens it, so a reader the code
    under test left blocked in open() (the old loader) gets unstuck."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader blocked: nothing to release
        return
    os.close(fd)


# --- non-regular files (issue 12 §A12-12) ----------------------------------------------


def test_a_fifo_as_the_configuration_file_is_refused_at_once(fifo: Path):
    result = within(5, lambda: config.load_file(fifo, env={}))

    assert isinstance(result, ConfigError)
    (problem,) = result.problems
    assert problem.message.startswith(
        "cannot read the configuration file: not a regular file but a FIFO (named pipe)"
    )


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "folder"])
def test_a_secret_file_that_is_no_regular_file_is_one_problem_at_once(
    kind: str, fifo: Path, tmp_path: Path
):
    path = {"fifo": fifo, "device": Path("/dev/zero"), "folder": tmp_path}.get(kind)
    listener = None
    if kind == "socket":
        path = tmp_path / "secret.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
    text = MINIMAL.replace("private_key: {private_key}", f"private_key_file: {path}")
    try:
        result = within(5, lambda: config.load(text, env={}))
    finally:
        if listener is not None:
            listener.close()

    assert isinstance(result, ConfigError)
    (problem,) = result.problems
    assert problem.path == "atlas.auth.private_key_file"
    expected = {
        "fifo": "not a regular file but a FIFO (named pipe)",
        "socket": "not a regular file but a socket",
        "device": "not a regular file but a character device",
        "folder": "Is a directory",
    }[kind]
    assert f"cannot read {path}: {expected}" in problem.message


@pytest.mark.parametrize("where", ["config", "secret"])
def test_check_config_on_a_fifo_ends_at_once_with_one_line(where: str, fifo: Path, tmp_path: Path):
    """The real command (it printed nothing and never ended)."""
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL.replace("private_key: {private_key}", f"private_key_file: {fifo}"))
    target = fifo if where == "config" else path
    try:
        done = subprocess.run(
            [sys.executable, "-m", "invoice_watch", "check-config", "-c", str(target)],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("check-config still waits on the FIFO after 20s")
    assert done.returncode == 2
    assert "not a regular file but a FIFO (named pipe)" in done.stderr
    assert "Traceback" not in done.stderr


# --- missing and empty secret files (issue 14 §A14-6, §A14-13) -------------------------


def test_a_missing_webhook_url_file_is_one_problem_saying_where_it_looked(tmp_path: Path):
    """Not also the placeholder's "does not start with https://"; under systemd, the
    `LoadCredential=` line that would put it there."""
    text = MINIMAL.format(private_key="p").replace(
        "    type: console\n", "    type: console\n" + WEBHOOK
    )
    (etc := tmp_path / "etc").mkdir()
    (run := tmp_path / "run").mkdir()

    (service,) = problems_of(text, {"CREDENTIALS_DIRECTORY": str(run)}, base_dir=etc)
    (shell,) = problems_of(text, {}, base_dir=etc)

    assert service.path == shell.path == "notifiers.hook.webhook_url_file"
    assert service.message == (
        f"cannot read {run / 'slack-webhook-url'}: no such file in $CREDENTIALS_DIRECTORY, "
        "where systemd puts the credentials the unit loads: add "
        f"`LoadCredential=slack-webhook-url:{etc / 'credentials' / 'slack-webhook-url'}` to the "
        "unit (`systemctl edit invoice-watch`; is that line commented out?), or give the "
        "file's full path"
    )
    assert shell.message.startswith(
        f"cannot read {etc / 'slack-webhook-url'}: no such file, nor "
        f"{etc / 'credentials' / 'slack-webhook-url'} (the systemd setup's credentials folder)"
    )


@pytest.mark.parametrize("field", ["private_key", "webhook_url", "token", "password"])
def test_an_unreadable_secret_of_any_kind_is_one_problem(field: str, tmp_path: Path):
    """Each secret's own checks (a URL, a Bearer token, a login pair) do not report the
    placeholder that stands for the unreadable file."""
    notifiers = {
        "webhook_url": "  s:\n    type: slack\n    webhook_url_file: gone\n",
        "token": "  s:\n    type: slack\n    token_file: gone\n    channel: C1\n",
        "password": "  m:\n    type: email\n    host: h\n    username: u\n"
        "    password_file: gone\n    from: a@b.test\n    to: [c@d.test]\n",
    }
    text = MINIMAL.format(private_key="p")
    if field == "private_key":
        text = MINIMAL.replace("private_key: {private_key}", "private_key_file: gone")
    else:
        text = text.replace("    type: console\n", "    type: console\n" + notifiers[field])

    (problem,) = problems_of(text, base_dir=tmp_path)

    assert problem.path.endswith(f"{field}_file") and "no such file" in problem.message


def test_an_empty_secret_file_names_the_file(tmp_path: Path):
    (tmp_path / "atlas-private-key").write_text("\n")  # `<<< "$UNSET"` writes one newline
    text = MINIMAL.replace("private_key: {private_key}", "private_key_file: atlas-private-key")

    (problem,) = problems_of(text, base_dir=tmp_path)

    assert problem.path == "atlas.auth.private_key_file"
    assert problem.message.startswith(
        f"{tmp_path / 'atlas-private-key'} is empty: write the secret"
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xef\xbb\xbfkey-123\n", "starts with a byte order mark (U+FEFF, as Notepad writes)"),
        (b"  \n", "holds only white space"),
        (b" key-123\n", "starts with white space; remove it"),
        (b"key-123 \n", "ends with white space; remove it"),
        (b"key-123\xc2\xa0", "ends with white space; remove it"),  # a no-break space
        (b"key\xe2\x80\x8b-123", "contains the invisible character U+200B; remove it"),
    ],
    ids=["bom", "spaces-only", "leading-space", "trailing-space", "nbsp", "zero-width"],
)
def test_a_secret_file_with_invisible_extras_is_refused_naming_the_file(
    tmp_path: Path, content: bytes, says: str
):
    """AD-6: a BOM (Notepad), white space around the secret or an invisible character
    passed check-config, then Atlas refused every read ("the API key is wrong or was
    revoked"). Refused at once, naming the file, as such characters are in inline
    values."""
    secret = tmp_path / "atlas-private-key"
    secret.write_bytes(content)
    text = MINIMAL.replace("private_key: {private_key}", "private_key_file: atlas-private-key")

    (problem,) = problems_of(text, base_dir=tmp_path)

    assert problem.path == "atlas.auth.private_key_file"
    assert problem.message.startswith(f"the content of {secret} {says}")
    assert "key-123" not in problem.message


def test_a_secret_file_with_inner_spaces_and_one_newline_is_taken(tmp_path: Path):
    (tmp_path / "smtp-password").write_text("correct horse battery staple\n")
    text = MINIMAL.replace("private_key: {private_key}", "private_key_file: smtp-password")

    cfg = config.load(text, env={}, base_dir=tmp_path)

    assert cfg.atlas.auth.private_key.get() == "correct horse battery staple"  # type: ignore[union-attr]


# --- the read-only commands read no secret (issue 14 §A14-9) ---------------------------


def test_without_secrets_a_configuration_loads_whatever_its_secrets_are(tmp_path: Path):
    text = MINIMAL.replace("private_key: {private_key}", "private_key_file: gone").replace(
        "    type: console\n",
        "    type: console\n" + WEBHOOK + "  bot:\n    type: slack\n    token: ${SLACK_TOKEN}\n"
        "    channel: C1\n  mail:\n    type: email\n    host: h\n    ca_file: /dev/zero\n"
        "    from: a@b.test\n    to: [c@d.test]\n",
    )

    cfg = config.load(text, env={}, base_dir=tmp_path, secrets=False)

    assert not cfg.secrets_read
    hook, bot = cfg.notifiers["hook"], cfg.notifiers["bot"]
    assert isinstance(hook, SlackNotifierConfig) and hook.webhook_url is not None
    assert isinstance(bot, SlackNotifierConfig) and bot.token is not None
    assert isinstance(cfg.notifiers["mail"], EmailNotifierConfig)  # ca_file not read either
    with pytest.raises(ValueError, match="without its secrets cannot run"):
        App(cfg)
    # Everything else is still checked.
    broken = text.replace("5f1e0c0a9b8d7e6f5a4b3c2d", "not-an-id")
    (problem,) = problems_of(broken, base_dir=tmp_path, secrets=False)
    assert problem.path == "organizations.0.id"


def test_without_secrets_the_receivers_secret_files_are_not_checked(tmp_path: Path):
    """A webhook's url_file/secret_file and a PagerDuty routing_key_file: the read-only
    commands (status --check is the Docker HEALTHCHECK) put placeholders there, which
    those fields' own checks must not refuse (attack on issue 18)."""
    receivers = (
        "  hook:\n    type: webhook\n    url_file: u\n    secret_file: s\n"
        "  oncall:\n    type: pagerduty\n    routing_key_file: k\n"
    )
    text = MINIMAL.replace("{private_key}", "k").replace(
        "    type: console\n", "    type: console\n" + receivers
    )
    cfg = config.load(text, env={}, base_dir=tmp_path, secrets=False)
    assert not cfg.secrets_read and {"hook", "oncall"} <= set(cfg.notifiers)


@pytest.mark.parametrize("command", ["status", "history", "invoices", "check-config"])
def test_read_only_commands_run_when_a_secret_file_is_unreadable(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """`status` & co. go on to the state file (none here: exit 1, saying so); only the
    commands that use the secrets stop at the configuration (exit 2)."""
    path = tmp_path / "config.yaml"
    path.write_text(
        MINIMAL.replace("private_key: {private_key}", "private_key_file: gone")
        + f"state:\n  path: {tmp_path / 'state.db'}\n"
    )

    status = cli.main([command, "-c", str(path)])

    err = capsys.readouterr().err
    if command == "check-config":
        assert status == 2 and "private_key_file: cannot read" in err
    else:
        assert status == 1 and "configuration problem" not in err
        assert "state.db" in err


# --- ca_file is loaded as sending loads it (issue 14 §A14-10) --------------------------


def with_ca_file(path: object) -> str:
    return MINIMAL.format(private_key="p").replace(
        "    type: console\n",
        "    type: console\n  mail:\n    type: email\n    host: h\n"
        f"    ca_file: {path}\n    from: a@b.test\n    to: [c@d.test]\n",
    )


def test_a_ca_file_of_pem_certificates_loads(tmp_path: Path):
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    cfg = config.load(with_ca_file("ca.pem"), env={}, base_dir=tmp_path)

    mail = cfg.notifiers["mail"]
    assert isinstance(mail, EmailNotifierConfig) and mail.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("/etc/passwd", "holds no certificate OpenSSL can load"),
        ("/dev/zero", "cannot read the CA file /dev/zero: not a regular file but a character"),
        ("missing.pem", "No such file or directory"),
        ("truncated.pem", "holds no certificate OpenSSL can load"),
    ],
)
def test_a_ca_file_that_sending_cannot_load_is_a_problem_at_its_line(
    name: str, fragment: str, tmp_path: Path
):
    (tmp_path / "truncated.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")

    (problem,) = problems_of(with_ca_file(name), base_dir=tmp_path)

    assert (problem.line, problem.path) == (13, "notifiers.mail.ca_file")
    assert fragment in problem.message
    assert "does not exist" not in problem.message or name == "missing.pem"


# --- bounds on what aliases and ${VAR} expand to (issue 12 §A12-5) ---------------------


def big_string_bomb(copies: int, *, variable: bool = False) -> str:
    """A 400 KB string aliased ``copies`` times: under the 1 MiB and node bounds."""
    value = ("${HOME}" if variable else "") + "A" * 400_000
    aliases = ", ".join(["*a"] * copies)
    return MINIMAL.format(private_key="p") + f'x-big: &a "{value}"\nx-list: [{aliases}]\n'


@pytest.mark.parametrize("variable", [False, True], ids=["plain", "interpolated"])
def test_a_big_string_aliased_95000_times_is_one_problem_in_linear_time(
    variable: bool, tmp_path: Path
):
    """check-config on the attack's file (it ran over 120 s and took 15 GB), in a process
    allowed 1 GiB of address space: one problem at the list, in the time PyYAML takes
    to parse 780 KB (about 2 s here)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(big_string_bomb(95_000, variable=variable))
    assert path.stat().st_size < config.MAX_CONFIG_BYTES

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "invoice_watch", "check-config", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=90,
            preexec_fn=limit,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "HOME": "/r"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("check-config still runs after 90s")
    elapsed = time.perf_counter() - started

    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"{path}:15:9: the values expand to more than 4 MiB of text through aliases (*name) "
        "or ${VAR}; a configuration is a few KiB: use fewer aliases of long values",
        "invoice-watch: 1 configuration problem(s)",
    ]
    assert elapsed < 30


def test_aliases_of_a_string_within_the_bound_are_built_once():
    """A few aliases of a long interpolated string load, each the same value."""
    text = big_string_bomb(5, variable=True)

    cfg = config.load(text, env={"HOME": "/home/x"})

    assert cfg.rules[0].name == "failed"


def test_a_value_naming_a_long_variable_many_times_is_refused_before_it_is_built():
    text = MINIMAL.format(private_key="p").replace(
        "  - id: 5f1e0c0a9b8d7e6f5a4b3c2d\n",
        "  - id: 5f1e0c0a9b8d7e6f5a4b3c2d\n    name: " + "${BIG}" * 2000 + "\n",
    )

    (problem,) = problems_of(text, {"BIG": "x" * 10_000})

    assert problem.path == "organizations.0.name"
    assert "longer than 1,048,576 characters once its ${...} are replaced" in problem.message


# --- extension fields (issue 14 §A14-13) -----------------------------------------------


def test_top_level_x_keys_are_ignored_and_hold_anchors_for_merge_keys():
    text = (
        "x-mail-rule: &mail-rule {notify: [out], severity: critical}\n"
        "x-anything: [1, 2, {a: b}]\n"
        + MINIMAL.format(private_key="p").replace(
            "  - name: failed\n    type: invoice_status\n    notify: [out]\n",
            "  - {<<: *mail-rule, name: failed, type: invoice_status}\n",
        )
    )

    cfg = config.load(text, env={})

    assert cfg.rules[0].severity.value == "critical" and cfg.rules[0].notify == ["out"]
    # Only at the top level: inside a section an x- key is still a mistake.
    nested = MINIMAL.format(private_key="p") + "poll:\n  x-note: 1\n"
    (problem,) = problems_of(nested)
    assert problem.path == "poll.x-note" and "unknown key" in problem.message


# --- warnings of settings that break at run time (issue 14 §A14-10, issue 12 §A12-9) ---


def test_a_base_url_with_a_gateway_path_is_a_warning_naming_where_requests_go():
    text = MINIMAL.format(private_key="p").replace(
        "atlas:\n", "atlas:\n  base_url: https://gw.example.com/atlas\n"
    )

    cfg = config.load(text, env={})

    (warning,) = cfg.warnings
    assert warning.path == "atlas.base_url"
    assert (
        "requests go to https://gw.example.com/atlas/api/atlas/v2/orgs/…, while Atlas has "
        "none before /api" in warning.message
    )


def test_check_config_warns_of_max_connections_above_the_open_files_limit(tmp_path: Path):
    """In a process whose RLIMIT_NOFILE is 512 (soft and hard), as the attack's
    `ulimit -n 1024` with max_connections 5000."""
    path = tmp_path / "config.yaml"
    path.write_text(
        MINIMAL.format(private_key="p") + "http:\n  listen: 127.0.0.1:0\n  max_connections: 5000\n"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    done = subprocess.run(
        [sys.executable, "-m", "invoice_watch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )

    assert done.returncode == 0, done.stderr
    assert (
        "http.max_connections: warning: 5000 connections are more than a process may open "
        "here (RLIMIT_NOFILE hard limit 512, less 224" in done.stderr
    )


def test_a_webhook_signing_secrets_key_is_a_secret_without_its_prefix_too(tmp_path: Path):
    """A receiver echoing the base64 key of `whsec_<key>` alone (what the Standard
    Webhooks libraries decode) shows no part of it (attack on issue 18)."""
    from invoice_watch.redact import redact

    key = "9pmpJk7YteiJ34EbXTfYb5A8CTCyRpPLhVLI3B/87LI="
    hook = f"  hook:\n    type: webhook\n    url: https://h.test/x\n    secret: whsec_{key}\n"
    text = MINIMAL.replace("{private_key}", "k").replace(
        "    type: console\n", "    type: console\n" + hook
    )
    config.load(text, env={}, base_dir=tmp_path)
    assert key not in redact(f"HTTP 503 ('echo {key}')")
