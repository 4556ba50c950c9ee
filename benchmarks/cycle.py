"""Benchmark of the poll cycle, measured against what the machine allows (issues 7, 16).

    pip install -e '.[bench]'                     # adds `requests`, for the peer
    python -m benchmarks.cycle reference          # the reference point, about 3 minutes
    python -m benchmarks.cycle                    # every case (the scaling table too)

Each case runs in a process of its own against the Atlas simulator in another process
(so that the server's CPU is not counted as ours, as a real server's would not be).
Every request takes a fixed round trip (20 ms): the simulator's answer leaves 20 ms
after the request arrived, its own processing included (``--latency-model sim`` uses
``Simulator.faults.latency`` instead, which sleeps before processing). The data are
monthly invoices as real organizations have them (``Scenario.generate(monthly=True)``:
this month's PENDING, last month's sometimes CLOSED or FAILED, every older one PAID).

Through the real App, AtlasClient and SQLite store (a file, WAL, synchronous=FULL), at
``--concurrency`` requests in flight (``atlas.max_concurrency``, default 8), it runs
``--pairs`` times (default 5), each time on a fresh state file:

- cold: a cycle on the empty state file (full listings);
- 2nd: the first incremental cycle (its ``fromDate`` is new, so every page is parsed);
- steady: a cycle with nothing changed since the one before;
- full: the full reconciliation listing, every organization at once;
- restart: a new process on the same state file, one cycle (a start lists in full).

Each cycle is followed at once by the bare aiohttp replay of its own requests (Digest
primed, the same concurrency, the same simulator): a pair. Its ratio is
cycle wall / max(theoretical floor, replay wall); the theoretical floor is
max(ceil(pages / concurrency), the longest organization's 1 + ceil((pages - 1) /
concurrency)) round trips (page 1 first, to learn ``totalCount``), pages being what
the paging rule needs (per org floor(listed / 500) + 1). Min / median / max over the
pairs, of that and of:

- requests / pages: every request the simulator received (401 challenges, retries and
  breakdown fetches included) over the pages needed;
- CPU per 100k invoices (of the snapshot): the whole cycle (the process's CPU time
  during it: HTTP client, Digest, asyncio, parse, diff, rules, commit, the state file's
  thread), and the parse + diff + rules + commit subset (each function timed with the
  CPU clock of the thread it runs in);
- the steady listing's bytes over the full listing's (the incremental read's share).

Then whole processes, ``--pairs`` times each: ``python -m invoice_watch run --once`` on
a fresh state file (cold) and on the state it left (steady: imports, config load, state
open and snapshot load included), each followed by a bare python process that imports
aiohttp, primes Digest, lists and json-decodes the same pages at the same concurrency:
wall, CPU (user + sys, from ``os.wait4``) and peak RSS (``ru_maxrss``) of each, and the
ratios; and the CPU of that bare process after what every start of ours does before its
first request (the config imported, read and validated; the state's rows fetched), to
show how much of the ratio that start alone takes. Then the daemon's peak RSS (``python
-m invoice_watch run``, fresh state, 4 cycles; restarted, 2 cycles), and the peer: what
a user would write with ``requests`` + ``HTTPDigestAuth`` and a pool of 4 threads (full
listings, rows into SQLite), its wall over our steady cycle's. The machine (cores, load
average) is printed with each case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ITEMS_PER_PAGE = 500
LATENCY = 0.020
CONCURRENCY = 8  # the reference point's
PAIRS = 5
PEER_THREADS = 4
ACCEPT = "application/vnd.atlas.2023-01-01+json"
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
# The targets of issue 16, at the reference point (paired medians).
TARGETS = {
    "cold": 1.2,  # cycle / max(floor, replay)
    "steady": 1.1,
    "steady_cpu": 0.8,  # whole cycle, CPU s per 100k invoices
    "requests": 1.01,  # requests / pages
    "incremental": 0.10,  # steady listing bytes / full listing bytes
    "rss": 80.0,  # MB, the daemon on a fresh state
    "once_steady": 1.5,  # run --once CPU / bare process CPU
    "once_cold": 2.0,
}

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Case:
    name: str
    orgs: int
    invoices_per_org: int
    latency: float = LATENCY
    latency_model: str = "round-trip"  # or "sim": Simulator.faults.latency
    peer: bool = True
    concurrency: int = CONCURRENCY
    pairs: int = PAIRS
    processes: bool = True  # run --once, the daemon
    # A PostgreSQL server (--backend postgresql): each case gets a database of its own
    # (``state.url``) instead of the state file.
    server: Any = None


CASES = {
    case.name: case
    for case in (
        Case("reference", 300, 60),
        Case("large", 10, 10_000),  # 100k invoices: the memory target
        Case("orgs-10", 10, 60),
        Case("orgs-100", 100, 60),
        Case("orgs-1000", 1000, 60),
        Case("one-1k", 1, 1_000),
        Case("one-10k", 1, 10_000),
        Case("one-50k", 1, 50_000),
        Case("one-100k", 1, 100_000),  # 100k invoices in one organization: the memory target
    )
}


# ---- the simulator, in a process of its own ------------------------------------------


def _simulator_main(conn: multiprocessing.connection.Connection, case: Case) -> None:
    asyncio.run(_serve_simulator(conn, case))


async def _serve_simulator(conn: multiprocessing.connection.Connection, case: Case) -> None:
    from aiohttp import web

    from invoice_watch.simulator import Scenario, Simulator
    from invoice_watch.simulator.server import RECORD_KEY

    scenario = Scenario.generate(
        orgs=case.orgs, invoices_per_org=case.invoices_per_org, monthly=True
    )
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


def _pages_needed(scenario: Any, from_dates: dict[str, str | None]) -> list[int]:
    """The pages each organization's read needs for the ``fromDate`` it asked."""
    pages = []
    for org_id, from_date in from_dates.items():
        start = datetime.fromisoformat(from_date).replace(tzinfo=UTC) if from_date else None
        listed = sum(1 for i in scenario.invoices_of(org_id) if start is None or i.start >= start)
        pages.append(listed // ITEMS_PER_PAGE + 1)
    return pages


class SimulatorProcess:
    """The parent's handle on the simulator process."""

    def __init__(self, case: Case) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_simulator_main, args=(child, case), daemon=True)
        self._process.start()
        child.close()  # the simulator's end: its exit is then an EOF here
        # Bounded: a simulator that fails to start (its traceback is above) is said so.
        if not self._conn.poll(300):
            self._process.kill()
            raise RuntimeError("the simulator did not start within 300 s")
        self.base_url, self.public_key, self.private_key, self.org_ids = self._conn.recv()

    def call(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    async def acall(self, command: str, argument: Any = None) -> Any:
        return await asyncio.to_thread(self.call, command, argument)

    def stop(self) -> None:
        self.call("stop")
        self._process.join(10)


# ---- figures -------------------------------------------------------------------------

Request = tuple[str, list[tuple[str, str]]]  # path, query


@dataclass
class CycleFigures:
    """One cycle and the replay of its requests: a pair."""

    label: str
    invoices: int = 0
    wall: float = 0.0
    floor: float = 0.0
    replay_wall: float = 0.0
    replay_cpu: float = 0.0  # the replay's CPU (process time)
    sim_cpu: float = 0.0
    requests: int = 0
    pages: int = 0
    challenges: int = 0
    listed_bytes: int = 0
    cpu_cycle: float = 0.0
    cpu_work: float = 0.0  # parse + diff + rules + commit
    replay: list[Request] = field(default_factory=list)

    def per_100k(self, seconds: float) -> float:
        return seconds / max(self.invoices, 1) * 100_000

    @property
    def ratio(self) -> float:
        return self.wall / max(self.floor, self.replay_wall)


@dataclass
class ProcessFigures:
    """``run --once`` (ours) and the bare process on the same requests."""

    label: str
    wall: float
    cpu: float
    rss_mb: float
    bare_wall: float
    bare_cpu: float
    bare_rss_mb: float
    # The bare client after what every start does before its first request (START).
    start_cpu: float = math.nan


@dataclass
class CaseFigures:
    case: Case
    cycles: list[CycleFigures]
    once: list[ProcessFigures] = field(default_factory=list)
    peer_wall: float | None = None
    daemon_rss: dict[str, float] = field(default_factory=dict)  # see daemon_peak_rss
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)


