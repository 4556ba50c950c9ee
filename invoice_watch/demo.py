"""``invoice-watch demo``: the whole product in under a minute, no credentials needed;
and the config that ``invoice-watch simulate --write-config`` writes.

The demo starts the built-in Atlas simulator on a free loopback port, runs the real
daemon against it (Digest auth, a 2 s poll interval, a throw-away state file) with the
console notifier (and Slack too when ``SLACK_WEBHOOK_URL`` is set), plays the demo
scenario so a charge FAILS and is paid, and a pending invoice crosses $5,000 and drops
back, while a ``usage_anomaly`` rule points at the cluster whose daily spend spiked
yesterday (it stays firing: yesterday stays the latest day of usage), then shows a
spend report and exits 0 by itself (1, saying why, when it could show no alert). A
reader that closes its output (``| head``) ends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import select
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.errors import UsageError
from invoice_watch.files import FileTooLarge, NotARegularFile, read_regular
from invoice_watch.notify import ConsoleNotifier, build_notifiers
from invoice_watch.simulator import Simulator, demo_scenario

TIME_LIMIT = 55.0
INTERVAL = "2s"
# `simulate --write-config`: a poll interval short enough to watch the timeline play.
SIMULATOR_INTERVAL = "5s"
# The usage_anomaly rule: the demo scenario's `orders` cluster spent 5 times its usual
# yesterday, so it fires at the second poll (the first reads the line items) and stays.
SPIKE_RULE = "usage-spike"
# The end of that config: /metrics, off unless uncommented (the port may be taken).
METRICS_HINT = """\
# /metrics with the billing gauges (pending amount, month to date per organization and
# project, forecast): uncomment, then `curl -s http://127.0.0.1:8934/metrics | grep _usd`
# http:
#   listen: 127.0.0.1:8934
"""
# The first line of a config `simulate --write-config` wrote: only such a file is
# overwritten, and its keys are kept (so that a config keeps working across restarts).
WRITTEN_BY = "# Written by `invoice-watch simulate --write-config`"


def simulator_config_data(
    sim: Simulator, *, state_path: str, interval: str, notifiers: dict[str, Any]
) -> dict[str, Any]:
    """A configuration watching every organization of ``sim`` with its API key: a FAILED
    charge, a pending invoice over $5,000 and a cluster's day of unusual spend (over its
    usual by $100 or more) alert through ``notifiers``."""
    org_names = {org.id: org.name for org in sim.scenario.orgs}
    return {
        "atlas": {
            "base_url": sim.base_url,
            "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            "retries": 2,
        },
        "organizations": [{"id": i, "name": org_names.get(i, i)} for i in sim.org_ids],
        "poll": {"interval": interval},
        "state": {"path": state_path},
        "notifiers": notifiers,
        "rules": [
            {
                "name": "failed-charge",
                "type": "invoice_status",
                "statuses": ["FAILED"],
                "severity": "critical",
                "notify": list(notifiers),
            },
            {
                "name": "pending-over-budget",
                "type": "pending_amount",
                "threshold": 5000,
                "notify": list(notifiers),
            },
            {
                "name": SPIKE_RULE,
                "type": "usage_anomaly",
                "by": "cluster",
                "min_increase": 100,
                "notify": list(notifiers),
            },
        ],
    }


def demo_config(sim: Simulator, state_dir: Path, slack_webhook: str | None) -> Config:
    notifiers: dict[str, Any] = {"console": {"type": "console"}}
    if slack_webhook:
        notifiers["slack"] = {"type": "slack", "webhook_url": slack_webhook}
    data = simulator_config_data(
        sim, state_path=str(state_dir / "demo.db"), interval=INTERVAL, notifiers=notifiers
    )
    data["log"] = {"level": "warning"}
    # A weekly report: not due within the demo (it waits for its first Monday), but the
    # daemon reads the daily line items of the organizations it covers, which the
    # report shown at the end (demo_report) draws.
    data["reports"] = [{"name": "weekly-spend", "schedule": "mon 09:00", "notify": ["console"]}]
    return load(yaml.safe_dump(data), filename="<demo>", env={}, base_dir=state_dir)


# A config `simulate --write-config` wrote is about 1 KiB; a larger file is not one.
_WRITTEN_MAX_BYTES = 64 * 1024


def written_keys(path: Path) -> dict[str, str]:
    """The API key pair of a config ``simulate --write-config`` wrote before (none when
    there is no file). A file that ``simulate`` did not write is never overwritten, nor
    anything but a regular file (a folder, ``/dev/stdout``...): :class:`UsageError`
    (OSError when it cannot be read). Reads at most 64 KiB, and never waits on a FIFO."""
    try:
        raw = read_regular(path, _WRITTEN_MAX_BYTES)
    except FileNotFoundError:
        return {}
    except NotARegularFile as exc:
        fix = (
            f"name a file in it, e.g. {path / 'sim.yaml'}"
            if exc.kind == "a folder"
            else ("name a regular file")
        )
        raise UsageError(f"--write-config {path}: it is {exc.kind}, not a file; {fix}") from exc
    except FileTooLarge:
        raw = b""  # not one simulate wrote
    except OSError as exc:
        exc.filename = str(path)
        raise
    text = raw.decode("utf-8", errors="replace")
    if not text.startswith(WRITTEN_BY):
        raise UsageError(
            f"--write-config {path}: the file exists and was not written by `invoice-watch "
            "simulate`; it is left as it is: name another file"
        )
    with contextlib.suppress(yaml.YAMLError, AttributeError, TypeError):
        auth = yaml.safe_load(text)["atlas"]["auth"]
        keys = {"public_key": auth["public_key"], "private_key": auth["private_key"]}
        if all(isinstance(value, str) and value for value in keys.values()):
            return keys
    return {}


def write_simulator_config(sim: Simulator, path: Path) -> None:
    """Write a ready config for ``sim`` to ``path`` (mode 0600, replaced atomically):
    the console notifier, the simulator's key pair and organizations, a state file of
    its own beside it, a 5 s poll interval, the rules of :func:`simulator_config_data`
    (a usage_anomaly one included), and ``http:`` for /metrics commented out. An
    OSError names ``path`` (not the temporary file beside it that is renamed onto
    it)."""
    data = simulator_config_data(
        sim,
        state_path=f"{path.stem}.state.db",
        interval=SIMULATOR_INTERVAL,
        notifiers={"console": {"type": "console"}},
    )
    text = (
        f"{WRITTEN_BY} for the simulator at {sim.base_url}.\n"
        f"# Run it: invoice-watch run -c {path}\n"
        "# Its keys are kept when simulate writes this file again; edit a copy.\n"
        f"# Spend insight: the {SPIKE_RULE} rule fires at the second poll (a cluster's day of\n"
        f"# unusual spend); `invoice-watch report -c {path}` prints a spend report.\n"
        + yaml.safe_dump(data, sort_keys=False)
        + METRICS_HINT
    )
    folder = path.absolute().parent
    temporary: str | None = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise


class _Watched(io.TextIOBase):
    """The demo's output: a write that fails (the reader went away) is remembered and
    dropped, and the demo ends at its next tick with it (:func:`run_demo`)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.failed: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                self.stream.write(text)
            except OSError as exc:
                self.failed = exc
        return len(text)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self.stream.flush()
            except OSError as exc:
                self.failed = exc

    def reader_gone(self) -> bool:
        """Whether the output is a pipe whose reader went away (``| head`` exited): the
        next write would fail. Asked every tick, so the demo ends without waiting for
        its next line."""
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            fd = self.stream.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                poller = select.poll()
                poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
                return any(event & select.POLLERR for _, event in poller.poll(0))
        return False


