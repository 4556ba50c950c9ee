"""The ``invoice-watch`` command line. The only module that touches signals, stdout
tables and exit codes: 0 success, 1 runtime failure, 2 usage or configuration error."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from invoice_watch import __version__
from invoice_watch import format as fmt
from invoice_watch.constants import INVOICE_STATUSES
from invoice_watch.errors import ConfigError, InvoiceWatchError, UsageError
from invoice_watch.redact import redact

log = logging.getLogger(__name__)

MAX_HISTORY = 100_000  # `history --limit`: rows read into one table


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


EPILOG = """\
exit status: 0 success (Ctrl-C, SIGTERM, and a reader that closes the output early, as
`| head` does, too); 1 a runtime failure (an organization unreadable, a notification
still undelivered after --once, even one stopped by a signal, the state file unusable or
held by another daemon); 2 a usage or configuration error. `invoice-watch COMMAND -h`
explains a command."""


CONFIG_HELP = (
    "config file (default: $INVOICE_WATCH_CONFIG, ./config.yaml, /etc/invoice-watch/config.yaml)"
)


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoice-watch",
        description="Billing watchdog for MongoDB Atlas organizations: alerts on failed "
        "charges, pending invoices over budget, spend jumps and forecasts, via Slack, "
        "email or the console.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(  # before the command (`-c FILE status`); each takes it after too
        "-c", "--config", metavar="FILE", help=CONFIG_HELP
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: when not given here, the value given before the command stands
        p.add_argument(
            "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP
        )
        return p

    run = with_config(
        command(
            "run",
            "run the daemon",
            "Run the daemon: poll every poll.interval, send alerts, until SIGTERM or Ctrl-C. "
            "SIGHUP rereads the config. One daemon per state file.",
        )
    )
    run.add_argument(
        "--once", action="store_true", help="run one cycle, deliver (up to 60 s), exit"
    )
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
    with_config(
        command(
            "check-config",
            "validate the config and summarize it",
            "Validate the config file: every problem at once as FILE:LINE:COL: path: "
            "message (exit 2), else a summary with secrets masked.",
        )
    )
    notify = with_config(
        command(
            "test-notify",
            "send a test message",
            "Send a test message through every notifier, or the one named.",
        )
    )
    notify.add_argument(
        "notifier", nargs="?", metavar="NOTIFIER", help="a notifier's name (default: all)"
    )
    status = with_config(
        command(
            "status",
            "show polls, alerts and the outbox",
            "Show the daemon's health, the last read of each organization, the firing "
            "alerts and the notifications not delivered yet, from its state file.",
        )
    )
    status.add_argument(
        "--check",
        action="store_true",
        help="print one line and exit 1 unless the daemon is healthy (for HEALTHCHECK)",
    )
    invoices = with_config(
        command(
            "invoices",
            "the snapshot as a table",
            "List the invoices of the snapshot (as last read from Atlas), newest first.",
        )
    )
    invoices.add_argument(
        "--org", metavar="ORG", help="only this organization (its id or configured name)"
    )
    invoices.add_argument(
        "--status",
        metavar="STATUS",
        help=f"only invoices in this status, one of {', '.join(INVOICE_STATUSES)}",
    )
    history = with_config(
        command(
            "history",
            "notifications sent, newest first",
            "List the notifications sent, failed or waiting, newest first.",
        )
    )
    history.add_argument(
        "--limit",
        type=_bounded_int(1, MAX_HISTORY),
        default=50,
        metavar="N",
        help=f"show the N newest (default: 50, at most {MAX_HISTORY})",
    )
    silence = with_config(
        command(
            "silence",
            "pause an alert's notifications for a while",
            "Add, list or expire silences. A silenced alert is recorded (history shows "
            "it) and, if it still fires when the silence ends, notified then. The daemon "
            "needs no restart.",
        )
    )
    silence_verbs = silence.add_subparsers(
        dest="verb", metavar="VERB", required=True, help="add, list or expire"
    )
    silence_add = with_config(silence_verbs.add_parser("add", help="add a silence"))
    silence_add.add_argument("--rule", required=True, help="the rule whose alerts to silence")
    silence_add.add_argument("--org", metavar="ID", help="only this organization's")
    silence_add.add_argument("--invoice", metavar="ID", help="only this invoice's")
    lasting = silence_add.add_mutually_exclusive_group(required=True)
    lasting.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 4h, 2d")
    lasting.add_argument("--until", metavar="TIME", help="e.g. 2025-07-01T08:00+02:00")
    silence_add.add_argument("--comment", required=True, help="why (e.g. a ticket)")
    silence_list = with_config(silence_verbs.add_parser("list", help="list the silences"))
    silence_list.add_argument("--expired", action="store_true", help="ended ones too")
    silence_expire = with_config(silence_verbs.add_parser("expire", help="end a silence now"))
    silence_expire.add_argument("id", help="the silence's id (silence list shows it)")
    state = with_config(
        command(
            "state",
            "move the state into PostgreSQL",
            "state copy: copy the state file (state.path) into an empty PostgreSQL database, "
            "for replicas (README: High availability). Stop the daemon first; nothing is "
            "alerted again afterwards.",
        )
    )
    state_verbs = state.add_subparsers(dest="verb", metavar="VERB", required=True, help="copy")
    state_copy = with_config(
        state_verbs.add_parser("copy", help="copy the state file into PostgreSQL")
    )
    state_copy.add_argument(
        "--to",
        metavar="URL",
        help="postgresql://user@host/db (default: the config's state.url; a password in "
        "PGPASSWORD, not on the command line)",
    )
    simulate = command(
        "simulate",
        "serve the built-in Atlas simulator",
        "Serve the built-in Atlas simulator (Digest and OAuth, paging, 429s) until Ctrl-C, "
        "and print what a config needs to use it. Its timeline of changes starts with the "
        "first request.",
    )
    simulate.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    simulate.add_argument(
        "--port",
        type=_bounded_int(0, 65535),
        default=8080,
        help="TCP port to listen on (default: 8080; 0 picks a free one)",
    )
    simulate.add_argument(
        "--scenario",
        metavar="FILE",
        help="scenario YAML: organizations, invoices and a timeline (default: the demo's)",
    )
    simulate.add_argument(
        "--write-config",
        metavar="FILE",
        help="write a ready config for it to FILE (console notifier, its keys and "
        "organizations; the keys are kept when FILE is written again)",
    )
    command(
        "demo",
        "see alerts fire and resolve (no credentials needed)",
        "Run the simulator and the daemon together: alerts fire and resolve on the console "
        "in under a minute, then it exits.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status. No command ends in a traceback: every
    error an operator can cause is one line on stderr saying what to do, and a reader
    that stops reading (``| head``) ends the command quietly, exit 0 (unless the command
    had failed already: its status stands, as it does when stderr cannot show why)."""
    real_stdout, real_stderr = sys.stdout, sys.stderr
    for stream in (real_stdout, real_stderr):
        _tolerant(stream)
    sys.stdout = _Output(real_stdout)
    sys.stderr = _Diagnostics(real_stderr)
    status = 0
    try:
        status = _main(argv)
        sys.stdout.flush()  # a write error shows here, not as "Exception ignored" at exit
        return status
    except OutputError as exc:
        # The command's own status stands (a failed notification after `run --once`
        # is 1, even when its reader left); otherwise a reader that left is no failure.
        if exc.errno in (errno.EPIPE, errno.EBADF):  # no one reads it (| head, >&-)
            _discard_output(real_stdout)
            return status
        _error(f"invoice-watch: cannot write to standard output: {exc.strerror}")
        _discard_output(real_stdout)
        return max(status, 1)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a bug: still no traceback, but say where to look
        log.debug("unexpected error", exc_info=True)
        _error(
            f"invoice-watch: unexpected error: {type(exc).__name__}: {redact(str(exc))}. "
            "This is a bug: please report it (log.level: debug logs where it happened)"
        )
        return 1
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.config == "":  # (an unset variable in `-c "$CONFIG"`): not the default
        parser.error("-c/--config: the path is empty; name the config file")
    if args.config is not None and args.command in ("simulate", "demo"):
        parser.error(f"{args.command} reads no config file: drop -c/--config")
    if args.command == "run" and (args.dry_run or args.baseline) and not args.once:
        parser.error("--dry-run and --baseline go with --once")
    if args.command == "run" and args.dry_run and args.baseline:
        parser.error("--dry-run and --baseline exclude each other")
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "demo":
        return _demo()
    return _with_config(args)


