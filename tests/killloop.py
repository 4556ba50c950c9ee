"""Crash safety, for real: the daemon (``python -m invoice_watch run``) in a subprocess,
polling every second, SIGKILLed at random moments and restarted, while the scenario it
watches changes every second. The Atlas simulator and a fake Slack (real HTTP) run in
this process.

    python -m tests.killloop --kills 25 [--seed N]

Each change makes or ends a condition: a new FAILED invoice appears, a FAILED invoice
is paid, a pending invoice's amount crosses the $5,000 threshold up or down (and now and
then it moves without crossing, which must stay quiet). The events these changes imply,
(rule, invoice, FIRING/RESOLVED) in order, are computed here from the scenario alone,
never from the daemon's state. A change waits until the daemon has seen the previous
one (two committed cycles of one process, or one of a process started after it); this
only makes every state observable, the kills stay random: at a random time, right after
a commit, or while Slack is receiving a message.

Afterwards, with a last daemon that is allowed to finish and is stopped by SIGTERM:
- every implied event reached Slack at least once, in order per alert;
- Slack got nothing else, and duplicates <= kills (a duplicate needs a kill between a
  successful send and its commit);
- the snapshot equals the simulator's invoices, the firing alerts equal the conditions
  that hold, the outbox is empty;
- every daemon logged no error, and the last one exited 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from invoice_watch.simulator import Simulator
from invoice_watch.simulator.scenario import Scenario
from invoice_watch.store import StateUrl, open_store
from tests.fakes_slack import FakeSlack, Route

PROD = "5f8a1c2e9b3d4a6f7e0c1b2a"
ANALYTICS = "6a7b8c9d0e1f2a3b4c5d6e7f"
ORGS = {PROD: "Production", ANALYTICS: "Analytics"}
THRESHOLD_CENTS = 5000_00
FAILED_RULE, OVER_RULE = "failed-charge", "pending-over-budget"
TRIGGERS = ("random moment", "right after a commit", "while Slack receives")

Event = tuple[str, str, str]  # (rule, invoice id, kind)
# A silence of an invoice that never exists, and quiet hours that let every severity
# through: the silence and quiet-hours checks run in every daemon, changing nothing.
SILENCED_INVOICE = "never-listed-invoice"
QUIET_HOURS = {
    "timezone": "Europe/Berlin",
    "from": "00:00",
    "to": "00:00",
    "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
    "except": ["info", "warning", "critical"],
}


def initial_scenario() -> Scenario:
    s = Scenario()
    s.add_org("Production", id=PROD)
    s.add_org("Analytics", id=ANALYTICS)
    s.add_invoice("Production", period=-2, status="PAID", amount_cents=3900_00)
    s.add_invoice("Production", period=-1, status="FAILED", amount_cents=4350_20)
    s.add_invoice("Production", period=0, status="PENDING", amount_cents=6000_00)
    s.add_invoice("Analytics", period=-1, status="PAID", amount_cents=900_00)
    s.add_invoice("Analytics", period=0, status="PENDING", amount_cents=700_00)
    return s


def conditions(scenario: Scenario) -> set[tuple[str, str]]:
    """(rule, invoice id) of every condition the scenario holds, by the rules' own terms."""
    held = set()
    for invoice in scenario.invoices:
        if invoice.status == "FAILED":
            held.add((FAILED_RULE, invoice.id))
        if invoice.status == "PENDING" and invoice.amount_billed_cents > THRESHOLD_CENTS:
            held.add((OVER_RULE, invoice.id))
    return held


