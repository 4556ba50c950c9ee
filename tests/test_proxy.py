"""Outbound HTTP honours the environment's proxy (issue 13 §3): the Atlas client (its
OAuth token request included) and both Slack notifiers go through ``HTTP_PROXY`` /
``HTTPS_PROXY`` unless ``NO_PROXY`` (CIDR ranges too) says otherwise, and
``atlas.proxy`` / a notifier's ``proxy`` override the environment. Loopback is always
reached directly (issue 13 A13-6: the demo's and ``simulate``'s servers), unless a
proxy is configured. A real forward proxy on loopback (:mod:`tests.fakes_proxy`)
records what passed through it; tests reach their servers through it by a host name
only the proxy resolves (``atlas.test``). ``~/.netrc`` is never read; proxy credentials
(user name and password) reach the proxy only, never a log, an error or a summary.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from invoice_watch.atlas.client import AtlasClient
from invoice_watch.cli.commands import run_once
from invoice_watch.clock import FakeClock
from invoice_watch.config import AtlasConfig, summary
from invoice_watch.errors import ConfigError, PermanentNotifyError
from invoice_watch.notify import build_notifiers
from invoice_watch.proxy import bypassed, masked, proxy_for
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.types import AlertEvent, EventKind, Severity
from tests.conftest import base_config, make_config
from tests.fakes_proxy import FakeProxy, aliased
from tests.fakes_slack import FakeSlack

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
ORG = "5f8a1c2e9b3d4a6f7e0c1b2a"
PROXY_PASSWORD = "proxy-passw0rd-never-logged"


def scenario() -> Scenario:
    s = Scenario(now=NOW)
    s.add_org("Production", id=ORG)
    s.add_invoice(ORG, period=0, status="PENDING", amount_cents=100_00)
    return s


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(scenario(), clock=FakeClock(NOW)) as server:
        yield server


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    async with FakeProxy() as server:
        yield server


def atlas_config(
    sim: Simulator,
    tmp_path: Path,
    *,
    service_account: bool = False,
    base_url: str | None = None,
    **atlas: Any,
):
    auth = (
        {"client_id": sim.client_id, "client_secret": sim.client_secret}
        if service_account
        else {"public_key": sim.public_key, "private_key": sim.private_key}
    )
    data = base_config()
    data["atlas"] = {"base_url": base_url or sim.base_url, "auth": auth, "retries": 0, **atlas}
    return make_config(tmp_path, data)


async def read(config: Any) -> Any:
    async with AtlasClient(config.atlas, clock=FakeClock(NOW)) as client:
        return await client.read_org(ORG)


# --- NO_PROXY and the choice of proxy -------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "direct"),
    [
        ("127.0.0.1", 80, "127.0.0.0/8", True),  # CIDR (aiohttp's trust_env misses it)
        ("10.1.2.3", 80, "10.0.0.0/8, 192.168.0.0/16", True),
        ("10.1.2.3", 80, "192.168.0.0/16", False),
        ("::1", 80, "::1/128", True),
        ("[::1]", 80, "[::1]:80", True),
        ("cloud.mongodb.com", 443, "mongodb.com", True),  # a domain covers its subdomains
        ("cloud.mongodb.com", 443, ".mongodb.com", True),
        ("cloud.mongodb.com", 443, "*.mongodb.com", True),
        ("notmongodb.com", 443, "mongodb.com", False),
        ("cloud.mongodb.com", 443, "cloud.mongodb.com:8443", False),  # another port
        ("cloud.mongodb.com", 443, "cloud.mongodb.com:443", True),
        ("hooks.slack.com", 443, "*", True),
        ("hooks.slack.com", 443, "", False),
        ("hooks.slack.com", 443, "not a cidr/99, slack.com", True),
    ],
)
def test_no_proxy_matching(host: str, port: int, no_proxy: str, direct: bool):
    assert bypassed(host, port, no_proxy) is direct


def test_proxy_for_reads_the_scheme_variable_lowercase_first():
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128"}
    assert proxy_for("https://cloud.mongodb.com", environ=env) == "http://lower:3128"
    assert proxy_for("http://127.0.0.1:9", environ=env) is None  # no HTTP_PROXY
    assert proxy_for("http://x", environ={"HTTP_PROXY": "proxy:3128"}) == "http://proxy:3128"
    assert proxy_for("https://x", "http://configured:1", env) == "http://configured:1"
    with pytest.raises(ValueError, match="HTTPS_PROXY is not a proxy URL"):
        proxy_for("https://x", environ={"HTTPS_PROXY": "http://:99999"})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pa%40ss@proxy:3128", "http://<secret>@proxy:3128"),
        ("http://tok_9f8e7d6c5b4a@proxy:3128", "http://<secret>@proxy:3128"),  # a token
        ("http://APIKEY0123456789:@proxy", "http://<secret>@proxy"),  # empty password
        ("http://proxy:3128", "http://proxy:3128"),
        ("http://[::1", "<secret>"),  # not a URL at all: nothing of it shown
    ],
)
def test_masked_hides_the_whole_user_info(url: str, shown: str):
    assert masked(url) == shown


def test_a_proxy_shows_no_credential_and_its_dump_loads_again():
    """A proxy URL is concealed as a secret is (:mod:`invoice_watch.concealed`): its repr,
    str and JSON dump mask the user info; a Python dump keeps the value, so that
    validating the dump again gives the same configuration (it held the masked URL,
    which loaded as another proxy, with `<secret>` as its user)."""
    url = f"http://relay:{PROXY_PASSWORD}@proxy.example.com:3128"
    auth = {"public_key": "abcdefgh", "private_key": "0123456789abcdef"}
    atlas = AtlasConfig(auth=auth, proxy=url)
    assert atlas.proxy is not None and atlas.proxy.url == url
    dumped = atlas.model_dump()
    shown = repr(atlas) + str(atlas) + str(dumped) + atlas.model_dump_json() + str(atlas.proxy)
    assert PROXY_PASSWORD not in shown and "relay" not in shown
    assert "http://<secret>@proxy.example.com:3128" in atlas.model_dump_json()
    assert AtlasConfig.model_validate(dumped) == atlas


@pytest.mark.parametrize(
    ("url", "direct"),
    [
        ("http://127.0.0.1:9/x", True),
        ("http://127.1.2.3/x", True),
        ("http://[::1]:9/x", True),
        ("http://[::ffff:127.0.0.1]:9/x", True),
        ("https://localhost/x", True),
        ("http://LocalHost.:8080/x", True),
        ("http://demo.localhost/x", True),
        ("http://10.0.0.1/x", False),
        ("http://localhost.example.com/x", False),
        ("https://cloud.mongodb.com/x", False),
    ],
)
def test_proxy_for_never_sends_loopback_through_the_environment(url: str, direct: bool):
    env = {"HTTP_PROXY": "http://proxy:3128", "HTTPS_PROXY": "http://proxy:3128"}
    assert (proxy_for(url, environ=env) is None) is direct
    assert proxy_for(url, "http://configured:1", env) == "http://configured:1"  # asked for


def test_proxy_for_no_proxy_cidr_goes_directly():
    env = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8"}
    assert proxy_for("https://10.1.2.3/x", environ=env) is None
    assert proxy_for("https://11.1.2.3/x", environ=env) == "http://proxy:3128"


# --- the Atlas client -----------------------------------------------------------------


@pytest.mark.parametrize("service_account", [False, True], ids=["api key", "service account"])
async def test_atlas_goes_through_http_proxy_from_the_environment(
    sim: Simulator,
    proxy: FakeProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    service_account: bool,
):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    base_url = aliased(sim.base_url)
    config = atlas_config(sim, tmp_path, service_account=service_account, base_url=base_url)
    result = await read(config)
    assert result.ok
    paths = [p.url.removeprefix(base_url) for p in proxy.seen]
    assert f"/api/atlas/v2/orgs/{ORG}/invoices" in " ".join(paths)
    if service_account:
        assert "/api/oauth/token" in paths  # the token request too
    assert len(proxy.seen) == len(sim.requests)  # everything went through it


@pytest.mark.parametrize("service_account", [False, True], ids=["api key", "service account"])
async def test_atlas_on_loopback_never_goes_through_the_environment_proxy(
    sim: Simulator,
    proxy: FakeProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    service_account: bool,
):
    """The demo's or `simulate`'s simulator on 127.0.0.1, with HTTP_PROXY set (a proxy
    that would forward, and one where nothing listens): read directly, no NO_PROXY
    needed."""
    for url in (proxy.url, "http://127.0.0.1:9"):
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.setenv("HTTPS_PROXY", url)
        assert (await read(atlas_config(sim, tmp_path, service_account=service_account))).ok
    assert proxy.seen == []


@pytest.mark.parametrize("which", ["demo", "simulate --write-config"])
async def test_demo_and_simulate_configs_work_with_a_proxy_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
):
    """Attack 13, A13-6: with HTTP_PROXY set (here to a port where nothing listens),
    the demo read nothing ("cannot go through the proxy") and ended "done: 0
    notification(s) sent"; its simulator on 127.0.0.1 is now reached directly."""
    from invoice_watch.app import App
    from invoice_watch.config import load_file
    from invoice_watch.demo import demo_config, write_simulator_config
    from invoice_watch.simulator import demo_scenario

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    async with Simulator(demo_scenario()) as sim:
        if which == "demo":
            config = demo_config(sim, tmp_path, slack_webhook=None)
        else:
            write_simulator_config(sim, tmp_path / "sim.yaml")
            config = load_file(tmp_path / "sim.yaml")
        async with App(config) as app:
            assert await run_once(app) == 0  # every organization read