REPORT_FILE = "invoice-watch-demo-report.html"


async def demo_report(app: App) -> tuple[str, str]:
    """The spend report of the demo's organizations as the daemon left them: its text,
    and where its HTML (the chart embedded) was written (a new private file in the
    system's temporary folder, kept for the user to open), or why it was not."""
    from invoice_watch.report.chart import cache_dir
    from invoice_watch.report.now import standalone_html
    from invoice_watch.report.outbox import make_message
    from invoice_watch.report.render import Renderer
    from invoice_watch.report.scheduler import SCOPE_ALL, report_data

    config, now = app.config, app.clock.now()
    data = await report_data(config, app.store, app.reporter_usage(), config.organizations, now)
    chart = await Renderer().draw(data, cache_dir(config.state.path))
    msg = make_message(data, chart, report="demo", scope=SCOPE_ALL, due=now)
    # A fresh private file (0600, O_EXCL: never a file or symlink someone else put at a
    # fixed name in the shared temporary folder), kept for the user to open.
    prefix, suffix = REPORT_FILE.removesuffix(".html") + "-", ".html"
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(standalone_html(msg))
    except OSError as exc:
        where = Path(tempfile.gettempdir())
        return msg.text, f"its HTML not written in {where}: {exc.strerror or exc}"
    return msg.text, f"the HTML with its chart: {name}"