class NullNotifier:
    name = "sink"

    async def send(self, events: Sequence[Any]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _config_text(
    sim: SimulatorProcess, state: Path, concurrency: int, url: str | None = None
) -> str:
    import yaml

    where = {"url": url} if url is not None else {"path": str(state)}
    return yaml.safe_dump(
        {
            "atlas": {
                "base_url": sim.base_url,
                "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
                "max_concurrency": concurrency,
            },
            "organizations": [{"id": org_id} for org_id in sim.org_ids],
            "state": where,
            "notifiers": {"sink": {"type": "console"}},
            "rules": [{**rule, "notify": ["sink"]} for rule in RULES],
        }
    )


class _Timed:
    """Counts the CPU seconds spent in ``owner.name`` until undone: the CPU time of the
    thread that runs it (the cycle's work runs in the event loop's thread, its SQLite
    transactions in a worker thread, both at once), so nothing is counted twice."""

    def __init__(self, owner: Any, name: str) -> None:
        self.cpu = 0.0
        self.calls = 0  # each costs the cycle _timer_cost() more CPU
        self._owner, self._name = owner, name
        self._original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - start
                self.calls += 1

        setattr(owner, name, timed)

    def undo(self) -> None:
        setattr(self._owner, self._name, self._original)


class _TimedStore(_Timed):
    """Counts the CPU seconds of the functions ``Database.run`` runs in its thread
    (every SQLite transaction of the cycle)."""

    def __init__(self, database_class: Any) -> None:
        self.cpu = 0.0
        self.calls = 0  # not counted: a few transactions a cycle
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


@functools.cache
def _timer_cost() -> float:
    """The CPU seconds a :class:`_Timed` wrapper adds to each call (its two clock reads
    and its frame), measured in this process: the least of 5 runs of 10,000 calls of a
    function wrapped, less as many unwrapped. A steady reference cycle makes about 2,100
    timed calls: the whole cycle's CPU is not to count them (the benchmark's, not the
    product's)."""

    def work(n: int) -> int:
        return n

    owner = types.SimpleNamespace(work=work)
    _Timed(owner, "work")
    runs = []
    for _ in range(5):
        start = time.process_time()
        for n in range(10_000):
            owner.work(n)
        middle = time.process_time()
        for n in range(10_000):
            work(n)
        runs.append((middle - start) - (time.process_time() - middle))
    return max(0.0, min(runs) / 10_000)


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


async def run_cycles(
    config_text: str,
    state: Path,
    labels: Sequence[str],
    sim: SimulatorProcess | None,
    profile: bool,
    case: Case,
) -> list[CycleFigures]:
    """Run one cycle per label on one App; with ``sim``, each is a pair (the simulator
    reset before it, its requests replayed at once after it); without, the caller does
    both."""
    from invoice_watch.app import App
    from invoice_watch.config import load

    config = load(config_text, filename="bench.yaml", env={}, base_dir=state.parent)
    cycles = []
    async with App(config, notifiers={"sink": NullNotifier()}) as app:
        if app.leadership is not None:  # PostgreSQL: lead, as `run` does first
            await app.leadership.step()
        for label in labels:
            figures = CycleFigures(label)
            if sim is not None:
                await sim.acall("reset")
            if label == "full":
                app.cycles.full_listings.force()  # every organization lists in full
            timers = _time_work()
            profiler = _start_profile() if profile else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = await app.run_cycle()
            figures.wall = time.perf_counter() - wall0
            figures.cpu_cycle = time.process_time() - cpu0
            figures.cpu_cycle -= _timer_cost() * sum(timer.calls for timer in timers)
            if profiler is not None:
                _stop_profile(profiler, label)
            for timer in timers:
                timer.undo()
            assert not result.orgs_failed, result.orgs_failed
            figures.cpu_work = sum(timer.cpu for timer in timers)
            figures.invoices = app.store.snapshot.invoice_count()
            if sim is not None:
                records, sim_cpu = await sim.acall("requests")
                await _count_requests(figures, records, sim_cpu, sim, case)
                figures.replay_wall, figures.replay_cpu = await raw_fetch(
                    sim, figures.replay, case.concurrency
                )
                figures.replay = []
            cycles.append(figures)
    return cycles


async def _count_requests(
    figures: CycleFigures, records: list[Any], sim_cpu: float, sim: SimulatorProcess, case: Case
) -> None:
    figures.sim_cpu = sim_cpu
    from_dates: dict[str, str | None] = {}
    for path, query, org_id, status, challenge, size in records:
        figures.requests += 1
        figures.challenges += challenge
        if path.endswith("/invoices") and org_id is not None:
            from_dates.setdefault(org_id, (query.get("fromDate") or [None])[0])
            figures.listed_bytes += size
        if status == 200:
            figures.replay.append((path, [(k, v) for k, vs in query.items() for v in vs]))
    pages: list[int] = await sim.acall("pages", from_dates)
    figures.pages = sum(pages)
    c = case.concurrency
    rounds = max([math.ceil(sum(pages) / c), *(1 + math.ceil((n - 1) / c) for n in pages)])
    figures.floor = rounds * case.latency


async def raw_fetch(
    sim: SimulatorProcess, requests: list[Request], concurrency: int
) -> tuple[float, float]:
    """The wall and CPU time of the same requests sent by a bare aiohttp loop:
    ``concurrency`` at a time, Digest primed beforehand, bodies read and dropped."""
    import aiohttp

    auth = aiohttp.DigestAuthMiddleware(sim.public_key, sim.private_key)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Accept": ACCEPT}
    async with aiohttp.ClientSession(middlewares=(auth,), connector=connector) as session:
        path, params = requests[0]
        async with session.get(sim.base_url + path, params=params, headers=headers) as answer:
            await answer.read()
        queue = iter(requests)

        async def worker() -> None:
            for path, params in queue:
                async with session.get(sim.base_url + path, params=params, headers=headers) as r:
                    await r.read()

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, time.process_time() - cpu


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
    config_text: str,
    state: Path,
    results: multiprocessing.queues.Queue[Any],
    profile: bool,
    case: Case,
) -> None:
    results.put(asyncio.run(run_cycles(config_text, state, ["restart"], None, profile, case))[0])


