"""Secrets never leak: not in logs (at DEBUG, tracebacks included), not on stdout or
stderr, not in the outbox errors `status` prints, not in reprs.

The main flows run here with every credential kind at once: Digest keys and a service
account against the simulator, a Slack webhook and a bot token against the fake Slack,
and SMTP AUTH with a password against aiosmtpd, through successes and the failures
whose messages are most tempted to quote a URL or a header (401, 5xx, refused logins,
unreachable hosts). ``no_secret_in_logs`` (tests/secret_guard.py) is the plugin form of
the log check, for the whole suite.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.atlas.auth import OAuthMiddleware
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.config import Config, load, summary
from invoice_watch.notify import build_notifiers
from tests.fakes_slack import TOKEN, WEBHOOK_PATH, Reply
from tests.fakes_smtp import Sink, StartServer
from tests.manual_clock import ManualClock
from tests.secret_guard import leaked
from tests.world import SMTP_PASSWORD, World

USERNAME = "invoice-watch"


def check_password(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USERNAME.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


def config_data(world: World, smtp_port: int, **kw: Any) -> dict[str, Any]:
    data = world.config_data(**kw)
    data["notifiers"]["mail"].update(
        {"port": smtp_port, "username": USERNAME, "password": SMTP_PASSWORD}
    )
    data["notifiers"]["bot"] = {
        "type": "slack",
        "token": TOKEN,
        "channel": "#billing",
        "api_url": world.slack.api_url,
    }
    for rule in data["rules"]:
        rule["notify"] = ["slack", "bot", "mail"]
    return data


def config_of(world: World, data: dict[str, Any]) -> Config:
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def every_secret(world: World, guarded: set[str]) -> set[str]:
    basic = base64.b64encode(f"{world.sim.client_id}:{world.sim.client_secret}".encode())
    return guarded | {
        world.sim.private_key,
        world.sim.client_secret,
        world.slack.webhook_url,
        WEBHOOK_PATH,
        TOKEN,
        SMTP_PASSWORD,
        basic.decode(),
    }


async def test_secrets_never_reach_logs_output_or_status_in_the_main_flows(
    world: World,
    smtp_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    no_secret_in_logs: set[str],
):
    caplog.set_level(logging.DEBUG)  # every library too: slack-sdk logs URLs at DEBUG
    sink = Sink()  # AUTH offered without TLS (required AUTH would want TLS too)
    port = await smtp_server(sink, auth_require_tls=False, authenticator=check_password)
    digest = config_of(world, config_data(world, port))
    oauth = config_of(world, config_data(world, port, service_account=True))
    status = io.StringIO()

    # Failures first: Atlas 503 and 401, Slack down, the bot refused, a wrong SMTP password.
    world.sim.faults.status(503, times=2, path="*/invoices")
    world.sim.faults.status(401, times=1, path="*/invoices/pending")
    world.slack.script_webhook(Reply(500), Reply(429, headers={"Retry-After": "1"}))
    world.slack.script_api(Reply(200, "invalid_auth"))
    wrong_login = config_data(world, port, service_account=True)
    wrong_login["notifiers"]["mail"]["password"] = SMTP_PASSWORD + "-wrong"
    no_secret_in_logs.add(SMTP_PASSWORD + "-wrong")
    await world.run_once(config_of(world, wrong_login))
    assert await ops.status(oauth, out=status) == 0

    # Then a revoked service account and a key pair, and the same with everything healthy.
    world.sim.revoke_credentials(api_key=False)
    assert await world.run_once(oauth) == 1
    world.sim.restore_credentials()
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    assert await world.run_once(oauth) == 0
    assert await world.run_once(digest) == 0

    # The daemon, a cycle through Slack unreachable, and a stop.
    unreachable = config_data(world, port)
    unreachable["notifiers"]["slack"]["webhook_url"] = "http://127.0.0.1:9" + WEBHOOK_PATH
    world.sim.set_amount(world.sim.scenario.invoice("pending").id, 1000_00)
    stop = asyncio.Event()
    async with App(config_of(world, unreachable), clock=ManualClock(world.clock.now())) as app:
        daemon = asyncio.create_task(app.serve(stop))
        async with asyncio.timeout(10):
            await app.cycles.done.wait()
        stop.set()
        await asyncio.wait_for(daemon, 10)
    assert await ops.status(digest, out=status) == 0
    assert "Undelivered notifications: 0" not in status.getvalue()  # errors were shown

    secrets = every_secret(world, no_secret_in_logs)
    assert world.slack.accepted and "cycle:" in caplog.text  # the flows did run
    assert sink.sessions and all(session.authenticated for session in sink.sessions)
    # DEBUG was on for every library (slack-sdk's own loggers included: the bot's and the
    # webhook's clients log through invoice_watch.notify.slack.sdk, which stays at INFO:
    # slack-sdk logs a proxy URL, password and all, at DEBUG).
    assert any(
        r.levelno == logging.DEBUG and not r.name.startswith("invoice_watch")
        for r in caplog.records
    )
    out, err = capsys.readouterr()
    for where, text in {"stdout": out, "stderr": err, "status": status.getvalue()}.items():
        assert [s for s in secrets if s in text] == [], where
    assert leaked(secrets, caplog.records) == []


def test_secrets_are_masked_in_reprs_and_summaries(tmp_path):
    data = {
        "atlas": {"auth": {"client_id": "mdb_sa_id_1", "client_secret": "mdb_sa_sk_s3cr3t"}},
        "organizations": [{"id": "a" * 24}],
        "state": {"path": str(tmp_path / "state.db")},
        "notifiers": {
            "hook": {"type": "slack", "webhook_url": "https://hooks.slack.com" + WEBHOOK_PATH},
            "bot": {"type": "slack", "token": TOKEN, "channel": "#billing"},
            "mail": {
                "type": "email",
                "host": "smtp.example.com",
                "username": USERNAME,
                "password": SMTP_PASSWORD,
                "from": "a@example.com",
                "to": ["b@example.com"],
            },
        },
        "rules": [{"name": "r", "type": "invoice_status", "notify": ["hook", "bot", "mail"]}],
    }
    config = load(yaml.safe_dump(data), env={}, base_dir=tmp_path)
    digest = load(
        yaml.safe_dump(
            {**data, "atlas": {"auth": {"public_key": "pub", "private_key": "pk-1234"}}}
        ),
        env={},
        base_dir=tmp_path,
    )
    secrets = ["mdb_sa_sk_s3cr3t", "pk-1234", WEBHOOK_PATH, TOKEN, SMTP_PASSWORD]
    notifiers = build_notifiers(config.notifiers)
    shown = [
        repr(config),
        str(config),
        repr(digest),
        repr(config.model_dump()),
        config.model_dump_json(),
        repr(digest.atlas),
        summary(config),
        summary(digest),
        repr(App(config)),
        repr(AtlasClient(config.atlas)),
        repr(AtlasClient(digest.atlas)),
        repr(OAuthMiddleware("https://x/token", "id", "mdb_sa_sk_s3cr3t", clock=App(config).clock)),
        *(repr(n) for n in notifiers.values()),
        repr(notifiers),
    ]
    for text in shown:
        assert [s for s in secrets if s in text] == [], text
