"""Shared fixtures: a config builder, invoice factory, clean environment."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from invoice_watch import constants, redact
from invoice_watch.config import Config, load
from invoice_watch.store import StateUrl, Store, open_copy, open_store
from invoice_watch.types import Invoice

# Fixtures test modules share: the SMTP sink (aiosmtpd on 127.0.0.1), the `world` of the
# end-to-end tests (simulator + fake Slack + SMTP + config builder), the guard that
# fails any test whose captured logs show a secret, and a throwaway PostgreSQL server.
pytest_plugins = [
    "tests.fakes_smtp",
    "tests.world",
    "tests.secret_guard",
    "tests.postgres",
]

ORG_A = "aaaaaaaaaaaaaaaaaaaaaaaa"
ORG_B = "bbbbbbbbbbbbbbbbbbbbbbbb"
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
PERIOD_START = datetime(2026, 11, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 12, 1, tzinfo=UTC)

_ENV_VARS = (
    "INVOICE_WATCH_CONFIG",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "SLACK_WEBHOOK_URL",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    # Proxies and ~/.netrc: tests never go through the developer's or CI's.
    *(name for base in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
      for name in (base, base.upper())),
    "NETRC",
)  # fmt: skip


@pytest.fixture(autouse=True)
def own_secrets_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no registered secret (invoice_watch.redact): a config a
    module loads at import (say, with `private_key: secret`) must not redact the word
    "secret" out of every later test's messages."""
    monkeypatch.setattr(redact, "_known", set())
    monkeypatch.setattr(redact, "_known_pattern", None)


# Where tests pretend the service keeps its state: nothing is there, unless a test puts
# a file there (tests never look at the machine's real /var/lib/invoice-watch).
NO_SERVICE_STATE = Path("/nonexistent-invoice-watch-service/state.db")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see the developer's or CI's environment for our variables, nor the
    state file of an invoice-watch service installed on the machine."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "SERVICE_STATE_PATH", NO_SERVICE_STATE)
    yield


class OpenState(Protocol):
    """The ``open_state`` fixture: ``await open_state(path)`` opens a state as the daemon
    does, ``exclusive=False`` as an operator command does, ``copy=True`` as --dry-run
    does (:func:`~invoice_watch.store.open_copy`); ``path`` None: ``tmp_path/state.db``.
    On PostgreSQL every path names the test's one database."""

    def __call__(
        self, path: Path | None = None, *, exclusive: bool = True, copy: bool = False
    ) -> Awaitable[Store]: ...


Backend = Callable[[Path], "Path | StateUrl"]


def where_state_is(request: pytest.FixtureRequest, name: str) -> Backend:
    """Where a path keeps the state on backend ``name``: the file itself (sqlite), or
    the test's fresh database (postgresql)."""
    if name == "sqlite":
        return lambda path: path
    url = StateUrl(request.getfixturevalue("postgres_url"))
    return lambda path: url


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """The state backend of ``open_state`` and ``store``: SQLite; a module whose tests
    every backend must pass overrides it with :func:`every_backend`."""
    return where_state_is(request, "sqlite")


@pytest.fixture(params=["sqlite", "postgresql"])
def every_backend(request: pytest.FixtureRequest) -> Backend:
    """Each state backend in turn (PostgreSQL: tests/postgres.py's server)."""
    return where_state_is(request, request.param)


@pytest.fixture
async def open_state(tmp_path: Path, backend: Backend) -> AsyncIterator[OpenState]:
    """Opens states for a test and closes each after it (closing one the test closed
    already does nothing): no test opens and closes a state by hand."""
    opened: list[Store] = []

    async def open_(
        path: Path | None = None, *, exclusive: bool = True, copy: bool = False
    ) -> Store:
        where = backend(tmp_path / "state.db" if path is None else path)
        state = await (open_copy(where) if copy else open_store(where, exclusive=exclusive))
        opened.append(state)
        return state

    yield open_
    for state in reversed(opened):
        await state.close()


@pytest.fixture
async def store(open_state: OpenState) -> Store:
    """A new state, the daemon's (``tmp_path/state.db``), closed after the test: what the
    store tests take, on every backend (``backend``)."""
    return await open_state()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many spec conformance tests were skipped, and why: a plain `pytest`
    without ../shared beside the repository must not pass them silently."""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "../shared" in str(report.longrepr)
    ]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} spec conformance test(s) SKIPPED: they read "
            "../shared/atlas-openapi/invoices.openapi.json, which is not beside this "
            "repository; put the shared folder there to run them",
            yellow=True,
            bold=True,
        )


def base_config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "atlas": {
            "base_url": "http://127.0.0.1:9",
            "auth": {"public_key": "pubkey", "private_key": "privkey-secret"},
        },
        "organizations": [{"id": ORG_A, "name": "Production"}, {"id": ORG_B, "name": "Analytics"}],
        "notifiers": {"console": {"type": "console"}},
        "rules": [
            {"name": "failed-invoice", "type": "invoice_status", "notify": ["console"]},
            {
                "name": "pending-over-budget",
                "type": "pending_amount",
                "threshold": 5000,
                "notify": ["console"],
            },
        ],
    }
    data.update(overrides)
    return data


def make_config(tmp_path: Path, data: dict[str, Any] | None = None, **overrides: Any) -> Config:
    data = data if data is not None else base_config(**overrides)
    data.setdefault("state", {"path": str(tmp_path / "state.db")})
    return load(
        yaml.safe_dump(data, sort_keys=False), filename="test.yaml", env={}, base_dir=tmp_path
    )


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    def factory(data: dict[str, Any] | None = None, **overrides: Any) -> Config:
        return make_config(tmp_path, data, **overrides)

    return factory


def inv(
    n: int = 1,
    *,
    org: str = ORG_A,
    status: str = "PENDING",
    cents: int = 100_00,
    start: datetime = PERIOD_START,
    end: datetime = PERIOD_END,
    source: str | None = None,
    **amounts: Any,
) -> Invoice:
    """An invoice with a readable id: inv(3) -> id '000...003'."""
    return Invoice(
        id=f"{n:024x}",
        org_id=org,
        status=status,
        start_date=start,
        end_date=end,
        amount_billed_cents=cents,
        source_org_id=source or org,
        **amounts,
    )