class OutputError(OSError):
    """Standard output could not be written (``errno`` says why: EPIPE when the reader
    went away)."""


class _Output(io.TextIOBase):
    """``sys.stdout`` while a command runs: a failed write raises :class:`OutputError`,
    so that :func:`main` tells a closed or full output from any other OS error. (Python
    sets ``sys.stdout`` to None when the process starts with it closed: ``>&-``.) What a
    terminal would act on (ESC, BEL, bidi controls: text from Atlas or a receiver) is
    written escaped (:func:`~invoice_watch.format.terminal_safe`)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def _open(self) -> TextIO:
        if self._stream is None:
            raise OutputError(errno.EBADF, "standard output is closed")
        return self._stream

    def write(self, text: str) -> int:
        try:
            self._open().write(fmt.terminal_safe(text))
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from None
        return len(text)

    def flush(self) -> None:
        if self._stream is None:  # nothing was written: nothing to flush
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from None

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self) -> int:
        return self._open().fileno()


class _Diagnostics(io.TextIOBase):
    """``sys.stderr`` while a command runs, control characters escaped as on stdout
    (error lines and logs quote servers): what cannot be written there (closed, ``2>&-``,
    or full) is dropped. An error line that cannot be shown must not fail the command or
    change its exit status (``print(file=None)`` would write it to stdout instead)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.write(fmt.terminal_safe(text))
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return self._stream is not None and self._stream.isatty()
        return False

    def fileno(self) -> int:
        if self._stream is None:
            raise io.UnsupportedOperation("standard error is closed")
        return self._stream.fileno()