def run_case(case: Case, profile: bool = False) -> CaseFigures:
    sim = SimulatorProcess(case)
    figures = CaseFigures(case, [])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(case.pairs):
                state = Path(tmp) / f"state-{n}.db"
                url = None
                if case.server is not None:
                    from tests.postgres import create_database

                    name = f"bench_{case.name.replace('-', '_')}_{n}"
                    url = create_database(case.server, name)
                config_text = _config_text(sim, state, case.concurrency, url)
                figures.cycles += asyncio.run(
                    run_cycles(config_text, state, CYCLES, sim, profile, case)
                )
                figures.cycles.append(_restart(case, sim, config_text, state, profile))
            if case.processes and case.server is None:
                compile_product()
                figures.once = run_once_pairs(sim, Path(tmp), case)
                figures.daemon_rss = daemon_peak_rss(sim, Path(tmp), case)
            if case.peer:
                figures.peer_wall = peer_cycle(sim, Path(tmp) / "peer.db")
    finally:
        sim.stop()
    figures.load = os.getloadavg()
    return figures


def _restart(
    case: Case, sim: SimulatorProcess, config_text: str, state: Path, profile: bool
) -> CycleFigures:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.queues.Queue[Any] = context.Queue()
    process = context.Process(
        target=_restart_main, args=(config_text, state, results, profile, case)
    )
    sim.call("reset")
    process.start()
    figures: CycleFigures = results.get()
    process.join()
    records, sim_cpu = sim.call("requests")

    async def pair() -> None:
        await _count_requests(figures, records, sim_cpu, sim, case)
        figures.replay_wall, figures.replay_cpu = await raw_fetch(
            sim, figures.replay, case.concurrency
        )
        figures.replay = []

    asyncio.run(pair())
    return figures


