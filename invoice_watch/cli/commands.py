"""The commands: each runs, prints its result and returns its exit status (0 success,
1 a runtime failure, 2 a usage or configuration error), every error an operator can
cause one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from invoice_watch import format as fmt
from invoice_watch import hangup
from invoice_watch.cli.logs import setup_logging
from invoice_watch.cli.streams import OutputError, print_error
from invoice_watch.errors import ConfigError, InvoiceWatchError, UsageError

if TYPE_CHECKING:  # (imported when used: a command starts without the daemon's modules)
    from invoice_watch.app import App
    from invoice_watch.config import Config
    from invoice_watch.daemon import OnceOutcome

log = logging.getLogger(__name__)


def with_config(args: argparse.Namespace) -> int:
    from invoice_watch.config import find_config_file, load_file, summary

    # Read-only commands need no secret: an operator who may read the state file but
    # not the secrets (LoadCredentialEncrypted=, a missing *_file) can still look.
    secrets = args.command not in ("status", "history", "invoices") and not (
        args.command == "report" and args.send is None
    )
    try:
        config: Config = load_file(find_config_file(args.config, os.environ), secrets=secrets)
    except ConfigError as exc:
        for problem in exc.problems:
            print_error(str(problem))
        print_error(f"invoice-watch: {len(exc.problems)} configuration problem(s)")
        return 2
    setup_logging(config.log.level, config.log.format)
    if args.command == "check-config":
        from invoice_watch.ops import refuse_second_state

        for warning in config.warnings:  # valid, almost surely wrong: not a failure
            print(warning, file=sys.stderr)
        if second := refuse_second_state(config):  # `run` would refuse: say it now
            print(f"warning: {second}", file=sys.stderr)
        print(summary(config))
        print("configuration OK")
        return 0
    if args.command == "run":
        for warning in config.warnings:
            log.warning("%s", warning)
    try:
        if args.command == "run":
            from invoice_watch.ops import refuse_second_state

            if second := refuse_second_state(config):
                print_error(f"invoice-watch: {second}")
                return 2
            return asyncio.run(_run(config, args))
        if args.command == "test-notify":
            return asyncio.run(_test_notify(config, args.notifier))
        from invoice_watch import ops

        if args.command == "status":
            return asyncio.run(ops.status(config, check=args.check))
        if args.command == "invoices":
            return asyncio.run(ops.invoices(config, org=args.org, status=args.status))
        if args.command == "history":
            return asyncio.run(ops.history(config, limit=args.limit))
        if args.command == "silence":
            return asyncio.run(_silence(config, args))
        if args.command == "report":
            return asyncio.run(_report(config, args))
        if args.command == "state":
            return asyncio.run(_state_copy(config, args.to))
    except UsageError as exc:  # an unknown organization or status
        print_error(f"invoice-watch {args.command}: {exc}")
        return 2
    except InvoiceWatchError as exc:  # a state file in use, unreadable, ...
        print_error(f"invoice-watch: {exc}")
        return 1
    raise AssertionError(args.command)


async def _report(config: Config, args: argparse.Namespace) -> int:
    """``report [--org ID] [--out FILE] [--send NOTIFIER]``: :mod:`invoice_watch.report.now`."""
    from pathlib import Path

    from invoice_watch.report.now import make_report

    if args.out is not None and args.send is not None:
        raise UsageError("--out and --send exclude each other: make one, then the other")
    out = Path(args.out) if args.out is not None else None
    return await make_report(config, org=args.org, out=out, send=args.send)


async def _state_copy(config: object, to: str | None) -> int:
    """``state copy [--to URL]``: the state file into PostgreSQL
    (:mod:`invoice_watch.store.postgres.copy`)."""
    from invoice_watch.config import Config
    from invoice_watch.store import StateUrl, location
    from invoice_watch.store.postgres.copy import copy_state

    assert isinstance(config, Config)
    if to is not None:
        target = StateUrl(to)
        if target.secrets():  # (the URL on a command line: `ps` shows it to every user)
            print(
                "warning: --to has a password in it, which `ps` shows to every user of "
                "this host while the copy runs; give it in PGPASSWORD (or set state.url "
                "with state.password_file in the config and leave --to out)",
                file=sys.stderr,
            )
    elif isinstance(where := location(config.state), StateUrl):
        target = where
    else:
        raise UsageError("--to postgresql://... is needed (the config has no state.url)")
    if not target.display.startswith(("postgresql://", "postgres://")):
        raise UsageError(f"--to {target.display}: not a postgresql:// URL")
    counts = await copy_state(config.state.path, target)
    rows = ", ".join(f"{n} {table}" for table, n in counts.items())
    print(f"copied {config.state.path} into {target.display}: {rows}")
    print("now set state.url to it in the config and start the replicas")
    return 0


async def _silence(config: object, args: argparse.Namespace) -> int:
    """``silence add|list|expire`` (:mod:`invoice_watch.silence_cmd`)."""
    from invoice_watch import silence_cmd
    from invoice_watch.config import Config

    assert isinstance(config, Config)
    if args.verb == "add":
        return await silence_cmd.add(
            config,
            rule=args.rule,
            org=args.org,
            invoice=args.invoice,
            duration=args.duration,
            until=args.until,
            comment=args.comment,
        )
    if args.verb == "list":
        return await silence_cmd.listing(config, expired=args.expired)
    return await silence_cmd.expire(config, args.id)


async def _run(config: object, args: argparse.Namespace) -> int:
    """``run``: the daemon, or one cycle (``--once``). Its signal handlers are in place
    before anything is opened: SIGTERM or Ctrl-C while it starts stops it as it would a
    moment later (exit 0), and a SIGHUP then (kept from the first instant:
    :mod:`invoice_watch.hangup`) is a reload once the daemon runs. Under
    ``--once``, SIGTERM, Ctrl-C and SIGHUP (the terminal closed) end the run as the
    daemon's stop does (:func:`run_once`)."""
    from invoice_watch.app import App
    from invoice_watch.config import Config, LogConfig

    assert isinstance(config, Config)
    if not args.once:
        from invoice_watch.allocator import one_arena

        one_arena()  # before any thread: the daemon's peak memory (allocator.py)

    def configure_logging(settings: LogConfig) -> None:
        setup_logging(settings.level, settings.format)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    running: list[App] = []  # the daemon, once it is up
    reload_asked = False

    def hang_up() -> None:
        nonlocal reload_asked
        if args.once:
            stop.set()
        elif running:
            running[0].request_reload()
        else:
            reload_asked = True

    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: hang_up}
    before = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    if hangup.take():  # one came while the command started (kept by __main__)
        hang_up()
    try:
        async with App(config, dry_run=args.dry_run, configure_logging=configure_logging) as app:
            started(collect=not args.once)
            if args.once:
                return await run_once(app, baseline=args.baseline, stop=stop)
            running.append(app)
            if reload_asked:
                app.request_reload()
            await app.serve(stop)
    finally:
        for sig, previous in before.items():
            loop.remove_signal_handler(sig)
            if previous is not None:  # (None: not set from Python)
                signal.signal(sig, previous)
    return 0