async def run_demo(out: TextIO | None = None, time_limit: float = TIME_LIMIT) -> int:
    """Run the demo; returns its exit status. Raises the OSError of a failed write to
    ``out`` (stdout by default) as soon as it happens: the demo has no one to show to.
    A bad ``$SLACK_WEBHOOK_URL`` is a ConfigError."""
    watched = _Watched(out or sys.stdout)
    logging.getLogger().setLevel(logging.WARNING)
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[demo {time.monotonic() - began:4.0f}s] {text}", file=watched, flush=True)
        if watched.failed is not None:
            raise watched.failed

    scenario = demo_scenario()
    last_step = max((step.at for step in scenario.timeline), default=0.0)
    with tempfile.TemporaryDirectory(prefix="invoice-watch-demo-") as folder:
        async with Simulator(scenario) as sim:
            config = demo_config(sim, Path(folder), os.environ.get("SLACK_WEBHOOK_URL"))
            notifiers = build_notifiers(config.notifiers)
            notifiers["console"] = ConsoleNotifier("console", stream=cast(TextIO, watched))
            say(f"Atlas simulator serving {len(sim.org_ids)} organizations at {sim.base_url}")
            say(
                "watching them every 2 s: a FAILED charge and a pending invoice over "
                "$5,000 raise alerts; they resolve when paid / back under budget. A "
                "cluster whose daily spend spiked yesterday raises one too"
            )
            try:
                async with App(config, notifiers=notifiers) as app:
                    stop = asyncio.Event()
                    daemon = asyncio.create_task(app.serve(stop))
                    timeline = asyncio.create_task(sim.run_timeline())
                    try:
                        while time.monotonic() - began < time_limit:
                            await asyncio.sleep(0.5)
                            if watched.failed is None and watched.reader_gone():
                                watched.failed = BrokenPipeError(
                                    errno.EPIPE, os.strerror(errno.EPIPE)
                                )
                            if watched.failed is not None:
                                raise watched.failed
                            elapsed = time.monotonic() - began
                            # The spike stays the latest day of usage: its alert
                            # fires on; the others resolve.
                            settled = (
                                timeline.done()
                                and elapsed > last_step + 4
                                and all(
                                    alert.rule == SPIKE_RULE
                                    for alert in app.store.alerts.firing().values()
                                )
                                and not (await app.store.outbox.counts()).get("pending")
                            )
                            if settled:
                                break
                    finally:
                        stop.set()
                        await daemon
                        timeline.cancel()
                        await asyncio.gather(timeline, return_exceptions=True)
                    totals = app.deliverer.totals
                    firing = len(app.store.alerts.firing())
                    report = await demo_report(app)
                    last = app.cycles.last
                    unread = (
                        [f"{config.org_name(o)}: {last.reads[o].error}" for o in last.orgs_failed]
                        if last is not None
                        else ["no cycle ended"]
                    )
            finally:
                for notifier in notifiers.values():
                    await notifier.aclose()
    if totals.sent == 0:  # the demo is its alerts: one that showed none failed
        if unread:
            say(
                f"done: the demo showed no alert: {len(unread)} organization(s) of the "
                f"simulator could not be read ({unread[0]})"
            )
        else:
            say("done: the demo showed no alert, although its scenario fires some")
        return 1
    say(
        f"done: {totals.sent} notification(s) sent, {totals.failed} failed, "
        f"{firing} alert(s) still firing"
    )
    text, where = report
    say(f"a spend report, as `invoice-watch report` makes one ({where}):")
    for line in text.rstrip("\n").split("\n"):
        print(f"    {line}".rstrip(), file=watched, flush=True)
    if watched.failed is not None:
        raise watched.failed
    say("next: copy config.example.yaml, add your API key, and run `invoice-watch run --once`")
    return 0 if totals.failed == 0 else 1