# ---- whole processes: run --once and the bare client ---------------------------------

BARE_CLIENT = """
import asyncio, json, sys
import aiohttp

async def main(base, user, password, concurrency, path, accept):
    with open(path) as f:
        requests = json.load(f)
    headers = {"Accept": accept}
    auth = aiohttp.DigestAuthMiddleware(user, password)
    connector = aiohttp.TCPConnector(limit=int(concurrency))
    async with aiohttp.ClientSession(middlewares=(auth,), connector=connector) as session:
        first, params = requests[0]
        async with session.get(base + first, params=params, headers=headers) as answer:
            await answer.read()
        queue = iter(requests)

        async def worker():
            for path, params in queue:
                async with session.get(base + path, params=params, headers=headers) as answer:
                    json.loads(await answer.read())

        await asyncio.gather(*(worker() for _ in range(int(concurrency))))

asyncio.run(main(*sys.argv[1:]))
"""


# The bare client, after what every start of ours does before its first request: the
# config's models imported, its file read and validated (`load_file`, PyYAML + pydantic),
# and on a state file the invoices' rows fetched as tuples (nothing built of them), the
# garbage collector off meanwhile as `python -m invoice_watch` has it. Not a product:
# what is left between it and `run --once` is the rest of ours (the state's snapshot,
# the cycle's parse, diff, rules and commit, delivery, the imports beyond the config).
START = (
    """
import gc, sqlite3, sys
gc.disable()
from invoice_watch.config import load_file
load_file(sys.argv.pop(1))
state = sys.argv.pop(1)
if state:
    connection = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    connection.execute("SELECT * FROM invoices").fetchall()
    connection.close()
gc.enable()
"""
    + BARE_CLIENT
)


