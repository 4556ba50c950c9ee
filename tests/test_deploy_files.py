"""The deployment files, checked as far as they can be without a Docker engine or a running
systemd: Dockerfile structure, the Compose example, .dockerignore, and the systemd unit's
keys (.ci/check-service runs systemd-analyze on the unit)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_watch import constants

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = "/etc/invoice-watch/config.yaml"
STATE_DIR = "/var/lib/invoice-watch"
# The service's state file as the code knows it (read before tests/conftest.py points it
# elsewhere for each test).
SERVICE_STATE = str(constants.SERVICE_STATE_PATH)


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, `\\` continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final_stage(dockerfile: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(dockerfile) if keyword == "FROM"]
    return dockerfile[starts[-1] :]


def args_of(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(instructions, "ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def test_dockerfile_parser_joins_continuations_and_drops_comments() -> None:
    text = '# c\nFROM x AS b\nRUN a \\\n    && b\n\n# d\nCMD ["run"]\n'
    assert dockerfile_instructions(text) == [
        ("FROM", "x AS b"),
        ("RUN", "a && b"),
        ("CMD", '["run"]'),
    ]


def test_dockerfile_bases_on_python_311_slim(dockerfile: list[tuple[str, str]]) -> None:
    bases = [args.split()[0] for args in args_of(dockerfile, "FROM")]
    assert bases and all(base == "python:3.11-slim" for base in bases)


def test_dockerfile_installs_project_without_pip_cache(dockerfile: list[tuple[str, str]]) -> None:
    assert any(
        re.search(r"pip install --no-cache-dir \.$", run) for run in args_of(dockerfile, "RUN")
    )


def test_dockerfile_copies_only_existing_files_not_ignored(
    dockerfile: list[tuple[str, str]],
) -> None:
    """Every COPY source from the build context exists and .dockerignore keeps it."""
    ignored = dockerignore_patterns()
    for args in args_of(dockerfile, "COPY"):
        if args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the source tree"
            assert not any(fnmatch(source, p) for p in ignored), f"COPY {source}: ignored"


def test_dockerfile_runs_as_non_root_user(final_stage: list[tuple[str, str]]) -> None:
    keywords = [keyword for keyword, _ in final_stage]
    users = args_of(final_stage, "USER")
    assert users, "the final stage never switches to a non-root USER"
    assert max(i for i, kw in enumerate(keywords) if kw == "USER") < keywords.index("ENTRYPOINT")
    assert any("useradd --system --uid 10001" in run for run in args_of(final_stage, "RUN"))
    assert users[-1].split(":")[0] in ("10001", "invoice-watch")


def test_dockerfile_keeps_state_on_a_volume(final_stage: list[tuple[str, str]]) -> None:
    volumes = [v for args in args_of(final_stage, "VOLUME") for v in args.split()]
    assert STATE_DIR in volumes
    assert env_of(final_stage)["STATE_DIRECTORY"] == STATE_DIR


def test_dockerfile_keeps_the_chart_font_cache_on_the_volume(
    final_stage: list[tuple[str, str]],
) -> None:
    """matplotlib's cache (report charts) in a folder the service writes and keeps,
    as LIBRARIES.md says: not rebuilt at every start, no warning on stderr."""
    assert env_of(final_stage)["MPLCONFIGDIR"].startswith(STATE_DIR + "/")


def test_dockerfile_sets_environment(final_stage: list[tuple[str, str]]) -> None:
    env = env_of(final_stage)
    assert env["INVOICE_WATCH_CONFIG"] == CONFIG_PATH
    assert env["PYTHONUNBUFFERED"] == "1"
    secret_words = ("key", "secret", "token", "password", "webhook")
    assert not [name for name in env if any(w in name.lower() for w in secret_words)]


def test_dockerfile_healthcheck_runs_status_check(final_stage: list[tuple[str, str]]) -> None:
    (healthcheck,) = args_of(final_stage, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert all(option.startswith("--") for option in options.split())
    assert json.loads(command) == ["invoice-watch", "status", "--check"]


def test_dockerfile_entrypoint_and_cmd_use_exec_form(final_stage: list[tuple[str, str]]) -> None:
    (entrypoint,) = args_of(final_stage, "ENTRYPOINT")
    (cmd,) = args_of(final_stage, "CMD")
    assert json.loads(entrypoint) == ["invoice-watch"]
    assert json.loads(cmd) == ["run"]
    keywords = [keyword for keyword, _ in final_stage]
    assert keywords[-2:] == ["ENTRYPOINT", "CMD"]


# --- .dockerignore ------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [".venv", ".git", "state.db", "state.db-wal", ".pytest_cache", ".mypy_cache", ".ruff_cache"],
)
def test_dockerignore_excludes(path: str) -> None:
    assert any(fnmatch(path, pattern) for pattern in dockerignore_patterns())


# --- docker-compose.example.yml -----------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.example.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_mounts_config_read_only_and_state_volume(compose: dict[str, Any]) -> None:
    service = compose["services"]["invoice-watch"]
    mounts = [volume.split(":") for volume in service["volumes"]]
    assert any(m[1:] == [CONFIG_PATH, "ro"] for m in mounts), "config must be mounted :ro"
    state = [m for m in mounts if m[1] == STATE_DIR]
    assert len(state) == 1 and state[0][0] in compose["volumes"], "state needs a named volume"


def test_compose_uses_secrets_for_atlas_key_and_slack_webhook(compose: dict[str, Any]) -> None:
    service = compose["services"]["invoice-watch"]
    assert set(service["secrets"]) == {"atlas-private-key", "slack-webhook-url"}
    for name in service["secrets"]:
        assert "file" in compose["secrets"][name]
    secret_words = ("key", "secret", "token", "password", "webhook")
    environment = service.get("environment") or {}
    assert not [name for name in environment if any(w in name.lower() for w in secret_words)]


def test_compose_restarts_and_allows_graceful_stop(compose: dict[str, Any]) -> None:
    service = compose["services"]["invoice-watch"]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace.group(1)) > 10, "the daemon may take 10 s to stop"


def test_compose_ha_profile_runs_two_replicas_on_one_postgresql(compose: dict[str, Any]) -> None:
    """The `ha` variant: PostgreSQL and two replicas of one config, the password a
    secret file on both sides, the replicas started once the database is ready."""
    services = compose["services"]
    db = services["postgres"]
    assert db["profiles"] == ["ha"] and "postgres-password" in db["secrets"]
    assert db["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres-password"
    a, b = services["invoice-watch-a"], services["invoice-watch-b"]
    assert a == b, "the replicas run the same config"
    assert a["profiles"] == ["ha"]
    assert a["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "postgres-password" in a["secrets"] and "file" in compose["secrets"]["postgres-password"]
    assert any(v.endswith(f":{CONFIG_PATH}:ro") for v in a["volumes"])
    assert not any(STATE_DIR in v for v in a["volumes"]), "the state is in PostgreSQL"
    assert int(a["stop_grace_period"].rstrip("s")) > 10
    assert not a.get("environment")


# --- systemd unit -------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit((ROOT / "systemd/invoice-watch.service").read_text(encoding="utf-8"))


def test_unit_parser_keeps_repeated_keys() -> None:
    text = "[Service]\n# c\nSystemCallFilter=@a\nSystemCallFilter=~@b @c\nEmpty=\n"
    assert parse_unit(text) == {"Service": {"SystemCallFilter": ["@a", "~@b @c"], "Empty": [""]}}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("TimeoutStopSec", "15s"),
        ("DynamicUser", "yes"),
        ("StateDirectory", "invoice-watch"),
        ("StateDirectoryMode", "0700"),
        ("CacheDirectory", "invoice-watch"),  # matplotlib's font cache (report charts)
        ("CacheDirectoryMode", "0700"),
        ("ConfigurationDirectory", "invoice-watch"),
        ("UMask", "0077"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("PrivateUsers", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("DevicePolicy", "closed"),
    ],
)
def test_unit_sets_service_key(unit: dict[str, dict[str, list[str]]], key: str, value: str) -> None:
    assert unit["Service"].get(key) == [value]


def test_unit_runs_the_daemon_with_the_etc_config(unit: dict[str, dict[str, list[str]]]) -> None:
    (exec_start,) = unit["Service"]["ExecStart"]
    assert shlex.split(exec_start)[1:] == ["run", "-c", CONFIG_PATH]
    assert shlex.split(exec_start)[0].endswith("/invoice-watch")


def test_unit_reload_sends_sighup(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Service"]["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_has_watchdog_and_restart_delay(unit: dict[str, dict[str, list[str]]]) -> None:
    for key in ("WatchdogSec", "RestartSec"):
        (value,) = unit["Service"][key]
        assert re.fullmatch(r"[1-9]\d*(s|min)", value), f"{key}={value}"
    assert unit["Service"]["RestartPreventExitStatus"] == ["2"]


def test_unit_filters_system_calls(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_unit_keeps_network_reachable(unit: dict[str, dict[str, list[str]]]) -> None:
    # Atlas, Slack and SMTP are elsewhere: no IP deny list, no private network.
    assert "IPAddressDeny" not in unit["Service"]
    assert "PrivateNetwork" not in unit["Service"]
    assert "network-online.target" in unit["Unit"]["After"]


def test_unit_loads_secrets_as_credentials(unit: dict[str, dict[str, list[str]]]) -> None:
    names = [value.split(":")[0] for value in unit["Service"]["LoadCredential"]]
    assert "atlas-private-key" in names
    text = (ROOT / "systemd/invoice-watch.service").read_text(encoding="utf-8")
    for example in ("slack-webhook-url", "smtp-password"):
        assert f"LoadCredential={example}:" in text or f"#LoadCredential={example}:" in text
    secret_words = ("key", "secret", "token", "password", "webhook")
    for assignment in unit["Service"].get("Environment", []):
        assert not any(word in assignment.lower() for word in secret_words), assignment


def test_unit_is_enabled_for_multi_user_target(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- .ci/check-service --------------------------------------------------------------------


def test_check_service_is_strict_executable_bash() -> None:
    script = ROOT / ".ci/check-service"
    assert os.access(script, os.X_OK)
    lines = script.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    subprocess.run(["bash", "-n", str(script)], check=True)


# --- the README's recipes agree with the files they install ---------------------------


def readme_block_after(marker: str) -> str:
    """The first ```sh block after ``marker`` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(marker) :]
    start = after.index("```sh\n") + len("```sh\n")
    return after[start : after.index("```", start)]