class Timeline:
    """Random changes to the simulator's scenario, and the events they imply."""

    def __init__(self, sim: Simulator, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.changes: list[str] = []
        self.changed = asyncio.Event()  # set at each change
        self.events: list[Event] = [(r, i, "FIRING") for r, i in sorted(conditions(sim.scenario))]

    def change(self) -> str:
        before = conditions(self.sim.scenario)
        what = self._random_change()
        after = conditions(self.sim.scenario)
        self.events += [(rule, inv, "RESOLVED") for rule, inv in sorted(before - after)]
        self.events += [(rule, inv, "FIRING") for rule, inv in sorted(after - before)]
        self.changes.append(what)
        self.changed.set()
        return what

    def _random_change(self) -> str:
        sim, rng = self.sim, self.rng
        invoices = sim.scenario.invoices
        failed = [i for i in invoices if i.status == "FAILED"]
        pending = [i for i in invoices if i.status == "PENDING"]
        choices: list[Callable[[], str]] = [self._new_failed]
        if failed:
            choices.append(lambda: self._pay(rng.choice(failed).id))
        if pending:
            choices += [lambda: self._cross(rng.choice(pending).id)] * 2
            choices.append(lambda: self._wiggle(rng.choice(pending).id))
        return rng.choice(choices)()

    def _new_failed(self) -> str:
        org = self.rng.choice(list(ORGS))
        cents = self.rng.randint(10_00, 9000_00)
        invoice_id = self.sim.add_invoice(org, period=0, status="FAILED", amount_cents=cents)
        return f"new FAILED invoice {invoice_id} in {ORGS[org]}"

    def _pay(self, invoice_id: str) -> str:
        self.sim.set_status(invoice_id, "PAID")
        return f"invoice {invoice_id} paid"

    def _cross(self, invoice_id: str) -> str:
        over = self.sim.scenario.invoice(invoice_id).amount_billed_cents > THRESHOLD_CENTS
        cents = (
            self.rng.randint(100_00, THRESHOLD_CENTS)
            if over
            else self.rng.randint(THRESHOLD_CENTS + 1, 20000_00)
        )
        self.sim.set_amount(invoice_id, cents)
        return f"pending {invoice_id} {'down' if over else 'up'} to {cents / 100:.2f}"

    def _wiggle(self, invoice_id: str) -> str:
        cents = self.sim.scenario.invoice(invoice_id).amount_billed_cents
        over = cents > THRESHOLD_CENTS
        cents = max(THRESHOLD_CENTS + 1, cents + 1_00) if over else max(0, cents - 1_00)
        self.sim.set_amount(invoice_id, cents)
        return f"pending {invoice_id} moved to {cents / 100:.2f} (same side)"


class WatchedSlack(FakeSlack):
    """The fake Slack, telling the driver the moment a message arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    async def _record(self, route: Route, request: web.Request) -> dict[str, Any]:
        body = await super()._record(route, request)
        self.arrived.set()
        return body


@dataclass
class Daemon:
    """One daemon process and what its log said."""

    number: int
    process: asyncio.subprocess.Process
    started: datetime
    cycles: list[datetime] = field(default_factory=list)  # when each "cycle:" was logged
    errors: list[str] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)  # its JSON log records
    reader: asyncio.Task[None] | None = None


class Driver:
    """Starts and stops daemons on one config and state file, and follows their logs."""

    def __init__(self, workdir: Path) -> None:
        self.daemons: list[Daemon] = []
        self.progress = asyncio.Condition()  # notified on every committed cycle
        self.config_path = workdir / "config.yaml"
        self.state_path = workdir / "state.db"

    def write_config(self, sim: Simulator, slack: FakeSlack) -> None:
        rules = [
            {"name": FAILED_RULE, "type": "invoice_status", "notify": ["slack"]},
            {"name": OVER_RULE, "type": "pending_amount", "threshold": THRESHOLD_CENTS / 100,
             "notify": ["slack"]},
        ]  # fmt: skip
        config = {
            "atlas": {
                "base_url": sim.base_url,
                "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
                "timeout": "5s",
                "retries": 2,
                "max_backoff": "1s",
            },
            "organizations": [{"id": org, "name": name} for org, name in ORGS.items()],
            "poll": {"interval": "1s"},
            "state": {"path": str(self.state_path)},
            "delivery": {"max_backoff": "1s", "group_over": 1000},
            "notifiers": {
                "slack": {
                    "type": "slack",
                    "webhook_url": slack.webhook_url,
                    # Quiet all week, but for every severity: each message is checked
                    # against the window and goes at once, as the expectations say.
                    "quiet_hours": QUIET_HOURS,
                }
            },
            "rules": rules,
            "log": {"level": "info", "format": "json"},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    async def add_silence(self) -> list[str]:
        """``silence add`` beside the running daemon (its state file exists once it has
        started): a silence of an invoice the scenario never has, so every release of
        messages applies a silence and nothing the loop expects is silenced. Returns
        problems (the command failed for 20 s)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOICE_WATCH", "NOTIFY"))}
        output = b""
        for _ in range(40):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "invoice_watch", "silence", "add",
                "-c", str(self.config_path), "--rule", FAILED_RULE,
                "--invoice", SILENCED_INVOICE, "--for", "1d", "--comment", "kill loop",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env,
            )  # fmt: skip
            output, _ = await process.communicate()
            if process.returncode == 0:
                return []
            await asyncio.sleep(0.5)
        return [f"silence add failed: {output.decode(errors='replace')[-300:]}"]

    async def spawn(self, **extra_env: str) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOICE_WATCH", "NOTIFY"))}
        env.update(extra_env)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "invoice_watch", "run", "-c", str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        daemon = Daemon(len(self.daemons) + 1, process, datetime.now(UTC))
        self.daemons.append(daemon)
        daemon.reader = asyncio.create_task(self._read(daemon))
        return daemon

    async def _read(self, daemon: Daemon) -> None:
        stream = daemon.process.stderr
        assert stream is not None
        while line := (await stream.readline()).decode(errors="replace").rstrip("\n"):
            try:
                record = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    daemon.errors.append(line)
                continue
            daemon.lines.append(record)
            self.logged(daemon, record)
            if record.get("level") in ("error", "critical"):
                daemon.errors.append(record.get("message", line))
            if str(record.get("message", "")).startswith("cycle:"):
                daemon.cycles.append(datetime.fromisoformat(record["time"]))
                async with self.progress:
                    self.progress.notify_all()

    def logged(self, daemon: Daemon, record: dict[str, Any]) -> None:
        """Each JSON log record of ``daemon``, as it comes (for subclasses)."""

    async def stop(self, daemon: Daemon, sig: signal.Signals) -> int:
        if daemon.process.returncode is not None:
            daemon.errors.append(f"exited by itself with status {daemon.process.returncode}")
        with contextlib.suppress(ProcessLookupError):
            daemon.process.send_signal(sig)
        code = await asyncio.wait_for(daemon.process.wait(), 15)
        if daemon.reader is not None:
            await daemon.reader
        return code

    def observed(self, since: datetime) -> bool:
        """Whether a daemon has read the scenario as it is since ``since`` and committed
        what it saw: one cycle of a process started later, or two of one process logged
        later (the second one's read began after the first one's commit)."""
        for daemon in self.daemons:
            later = [at for at in daemon.cycles if at > since]
            if len(later) >= 2 or (later and daemon.started > since):
                return True
        return False

    async def wait_observed(self, since: datetime) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: self.observed(since))


