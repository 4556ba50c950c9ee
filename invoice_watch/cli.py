"""The ``invoice-watch`` command line. The only module that touches signals, stdout
tables and exit codes: 0 success, 1 runtime failure, 2 usage or configuration error."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from invoice_watch import __version__
from invoice_watch import format as fmt
from invoice_watch.errors import ConfigError, InvoiceWatchError, UsageError

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "info", style: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoice-watch",
        description="Billing watchdog for MongoDB Atlas organizations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="config file (default: $INVOICE_WATCH_CONFIG, ./config.yaml, "
            "/etc/invoice-watch/config.yaml)",
        )
        return p

    run = with_config(commands.add_parser("run", help="run the daemon"))
    run.add_argument("--once", action="store_true", help="run one cycle, deliver, exit")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="with --once: print what would be sent, write nothing",
    )
    run.add_argument(
        "--baseline",
        action="store_true",
        help="with --once: record the snapshot, mark current alerts notified, send nothing",
    )
    with_config(commands.add_parser("check-config", help="validate the config and summarize it"))
    notify = with_config(commands.add_parser("test-notify", help="send a test message"))
    notify.add_argument("notifier", nargs="?", help="one notifier (default: all)")
    status = with_config(commands.add_parser("status", help="show polls, alerts and the outbox"))
    status.add_argument(
        "--check", action="store_true", help="exit 1 unless the daemon is healthy (for HEALTHCHECK)"
    )
    invoices = with_config(commands.add_parser("invoices", help="the snapshot as a table"))
    invoices.add_argument("--org", help="only this organization (its id or configured name)")
    invoices.add_argument("--status", help="only invoices in this status (e.g. FAILED)")
    history = with_config(commands.add_parser("history", help="notifications sent, newest first"))
    history.add_argument("--limit", type=int, default=50)
    simulate = commands.add_parser("simulate", help="serve the built-in Atlas simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8080)
    simulate.add_argument("--scenario", metavar="FILE", help="scenario YAML (default: the demo)")
    commands.add_parser("demo", help="see alerts fire and resolve (no credentials needed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run" and (args.dry_run or args.baseline) and not args.once:
        parser.error("--dry-run and --baseline go with --once")
    if args.command == "run" and args.dry_run and args.baseline:
        parser.error("--dry-run and --baseline exclude each other")
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "demo":
            from invoice_watch.demo import run_demo

            return asyncio.run(run_demo())
        return _with_config(args)
    except KeyboardInterrupt:
        return 0


def _with_config(args: argparse.Namespace) -> int:
    from invoice_watch.config import Config, find_config_file, load_file, summary

    try:
        config: Config = load_file(find_config_file(args.config, os.environ))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"invoice-watch: {len(exc.problems)} configuration problem(s)", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    if args.command == "check-config":
        for warning in config.warnings:  # valid, almost surely wrong: not a failure
            print(warning, file=sys.stderr)
        print(summary(config))
        print("configuration OK")
        return 0
    if args.command == "run":
        for warning in config.warnings:
            log.warning("%s", warning)
    try:
        if args.command == "run":
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
    except UsageError as exc:  # an unknown organization or status
        print(f"invoice-watch {args.command}: {exc}", file=sys.stderr)
        return 2
    except InvoiceWatchError as exc:  # a state file in use, unreadable, ...
        print(f"invoice-watch: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


async def _run(config: object, args: argparse.Namespace) -> int:
    from invoice_watch.app import App
    from invoice_watch.config import Config, LogConfig

    assert isinstance(config, Config)

    def configure_logging(settings: LogConfig) -> None:
        setup_logging(settings.level, settings.format)

    async with App(config, dry_run=args.dry_run, configure_logging=configure_logging) as app:
        if args.once:
            return await app.run_once(baseline=args.baseline)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = {
            signal.SIGTERM: stop.set,
            signal.SIGINT: stop.set,
            signal.SIGHUP: app.request_reload,
        }
        for sig, handler in signals.items():
            loop.add_signal_handler(sig, handler)
        try:
            await app.serve(stop)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
    return 0


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


def _simulate(args: argparse.Namespace) -> int:
    from invoice_watch.simulator import serve

    setup_logging("info")
    try:
        asyncio.run(serve(args.scenario, args.host, args.port))
    except OSError as exc:
        print(f"invoice-watch simulate: {exc}", file=sys.stderr)
        return 1
    except (InvoiceWatchError, ValueError) as exc:  # a bad scenario file
        print(f"invoice-watch simulate: {exc}", file=sys.stderr)
        return 2
    return 0
