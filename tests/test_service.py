"""Running in production: /healthz and /metrics, SIGHUP reload, status --check, the
operator tables, JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys

import aiohttp
import pytest
import yaml

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.cli.logs import JsonFormatter
from tests.fakes_slack import Reply
from tests.manual_clock import ManualClock
from tests.world import ANALYTICS, PROD, World


async def test_http_healthz_and_metrics_while_running(world: World):
    config = world.config(http={"listen": "127.0.0.1:0"})
    stop = asyncio.Event()
    async with App(config, clock=ManualClock(world.clock.now())) as app:
        daemon = asyncio.create_task(app.serve(stop))
        async with asyncio.timeout(10):
            await app.cycles.done.wait()
        assert app.daemon.endpoint.port
        base = f"http://127.0.0.1:{app.daemon.endpoint.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
            async with http.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        stop.set()
        await asyncio.wait_for(daemon, 10)
    for series in (
        'invoice_watch_cycles_total{outcome="ok"} 1.0',
        "invoice_watch_cycle_duration_seconds_count 1.0",
        "invoice_watch_orgs_failing 0.0",
        "invoice_watch_invoices_seen 5.0",
        'invoice_watch_alerts_firing{rule="failed-charge"} 1.0',
        'invoice_watch_outbox_depth{state="pending"}',
    ):
        assert series in metrics


async def test_outbox_depth_is_published_when_a_cycle_enqueues(world: World):
    # The gauge follows the outbox as soon as a cycle commits its messages, not only
    # after a delivery pass (a scrape in between, or a receiver that hangs, saw none).
    async with App(world.config(), clock=ManualClock(world.clock.now())) as app:
        await app.run_cycle()  # no delivery runs: the messages stay pending
        pending = await app.store.outbox.counts()
        value = app.metrics.registry.get_sample_value(
            "invoice_watch_outbox_depth", {"state": "pending"}
        )
    assert pending.get("pending", 0) > 0
    assert value == pending["pending"]


async def test_http_healthz_is_503_when_no_org_can_be_read(world: World):
    world.sim.faults.status(503, times=1000, path="/api/atlas/v2/orgs/*/invoices")
    atlas = {**world.config_data()["atlas"], "retries": 0}
    config = world.config(http={"listen": "127.0.0.1:0"}, atlas=atlas)
    stop = asyncio.Event()
    async with App(config, clock=ManualClock(world.clock.now())) as app:
        daemon = asyncio.create_task(app.serve(stop))
        async with asyncio.timeout(10):
            await app.cycles.done.wait()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{app.daemon.endpoint.port}/healthz") as resp:
                assert resp.status == 503
                body = await resp.json()
            async with http.get(f"http://127.0.0.1:{app.daemon.endpoint.port}/metrics") as resp:
                assert "invoice_watch_orgs_failing 2.0" in await resp.text()
        stop.set()
        await asyncio.wait_for(daemon, 10)
    assert body["status"] == "unhealthy" and "none of 2" in body["reason"]


async def test_reload_replaces_rules_and_refuses_a_state_path_change(world: World):
    config = world.config()
    async with App(config, clock=world.clock) as app:
        await app.run_cycle()
        fewer = world.config(rules=[{"name": "only", "type": "invoice_status", "notify": ["mail"]}])
        assert await app.reload(fewer)
        assert [r.name for r in app.config.rules] == ["only"]
        moved = world.config_data()
        moved["state"] = {"path": str(world.tmp / "elsewhere.db")}
        from invoice_watch.config import load

        other = load(yaml.safe_dump(moved), env={}, base_dir=world.tmp)
        assert not await app.reload(other)
        assert app.config is fewer


async def test_sighup_reloads_and_a_bad_config_is_refused(world: World):
    path = world.write_config()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "invoice_watch", "run", "-c", str(path),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stderr = proc.stderr
    assert stderr is not None

    async def wait_for(text: bytes) -> bytes:
        async with asyncio.timeout(30):
            while True:
                line = await stderr.readline()
                assert line, f"daemon exited before printing {text!r}"
                if text in line:
                    return line

    try:
        await wait_for(b"cycle:")
        path.write_text("rules: [\n")  # broken YAML
        proc.send_signal(signal.SIGHUP)
        refused = await wait_for(b"config reload refused")
        assert str(path).encode() in refused
        await wait_for(b"keeping the running configuration")
        data = world.config_data()
        data["poll"] = {"interval": "1h"}
        path.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        await wait_for(b"configuration reloaded")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_operator_commands_show_the_state(world: World):
    config = world.config()
    assert await world.run_once(config) == 0
    out = io.StringIO()
    assert await ops.status(config, out=out) == 0
    text = out.getvalue()
    assert "Health: OK" in text or "Health: UNHEALTHY" in text
    assert "Production" in text and "Analytics" in text and "Firing alerts: 2" in text

    out = io.StringIO()
    assert await ops.invoices(config, status="failed", out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["Organization", "Invoice", "Period", "Status", "Billed", "Paid"]
    assert "$4,350.20" in lines[1] and "FAILED" in lines[1]
    assert lines[-1] == "1 invoice(s)"

    out = io.StringIO()
    assert await ops.invoices(config, org=ANALYTICS, out=out) == 0
    assert "Production" not in out.getvalue() and PROD not in out.getvalue()

    out = io.StringIO()
    assert await ops.history(config, out=out) == 0
    history = out.getvalue()
    assert history.count("sent") == 4 and "FIRING failed-charge Production" in history


async def test_status_check_exit_codes(world: World):
    config = world.config()
    out = io.StringIO()
    from invoice_watch.errors import StateError

    with pytest.raises(StateError, match="no state file"):
        await ops.status(config, check=True, out=out)
    assert await world.run_once(config) == 0
    # The last cycle is judged against the wall clock: a moment ago, so healthy.
    assert await ops.status(config, check=True, out=out) == 0
    assert out.getvalue().startswith("healthy:")


def test_operator_table_aligns_columns_and_right_aligns_money():
    text = ops.table(["Name", "$Amount"], [["a", "$1.00"], ["longer", "$1,234.56"]])
    assert text.splitlines() == [
        "Name       Amount",
        "a           $1.00",
        "longer  $1,234.56",
    ]


def test_json_log_lines():
    record = logging.LogRecord(
        "invoice_watch.app", logging.INFO, "x", 1, "cycle: %d orgs", (2,), None
    )
    data = json.loads(JsonFormatter().format(record))
    assert data["level"] == "info" and data["message"] == "cycle: 2 orgs"
    assert data["logger"] == "invoice_watch.app" and data["time"].endswith("+00:00")


async def test_test_notify_sends_through_each_notifier(world: World, capsys):
    from invoice_watch.cli.commands import _test_notify

    assert await _test_notify(world.config(), None) == 0
    out = capsys.readouterr().out
    assert "slack: sent" in out and "mail: sent" in out
    assert "test message" in world.slack.accepted[0]["text"]
    assert len(world.sink.envelopes) == 1

    assert await _test_notify(world.config(), "nope") == 2
    assert "configured: mail, slack" in capsys.readouterr().err

    world.slack.script_webhook(Reply(status=404, error="no_service"))
    assert await _test_notify(world.config(), "slack") == 1
    assert "slack: FAILED" in capsys.readouterr().err


async def test_daemon_speaks_the_systemd_notify_protocol(world: World, tmp_path, monkeypatch):
    import socket

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    stop = asyncio.Event()
    try:
        async with App(world.config(), clock=ManualClock(world.clock.now())) as app:
            daemon = asyncio.create_task(app.serve(stop))
            async with asyncio.timeout(10):
                await app.cycles.done.wait()
            stop.set()
            await asyncio.wait_for(daemon, 10)
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    assert messages[0].startswith("READY=1\nSTATUS=watching 2 organization(s)")
    assert "WATCHDOG=1" in messages  # pinged while starting up, before a cycle finished
    status = [m for m in messages if m.startswith("STATUS=last cycle")]
    assert status and "2 org(s) read, 0 failed, 2 alert(s) firing" in status[0]
    assert messages[-1] == "STOPPING=1"
