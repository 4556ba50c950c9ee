"""End to end, on loopback: the Atlas simulator (real Digest and OAuth), a real HTTP
Slack endpoint and aiosmtpd, driven through `run --once` and the daemon loop.

Each `run --once` is a fresh App on the same state file, as separate runs would be.
Time that the client would sleep (Retry-After, backoff) goes through a FakeClock.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.cli.commands import run_once
from invoice_watch.config import Config
from tests.manual_clock import ManualClock
from tests.world import ANALYTICS, PROD, World


async def check_full_lifecycle(world: World, config: Config) -> None:
    # First run: one FIRING per condition, through both notifiers.
    assert await world.run_once(config) == 0
    assert sorted(world.kinds()) == [
        ("FIRING", "failed-charge"),
        ("FIRING", "pending-over-budget"),
    ]
    assert len(world.sink.envelopes) == 2
    subjects = sorted(world.sink.message(i)["Subject"] for i in range(2))
    assert subjects == [
        "[invoice-watch] FIRING failed-charge: Production $4,350.20",
        "[invoice-watch] FIRING pending-over-budget: Production $6,000.00",
    ]

    # Unchanged second run: nothing.
    assert await world.run_once(config) == 0
    assert len(world.slack.accepted) == 2 and len(world.sink.envelopes) == 2

    # Paid, and the pending amount drops: RESOLVED for both.
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    world.sim.set_amount(world.sim.scenario.invoice("pending").id, 4000_00)
    assert await world.run_once(config) == 0
    assert sorted(world.kinds()[2:]) == [
        ("RESOLVED", "failed-charge"),
        ("RESOLVED", "pending-over-budget"),
    ]
    assert len(world.sink.envelopes) == 4
    resolved = "\n".join(world.slack_texts()[2:])
    assert "Fired for:" in resolved and "$4,000.00" in resolved

    # And quiet again.
    assert await world.run_once(config) == 0
    assert len(world.slack.accepted) == 4


async def test_e2e_digest_fires_once_stays_quiet_and_resolves(world: World):
    await check_full_lifecycle(world, world.config())
    challenges = [r for r in world.sim.requests if r.challenge]
    assert len(challenges) == 4  # one Digest challenge per run, not one per request


@pytest.mark.parametrize("api", ["v1", "cloud-manager"])
async def test_e2e_legacy_api_flavors_behave_like_v2(world: World, api: str):
    atlas = {**world.config_data()["atlas"], "api": api}
    await check_full_lifecycle(world, world.config(atlas=atlas))
    prefix = {"v1": "/api/atlas/v1.0/", "cloud-manager": "/api/public/v1.0/"}[api]
    assert world.sim.requests and all(r.path.startswith(prefix) for r in world.sim.requests)


async def test_e2e_service_account_through_two_429s(world: World):
    world.sim.faults.status(429, times=2, path="/api/atlas/v2/orgs/*/invoices", retry_after=7)
    await check_full_lifecycle(world, world.config(service_account=True))
    # Retry-After honoured, through the clock: each 429's retry waits it, and a 429
    # saying no request remains makes the other organization's request wait it too.
    assert world.clock.sleeps.count(7.0) >= 2 and max(world.clock.sleeps) == 7.0
    assert all(r.auth in ("bearer", "basic") for r in world.sim.requests)
    assert sum(1 for r in world.sim.requests if r.path == "/api/oauth/token") == 4


async def test_e2e_one_org_failing_leaves_the_other_and_its_snapshot_alone(world: World):
    config = world.config()
    assert await world.run_once(config) == 0
    world.sim.faults.status(500, times=100, path=f"/api/atlas/v2/orgs/{PROD}/invoices")
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    world.sim.set_amount(world.sim.scenario.invoice("small").id, 5100_00)
    assert await world.run_once(config) == 1  # an org unreadable: exit 1
    # Production's alerts neither resolved nor vanished; Analytics still evaluated.
    assert world.kinds()[2:] == [("FIRING", "pending-over-budget")]
    assert "Analytics" in world.slack_texts()[2]
    async with App(config, clock=world.clock) as app:
        assert len(app.store.snapshot.get(PROD)) == 3
        assert app.store.snapshot.org_state(PROD).failing_since is not None
        assert len(app.store.alerts.firing()) == 3
    world.sim.faults.clear()
    assert await world.run_once(config) == 0
    assert world.kinds()[3:] == [("RESOLVED", "failed-charge")]


async def test_e2e_forbidden_org_names_the_role(world: World, capsys):
    world.sim.scenario.org("Analytics").forbidden = True
    assert await world.run_once(world.config()) == 1
    err = capsys.readouterr().err
    assert "Analytics" in err and "Organization Billing Viewer" in err


async def test_e2e_slack_down_keeps_the_message_for_the_next_run(world: World):
    from tests.fakes_slack import Reply

    world.slack.script_webhook(*[Reply(status=500)] * 50)
    config = world.config()
    assert await world.run_once(config) == 1  # undelivered after 60 s of (fake) time
    assert len(world.sink.envelopes) == 2  # email is not held up by Slack
    assert world.slack.accepted == [] and len(world.slack.received) > 2  # it kept trying
    world.slack.clear_scripts()  # Slack is back
    assert await world.run_once(config) == 0
    assert sorted(world.kinds()[-2:]) == [
        ("FIRING", "failed-charge"),
        ("FIRING", "pending-over-budget"),
    ]
    assert len(world.sink.envelopes) == 2  # and email was not sent twice


async def test_e2e_baseline_records_without_sending_then_only_changes_alert(world: World):
    config = world.config()
    async with App(config, clock=world.clock) as app:
        assert await run_once(app, baseline=True) == 0
    assert world.slack.accepted == [] and world.sink.envelopes == []
    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    assert await world.run_once(config) == 0
    assert world.kinds() == [("RESOLVED", "failed-charge")]


async def test_e2e_dry_run_prints_and_creates_no_file(world: World, capsys):
    config = world.config()
    async with App(config, clock=world.clock, dry_run=True) as app:
        assert await run_once(app) == 0
    out = capsys.readouterr().out
    assert "would send to slack" in out and "FIRING: failed-charge" in out
    assert "nothing was sent and nothing was written" in out
    assert not (world.tmp / "state.db").exists()
    assert world.slack.received == [] and world.sink.envelopes == []


async def test_e2e_daemon_runs_first_cycle_at_start_and_stops_cleanly(world: World):
    config = world.config()
    stop = asyncio.Event()
    async with App(config, clock=ManualClock(world.clock.now())) as app:
        daemon = asyncio.create_task(app.serve(stop))
        async with asyncio.timeout(10):  # the first cycle runs at start, not after a timer
            await app.cycles.done.wait()
        stop.set()
        async with asyncio.timeout(10):
            await daemon
        # What the cycle committed was delivered before the daemon stopped.
        assert len(world.slack.accepted) == 2 and len(world.sink.envelopes) == 2
        assert app.cycles.last is not None and not app.cycles.last.orgs_failed
        assert app.daemon.health()[0]


async def test_e2e_no_secret_reaches_the_logs(world: World, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    world.sim.faults.status(503, times=1, path="/api/atlas/v2/orgs/*/invoices")
    world.sim.faults.status(401, times=1, path="/api/atlas/v2/orgs/*/invoices/pending")
    await world.run_once(world.config(service_account=True))
    await world.run_once(world.config())
    captured = caplog.text + "".join(capsys.readouterr())
    assert "cycle:" in caplog.text  # the logs were captured at all
    for secret in (
        world.sim.private_key,
        world.sim.client_secret,
        world.slack.webhook_url,
        "/services/T000",
    ):
        assert secret not in captured


async def test_e2e_cli_run_once_and_sigterm(world: World):
    """The real command line in a subprocess: --once exits 0, the daemon exits 0 on
    SIGTERM after its first cycle, and the state file is kept."""
    path = world.write_config()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    once = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "invoice_watch", "run", "--once", "-c", str(path), env=env
    )
    assert await asyncio.wait_for(once.wait(), 60) == 0
    assert len(world.slack.accepted) == 2

    world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "invoice_watch",
        "run",
        "-c",
        str(path),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert daemon.stderr is not None
    async with asyncio.timeout(30):
        while b"cycle:" not in await daemon.stderr.readline():
            pass
    daemon.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.wait(), 10) == 0
    assert [k for k, _ in world.kinds()] == ["FIRING", "FIRING", "RESOLVED"]

    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "invoice_watch",
        "status",
        "-c",
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await status.communicate()
    assert status.returncode == 0
    assert b"Production" in out and b"Firing alerts: 1" in out


async def test_e2e_cli_bad_config_exits_2_with_located_errors(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"atlas": {"auth": {}}, "organizations": []}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "invoice_watch",
        "check-config",
        "-c",
        str(path),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert f"{path}:1:" in err.decode()
    assert b"Traceback" not in err


async def test_e2e_an_invoice_two_configured_orgs_list_fires_once(tmp_path, smtp_server):
    """Analytics is billed through Production: its FAILED invoice is in both listings.
    Organizations are processed one by one as their reads end, and still one alert
    fires, and one resolves; the state file keeps the invoice for each of them (it
    used to keep it for one, so every run found it "new" for the other)."""
    from invoice_watch.simulator import Simulator
    from invoice_watch.simulator.scenario import Scenario
    from tests.fakes_slack import FakeSlack
    from tests.fakes_smtp import Sink

    linked = Scenario()
    linked.add_org("Production", id=PROD)
    linked.add_org("Analytics", id=ANALYTICS, linked_to="Production")
    linked.add_invoice("Production", period=-1, status="PAID", amount_cents=900_00)
    linked.add_invoice("Analytics", period=-1, status="FAILED", amount_cents=120_00, name="bad")
    sink = Sink()
    port = await smtp_server(sink)
    async with Simulator(linked) as sim, FakeSlack() as slack:
        world = World(sim, slack, sink, port, tmp_path)
        config = world.config()
        assert await world.run_once(config) == 0
        assert world.kinds() == [("FIRING", "failed-charge")]
        bad = sim.scenario.invoice("bad").id
        async with App(config, clock=world.clock) as app:  # kept under both, once each
            assert bad in app.store.snapshot.get(PROD) and bad in app.store.snapshot.get(ANALYTICS)
        assert await world.run_once(config) == 0
        assert world.kinds() == [("FIRING", "failed-charge")]
        sim.set_status(bad, "PAID")
        assert await world.run_once(config) == 0
        assert world.kinds() == [("FIRING", "failed-charge"), ("RESOLVED", "failed-charge")]


async def test_e2e_a_cycle_cut_short_still_delivers_what_it_committed(world: World):
    """Production is read and committed; Analytics hangs; the cycle is cancelled (a stop
    that could not wait). Production's messages, held until the cycle's end, go out
    anyway, once; Analytics is read by the next run."""
    rules = [{"name": "failed-charge", "type": "invoice_status", "notify": ["slack", "mail"]}]
    config = world.config(rules=rules)
    world.sim.faults.hang(org_id=ANALYTICS, path="/api/atlas/v2/orgs/*/invoices")
    async with App(config, clock=world.clock) as app:
        cycle = asyncio.create_task(app.run_cycle())
        for _ in range(500):  # until Production's part is committed (real time, <5 s)
            if app.store.alerts.firing():
                break
            await asyncio.sleep(0.01)
        assert len(app.store.alerts.firing()) == 1
        assert (await app.store.outbox.counts()) == {"held": 2}
        cycle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cycle
        assert (await app.store.outbox.counts()) == {"pending": 2}
        assert await app.deliverer.drain(10) == 0
    assert world.kinds() == [("FIRING", "failed-charge")]
    assert len(world.sink.envelopes) == 1
    assert await world.run_once(config) == 0
    assert len(world.slack.accepted) == 1
    async with App(config, clock=world.clock) as app:
        assert app.store.snapshot.org_state(ANALYTICS).last_success is not None


async def test_e2e_messages_held_by_a_crashed_cycle_go_out_at_the_next_start(
    world: World, open_state
):
    from tests.test_store import firing

    config = world.config()
    # What a crash between two organizations' transactions leaves behind.
    store = await open_state(config.state.path)
    await store.commit_orgs(
        store.begin_cycle(), world.clock.now(), [], [firing()], {"failed": ["slack"]}
    )
    await store.close()
    shown = io.StringIO()
    await ops.status(config, out=shown)  # the operator sees it waiting
    assert "Undelivered notifications: 1" in shown.getvalue() and "HELD" in shown.getvalue()
    async with App(config, clock=world.clock) as app:
        assert (await app.store.outbox.counts()) == {"pending": 1}
