"""A pytest plugin: no secret a test's components hold ever shows in its captured logs.

The autouse fixture ``no_secret_in_logs`` collects the secrets of the test: the fixed
ones of the test suite (config private key, SMTP password, Slack token and webhook
path, the receivers' routing key, tokens, signing secret and header) and every
credential the Atlas simulator is given or issues (Digest private key, service account
secret, bearer tokens). It captures invoice_watch's logs down to DEBUG, and after the
test fails it if any secret appears in a log record (message or traceback) of the setup
or call phase.

Enable it for the whole suite by adding ``"tests.secret_guard"`` to ``pytest_plugins`` in
``tests/conftest.py``; ``tests/test_reliability_secrets.py`` imports it for its own tests.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from invoice_watch.simulator.auth import DigestVerifier, TokenIssuer

MIN_LENGTH = 8


def suite_secrets() -> set[str]:
    """Secrets written into the test suite's own configs and fakes. (Imported here, not
    at the top: a plugin given with ``-p`` must not import test modules early.)"""
    from tests.conftest import base_config
    from tests.fakes_receivers import (
        AM_TOKEN,
        ROUTING_KEY,
        TEAMS_QUERY,
        WEBHOOK_HEADER_VALUE,
        WEBHOOK_SECRET,
    )
    from tests.fakes_slack import TOKEN, WEBHOOK_PATH
    from tests.world import SMTP_PASSWORD

    private_key: str = base_config()["atlas"]["auth"]["private_key"]
    receivers = {AM_TOKEN, ROUTING_KEY, TEAMS_QUERY, WEBHOOK_HEADER_VALUE, WEBHOOK_SECRET}
    return {private_key, SMTP_PASSWORD, TOKEN, WEBHOOK_PATH, *receivers}


def _recording(method: Callable[..., Any], record: Callable[..., None]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        record(result, *args, **kwargs)
        return result

    return wrapper


def leaked(secrets: set[str], records: list[logging.LogRecord]) -> list[str]:
    """The secrets that appear in any of ``records`` (formatted, tracebacks included)."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    text = "\n".join(formatter.format(record) for record in records)
    return sorted(secret for secret in secrets if secret in text)


@pytest.fixture(autouse=True)
def no_secret_in_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[set[str]]:
    """Yields the set of secrets (tests may add their own); asserts none was logged."""
    secrets = suite_secrets()

    def keep(value: str) -> None:
        if len(value) >= MIN_LENGTH:  # a test's one-letter "secret" would match anywhere
            secrets.add(value)

    def digest(_: None, verifier: DigestVerifier, username: str, password: str, *a: Any) -> None:
        keep(password)

    def issuer(_: None, issuer: TokenIssuer, client_id: str, client_secret: str, *a: Any) -> None:
        keep(client_secret)

    def token(issued: str, *_: Any) -> None:
        keep(issued)

    monkeypatch.setattr(DigestVerifier, "__init__", _recording(DigestVerifier.__init__, digest))
    monkeypatch.setattr(TokenIssuer, "__init__", _recording(TokenIssuer.__init__, issuer))
    monkeypatch.setattr(TokenIssuer, "issue", _recording(TokenIssuer.issue, token))
    caplog.set_level(logging.DEBUG, logger="invoice_watch")
    yield secrets
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert leaked(secrets, records) == [], "a secret was logged"