@dataclass
class Outcome:
    kills: int
    triggers: dict[str, int]
    changes: list[str]
    expected: list[Event]
    delivered: list[Event]
    problems: list[str]

    @property
    def duplicates(self) -> int:
        return len(self.delivered) - len(self.expected)


def parse_message(body: dict[str, Any]) -> Event | None:
    """(rule, invoice id, kind) of one single-event Slack message."""
    text = str(body.get("text", ""))
    head = re.match(r"(FIRING|RESOLVED|REMINDER|NOTICE): (\S+)\n", text)
    invoice = re.search(r"^Invoice:\s+([0-9a-f]{24})$", text, re.MULTILINE)
    if head is None or invoice is None:
        return None
    return head[2], invoice[1], head[1]


def delivered(slack: FakeSlack) -> list[Event]:
    """The events of the messages Slack accepted, in order (unreadable ones left out)."""
    return [event for body in slack.accepted if (event := parse_message(body)) is not None]


def compare(expected: list[Event], delivered: list[Event], kills: int) -> list[str]:
    """Per alert, the delivered kinds with repeats collapsed must be the expected ones."""
    problems = []
    want: dict[tuple[str, str], list[str]] = defaultdict(list)
    got: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rule, invoice, kind in expected:
        want[(rule, invoice)].append(kind)
    for rule, invoice, kind in delivered:
        got[(rule, invoice)].append(kind)
    for key in sorted(want.keys() | got.keys()):
        collapsed = [k for n, k in enumerate(got[key]) if n == 0 or got[key][n - 1] != k]
        if collapsed != want[key]:
            problems.append(f"{key}: expected {want[key]}, Slack got {got[key]}")
    duplicates = len(delivered) - len(expected)
    if not problems and duplicates > kills:
        problems.append(f"{duplicates} duplicates for {kills} kills")
    return problems