async def test_atlas_proxy_setting_overrides_the_environment_and_keeps_its_password(
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_secret_in_logs: set[str],
):
    no_secret_in_logs.add(PROXY_PASSWORD)
    async with FakeProxy(("relay", PROXY_PASSWORD)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # and the setting ignores this too
        configured = proxy.url.replace("http://", f"http://relay:{PROXY_PASSWORD}@")
        config = atlas_config(sim, tmp_path, proxy=configured)
        assert (await read(config)).ok
        assert proxy.seen  # through the configured proxy, with its credentials
        expected = base64.b64encode(f"relay:{PROXY_PASSWORD}".encode()).decode()
        assert {p.headers["Proxy-Authorization"] for p in proxy.seen} == {f"Basic {expected}"}
        # The password never shows: not in the summary, the config's repr, or the logs
        # (a 407 from the proxy, quoted in the error, included).
        shown = summary(config) + repr(config) + config.model_dump_json()
        assert PROXY_PASSWORD not in shown and "proxy http://<secret>@127.0.0.1" in summary(config)
        wrong = atlas_config(sim, tmp_path, proxy=proxy.url.replace("http://", "http://relay:x@"))
        result = await read(wrong)
    assert not result.ok and "proxy" in (result.error or "") and "407" in (result.error or "")
    assert PROXY_PASSWORD not in caplog.text


PROXY_TOKEN = "tok_9f8e7d6c5b4a3210"


async def test_proxy_user_name_is_never_printed(
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    no_secret_in_logs: set[str],
):
    """Attack 13, A13-7: a token as the proxy's user name (`http://TOKEN@proxy`, or
    `http://TOKEN:@proxy`) was printed by the log, the `run --once` error line,
    `status` and check-config: the whole user info is masked."""
    import io

    from invoice_watch import ops
    from invoice_watch.app import App

    no_secret_in_logs.add(PROXY_TOKEN)
    async with FakeProxy(("someone", "else")) as proxy:  # refuses the token: 407
        for url in (f"http://{PROXY_TOKEN}@", f"http://{PROXY_TOKEN}:@"):
            monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", url))
            config = atlas_config(sim, tmp_path, base_url=aliased(sim.base_url))
            async with App(config, clock=FakeClock(NOW)) as app:
                assert await run_once(app) == 1
            report = io.StringIO()
            assert await ops.status(config, out=report) == 0
            _, err = capsys.readouterr()
            for where, text in {"stderr": err, "status": report.getvalue()}.items():
                assert PROXY_TOKEN not in text, where
                assert "the proxy http://<secret>@127.0.0.1" in text, where
        configured = atlas_config(sim, tmp_path, proxy=f"http://{PROXY_TOKEN}:@proxy:3128")
        assert "proxy http://<secret>@proxy:3128" in summary(configured)
        assert PROXY_TOKEN not in summary(configured) + repr(configured)
    assert PROXY_TOKEN not in caplog.text


async def test_netrc_is_never_read(
    sim: Simulator, proxy: FakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """aiohttp's trust_env would send ~/.netrc's password as Authorization: Basic to a
    matching host; with slack-sdk, to the webhook's host."""
    netrc = tmp_path / "netrc"
    netrc.write_text(
        "machine 127.0.0.1 login netrc-user password netrc-secret-password\n"
        "machine atlas.test login netrc-user password netrc-secret-password\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert (await read(atlas_config(sim, tmp_path, base_url=aliased(sim.base_url)))).ok
    async with FakeSlack() as slack:
        notifiers = build_notifiers(
            load_notifiers(tmp_path, {"hook": {"type": "slack", "webhook_url": slack.webhook_url}})
        )
        await notifiers["hook"].send([event()])
        assert slack.accepted
        assert all("Authorization" not in r.headers for r in slack.received)
    assert proxy.seen and not [a for a in proxy.authorizations if a.startswith("Basic")]


def test_proxy_setting_errors_are_located(tmp_path: Path):
    data = base_config()
    data["atlas"]["proxy"] = "ftp://proxy:21"
    with pytest.raises(ConfigError, match=r"test.yaml:\d+:\d+: atlas.proxy: .*not a proxy URL"):
        make_config(tmp_path, data)


async def test_malformed_proxy_in_the_environment_fails_each_read_clearly(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HTTP_PROXY", "http://user:pw@proxy:notaport")
    result = await read(atlas_config(sim, tmp_path, base_url=aliased(sim.base_url)))
    assert not result.ok and "HTTP_PROXY is not a proxy URL" in (result.error or "")
    assert "pw" not in (result.error or "").replace("proxy", "")


# --- the Slack notifiers --------------------------------------------------------------


def event() -> AlertEvent:
    return AlertEvent(
        kind=EventKind.FIRING,
        key="failed-charge|" + ORG,
        rule="failed-charge",
        rule_type="invoice_status",
        severity=Severity.CRITICAL,
        org_id=ORG,
        org_name="Production",
        billing_url="https://cloud.mongodb.com/v2#/org/x/billing/overview",
        summary="invoice FAILED",
        at=NOW,
        invoice_id="1" * 24,
        invoice_status="FAILED",
        amount_cents=100_00,
    )


def load_notifiers(tmp_path: Path, notifiers: dict[str, Any]) -> Any:
    data = base_config(notifiers=notifiers)
    data["rules"] = [{"name": "r", "type": "invoice_status", "notify": list(notifiers)}]
    return make_config(tmp_path, data).notifiers


def slack_notifiers(slack: FakeSlack, host: str | None = None, **extra: Any) -> dict[str, Any]:
    """A webhook and a bot on ``slack``, named by ``host`` (an alias only the proxy
    resolves) when given."""

    def url(address: str) -> str:
        return aliased(address, host) if host else address

    return {
        "hook": {"type": "slack", "webhook_url": url(slack.webhook_url), **extra},
        "bot": {
            "type": "slack",
            "token": "xoxb-0000-fake-token",
            "channel": "#billing",
            "api_url": url(slack.api_url),
            **extra,
        },
    }


async def test_slack_goes_through_the_environment_proxy_but_never_for_loopback(
    proxy: FakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with FakeSlack() as slack:
        configs = load_notifiers(tmp_path, slack_notifiers(slack, "slack.test"))
        for notifier in build_notifiers(configs).values():
            await notifier.send([event()])
        assert len(slack.accepted) == 2 and len(proxy.seen) == 2
        assert any("chat.postMessage" in p.url for p in proxy.seen)

        # slack-sdk would take HTTP_PROXY for 127.0.0.1 itself: loopback goes directly.
        notifiers = build_notifiers(load_notifiers(tmp_path, slack_notifiers(slack)))
        for notifier in notifiers.values():
            await notifier.send([event()])
        assert len(slack.accepted) == 4 and len(proxy.seen) == 2  # directly


async def test_slack_notifier_proxy_setting_overrides_the_environment(
    proxy: FakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    async with FakeSlack() as slack:
        configs = load_notifiers(tmp_path, slack_notifiers(slack, proxy=proxy.url))
        for notifier in build_notifiers(configs).values():
            await notifier.send([event()])
        assert len(slack.accepted) == 2 and len(proxy.seen) == 2


async def test_slack_with_a_malformed_environment_proxy_is_a_permanent_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HTTP_PROXY", "http://[::1")
    async with FakeSlack() as slack:
        configs = load_notifiers(tmp_path, slack_notifiers(slack, "slack.test"))
        notifiers = build_notifiers(configs)
        with pytest.raises(PermanentNotifyError, match="HTTP_PROXY is not a proxy URL"):
            await notifiers["hook"].send([event()])


async def test_slack_sdk_never_logs_the_proxy_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_secret_in_logs: set[str],
):
    """slack-sdk logs the proxy URL it takes from the environment at DEBUG."""
    no_secret_in_logs.add(PROXY_PASSWORD)
    caplog.set_level(logging.DEBUG)
    async with FakeProxy(("relay", PROXY_PASSWORD)) as proxy, FakeSlack() as slack:
        with_password = proxy.url.replace("http://", f"http://relay:{PROXY_PASSWORD}@")
        monkeypatch.setenv("HTTPS_PROXY", with_password)
        monkeypatch.setenv("HTTP_PROXY", with_password)
        configs = load_notifiers(tmp_path, slack_notifiers(slack, "slack.test"))
        for notifier in build_notifiers(configs).values():
            await notifier.send([event()])
        assert len(slack.accepted) == 2 and len(proxy.seen) == 2
    assert PROXY_PASSWORD not in caplog.text


def test_email_has_no_proxy_setting(tmp_path: Path):
    """SMTP is not HTTP: `proxy` is refused there (config.example.yaml says so)."""
    data = base_config(
        notifiers={
            "mail": {
                "type": "email",
                "host": "smtp.example.com",
                "from": "a@example.com",
                "to": ["b@example.com"],
                "proxy": "http://proxy:3128",
            }
        }
    )
    data["rules"] = [{"name": "r", "type": "invoice_status", "notify": ["mail"]}]
    with pytest.raises(ConfigError, match=r"notifiers\.mail\.proxy"):
        make_config(tmp_path, data)
