"""The command line's arguments: one parser, a subcommand per command, each with its
help and its bounds (argparse; a bad value is a usage error, exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from invoice_watch import __version__
from invoice_watch.constants import INVOICE_STATUSES

MAX_HISTORY = 100_000  # `history --limit`: rows read into one table


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
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


class _Once(argparse.Action):
    """Store an option's value, refusing a second one (argparse keeps the last
    silently: ``report --org A --org B`` would report on B alone)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen = f"_given_{self.dest}"
        if getattr(namespace, seen, False):
            raise argparse.ArgumentError(
                self, f"given twice ({getattr(namespace, self.dest)}, then {values}): give it once"
            )
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
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

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: when not given here, the value given before the command stands
        p.add_argument(
            "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP
        )
        return p

    def command(
        name: str, summary: str, description: str, *, config: bool = True
    ) -> argparse.ArgumentParser:
        """A command, with ``-c FILE`` after it too when it reads the config."""
        p = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return with_config(p) if config else p

    run = command(
        "run",
        "run the daemon",
        "Run the daemon: poll every poll.interval, send alerts, until SIGTERM or Ctrl-C. "
        "SIGHUP rereads the config. One daemon per state file.",
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
    command(
        "check-config",
        "validate the config and summarize it",
        "Validate the config file: every problem at once as FILE:LINE:COL: path: "
        "message (exit 2), else a summary with secrets masked.",
    )
    notify = command(
        "test-notify",
        "send a test message",
        "Send a test message through every notifier, or the one named.",
    )
    notify.add_argument(
        "notifier", nargs="?", metavar="NOTIFIER", help="a notifier's name (default: all)"
    )
    status = command(
        "status",
        "show polls, alerts and the outbox",
        "Show the daemon's health, the last read of each organization, the firing "
        "alerts and the notifications not delivered yet, from its state file.",
    )
    status.add_argument(
        "--check",
        action="store_true",
        help="print one line and exit 1 unless the daemon is healthy (for HEALTHCHECK)",
    )
    invoices = command(
        "invoices",
        "the snapshot as a table",
        "List the invoices of the snapshot (as last read from Atlas), newest first.",
    )
    invoices.add_argument(
        "--org",
        action=_Once,
        metavar="ORG",
        help="only this organization (its id or configured name)",
    )
    invoices.add_argument(
        "--status",
        action=_Once,
        metavar="STATUS",
        help=f"only invoices in this status, one of {', '.join(INVOICE_STATUSES)}",
    )
    history = command(
        "history",
        "notifications sent, newest first",
        "List the notifications sent, failed or waiting, newest first.",
    )
    history.add_argument(
        "--limit",
        type=_bounded_int(1, MAX_HISTORY),
        default=50,
        metavar="N",
        help=f"show the N newest (default: 50, at most {MAX_HISTORY})",
    )
    report = command(
        "report",
        "make a spend report now",
        "Make a spend report now from the state (what the daemon last read): month "
        "to date, last month, the forecast against the budget, the top projects and "
        "SKUs, the firing alerts and a chart. Prints its text, or writes it to a file "
        "(--out), or sends it through a notifier (--send).",
    )
    report.add_argument(
        "--org",
        action=_Once,
        metavar="ID",
        help="only this organization (its id or name; default: all)",
    )
    report.add_argument(
        "--out",
        action=_Once,
        metavar="FILE",
        help="write FILE.html (the report) or FILE.png (its chart)",
    )
    report.add_argument(
        "--send", action=_Once, metavar="NOTIFIER", help="send it through this notifier"
    )
    silence = command(
        "silence",
        "pause an alert's notifications for a while",
        "Add, list or expire silences. A silenced alert is recorded (history shows "
        "it) and, if it still fires when the silence ends, notified then. The daemon "
        "needs no restart.",
    )
    silence_verbs = silence.add_subparsers(
        dest="verb", metavar="VERB", required=True, help="add, list or expire"
    )
    silence_add = with_config(silence_verbs.add_parser("add", help="add a silence"))
    silence_add.add_argument("--rule", required=True, help="the rule whose alerts to silence")
    silence_add.add_argument("--org", action=_Once, metavar="ID", help="only this organization's")
    silence_add.add_argument("--invoice", action=_Once, metavar="ID", help="only this invoice's")
    lasting = silence_add.add_mutually_exclusive_group(required=True)
    lasting.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 4h, 2d")
    lasting.add_argument("--until", metavar="TIME", help="e.g. 2025-07-01T08:00+02:00")
    silence_add.add_argument("--comment", required=True, help="why (e.g. a ticket)")
    silence_list = with_config(silence_verbs.add_parser("list", help="list the silences"))
    silence_list.add_argument("--expired", action="store_true", help="ended ones too")
    silence_expire = with_config(silence_verbs.add_parser("expire", help="end a silence now"))
    silence_expire.add_argument("id", help="the silence's id (silence list shows it)")
    state = command(
        "state",
        "move the state into PostgreSQL",
        "state copy: copy the state file (state.path) into an empty PostgreSQL database, "
        "for replicas (README: High availability). Stop the daemon first; nothing is "
        "alerted again afterwards.",
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
        config=False,
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
        config=False,
    )
    return parser