async def check_state(state_path: Path | StateUrl, sim: Simulator) -> list[str]:
    store = await open_store(state_path)
    try:
        problems = []
        stored = {
            i.id: (i.org_id, i.status, i.amounts()) for i in await store.snapshot.stored_invoices()
        }
        actual = {
            i.id: (
                i.org_id,
                i.status,
                {
                    "amountBilledCents": i.amount_billed_cents,
                    "amountPaidCents": i.amount_paid_cents,
                    "creditsCents": i.credits_cents,
                    "salesTaxCents": i.sales_tax_cents,
                    "startingBalanceCents": i.starting_balance_cents,
                    "subtotalCents": i.subtotal_cents,
                },
            )
            for i in sim.scenario.invoices
        }
        if stored != actual:
            differ = sorted(
                k for k in stored.keys() | actual.keys() if stored.get(k) != actual.get(k)
            )
            problems.append(f"snapshot differs from the simulator for {differ}")
        firing = {(a.rule, a.invoice_id or "") for a in store.alerts.firing().values()}
        if firing != conditions(sim.scenario):
            problems.append(f"firing alerts {sorted(firing)} != {sorted(conditions(sim.scenario))}")
        counts = await store.outbox.counts()
        if counts.get("pending") or counts.get("failed"):
            problems.append(f"outbox not empty: {counts}")
        silences = await store.silences.listing(datetime.now(UTC))
        if [s.invoice_id for s in silences] != [SILENCED_INVOICE]:
            problems.append(f"the silence added beside the daemon is not kept: {silences}")
        return problems
    finally:
        await store.close()


async def change_every_second(
    driver: Driver, timeline: Timeline, say: Callable[[str], None]
) -> None:
    """Change the scenario once a second, each change once a daemon has observed the
    one before, until cancelled."""
    last = datetime.now(UTC)
    while True:
        await asyncio.sleep(1.0)
        await driver.wait_observed(last)
        say(f"change: {timeline.change()}")  # no await inside: a change is atomic
        last = datetime.now(UTC)


async def kill_at(
    driver: Driver, slack: WatchedSlack, rng: random.Random, daemon: Daemon, trigger: str
) -> None:
    """Wait for the moment ``trigger`` names (at most 6 s): a random one, right after
    ``daemon`` committed a cycle, or while Slack receives a message."""
    if trigger == "random moment":
        await asyncio.sleep(rng.uniform(0.2, 3.0))
        return
    seen = len(daemon.cycles)
    slack.arrived.clear()
    async with asyncio.timeout(6):
        if trigger == "right after a commit":
            async with driver.progress:
                await driver.progress.wait_for(lambda: len(daemon.cycles) > seen)
        else:
            await slack.arrived.wait()