def _tolerant(stream: TextIO | None) -> None:
    """Write what the output's encoding cannot hold as ``\\u2013`` escapes rather than
    fail (``PYTHONIOENCODING=latin-1``, an old Python under ``LANG=C``): every line the
    commands print, the console notifier's messages included."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            reconfigure(errors="backslashreplace")


def _discard_output(stream: TextIO | None) -> None:
    """Point standard output at /dev/null, so that what is still buffered (and
    Python's flush at exit) goes nowhere instead of failing again."""
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _error(text: str) -> None:
    """One line on stderr (which may itself be closed: then nothing)."""
    if sys.stderr is None:
        return
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def _with_config(args: argparse.Namespace) -> int:
    from invoice_watch.config import Config, find_config_file, load_file, summary

    # Read-only commands need no secret: an operator who may read the state file but
    # not the secrets (LoadCredentialEncrypted=, a missing *_file) can still look.
    secrets = args.command not in ("status", "history", "invoices")
    try:
        config: Config = load_file(find_config_file(args.config, os.environ), secrets=secrets)
    except ConfigError as exc:
        for problem in exc.problems:
            _error(str(problem))
        _error(f"invoice-watch: {len(exc.problems)} configuration problem(s)")
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
                _error(f"invoice-watch: {second}")
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
        if args.command == "state":
            return asyncio.run(_state_copy(config, args.to))
    except UsageError as exc:  # an unknown organization or status
        _error(f"invoice-watch {args.command}: {exc}")
        return 2
    except InvoiceWatchError as exc:  # a state file in use, unreadable, ...
        _error(f"invoice-watch: {exc}")
        return 1
    raise AssertionError(args.command)


async def _state_copy(config: object, to: str | None) -> int:
    """``state copy [--to URL]``: the state file into PostgreSQL
    (:mod:`invoice_watch.store.postgres.copy`)."""
    from invoice_watch.config import Config
    from invoice_watch.store import StateUrl, location
    from invoice_watch.store.postgres.copy import copy_state

    assert isinstance(config, Config)
    if to is not None:
        target = StateUrl(to)
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
    moment later (exit 0), and a SIGHUP then is a reload once the daemon runs. Under
    ``--once``, SIGTERM, Ctrl-C and SIGHUP (the terminal closed) end the run as the
    daemon's stop does (:meth:`App.run_once <invoice_watch.app.App.run_once>`)."""
    from invoice_watch.app import App
    from invoice_watch.config import Config, LogConfig

    assert isinstance(config, Config)

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
    try:
        async with App(config, dry_run=args.dry_run, configure_logging=configure_logging) as app:
            if args.once:
                return await app.run_once(baseline=args.baseline, stop=stop)
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
        asyncio.run(serve(args.scenario, args.host, args.port, write_config=args.write_config))
    except OutputError:
        raise
    except UsageError as exc:  # --write-config names a file that is not ours
        _error(f"invoice-watch simulate: {exc}")
        return 2
    except OSError as exc:
        _error(f"invoice-watch simulate: {_simulate_problem(args.host, args.port, exc)}")
        return 1
    except (InvoiceWatchError, ValueError) as exc:  # a bad scenario file
        _error(f"invoice-watch simulate: {exc}")
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


def _demo() -> int:
    from invoice_watch.demo import run_demo

    try:
        return asyncio.run(run_demo())
    except ConfigError as exc:  # $SLACK_WEBHOOK_URL is not a webhook URL
        for problem in exc.problems:
            _error(f"invoice-watch demo: $SLACK_WEBHOOK_URL: {problem.message}")
        return 2
    except InvoiceWatchError as exc:
        _error(f"invoice-watch demo: {exc}")
        return 1
    except OutputError:
        raise
    except OSError as exc:  # no temporary folder, no loopback port
        if exc.errno == errno.EPIPE:  # the demo saw its reader go (see demo._Watched)
            raise OutputError(exc.errno, exc.strerror) from None
        _error(f"invoice-watch demo: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return 1
