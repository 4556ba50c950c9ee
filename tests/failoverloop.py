"""Failover, for real: two replicas (``python -m invoice_watch run``, one config, one
PostgreSQL state, distinct ``http.listen`` through ``${REPLICA_LISTEN}``) watch the Atlas
simulator while its scenario changes every second; the current leader is SIGKILLed at
random moments and restarted as a new standby; the other takes over when the lease
(``ha.lease_ttl: 3s``) expires.

    python -m tests.failoverloop --kills 25 [--seed N]

It starts a throwaway PostgreSQL server (tests/postgres.py) unless ``--url`` names a
database. The scenario, the events it implies and the checks are tests/killloop.py's
(:class:`~tests.killloop.Timeline`, :class:`~tests.killloop.WatchedSlack`,
:func:`~tests.killloop.compare`, :func:`~tests.killloop.check_state`): every implied
event reached Slack at least once, in order per alert, duplicates <= kills, the state
matches the simulator. Plus the takeover time of each kill: from the SIGKILL to the
first listing request the simulator gets afterwards (the new leader's first cycle),
with a target of lease TTL + one poll interval (4 s here).

Two more runs the pytest tests use (tests/test_ha_processes.py):
- :func:`pause_loop`: the leader SIGSTOPped in the middle of a cycle past its TTL, the
  standby takes over, SIGCONT: the old leader writes and sends nothing before it steps
  down (its in-flight cycle's commit is refused by the fence);
- :func:`restart_database`: ``pg_ctl restart`` under a running leader: it reconnects and
  nothing is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from invoice_watch.simulator import Simulator
from invoice_watch.store import StateUrl
from tests.fakes_slack import FakeSlack
from tests.killloop import (
    TRIGGERS,
    Daemon,
    Driver,
    Event,
    Timeline,
    WatchedSlack,
    change_every_second,
    check_state,
    compare,
    delivered,
    initial_scenario,
    kill_at,
)
from tests.postgres import PostgresServer, create_database, free_port, pg_bin, running_server

LEASE_TTL = 3.0  # seconds (ha.lease_ttl)
POLL = 1.0  # seconds (poll.interval)
TARGET = LEASE_TTL + POLL
LEADER_NOW = "this replica is the leader now"
NOT_LEADER = "this replica is no longer the leader"


class Replicas(Driver):
    """killloop's driver for replicas on a PostgreSQL state: each process gets its own
    ``http.listen``; who leads is followed in their logs."""

    def __init__(self, workdir: Path, url: str) -> None:
        super().__init__(workdir)
        self.url = url
        self.leader_changed = asyncio.Condition()
        self.led_since: dict[int, datetime] = {}  # daemon number -> became the leader at

    def write_config(self, sim: Simulator, slack: FakeSlack) -> None:
        super().write_config(sim, slack)
        config = yaml.safe_load(self.config_path.read_text())
        config["state"] = {"url": self.url}
        config["ha"] = {"lease_ttl": f"{LEASE_TTL:g}s"}
        config["http"] = {"listen": "${REPLICA_LISTEN:-127.0.0.1:0}"}  # (commands: unused)
        self.config_path.write_text(yaml.safe_dump(config))

    async def spawn(self, **extra_env: str) -> Daemon:
        return await super().spawn(REPLICA_LISTEN=f"127.0.0.1:{free_port()}", **extra_env)

    def logged(self, daemon: Daemon, record: dict[str, Any]) -> None:
        message = str(record.get("message", ""))
        if message.startswith(LEADER_NOW):
            self.led_since[daemon.number] = datetime.fromisoformat(record["time"])
        elif message.startswith(NOT_LEADER):
            self.led_since.pop(daemon.number, None)
        else:
            return
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.leader_changed:
            self.leader_changed.notify_all()

    def leader(self) -> Daemon | None:
        for daemon in self.daemons:
            if daemon.number in self.led_since and daemon.process.returncode is None:
                return daemon
        return None

    async def wait_leader(self) -> Daemon:
        """The replica that leads, once one does (at most 30 s)."""
        async with asyncio.timeout(30), self.leader_changed:
            await self.leader_changed.wait_for(lambda: self.leader() is not None)
        leader = self.leader()
        assert leader is not None
        return leader

    def observed(self, since: datetime) -> bool:
        """As killloop's, a replica counting as started when it became the leader (a
        standby reads nothing before)."""
        for daemon in self.daemons:
            later = [at for at in daemon.cycles if at > since]
            became = self.led_since.get(daemon.number, daemon.started)
            if len(later) >= 2 or (later and max(daemon.started, became) > since):
                return True
        return False


def listings(sim: Simulator, since: int) -> int | None:
    """The index of the first invoice listing the simulator got at or after ``since``."""
    for n in range(since, len(sim.requests)):
        if sim.requests[n].path.endswith("/invoices"):
            return n
    return None


async def takeover_after(sim: Simulator, since: int, began: float, limit: float) -> float:
    """Seconds from ``began`` (the kill) to the first listing request after it. The
    simulator runs in this process: its request list is looked at every 10 ms."""
    async with asyncio.timeout(limit):
        while listings(sim, since) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return time.monotonic() - began


@dataclass
class Outcome:
    kills: int
    triggers: dict[str, int]
    changes: list[str]
    expected: list[Event]
    delivered: list[Event]
    takeovers: list[float]
    problems: list[str]

    @property
    def duplicates(self) -> int:
        return len(self.delivered) - len(self.expected)


async def _settle(
    driver: Replicas, timeline: Timeline, slack: WatchedSlack, kills: int, limit: float = 60
) -> None:
    """Wait until the scenario as it is now was observed and Slack has every event."""
    last_change = datetime.now(UTC)
    with contextlib.suppress(TimeoutError):  # a missing message shows in the checks
        async with asyncio.timeout(limit):
            await driver.wait_observed(last_change)
            while compare(timeline.events, delivered(slack), kills):
                slack.arrived.clear()
                await slack.arrived.wait()
    await asyncio.sleep(1.5)  # one more cycle: nothing else may arrive


async def _finish(
    driver: Replicas, sim: Simulator, url: str, *, silence: bool = False
) -> list[str]:
    """SIGTERM every replica still running (each exits 0 within 10 s), then the
    state's checks (``silence``: the loop added killloop's silence)."""
    problems = []
    for daemon in driver.daemons:
        if daemon.process.returncode is None:
            began = time.monotonic()
            code = await driver.stop(daemon, signal.SIGTERM)
            if code != 0 or time.monotonic() - began > 10:
                problems.append(f"replica {daemon.number}: SIGTERM: exit status {code}")
    checks = await check_state(StateUrl(url), sim)
    return problems + [p for p in checks if silence or "silence added" not in p]


async def failover_loop(
    workdir: Path,
    url: str,
    *,
    kills: int,
    seed: int,
    min_changes: int = 5,
    say: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """SIGKILL the leader ``kills`` times while the scenario changes every second; each
    killed replica is replaced by a new standby."""
    rng = random.Random(seed)
    driver = Replicas(workdir, url)
    triggers: dict[str, int] = dict.fromkeys(TRIGGERS, 0)
    takeovers: list[float] = []
    problems: list[str] = []
    slack = WatchedSlack()
    async with Simulator(initial_scenario()) as sim, slack:
        driver.write_config(sim, slack)
        timeline = Timeline(sim, rng)

        await driver.spawn()
        await driver.wait_leader()
        await driver.spawn()  # the standby
        problems += await driver.add_silence()  # beside the replicas
        changer = asyncio.create_task(change_every_second(driver, timeline, say))
        killed = 0
        try:
            while killed < kills:
                leader = await driver.wait_leader()
                trigger = rng.choice(TRIGGERS)
                with contextlib.suppress(TimeoutError):
                    await kill_at(driver, slack, rng, leader, trigger)
                mark, began = len(sim.requests), time.monotonic()
                await driver.stop(leader, signal.SIGKILL)
                killed += 1
                triggers[trigger] += 1
                await driver.spawn()  # the new standby
                try:
                    took = await takeover_after(sim, mark, began, limit=30)
                except TimeoutError:
                    problems.append(f"kill {killed}: no replica polled within 30 s")
                    continue
                takeovers.append(took)
                say(f"kill {killed}/{kills} ({trigger}): the standby polled {took:.2f}s later")
            with contextlib.suppress(TimeoutError):  # too few changes show below
                async with asyncio.timeout(60):
                    while len(timeline.changes) < min_changes:
                        timeline.changed.clear()
                        await timeline.changed.wait()
            changer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await changer
            await _settle(driver, timeline, slack, kills)
            problems += await _finish(driver, sim, url, silence=True)
        finally:
            changer.cancel()
            for daemon in driver.daemons:
                if daemon.process.returncode is None:
                    daemon.process.kill()
                    await daemon.process.wait()
        events = delivered(slack)
        problems = compare(timeline.events, events, kills) + problems
        if len(timeline.changes) < min_changes:
            problems.append(f"only {len(timeline.changes)} change(s) in 60 s after the kills")
        for daemon in driver.daemons:
            problems += [f"replica {daemon.number} logged: {line}" for line in daemon.errors]
        return Outcome(
            killed, triggers, timeline.changes, timeline.events, events, takeovers, problems
        )


@dataclass
class PauseOutcome:
    after_cont: list[str]  # the paused replica's log messages after SIGCONT
    delivered: list[Event]
    expected: list[Event]
    problems: list[str]


async def pause_loop(workdir: Path, url: str, *, seed: int = 1) -> PauseOutcome:
    """The leader SIGSTOPped while its cycle reads a change, for 2 TTLs; the standby
    takes over and delivers the change; SIGCONT: the old leader must log that it is no
    longer the leader, and deliver and commit nothing (its cycle's commit refused)."""
    rng = random.Random(seed)
    driver = Replicas(workdir, url)
    problems: list[str] = []
    slack = WatchedSlack()
    async with Simulator(initial_scenario()) as sim, slack:
        driver.write_config(sim, slack)
        timeline = Timeline(sim, rng)
        sim.faults.latency = 0.5  # a cycle's reads take a while: the pause lands in one
        try:
            a = await driver.spawn()
            await driver.wait_leader()
            b = await driver.spawn()
            await _settle(driver, timeline, slack, 0, limit=30)
            mark = len(sim.requests)
            timeline.change()
            async with asyncio.timeout(10):
                while listings(sim, mark) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            a.process.send_signal(signal.SIGSTOP)  # in the middle of the cycle
            paused_at = len(a.lines)
            async with asyncio.timeout(30), driver.leader_changed:
                await driver.leader_changed.wait_for(lambda: b.number in driver.led_since)
            await _settle(driver, timeline, slack, 0, limit=30)
            sent = len(slack.accepted)
            a.process.send_signal(signal.SIGCONT)
            async with asyncio.timeout(15):
                while not any(  # noqa: ASYNC110
                    str(r.get("message", "")).startswith(NOT_LEADER) for r in a.lines[paused_at:]
                ):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(2 * POLL)  # what it would do next, had it not stepped down
            if len(slack.accepted) != sent:
                problems.append(f"{len(slack.accepted) - sent} message(s) after SIGCONT")
            after = [str(r.get("message", "")) for r in a.lines[paused_at:]]
            problems += await _finish(driver, sim, url)
        finally:
            for daemon in driver.daemons:
                if daemon.process.returncode is None:
                    daemon.process.kill()
                    await daemon.process.wait()
        events = delivered(slack)
        problems = compare(timeline.events, events, 0) + problems
        problems += [f"replica {b.number} logged: {line}" for line in b.errors]
        return PauseOutcome(after, events, timeline.events, problems)


async def restart_database(
    workdir: Path, server: PostgresServer, url: str, *, seed: int = 1
) -> list[str]:
    """One replica; a change, ``pg_ctl restart`` (fast: connections are cut), another
    change: both are delivered once, nothing lost; the replica leads again."""
    rng = random.Random(seed)
    driver = Replicas(workdir, url)
    problems: list[str] = []
    slack = WatchedSlack()
    async with Simulator(initial_scenario()) as sim, slack:
        driver.write_config(sim, slack)
        timeline = Timeline(sim, rng)
        try:
            daemon = await driver.spawn()
            await driver.wait_leader()
            await _settle(driver, timeline, slack, 0, limit=30)
            timeline.change()
            await asyncio.to_thread(server.restart, "fast")
            timeline.change()
            await _settle(driver, timeline, slack, 0, limit=30)
            if driver.leader() is not daemon:
                problems.append("the replica does not lead after the restart")
            problems += await _finish(driver, sim, url)
        finally:
            if daemon.process.returncode is None:
                daemon.process.kill()
                await daemon.process.wait()
        problems = compare(timeline.events, delivered(slack), 0) + problems
        if len(delivered(slack)) != len(timeline.events):
            problems.append(f"duplicates without a kill: {delivered(slack)}")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.failoverloop", description=__doc__)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--url", help="an empty PostgreSQL database (default: a new server)")
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"{datetime.now():%H:%M:%S.%f}"[:-3], line, flush=True)

    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            found = pg_bin()
            if found is None:
                print("PostgreSQL is not installed: `apt-get install postgresql`, or --url")
                return 2
            server = stack.enter_context(running_server(found))
            url = create_database(server, "failover")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="failover-")))
        outcome = asyncio.run(failover_loop(tmp, url, kills=args.kills, seed=seed, say=say))
    triggers = ", ".join(f"{n} {trigger}" for trigger, n in outcome.triggers.items())
    t = outcome.takeovers or [0.0]
    print(
        f"seed {seed}: {outcome.kills} kills ({triggers}), "
        f"{len(outcome.changes)} changes, {len(outcome.expected)} events implied, "
        f"{len(outcome.delivered)} delivered, {outcome.duplicates} duplicate(s), "
        f"{time.monotonic() - began:.0f}s"
    )
    print(
        f"takeover (kill -> the new leader's first listing): median "
        f"{statistics.median(t):.2f}s, max {max(t):.2f}s (target {TARGET:g}s = lease TTL "
        f"{LEASE_TTL:g}s + poll {POLL:g}s)"
    )
    for problem in outcome.problems:
        print(f"PROBLEM: {problem}")
    print("OK" if not outcome.problems else "FAILED")
    return 1 if outcome.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