def test_readme_install_recipe_uses_a_virtualenv_the_unit_runs(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """PEP 668 systems (Debian 12, Ubuntu 24.04) refuse `sudo pip install`: the recipe
    installs into its own virtualenv, and the unit starts the script from there
    (.ci/check-install runs the recipe)."""
    recipe = readme_block_after("<!-- .ci/check-install runs this block")
    (venv,) = re.findall(r"python3 -m venv (\S+)", recipe)
    for line in recipe.splitlines():
        if re.search(r"\bpip3? install\b", line):
            assert f"{venv}/bin/pip install" in line, line
    (exec_start,) = unit["Service"]["ExecStart"]
    assert shlex.split(exec_start)[0] == f"{venv}/bin/invoice-watch"


def test_readme_credentials_folder_is_private_as_the_unit_expects() -> None:
    recipe = readme_block_after("<!-- .ci/check-install runs this block")
    (line,) = [
        line for line in recipe.splitlines() if "install -d" in line and "credentials" in line
    ]
    assert "-m 0700" in line and "/etc/invoice-watch/credentials" in line
    unit = (ROOT / "systemd/invoice-watch.service").read_text(encoding="utf-8")
    assert "LoadCredential=atlas-private-key:/etc/invoice-watch/credentials/" in unit


@pytest.mark.parametrize(
    "path", ["README.md", "Dockerfile", "docker-compose.example.yml", "config.example.yaml"]
)
def test_secrets_come_from_files_everywhere(path: str) -> None:
    """One recommended way: secrets in files (`<key>_file`), never a container's
    environment (`docker run -e`, compose `environment:`), as the Dockerfile says."""
    text = (ROOT / path).read_text(encoding="utf-8")
    secrets = ("PRIVATE_KEY", "CLIENT_SECRET", "WEBHOOK_URL", "TOKEN", "PASSWORD")
    for match in re.finditer(r"(?:-e|--env)\s+([A-Z_]+)", text):
        assert not any(word in match.group(1) for word in secrets), match.group(0)
    if path == "config.example.yaml":
        active = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        for key in ("private_key", "webhook_url", "password"):
            assert any(f"{key}_file:" in line for line in active), key
            assert not any(re.search(rf"\b{key}: \$\{{", line) for line in active), key


def readme_yaml_after(marker: str) -> str:
    """The first ```yaml block after ``marker`` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(marker) :]
    start = after.index("```yaml\n") + len("```yaml\n")
    return after[start : after.index("```", start)]


def test_readme_config_starts_under_the_unit_as_the_recipe_installs_it(
    tmp_path: Path, unit: dict[str, dict[str, list[str]]]
) -> None:
    """A14-6: the README's config (its minimal one, plus the service's state.path) with
    the recipe's files and the unit unchanged: every file the unit's LoadCredential=
    lines name is one the recipe installs (a missing one stops the unit), and the config
    loads with only those in $CREDENTIALS_DIRECTORY, as the service sees it. It then
    uses the unit's StateDirectory (the container's volume too)."""
    from invoice_watch.config import load_file

    recipe = readme_block_after("<!-- .ci/check-install runs this block")
    installed = set(re.findall(r"/etc/invoice-watch/credentials/([\w.-]+) <<<", recipe))
    loaded = dict(value.split(":", 1) for value in unit["Service"]["LoadCredential"])
    assert set(loaded) <= installed, "the unit loads a credential the recipe does not install"
    for name, source in loaded.items():
        assert source == f"/etc/invoice-watch/credentials/{name}"
    credentials = tmp_path / "run-credentials"  # what systemd hands the service
    credentials.mkdir()
    for name in loaded:
        value = "https://hooks.slack.com/services/T0/B0/x" if "webhook" in name else "k"
        (credentials / name).write_text(value + "\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    config = readme_yaml_after("## Use it") + readme_yaml_after("## Run it as a systemd service")
    (etc / "config.yaml").write_text(config)
    (state_dir,) = unit["Service"]["StateDirectory"]
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "STATE_DIRECTORY": f"/var/lib/{state_dir}"}
    loaded_config = load_file(etc / "config.yaml", env=env)  # no ConfigError
    assert str(loaded_config.state.path) == f"{STATE_DIR}/state.db" == SERVICE_STATE
    assert loaded_config.state.explicit


def test_readme_says_a_changed_secret_needs_a_restart_under_systemd() -> None:
    """LoadCredential= copies the files at start: a reload rereads the old copies."""
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "A changed **secret** needs `systemctl restart invoice-watch`" in text
    assert "Every setting takes effect on reload" not in text


def test_sqlite_temporary_files_go_to_the_state_folder(
    unit: dict[str, dict[str, list[str]]], final_stage: list[tuple[str, str]]
) -> None:
    """A big organization's first listing is staged in SQLite's temporary files until
    its commit (README Guarantees): on the state's disk, not in a /tmp that may be a
    tmpfs (the read-only container's is: memory, which the staging saves)."""
    assert "SQLITE_TMPDIR=/var/lib/invoice-watch" in unit["Service"]["Environment"]
    env = " ".join(args for instruction, args in final_stage if instruction == "ENV")
    assert "SQLITE_TMPDIR=/var/lib/invoice-watch" in env