async def kill_loop(
    workdir: Path,
    *,
    kills: int,
    seed: int,
    min_changes: int = 5,
    say: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """SIGKILL ``kills`` daemons in turn while the scenario changes; at least
    ``min_changes`` changes happen (the last daemon watches them when the kills went by
    faster, on a loaded machine), so that a passing loop has always tested something."""
    rng = random.Random(seed)
    driver = Driver(workdir)
    triggers: dict[str, int] = dict.fromkeys(TRIGGERS, 0)
    slack = WatchedSlack()
    async with Simulator(initial_scenario()) as sim, slack:
        driver.write_config(sim, slack)
        timeline = Timeline(sim, rng)

        changer = asyncio.create_task(change_every_second(driver, timeline, say))
        killed = 0
        silence_problems: list[str] = []
        try:
            while killed < kills:
                daemon = await driver.spawn()
                if killed == 0:  # beside the first daemon, while it runs
                    silence_problems = await driver.add_silence()
                trigger = rng.choice(TRIGGERS)
                with contextlib.suppress(TimeoutError):
                    await kill_at(driver, slack, rng, daemon, trigger)
                await driver.stop(daemon, signal.SIGKILL)
                killed += 1
                triggers[trigger] += 1
                say(f"kill {killed}/{kills} ({trigger}) after {len(daemon.cycles)} cycle(s)")
            # The last daemon may finish: it sees the final state, delivers, and stops.
            final = await driver.spawn()
            with contextlib.suppress(TimeoutError):  # too few changes show below
                async with asyncio.timeout(60):
                    while len(timeline.changes) < min_changes:
                        timeline.changed.clear()
                        await timeline.changed.wait()
            changer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await changer
            last_change = datetime.now(UTC)
            with contextlib.suppress(TimeoutError):  # a missing message shows below
                async with asyncio.timeout(60):
                    await driver.wait_observed(last_change)
                    while compare(timeline.events, delivered(slack), kills):
                        slack.arrived.clear()
                        await slack.arrived.wait()
            await asyncio.sleep(1.5)  # one more cycle: nothing else may arrive
            began = time.monotonic()
            code = await driver.stop(final, signal.SIGTERM)
            stopped_in = time.monotonic() - began
        finally:
            changer.cancel()
            for daemon in driver.daemons:
                if daemon.process.returncode is None:
                    daemon.process.kill()
                    await daemon.process.wait()

        events = delivered(slack)
        problems = compare(timeline.events, events, kills)
        if len(timeline.changes) < min_changes:
            problems.append(f"only {len(timeline.changes)} change(s) in 60 s after the kills")
        if len(events) < len(slack.accepted):
            problems.append(f"{len(slack.accepted) - len(events)} unreadable Slack message(s)")
        problems += await check_state(driver.state_path, sim)
        problems += silence_problems
        if code != 0 or stopped_in > 10:
            problems.append(f"SIGTERM: exit status {code} after {stopped_in:.1f}s")
        for daemon in driver.daemons:
            problems += [f"daemon {daemon.number} logged: {line}" for line in daemon.errors]
        return Outcome(killed, triggers, timeline.changes, timeline.events, events, problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.killloop", description=__doc__)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"{datetime.now():%H:%M:%S.%f}"[:-3], line, flush=True)

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="killloop-") as tmp:
        outcome = asyncio.run(kill_loop(Path(tmp), kills=args.kills, seed=seed, say=say))
    triggers = ", ".join(f"{n} {trigger}" for trigger, n in outcome.triggers.items())
    print(
        f"seed {seed}: {outcome.kills} kills ({triggers}), "
        f"{len(outcome.changes)} changes, {len(outcome.expected)} events implied, "
        f"{len(outcome.delivered)} delivered, {outcome.duplicates} duplicate(s), "
        f"{time.monotonic() - began:.0f}s"
    )
    for problem in outcome.problems:
        print(f"PROBLEM: {problem}")
    print("OK" if not outcome.problems else "FAILED")
    return 1 if outcome.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
