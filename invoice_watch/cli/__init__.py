"""The ``invoice-watch`` command line. The only package that touches signals, stdout
tables and exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

:func:`main` is the entry point; :mod:`.parser` holds the arguments, :mod:`.commands`
runs each command (its output and exit status), :mod:`.streams` guards standard output
and error, :mod:`.logs` sets up logging."""

from __future__ import annotations

import errno
import gc
import logging
import sys
from collections.abc import Sequence

from invoice_watch import hangup
from invoice_watch.cli.commands import demo, simulate, with_config
from invoice_watch.cli.parser import build_parser
from invoice_watch.cli.streams import (
    Diagnostics,
    Output,
    OutputError,
    discard_output,
    print_error,
    tolerant,
)
from invoice_watch.redact import redact

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status. No command ends in a traceback: every
    error an operator can cause is one line on stderr saying what to do, and a reader
    that stops reading (``| head``) ends the command quietly, exit 0 (unless the command
    had failed already: its status stands, as it does when stderr cannot show why)."""
    real_stdout, real_stderr = sys.stdout, sys.stderr
    for stream in (real_stdout, real_stderr):
        tolerant(stream)
    sys.stdout = Output(real_stdout)
    sys.stderr = Diagnostics(real_stderr)
    status = 0
    try:
        status = _main(argv)
        sys.stdout.flush()  # a write error shows here, not as "Exception ignored" at exit
        return status
    except OutputError as exc:
        # The command's own status stands (a failed notification after `run --once`
        # is 1, even when its reader left); otherwise a reader that left is no failure.
        if exc.errno in (errno.EPIPE, errno.EBADF):  # no one reads it (| head, >&-)
            discard_output(real_stdout)
            return status
        print_error(f"invoice-watch: cannot write to standard output: {exc.strerror}")
        discard_output(real_stdout)
        return max(status, 1)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a bug: still no traceback, but say where to look
        log.debug("unexpected error", exc_info=True)
        print_error(
            f"invoice-watch: unexpected error: {type(exc).__name__}: {redact(str(exc))}. "
            "This is a bug: please report it (log.level: debug logs where it happened)"
        )
        return 1
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
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
    if args.command != "run":
        gc.enable()  # (disabled while a start imports: see commands.started)
        hangup.restore()  # only `run` takes a SIGHUP that came while it started
    if args.command == "simulate":
        return simulate(args)
    if args.command == "demo":
        return demo()
    return with_config(args)