def started(*, collect: bool) -> None:
    """The start is over (imports, config, the App open): the cyclic garbage collector,
    disabled meanwhile by ``python -m invoice_watch`` (:mod:`invoice_watch.__main__`),
    runs again, and what the start made is frozen (``gc.freeze``: never traversed
    again, nor collected), its garbage collected first when ``collect`` (the daemon:
    0.04 s of CPU, not to keep about 0.5 MB; ``run --once`` ends soon). Nothing
    when the collector runs already (the CLI called in a process of its own, a test)."""
    if gc.isenabled():
        return
    if collect:
        gc.collect()
    gc.freeze()
    gc.enable()


async def run_once(
    app: App,
    *,
    baseline: bool = False,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``run --once`` on an open App (:func:`invoice_watch.daemon.run_once`), said on
    ``out`` (a dry run's messages) and ``err`` (what went wrong); returns the exit
    status: 1 when an organization could not be read or a message is still waiting in
    the outbox (or failed for good, or its outcome could not be recorded)."""
    outcome = await app.run_once(baseline=baseline, stop=stop)
    return once_status(outcome, app.config, out=out, err=err)


def once_status(
    outcome: OnceOutcome, config: Config, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Say what a ``run --once`` did (:class:`~invoice_watch.daemon.OnceOutcome`) and
    return its exit status (see :func:`run_once`)."""
    out, err = out or sys.stdout, err or sys.stderr
    if outcome.standby is not None:
        print(
            f"error: this run is a {outcome.standby}: another invoice-watch replica holds "
            "the lease of the state database; `run --once` runs nothing while a daemon leads",
            file=err,
        )
        return 1
    status = 0
    result = outcome.result
    if outcome.dry_run and result is not None:
        from invoice_watch.notify.render.plain import text

        if not result.messages:
            print("dry run: nothing would be sent.", file=out)
        for notifier, events, part in result.messages:
            print(f"--- dry run: would send to {notifier} ---", file=out)
            print(text(events, part), file=out)
        print("dry run: nothing was sent and nothing was written.", file=out)
    for org_id, read in (result.reads if result is not None else {}).items():
        if not read.ok:
            print(f"error: {config.org_name(org_id)}: {read.error}", file=err)
            status = 1
    if outcome.dry_run:
        return status
    if outcome.failed:
        print(
            f"error: {outcome.failed} notification(s) failed for good (see `invoice-watch status`)",
            file=err,
        )
        status = 1
    if outcome.pending:
        why = (
            "stopped before they could be delivered"
            if outcome.stopped
            else "could not be delivered yet"
        )
        print(
            f"error: {outcome.pending} notification(s) {why}; they stay in the outbox for "
            "the next run (see `invoice-watch status`)",
            file=err,
        )
        status = 1
    if outcome.unrecorded:
        print(
            f"error: the state file {config.state.path} could not record the outcome of "
            f"{outcome.unrecorded} notification(s) (is its disk full?): those sent may be "
            "sent again by the next run",
            file=err,
        )
        status = 1
    return status


async def _test_notify(config: object, only: str | None) -> int:
    from invoice_watch.config import Config
    from invoice_watch.errors import NotifyError
    from invoice_watch.notify import build_notifiers
    from invoice_watch.types import AlertEvent, EventKind, Severity

    assert isinstance(config, Config)
    if only is not None and only not in config.notifiers:
        known = ", ".join(sorted(config.notifiers))
        print(f"invoice-watch: no notifier named {only!r} (configured: {known})", file=sys.stderr)
        return 2
    notifiers = build_notifiers(config.notifiers)
    org = config.organizations[0]
    now = datetime.now(UTC)
    event = AlertEvent(
        kind=EventKind.NOTICE,
        key=f"test-notify/{org.id}",
        rule="test-notify",
        rule_type="test",
        severity=Severity.INFO,
        org_id=org.id,
        org_name=org.display_name,
        billing_url=fmt.billing_url(config.atlas.ui_url, org.id),
        summary="This is a test message from invoice-watch: this notifier works.",
        at=now,
    )
    status = 0
    try:
        for name, notifier in notifiers.items():
            if only is not None and name != only:
                continue
            try:
                await notifier.send([event])
            except NotifyError as exc:
                print(f"{name}: FAILED: {exc}", file=sys.stderr)
                status = 1
            else:
                print(f"{name}: sent")
    finally:
        for notifier in notifiers.values():
            await notifier.aclose()
    return status


def simulate(args: argparse.Namespace) -> int:
    from invoice_watch.simulator import serve

    setup_logging("info")
    try:
        asyncio.run(serve(args.scenario, args.host, args.port, write_config=args.write_config))
    except OutputError:
        raise
    except UsageError as exc:  # --write-config names a file that is not ours
        print_error(f"invoice-watch simulate: {exc}")
        return 2
    except OSError as exc:
        print_error(f"invoice-watch simulate: {_simulate_problem(args.host, args.port, exc)}")
        return 1
    except (InvoiceWatchError, ValueError) as exc:  # a bad scenario file
        print_error(f"invoice-watch simulate: {exc}")
        return 2
    return 0


def _simulate_problem(host: str, port: int, exc: OSError) -> str:
    """Why ``simulate`` could not start (listen on host:port, write its config), and what
    to do."""
    if exc.filename:  # --write-config's file or folder
        return f"cannot write {exc.filename}: {exc.strerror}; check --write-config"
    where = f"cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use; choose another with --port (0 picks a free one)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: ports below 1024 need root; choose --port 1024 or above"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine; check --host"
    if isinstance(exc, socket.gaierror):
        return f"{where}: unknown host {host!r} ({exc.strerror}); check --host"
    return f"{where}: {exc.strerror or exc}"


def demo() -> int:
    from invoice_watch.demo import run_demo

    try:
        return asyncio.run(run_demo())
    except ConfigError as exc:  # $SLACK_WEBHOOK_URL is not a webhook URL
        for problem in exc.problems:
            print_error(f"invoice-watch demo: $SLACK_WEBHOOK_URL: {problem.message}")
        return 2
    except InvoiceWatchError as exc:
        print_error(f"invoice-watch demo: {exc}")
        return 1
    except OutputError:
        raise
    except OSError as exc:  # no temporary folder, no loopback port
        if exc.errno == errno.EPIPE:  # the demo saw its reader go (see demo._Watched)
            raise OutputError(exc.errno, exc.strerror) from exc
        print_error(f"invoice-watch demo: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return 1