# Runs a command and reports its wall time, exit status, CPU (user + sys) and peak RSS
# (os.wait4). A small process of its own: a child's ru_maxrss counts the memory of the
# process it was forked from until its exec (ours holds the harness and the App).
LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - started, os.waitstatus_to_exitcode(status),
                  usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]))
"""


def _measure(command: list[str]) -> tuple[float, float, float]:
    """Wall s, CPU s (user + sys) and peak RSS MB of a child process run to its end."""
    launcher = [sys.executable, "-S", "-c", LAUNCHER, *command]
    done = subprocess.run(launcher, capture_output=True, text=True, check=False, timeout=600)
    wall, code, cpu, rss = json.loads(done.stdout)
    assert code == 0, f"{command[:5]} exited {code}: {done.stderr[-2000:]}"
    return wall, cpu, rss


def compile_product() -> None:
    """Write the product's bytecode (``__pycache__``) before the whole processes run, as
    an installed product has it: pip compiles a wheel's modules when it installs them,
    an editable install at their first import. Where ``PYTHONDONTWRITEBYTECODE`` is set
    (or the tree is read-only) every start would compile the product's ~150 modules
    again, about 0.14 s of CPU that no installed copy pays (the bare client's aiohttp is
    compiled: pip did it)."""
    import compileall

    import invoice_watch

    compileall.compile_dir(str(Path(invoice_watch.__file__).parent), quiet=1)


def run_once_pairs(sim: SimulatorProcess, tmp: Path, case: Case) -> list[ProcessFigures]:
    """``run --once`` on a fresh state file (cold) then on the state it left (steady),
    ``case.pairs`` times, each followed by the bare client on its requests."""
    out = []
    for n in range(case.pairs):
        state = tmp / f"once-{n}.db"
        path = tmp / f"once-{n}.yaml"
        path.write_text(_config_text(sim, state, case.concurrency))
        for label in ("cold", "steady"):
            sim.call("reset")
            ours = _measure(
                [sys.executable, "-m", "invoice_watch", "run", "--once", "-c", str(path)]
            )
            records, _ = sim.call("requests")
            replay = [
                (p, [(k, v) for k, vs in q.items() for v in vs])
                for p, q, _org, status, _c, _s in records
                if status == 200
            ]
            requests = tmp / "requests.json"
            requests.write_text(json.dumps(replay))
            listing = [
                sim.base_url,
                sim.public_key,
                sim.private_key,
                str(case.concurrency),
                str(requests),
                ACCEPT,
            ]
            bare = _measure([sys.executable, "-c", BARE_CLIENT, *listing])
            # (cold: the state file did not exist before `run --once` made it)
            held = str(state) if label == "steady" else ""
            start = _measure([sys.executable, "-c", START, str(path), held, *listing])
            out.append(ProcessFigures(label, *ours, *bare, start_cpu=start[1]))
    return out


# ---- the daemon itself ---------------------------------------------------------------

DAEMON_RUNS = (("fresh", 4), ("restarted", 2))  # (state file, cycles to wait for)


def daemon_peak_rss(sim: SimulatorProcess, tmp: Path, case: Case) -> dict[str, float]:
    """Peak RSS (MB) of the product itself, ``python -m invoice_watch run``, a process of
    its own (nothing of this harness in it), polling every second: on a fresh state file
    for 4 cycles (cold, then steady ones, delivering the cold cycle's messages to the
    console), then restarted on that file for 2 more. VmHWM is read from /proc until the
    process exits (SIGTERM after the last cycle)."""
    import signal

    import yaml

    config = yaml.safe_load(_config_text(sim, tmp / "daemon.db", case.concurrency))
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


# ---- the peer ------------------------------------------------------------------------


def peer_cycle(sim: SimulatorProcess, db: Path, threads: int = PEER_THREADS) -> float:
    """One cycle as a user would write it: ``requests`` with HTTPDigestAuth, a pool of
    ``threads`` threads (one session each), one organization per task, its pages one
    after another, every invoice rewritten into SQLite. Returns its wall time."""
    import requests
    from requests.auth import HTTPDigestAuth

    local = threading.local()
    sessions: list[requests.Session] = []

    def session() -> requests.Session:
        found: requests.Session | None = getattr(local, "session", None)
        if found is None:
            found = local.session = requests.Session()
            found.auth = HTTPDigestAuth(sim.public_key, sim.private_key)
            found.headers["Accept"] = ACCEPT
            sessions.append(found)
        return found

    def list_org(org_id: str) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        page = 1
        while True:
            response = session().get(
                f"{sim.base_url}/api/atlas/v2/orgs/{org_id}/invoices",
                params={"itemsPerPage": ITEMS_PER_PAGE, "pageNum": page},
                timeout=30,
            )
            response.raise_for_status()
            results = response.json()["results"]
            rows.extend(
                (
                    i["id"],
                    i["orgId"],
                    i["statusName"],
                    i["startDate"],
                    i["endDate"],
                    i["amountBilledCents"],
                )
                for i in results
            )
            if len(results) < ITEMS_PER_PAGE:
                return rows
            page += 1

    started = time.perf_counter()
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS invoices (id TEXT PRIMARY KEY, org_id TEXT, status TEXT, "
        "start_date TEXT, end_date TEXT, amount_billed_cents INTEGER)"
    )
    with ThreadPoolExecutor(threads) as pool:
        for rows in pool.map(list_org, sim.org_ids):
            conn.executemany("INSERT OR REPLACE INTO invoices VALUES (?,?,?,?,?,?)", rows)
            conn.commit()
    conn.close()
    wall = time.perf_counter() - started
    for each in sessions:
        each.close()
    return wall


# ---- report --------------------------------------------------------------------------


def _spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """min / median / max."""
    if not values:
        return "-"
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


COLUMNS = (
    "cycle",
    "pairs",
    "invoices",
    "wall s",
    "floor s",
    "replay/floor",
    "cycle/max(floor,replay)",
    "requests/pages (401s)",
    "CPU s/100k whole cycle",
    "CPU s/100k replay",
    "CPU s/100k parse+diff+rules+commit",
    "listed bytes / full listing's",
)


def report_lines(figures: CaseFigures) -> list[str]:
    """The case's figures, min/median/max over its pairs."""
    case = figures.case
    load = ", ".join(f"{x:.1f}" for x in figures.load)
    lines = [
        f"### {case.name}: {case.orgs:,} organizations x {case.invoices_per_org:,} invoices, "
        f"{case.latency * 1000:.0f} ms round trip, concurrency {case.concurrency} "
        f"(load average at its end {load})",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    full = [c.listed_bytes for c in figures.cycles if c.label == "full"]
    for label in (*CYCLES, "restart"):
        cs = [c for c in figures.cycles if c.label == label]
        if not cs:
            continue
        requests = [c.requests / c.pages for c in cs]
        share = [c.listed_bytes / f for c, f in zip(cs, full, strict=False) if f]
        cells = [
            label,
            str(len(cs)),
            f"{cs[0].invoices:,}",
            _spread([c.wall for c in cs], ".3f"),
            f"{_median([c.floor for c in cs]):.3f}",
            _spread([c.replay_wall / c.floor for c in cs]),
            _spread([c.ratio for c in cs]),
            f"{_spread(requests, '.3f')} ({max(c.challenges for c in cs)})",
            _spread([c.per_100k(c.cpu_cycle) for c in cs]),
            _spread([c.per_100k(c.replay_cpu) for c in cs]),
            _spread([c.per_100k(c.cpu_work) for c in cs]),
            _spread(share, ".1%"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label in ("cold", "steady"):
        ps = [p for p in figures.once if p.label == label]
        if not ps:
            continue
        lines.append(
            f"- `run --once` {label} ({len(ps)} pairs, min/median/max): wall "
            f"{_spread([p.wall for p in ps])} s, CPU {_spread([p.cpu for p in ps])} s, "
            f"peak RSS {_spread([p.rss_mb for p in ps], '.0f')} MB; the bare client: wall "
            f"{_spread([p.bare_wall for p in ps])} s, CPU {_spread([p.bare_cpu for p in ps])}"
            f" s, peak RSS {_spread([p.bare_rss_mb for p in ps], '.0f')} MB; CPU ratio "
            f"**{_spread([p.cpu / p.bare_cpu for p in ps])}**, wall ratio "
            f"{_spread([p.wall / p.bare_wall for p in ps])}"
        )
        lines.append(
            f"  - the bare client after a start's config{' and state rows' * (label == 'steady')}"
            f" (`START`): CPU {_spread([p.start_cpu for p in ps])} s, "
            f"{_spread([p.start_cpu / p.bare_cpu for p in ps])}x the bare client's"
        )
    if figures.daemon_rss:
        lines.append(
            "- the daemon's peak RSS (`python -m invoice_watch run`): "
            + ", ".join(
                f"{label} ({cycles} cycles) {figures.daemon_rss[label]:.0f} MB"
                for label, cycles in DAEMON_RUNS
            )
        )
    steady = [c.wall for c in figures.cycles if c.label == "steady"]
    if figures.peer_wall is not None and steady:
        lines.append(
            f"- the peer (`requests` + HTTPDigestAuth, {PEER_THREADS} threads, full "
            f"listings): {figures.peer_wall:.3f} s = **{figures.peer_wall / _median(steady):.2f}x**"
            " our steady cycle (median)"
        )
    return lines


def target_lines(figures: CaseFigures) -> list[str]:
    """The targets of issue 16, measured (min/median/max), met or not (on the median)."""
    cs = figures.cycles

    def of(label: str, value: Callable[[CycleFigures], float]) -> list[float]:
        return [value(c) for c in cs if c.label == label]

    full = of("full", lambda c: c.listed_bytes)
    steady_bytes = of("steady", lambda c: c.listed_bytes)
    once = {
        label: [p.cpu / p.bare_cpu for p in figures.once if p.label == label]
        for label in ("cold", "steady")
    }
    rows: list[tuple[str, list[float], float, str]] = [
        ("cold cycle / max(floor, replay)", of("cold", lambda c: c.ratio), TARGETS["cold"], ".2f"),
        (
            "steady cycle / max(floor, replay)",
            of("steady", lambda c: c.ratio),
            TARGETS["steady"],
            ".2f",
        ),
        (
            "whole steady cycle CPU s/100k",
            of("steady", lambda c: c.per_100k(c.cpu_cycle)),
            TARGETS["steady_cpu"],
            ".2f",
        ),
        (
            "requests/pages (every cycle)",
            [c.requests / c.pages for c in cs],
            TARGETS["requests"],
            ".3f",
        ),
        (
            "incremental listing / full listing (bytes)",
            [s / f for s, f in zip(steady_bytes, full, strict=False) if f],
            TARGETS["incremental"],
            ".3f",
        ),
        ("`run --once` CPU / bare client's, steady", once["steady"], TARGETS["once_steady"], ".2f"),
        ("`run --once` CPU / bare client's, cold", once["cold"], TARGETS["once_cold"], ".2f"),
    ]
    if figures.daemon_rss:
        rows.append(
            (
                "daemon peak RSS MB, fresh state (this case; the target is at 100k: `large`)",
                [figures.daemon_rss["fresh"]],
                TARGETS["rss"],
                ".0f",
            )
        )
    lines = [f"Targets ({figures.case.name}; met = median within the target):", ""]
    lines += ["| target | limit | min/median/max | met |", "|---|---|---|---|"]
    for name, values, limit, fmt in rows:
        if name.startswith("requests"):
            met = max(values) <= limit if values else False  # every cycle, not the median
        else:
            met = _median(values) <= limit
        lines.append(
            f"| {name} | {limit:{fmt}} | {_spread(values, fmt)} | {'yes' if met else '**no**'} |"
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
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), load average {load}, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cycle",
        description="Benchmark the poll cycle against what the machine allows "
        "(see benchmarks/README.md).",
    )
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"of {', '.join(CASES)}")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"requests in flight (atlas.max_concurrency), ours and the replay's "
        f"(default {CONCURRENCY}, the reference point's)",
    )
    parser.add_argument(
        "--pairs", type=int, default=PAIRS, help=f"pairs per cycle (default {PAIRS})"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the requests peer")
    parser.add_argument(
        "--no-processes",
        action="store_true",
        help="skip the whole processes (run --once, the bare client, the daemon)",
    )
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
    if args.concurrency < 1 or args.pairs < 1:
        parser.error("--concurrency and --pairs are at least 1")

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
        f"machine: {machine()}; latency {LATENCY * 1000:.0f} ms ({args.latency_model}); "
        f"state: {args.backend}\n",
        flush=True,
    )
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    for name in args.cases or list(CASES):
        case = dataclasses.replace(
            CASES[name],
            peer=CASES[name].peer and not args.no_peer,
            processes=CASES[name].processes and not args.no_processes,
            latency_model=args.latency_model,
            concurrency=args.concurrency,
            pairs=args.pairs,
            server=server,
        )
        results: multiprocessing.queues.Queue[Any] = context.Queue()
        process = context.Process(target=_case_main, args=(case, results, args.profile))
        process.start()
        figures: CaseFigures = results.get()
        process.join()
        for line in report_lines(figures):
            print(line, flush=True)
        if name == "reference":
            print()
            for line in target_lines(figures):
                print(line, flush=True)
        print()
    print(
        f"({time.perf_counter() - started:.0f} s; load average now "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
