"""Benchmark of one poll cycle, cold and steady (issue 7).

    pip install -e '.[bench]'                     # adds `requests`, for the naive peer
    python -m benchmarks.cycle                    # every case, about 2.5 minutes
    python -m benchmarks.cycle reference --no-peer

Each case runs in a process of its own (so that its peak RSS is its own) against the
Atlas simulator in another process (so that the server's CPU is not counted as ours, as
a real server's would not be). Every request takes a fixed round trip of 20 ms: the
simulator's answer leaves 20 ms after the request arrived, its own processing included
(``--latency-model sim`` uses ``Simulator.faults.latency`` instead, which sleeps before
processing; see README.md). Through the real App, AtlasClient and SQLite store (a
file, WAL, synchronous=FULL) it runs, on one App:

- cold: a cycle on an empty state file (full listings);
- 2nd: the first incremental cycle (its ``fromDate`` is new, so every page is parsed);
- steady: a cycle with nothing changed since the one before;
- full: the full reconciliation listing, every organization at once (as at a start;
  the daemon spreads them over ``poll.full_listing_every``), nothing changed;
- restart: a new process on the same state file (a daemon restart, or the next
  ``run --once``): it loads the snapshot and runs one cycle, nothing changed (a start
  lists in full).

For each it prints:

- wall / floor, floor = ceil(pages needed / max_concurrency) x latency, pages needed
  being what the paging rule needs (per org, floor(listed / 500) + 1: paging stops at the
  first page shorter than 500) for the ``fromDate`` the cycle asked for;
- raw / floor: the same requests replayed by a bare aiohttp loop (4 at a time, already
  authenticated, bodies read and dropped): what this machine and harness allow at best;
- reads s: when the last organization's read ended (each organization is diffed,
  evaluated and committed as soon as it is read, so this includes all but the cycle's
  last transaction);
- sim CPU s: the simulator's CPU time in the cycle (it serves from one process: a floor
  of its own when larger than the network's);
- requests / pages: every request the simulator received (401 challenges, retries and
  breakdown fetches included) over the pages needed;
- CPU per 100k invoices (of the snapshot), of our process: the whole cycle (HTTP client
  included), and the parse + diff + rules + commit part (each function of it timed with
  the CPU clock of the thread it runs in: the event loop's, the state file's);
- peak RSS of the process when the cycle ended (VmHWM in /proc/self/status, the
  figure ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` gives; cold, 2nd and steady share
  a process, so only a higher peak shows), and its RSS after imports; and, per case, the
  peak RSS of the daemon itself (``python -m invoice_watch run``, see
  :func:`daemon_peak_rss`);
- the naive peer's wall time for the same cycle (one org after another, one page after
  another, ``requests`` with HTTPDigestAuth, full listings, every row rewritten; its
  cycle is the same every time) and how many times slower it is than ours;
- for the "history" case, the bytes of a steady (incremental) listing against a full
  one, per org.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ITEMS_PER_PAGE = 500
LATENCY = 0.020
CONCURRENCY = 4  # atlas.max_concurrency, the default
# What turns a page body into invoices (in invoice_watch.atlas.parse), timed as "parse".
PARSE = "parse_page"
# What diffs, evaluates, plans and groups, timed with it: (module of invoice_watch
# that calls it, name).
WORK = (
    ("listing", "incremental_from"),
    ("cycle", "listing_change"),
    ("cycle", "step_org"),
    ("plan", "evaluate"),
    ("plan", "plan_holding"),
    ("plan", "plan_resolved"),
    ("store.grouping", "cycle_messages"),
)
CYCLES = ("cold", "2nd", "steady", "full")
RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status"},
    {"name": "pending-over-budget", "type": "pending_amount", "threshold": 25000},
    {"name": "status-moves", "type": "status_change"},
    {"name": "spend-jump", "type": "amount_increase", "percent": 50},
    {"name": "month-forecast", "type": "forecast", "budget": 50000},
    {"name": "atlas-unreachable", "type": "poll_failure"},
]

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Case:
    name: str
    orgs: int
    invoices_per_org: int
    latency: float = LATENCY
    latency_model: str = "round-trip"  # or "sim": Simulator.faults.latency
    peer: bool = True
    history: bool = False  # two orgs with two years of monthly invoices instead
    # A PostgreSQL server (--backend postgresql): each case gets a database of its own
    # (``state.url``) instead of the state file.
    server: Any = None


CASES = {
    case.name: case
    for case in (
        Case("reference", 300, 60),
        Case("large", 10, 10_000),
        Case("one-big", 1, 10_000, latency=0.100),  # a far region: the network dominates
        Case("orgs-10", 10, 60),
        Case("orgs-100", 100, 60),
        Case("orgs-1000", 1000, 60),
        Case("history", 2, 24, history=True),
    )
}


# ---- the simulator, in a process of its own ------------------------------------------


def _history_scenario() -> Any:
    """Two orgs with two years of monthly invoices: "typical" (older ones all PAID) and
    "month-start" (last month's invoice still CLOSED, as in the first days of a month)."""
    from invoice_watch.simulator import Scenario

    scenario = Scenario()
    for name in ("typical", "month-start"):
        scenario.add_org(name)
        for age in range(24):
            status = "PENDING" if age == 0 else "PAID"
            if age == 1 and name == "month-start":
                status = "CLOSED"
            scenario.add_invoice(name, period=-age, status=status, amount_cents=1000_00 + age)
    return scenario


def _simulator_main(conn: multiprocessing.connection.Connection, case: Case) -> None:
    asyncio.run(_serve_simulator(conn, case))


async def _serve_simulator(conn: multiprocessing.connection.Connection, case: Case) -> None:
    from aiohttp import web

    from invoice_watch.simulator import Scenario, Simulator
    from invoice_watch.simulator.server import RECORD_KEY

    if case.history:
        scenario = _history_scenario()
    else:
        scenario = Scenario.generate(orgs=case.orgs, invoices_per_org=case.invoices_per_org)
    loop = asyncio.get_running_loop()
    sizes: dict[int, int] = {}  # id(request record) -> body bytes

    async def count_bytes(request: web.Request, response: web.StreamResponse) -> None:
        body = getattr(response, "body", None)
        sizes[id(request[RECORD_KEY])] = len(body) if isinstance(body, bytes) else 0

    @web.middleware
    async def round_trip(request: web.Request, handler: Handler) -> web.StreamResponse:
        arrived = loop.time()
        response: web.StreamResponse = await handler(request)
        await asyncio.sleep(arrived + case.latency - loop.time())
        return response

    sim = Simulator(scenario)
    sim.app.on_response_prepare.append(count_bytes)
    if case.latency_model == "sim":
        sim.faults.latency = case.latency
    else:
        sim.app.middlewares.insert(0, round_trip)
    async with sim:
        conn.send((sim.base_url, sim.public_key, sim.private_key, sim.org_ids))
        cpu = time.process_time()
        while True:
            command, argument = await loop.run_in_executor(None, conn.recv)
            if command == "reset":
                sim.requests.clear()
                sizes.clear()
                cpu = time.process_time()
                conn.send(None)
            elif command == "requests":
                records = [
                    (r.path, r.query, r.org_id, r.status, r.challenge, sizes.get(id(r), 0))
                    for r in sim.requests
                ]
                conn.send((records, time.process_time() - cpu))
            elif command == "pages":
                conn.send(_pages_needed(scenario, argument))
            elif command == "stop":
                conn.send(None)
                return


def _pages_needed(scenario: Any, from_dates: dict[str, str | None]) -> int:
    pages = 0
    for org_id, from_date in from_dates.items():
        start = datetime.fromisoformat(from_date).replace(tzinfo=UTC) if from_date else None
        listed = sum(1 for i in scenario.invoices_of(org_id) if start is None or i.start >= start)
        pages += listed // ITEMS_PER_PAGE + 1
    return pages


class SimulatorProcess:
    """The parent's handle on the simulator process."""

    def __init__(self, case: Case) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_simulator_main, args=(child, case), daemon=True)
        self._process.start()
        self.base_url, self.public_key, self.private_key, self.org_ids = self._conn.recv()

    def call(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    async def acall(self, command: str, argument: Any = None) -> Any:
        return await asyncio.to_thread(self.call, command, argument)

    def stop(self) -> None:
        self.call("stop")
        self._process.join(10)


# ---- our cycles ----------------------------------------------------------------------


@dataclass
class CycleFigures:
    label: str
    invoices: int = 0
    wall: float = 0.0
    fetch_wall: float = 0.0
    floor: float = 0.0
    raw_wall: float = 0.0
    sim_cpu: float = 0.0
    requests: int = 0
    pages: int = 0
    challenges: int = 0
    cpu_cycle: float = 0.0
    cpu_work: float = 0.0  # parse + diff + rules + commit
    rss_start_mb: float = 0.0  # after imports, before the App opens
    rss_peak_mb: float = 0.0
    replay: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    bytes_by_org: dict[str, int] = field(default_factory=dict)

    def per_100k(self, seconds: float) -> float:
        return seconds / max(self.invoices, 1) * 100_000


@dataclass
class CaseFigures:
    case: Case
    cycles: list[CycleFigures]
    peer_wall: float | None = None
    org_names: dict[str, str] = field(default_factory=dict)
    daemon_rss: dict[str, float] = field(default_factory=dict)  # see daemon_peak_rss


class NullNotifier:
    name = "sink"

    async def send(self, events: Sequence[Any]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _config_text(sim: SimulatorProcess, state: Path, url: str | None = None) -> str:
    import yaml

    where = {"url": url} if url is not None else {"path": str(state)}
    return yaml.safe_dump(
        {
            "atlas": {
                "base_url": sim.base_url,
                "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
                "max_concurrency": CONCURRENCY,
            },
            "organizations": [{"id": org_id} for org_id in sim.org_ids],
            "state": where,
            "notifiers": {"sink": {"type": "console"}},
            "rules": [{**rule, "notify": ["sink"]} for rule in RULES],
        }
    )


def _rss_mb() -> float:
    """Peak RSS of this process: VmHWM, which getrusage's ru_maxrss also reports, except
    that in a spawned child ru_maxrss counts the parent's pages from before the exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Timed:
    """Counts the CPU seconds spent in ``owner.name`` until undone: the CPU time of the
    thread that runs it (the cycle's work runs in the event loop's thread, its SQLite
    transactions in a worker thread, both at once), so nothing is counted twice."""

    def __init__(self, owner: Any, name: str) -> None:
        self.cpu = 0.0
        self._owner, self._name = owner, name
        self._original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - start

        setattr(owner, name, timed)

    def undo(self) -> None:
        setattr(self._owner, self._name, self._original)


class _TimedStore(_Timed):
    """Counts the CPU seconds of the functions ``Database.run`` runs in its thread
    (every SQLite transaction of the cycle)."""

    def __init__(self, database_class: Any) -> None:
        self.cpu = 0.0
        self._owner, self._name = database_class, "run"
        original = self._original = database_class.run

        async def run(database: Any, fn: Callable[[], Any]) -> Any:
            def timed() -> Any:
                start = time.thread_time()
                try:
                    return fn()
                finally:
                    self.cpu += time.thread_time() - start

            return await original(database, timed)

        database_class.run = run


def _time_work() -> list[_Timed]:
    """Timers around the parse + diff + rules + commit part of a cycle: parsing pages,
    each organization's step (diff), rules and alert planning, grouping, and the
    state file's transactions and caches."""
    import importlib

    from invoice_watch.atlas import parse
    from invoice_watch.linked import Linked
    from invoice_watch.store.postgres.database import PgDatabase
    from invoice_watch.store.sqlite.database import Database
    from invoice_watch.store.unit_of_work import SqlStore

    timers = [
        _Timed(parse, PARSE),
        _TimedStore(Database),
        _TimedStore(PgDatabase),
        _Timed(SqlStore, "_apply"),
    ]
    for module, name in WORK:
        timers.append(_Timed(importlib.import_module(f"invoice_watch.{module}"), name))
    timers.append(_Timed(Linked, "shared"))  # linked invoices: what others hold
    timers.append(_Timed(Linked, "to_load"))  # and which of their copies to read
    return timers


class _EndOf:
    """Notes the wall clock when the async generator method ``obj.name`` hands over its
    last item (``AtlasClient.read_orgs``: when the last organization's read ended)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.wall = 0.0
        self._obj, self._name = obj, name
        original: Callable[..., AsyncGenerator[Any, None]] = getattr(obj, name)

        async def noted(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
            async with contextlib.aclosing(original(*args, **kwargs)) as items:
                async for item in items:
                    self.wall = time.perf_counter()
                    yield item

        setattr(obj, name, noted)

    def undo(self) -> None:
        delattr(self._obj, self._name)


async def run_cycles(
    config_text: str,
    state: Path,
    labels: Sequence[str],
    sim: SimulatorProcess | None,
    profile: bool,
    latency: float = LATENCY,
) -> list[CycleFigures]:
    """Run one cycle per label on one App; ``sim`` is reset before each when given (else
    the caller does it)."""
    from invoice_watch.app import App
    from invoice_watch.config import load

    config = load(config_text, filename="bench.yaml", env={}, base_dir=state.parent)
    rss_start = _rss_mb()
    cycles = []
    async with App(config, notifiers={"sink": NullNotifier()}) as app:
        if app.leadership is not None:  # PostgreSQL: lead, as `run` does first
            await app.leadership.step()
        for label in labels:
            figures = CycleFigures(label, rss_start_mb=rss_start)
            if sim is not None:
                await sim.acall("reset")
            if label == "full":
                app.cycles.full_listings.force()  # every organization lists in full
            timers, fetched = _time_work(), _EndOf(app.client, "read_orgs")
            profiler = _start_profile() if profile else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = await app.run_cycle()
            figures.wall = time.perf_counter() - wall0
            figures.cpu_cycle = time.process_time() - cpu0
            if profiler is not None:
                _stop_profile(profiler, label)
            for timer in timers:
                timer.undo()
            fetched.undo()
            assert not result.orgs_failed, result.orgs_failed
            figures.fetch_wall = fetched.wall - wall0
            figures.cpu_work = sum(timer.cpu for timer in timers)
            figures.invoices = app.store.snapshot.invoice_count()
            figures.rss_peak_mb = _rss_mb()
            if sim is not None:
                records, sim_cpu = await sim.acall("requests")
                _count_requests(figures, records, sim_cpu, sim, latency)
            cycles.append(figures)
    return cycles


def _count_requests(
    figures: CycleFigures,
    records: list[Any],
    sim_cpu: float,
    sim: SimulatorProcess,
    latency: float,
) -> None:
    figures.sim_cpu = sim_cpu
    from_dates: dict[str, str | None] = {}
    for path, query, org_id, status, challenge, size in records:
        figures.requests += 1
        figures.challenges += challenge
        if path.endswith("/invoices") and org_id is not None:
            from_dates.setdefault(org_id, (query.get("fromDate") or [None])[0])
            figures.bytes_by_org[org_id] = figures.bytes_by_org.get(org_id, 0) + size
        if status == 200:
            figures.replay.append((path, [(k, v) for k, vs in query.items() for v in vs]))
    figures.pages = sim.call("pages", from_dates)
    figures.floor = math.ceil(figures.pages / CONCURRENCY) * latency


async def raw_fetch(
    sim: SimulatorProcess, requests: list[tuple[str, list[tuple[str, str]]]]
) -> float:
    """The wall time of the same requests sent by a bare aiohttp loop: 4 at a time,
    authenticated beforehand, bodies read and dropped."""
    import aiohttp

    auth = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    headers = {"Accept": "application/vnd.atlas.2023-01-01+json"}
    async with aiohttp.ClientSession(middlewares=(auth,), connector=connector) as session:
        path, params = requests[0]
        async with session.get(sim.base_url + path, params=params, headers=headers) as answer:
            await answer.read()
        queue = iter(requests)

        async def worker() -> None:
            for path, params in queue:
                async with session.get(sim.base_url + path, params=params, headers=headers) as r:
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - started


def _start_profile() -> Any:
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _stop_profile(profiler: Any, name: str) -> None:
    import pstats

    profiler.disable()
    path = Path(tempfile.gettempdir()) / f"bench-{name}.prof"
    profiler.dump_stats(path)
    print(f"--- profile of the {name} cycle (saved to {path}) ---")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


# ---- one case, in a process of its own -----------------------------------------------


def _case_main(case: Case, results: multiprocessing.queues.Queue[Any], profile: bool) -> None:
    results.put(run_case(case, profile))


def _restart_main(
    config_text: str, state: Path, results: multiprocessing.queues.Queue[Any], profile: bool
) -> None:
    results.put(asyncio.run(run_cycles(config_text, state, ["restart"], None, profile))[0])


def run_case(case: Case, profile: bool = False) -> CaseFigures:
    sim = SimulatorProcess(case)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "state.db"
            url = None
            if case.server is not None:
                from tests.postgres import create_database

                url = create_database(case.server, f"bench_{case.name.replace('-', '_')}")
            config_text = _config_text(sim, state, url)
            cycles = asyncio.run(run_cycles(config_text, state, CYCLES, sim, profile, case.latency))
            cycles.append(_restart(case, sim, config_text, state, profile))
            # The same requests replayed: those of full listings, and of incremental ones.
            raw = {"full": asyncio.run(raw_fetch(sim, cycles[-1].replay))}
            raw["incremental"] = asyncio.run(raw_fetch(sim, cycles[2].replay))
            for figures in cycles:
                incremental = figures.label in ("2nd", "steady")
                figures.raw_wall = raw["incremental" if incremental else "full"]
            peer_wall = naive_cycle(sim, Path(tmp) / "peer.db") if case.peer else None
            # (the daemon's RSS on the state file only)
            daemon = (
                daemon_peak_rss(sim, Path(tmp))
                if url is None
                else dict.fromkeys([label for label, _ in DAEMON_RUNS], 0.0)
            )
    finally:
        sim.stop()
    names = dict(zip(sim.org_ids, ("typical", "month-start"), strict=True)) if case.history else {}
    return CaseFigures(case, cycles, peer_wall, names, daemon)


def _restart(
    case: Case, sim: SimulatorProcess, config_text: str, state: Path, profile: bool
) -> CycleFigures:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.queues.Queue[Any] = context.Queue()
    process = context.Process(target=_restart_main, args=(config_text, state, results, profile))
    sim.call("reset")
    process.start()
    figures: CycleFigures = results.get()
    process.join()
    records, sim_cpu = sim.call("requests")
    _count_requests(figures, records, sim_cpu, sim, case.latency)
    return figures


# ---- the daemon itself ---------------------------------------------------------------

DAEMON_RUNS = (("fresh", 4), ("restarted", 2))  # (state file, cycles to wait for)


def daemon_peak_rss(sim: SimulatorProcess, tmp: Path) -> dict[str, float]:
    """Peak RSS (MB) of the product itself, ``python -m invoice_watch run``, a process of
    its own (nothing of this harness in it), polling every second: on a fresh state file
    for 4 cycles (cold, then steady ones, delivering the cold cycle's messages to the
    console), then restarted on that file for 2 more. VmHWM is read from /proc until the
    process exits (SIGTERM after the last cycle)."""
    import signal
    import subprocess

    import yaml

    config = yaml.safe_load(_config_text(sim, tmp / "daemon.db"))
    config["poll"] = {"interval": "1s"}
    path = tmp / "daemon.yaml"
    path.write_text(yaml.safe_dump(config))
    peaks = {}
    for label, cycles in DAEMON_RUNS:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "invoice_watch", "run", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert daemon.stderr is not None
        status = Path(f"/proc/{daemon.pid}/status")
        peak, seen = 0.0, 0
        for line in daemon.stderr:
            peak = max(peak, _hwm_mb(status))
            seen += " cycle: " in line
            if seen == cycles:
                daemon.send_signal(signal.SIGTERM)
                break
        while daemon.poll() is None:
            peak = max(peak, _hwm_mb(status))
            time.sleep(0.01)
        daemon.stderr.close()
        assert daemon.returncode == 0, f"the daemon exited {daemon.returncode}"
        peaks[label] = peak
    return peaks


def _hwm_mb(status: Path) -> float:
    try:
        text = status.read_text()
    except OSError:  # it has exited
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- the naive peer ------------------------------------------------------------------


def naive_cycle(sim: SimulatorProcess, db: Path) -> float:
    """One cycle as a naive client would run it: one org after another, one page after
    another, with ``requests`` and HTTPDigestAuth, every invoice rewritten. Returns its
    wall time."""
    import requests
    from requests.auth import HTTPDigestAuth

    started = time.perf_counter()
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS invoices (id TEXT PRIMARY KEY, org_id TEXT, status TEXT, "
        "start_date TEXT, end_date TEXT, amount_billed_cents INTEGER)"
    )
    with requests.Session() as session:
        session.auth = HTTPDigestAuth(sim.public_key, sim.private_key)
        session.headers["Accept"] = "application/vnd.atlas.2023-01-01+json"
        for org_id in sim.org_ids:
            rows: list[tuple[Any, ...]] = []
            page = 1
            while True:
                response = session.get(
                    f"{sim.base_url}/api/atlas/v2/orgs/{org_id}/invoices",
                    params={"itemsPerPage": ITEMS_PER_PAGE, "pageNum": page},
                    timeout=30,
                )
                response.raise_for_status()
                results = response.json()["results"]
                rows.extend(
                    (
                        item["id"],
                        item["orgId"],
                        item["statusName"],
                        item["startDate"],
                        item["endDate"],
                        item["amountBilledCents"],
                    )
                    for item in results
                )
                if len(results) < ITEMS_PER_PAGE:
                    break
                page += 1
            conn.executemany("INSERT OR REPLACE INTO invoices VALUES (?,?,?,?,?,?)", rows)
            conn.commit()
    conn.close()
    return time.perf_counter() - started


# ---- report --------------------------------------------------------------------------

COLUMNS = (
    "case",
    "cycle",
    "invoices",
    "wall s",
    "reads s",
    "floor s",
    "wall/floor",
    "raw/floor",
    "sim CPU s",
    "requests/pages (401s)",
    "CPU s/100k cycle",
    "CPU s/100k parse+diff+rules+commit",
    "peak RSS MB (at start)",
    "naive s",
    "naive/ours",
)


def report_lines(figures: CaseFigures) -> list[str]:
    case, peer = figures.case, figures.peer_wall
    lines = []
    for c in figures.cycles:
        cells = [
            f"{case.name} {case.orgs}x{case.invoices_per_org}"
            + (f" at {case.latency * 1000:.0f} ms" if case.latency != LATENCY else ""),
            c.label,
            f"{c.invoices:,}",
            f"{c.wall:.3f}",
            f"{c.fetch_wall:.3f}",
            f"{c.floor:.3f}",
            f"{c.wall / c.floor:.2f}",
            f"{c.raw_wall / c.floor:.2f}",
            f"{c.sim_cpu:.2f}",
            f"{c.requests}/{c.pages} = {c.requests / c.pages:.3f} ({c.challenges})",
            f"{c.per_100k(c.cpu_cycle):.2f}",
            f"{c.per_100k(c.cpu_work):.2f}",
            f"{c.rss_peak_mb:.0f} ({c.rss_start_mb:.0f})",
            f"{peer:.2f}" if peer is not None else "-",
            f"{peer / c.wall:.1f}x" if peer is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def history_lines(figures: CaseFigures) -> list[str]:
    cold, steady = figures.cycles[0], figures.cycles[2]
    lines = []
    for org_id, name in figures.org_names.items():
        full, incremental = cold.bytes_by_org[org_id], steady.bytes_by_org[org_id]
        lines.append(
            f"- {name} (24 monthly invoices): full listing {full:,} bytes, steady "
            f"(incremental) listing {incremental:,} bytes = {incremental / full:.1%}"
        )
    return lines


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cycle",
        description="Benchmark one poll cycle, cold and steady (see benchmarks/README.md).",
    )
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"of {', '.join(CASES)}")
    parser.add_argument("--no-peer", action="store_true", help="skip the naive peer")
    parser.add_argument("--profile", action="store_true", help="cProfile each cycle")
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="where the state is: an SQLite file (default), or a throwaway PostgreSQL "
        "server started for the run (Debian's postgresql, as the tests start it)",
    )
    parser.add_argument(
        "--latency-model",
        choices=("round-trip", "sim"),
        default="round-trip",
        help="round-trip: each answer leaves 20 ms after its request arrived (default); "
        "sim: Simulator.faults.latency, a 20 ms sleep before processing",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; cases: {', '.join(CASES)}")

    with contextlib.ExitStack() as stack:
        server = None
        if args.backend == "postgresql":
            from tests.postgres import pg_bin, running_server

            found = pg_bin()
            if found is None:
                parser.error("PostgreSQL is not installed (apt-get install postgresql)")
            server = stack.enter_context(running_server(found))
        return _run(args, server)


def _run(args: argparse.Namespace, server: Any) -> int:
    print(
        f"machine: {machine()}; latency {LATENCY * 1000:.0f} ms ({args.latency_model}), "
        f"max_concurrency {CONCURRENCY}; state: {args.backend}"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    context = multiprocessing.get_context("spawn")
    history: list[str] = []
    daemon_rss: list[str] = []
    started = time.perf_counter()
    for name in args.cases or list(CASES):
        case = dataclasses.replace(
            CASES[name],
            peer=CASES[name].peer and not args.no_peer,
            latency_model=args.latency_model,
            server=server,
        )
        results: multiprocessing.queues.Queue[Any] = context.Queue()
        process = context.Process(target=_case_main, args=(case, results, args.profile))
        process.start()
        figures: CaseFigures = results.get()
        process.join()
        for line in report_lines(figures):
            print(line, flush=True)
        daemon_rss.append(
            f"- {case.name}: "
            + ", ".join(
                f"{label} ({cycles} cycles) {figures.daemon_rss[label]:.0f} MB"
                for label, cycles in DAEMON_RUNS
            )
        )
        if case.history:
            history.extend(history_lines(figures))
    print("peak RSS of the daemon (`python -m invoice_watch run`, polling every second):")
    for line in daemon_rss:
        print(line)
    for line in history:
        print(line)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
