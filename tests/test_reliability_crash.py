"""Crash safety of the real daemon in a subprocess: SIGKILL at random moments loses
nothing (tests/killloop.py; the full run is ``python -m tests.killloop --kills 25``),
SIGTERM in the middle of a cycle or of a hung delivery exits 0 within 10 s with no loss
and no duplicate, and a second process on a state file in use is refused with exit
status 1.

These run in real time (each starts Python processes), hence ``slow``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml

from invoice_watch.store import open_store
from tests.killloop import kill_loop
from tests.test_reliability_outages import HangingSlack
from tests.world import PROD, World

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def start_daemon(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "invoice_watch", "run", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=ENV,
    )  # fmt: skip


async def wait_for_line(process: asyncio.subprocess.Process, text: str) -> str:
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = (await process.stderr.readline()).decode()
            assert line, f"the daemon exited before logging {text!r}"
            if text in line:
                return line


async def sigterm(process: asyncio.subprocess.Process) -> tuple[int, float, str]:
    """Exit status, seconds it took, and the rest of stderr."""
    assert process.stderr is not None
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(process.stderr.read(), 15)
    code = await process.wait()
    return code, time.monotonic() - began, rest.decode()


async def test_crash_sigkill_at_random_moments_loses_nothing(tmp_path: Path):
    seed = random.randrange(2**32)
    outcome = await kill_loop(tmp_path, kills=10, seed=seed)
    assert outcome.problems == [], f"seed {seed}: python -m tests.killloop --seed {seed}"
    assert outcome.kills == 10 and len(outcome.changes) >= 5
    assert 0 <= outcome.duplicates <= outcome.kills


async def test_crash_sigkill_while_a_big_organization_is_staged_loses_and_duplicates_nothing(
    world: World,
):
    """An organization of more pages than the requests in flight: its settled invoices
    wait for its commit in the staging area (invoice_watch.store.sql.staging). Killed
    once some are staged, the daemon committed nothing of that organization; restarted,
    it lists it again, its snapshot ends equal to Atlas, every alert goes out once."""
    sim = world.sim
    for month in range(3, 3003):  # 3,000 more PAID invoices: 7 pages of 500
        sim.add_invoice(PROD, period=-month, status="PAID", amount_cents=month * 10)
    sim.faults.latency = 0.3  # 2 requests at a time: the pages arrive over about 1.5 s
    data = world.config_data(log={"level": "debug"})
    data["atlas"]["max_concurrency"] = 2
    path = world.tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    daemon = await start_daemon(path)
    await wait_for_line(daemon, "invoices listed staged until its commit")
    daemon.kill()
    await daemon.wait()
    with sqlite3.connect(world.tmp / "state.db") as conn:  # nothing of it was committed
        ((count,),) = conn.execute("SELECT count(*) FROM invoices WHERE source_org_id=?", (PROD,))
    assert count == 0 and world.slack.accepted == []

    sim.faults.latency = 0.0
    daemon = await start_daemon(path)
    await wait_for_line(daemon, " cycle: ")
    code, _, rest = await sigterm(daemon)
    assert code == 0, rest
    store = await open_store(world.tmp / "state.db")
    try:
        stored = {(i.id, i.org_id, i.status, i.amount_billed_cents, i.amount_paid_cents)
                  for i in await store.snapshot.stored_invoices()}  # fmt: skip
        assert (await store.outbox.counts()).get("pending") is None
    finally:
        await store.close()
    listed = {(i.id, i.org_id, i.status, i.amount_billed_cents, i.amount_paid_cents)
              for i in sim.scenario.invoices}  # fmt: skip
    assert stored == listed and len(stored) == 3005
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]


async def test_crash_sigterm_mid_cycle_finishes_it_and_exits_0(world: World):
    world.sim.faults.latency = 1.0  # a cycle takes several seconds
    daemon = await start_daemon(world.write_config())
    await wait_for_line(daemon, "watching 2 organization(s)")  # the first cycle starts now
    await asyncio.sleep(0.5)
    code, seconds, rest = await sigterm(daemon)
    assert code == 0 and seconds < 10, rest
    assert "cycle:" in rest  # it finished the cycle in flight rather than dropping it
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    assert len(world.sink.envelopes) == 2  # delivered before exiting

    world.sim.faults.latency = 0.0
    assert await world.run_once(world.config()) == 0
    assert len(world.slack.accepted) == 2 and len(world.sink.envelopes) == 2  # no duplicate


async def test_crash_sigterm_during_a_hung_cycle_stops_it_and_exits_0(world: World):
    world.sim.faults.hang(path="*/invoices")  # one org's read never ends
    daemon = await start_daemon(world.write_config())
    await wait_for_line(daemon, "watching 2 organization(s)")
    await asyncio.sleep(0.5)
    code, seconds, rest = await sigterm(daemon)
    assert code == 0 and seconds < 10, rest
    assert "did not finish in" in rest and "cycle:" not in rest
    assert world.slack.received == [] and world.sink.envelopes == []

    world.sim.faults.clear()  # the next run does the work, once
    assert await world.run_once(world.config()) == 0
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    assert len(world.sink.envelopes) == 2


async def test_crash_second_process_on_a_state_file_in_use_exits_1(world: World):
    config = world.write_config()
    daemon = await start_daemon(config)
    try:
        await wait_for_line(daemon, "cycle:")
        once = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "invoice_watch", "run", "--once", "-c", str(config),
            stderr=asyncio.subprocess.PIPE, env=ENV,
        )  # fmt: skip
        _, err = await asyncio.wait_for(once.communicate(), 30)
        assert once.returncode == 1
        assert b"is in use by another invoice-watch daemon" in err
        assert b"Traceback" not in err
    finally:
        code, _, rest = await sigterm(daemon)
    assert code == 0, rest
    assert len(world.slack.accepted) == 2  # the refused run sent nothing


async def test_crash_sigterm_while_slack_hangs_exits_0_within_10s(world: World):
    """The daemon gives delivery what is left of its 10 s, then leaves the message in
    the outbox for the next run."""
    async with HangingSlack() as hanging:
        data = world.config_data()
        data["notifiers"]["slack"]["webhook_url"] = hanging.url
        config = world.tmp / "hanging.yaml"
        config.write_text(yaml.safe_dump(data))
        daemon = await start_daemon(config)
        await wait_for_line(daemon, "cycle:")
        await asyncio.wait_for(hanging.arrived.wait(), 10)
        code, seconds, rest = await sigterm(daemon)
        assert code == 0 and seconds < 10, rest
        assert len(world.sink.envelopes) == 2  # email was not held up

    assert await world.run_once(world.config()) == 0  # Slack is back: the messages go out
    assert sorted(world.kinds()) == [("FIRING", "failed-charge"), ("FIRING", "pending-over-budget")]
    assert len(world.sink.envelopes) == 2
