"""``invoice-watch report``: a report made now from the state (what the daemon last read),
written to a file or sent through one notifier, outside the schedule and the outbox.

- no option: the text summary on standard output;
- ``--out FILE.html``: the HTML with the chart embedded (a ``data:`` URI: a file has no
  ``cid:`` parts); ``--out FILE.png``: the chart alone;
- ``--send NOTIFIER``: sent at once through that notifier, as the daemon would send it
  (an error says why it was not; nothing is queued).

``--org ID`` (an id or configured name) makes the report of that organization; without
it, one report of every configured organization together. The state is opened
read-only, beside a running daemon. An organization the state holds nothing for yet
(the daemon has not read it) is reported with what is known, and a note says so.
"""

from __future__ import annotations

import base64
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from invoice_watch.config import Config
from invoice_watch.errors import NotifyError, UsageError
from invoice_watch.report.message import CHART_CID
from invoice_watch.report.outbox import REPORT_NOTIFIER_TYPES, ReportMessage, send_report
from invoice_watch.report.scheduler import (
    SCOPE_ALL,
    StateUsage,
    UsageSource,
    pending_invoice,
    report_data,
)

_SUFFIXES = (".html", ".htm", ".png")


def standalone_html(msg: ReportMessage) -> str:
    """The report's HTML with its chart embedded (``data:`` URI) in place of ``cid:``."""
    if msg.chart is None:
        return msg.html
    uri = "data:image/png;base64," + base64.b64encode(msg.chart).decode()
    return msg.html.replace(f"cid:{CHART_CID}", uri)


def _check_args(config: Config, out: Path | None, send: str | None) -> None:
    if out is not None and out.suffix.lower() not in _SUFFIXES:
        raise UsageError(f"--out {out}: write FILE.html (the report) or FILE.png (its chart)")
    if send is None:
        return
    notifier = config.notifiers.get(send)
    if notifier is None:
        known = ", ".join(sorted(config.notifiers))
        raise UsageError(f"--send {send}: no notifier of that name (configured: {known})")
    if notifier.type not in REPORT_NOTIFIER_TYPES:
        raise UsageError(
            f"--send {send}: a {notifier.type} notifier cannot carry a report (reports go "
            f"to {', '.join(sorted(REPORT_NOTIFIER_TYPES))} notifiers)"
        )


async def make_report(
    config: Config,
    *,
    org: str | None = None,
    out: Path | None = None,
    send: str | None = None,
    usage: UsageSource | None = None,
    now: datetime | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``invoice-watch report`` (module docstring); the exit status. UsageError for a
    bad argument; StateError when the state cannot be read."""
    from invoice_watch.ops import _open, _org_arg

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    _check_args(config, out, send)
    now = now or datetime.now(UTC)
    store = await _open(config)
    try:
        wanted = _org_arg(config, org, set())
        orgs = [o for o in config.organizations if wanted is None or o.id == wanted]
        for known in orgs:
            if pending_invoice(store, known.id) is None:
                print(
                    f"note: the state holds no pending invoice of {known.display_name} "
                    f"({known.id}) yet: has the daemon read it? (`invoice-watch run --once`)",
                    file=stderr,
                )
        data = await report_data(config, store, usage or StateUsage(lambda: store), orgs, now)
    finally:
        await store.close()
    from invoice_watch.report.chart import cache_dir
    from invoice_watch.report.outbox import make_message
    from invoice_watch.report.render import Renderer

    drawn = out is not None or send is not None  # the text alone needs no chart
    chart = await Renderer().draw(data, cache_dir(config.state.path)) if drawn else None
    scope = orgs[0].id if len(orgs) == 1 else SCOPE_ALL
    msg = make_message(data, chart, report="now", scope=scope, due=now, drawn=drawn)
    if out is not None:
        return _write(msg, out, stdout, stderr)
    if send is not None:
        return await _send(config, send, msg, stdout, stderr)
    stdout.write(msg.text)
    return 0


def _write(msg: ReportMessage, out: Path, stdout: TextIO, stderr: TextIO) -> int:
    if out.suffix.lower() == ".png":
        if msg.chart is None:
            print(f"invoice-watch report: the chart could not be drawn; {out} not written",
                  file=stderr)  # fmt: skip
            return 1
        content = msg.chart
    else:
        content = standalone_html(msg).encode()
    try:
        out.write_bytes(content)
    except OSError as exc:
        print(f"invoice-watch report: cannot write {out}: {exc.strerror or exc}", file=stderr)
        return 1
    print(f"wrote {msg.title} to {out} ({len(content):,} bytes)", file=stdout)
    return 0


async def _send(
    config: Config, name: str, msg: ReportMessage, stdout: TextIO, stderr: TextIO
) -> int:
    from invoice_watch.notify import build_notifier
    from invoice_watch.notify.slack import ChartOwedError

    notifier = build_notifier(name, config.notifiers[name])
    try:
        await send_report(notifier, msg)
    except ChartOwedError as exc:  # nothing is queued here: no retry to promise
        print(
            f"invoice-watch report: {name}: the summary was posted, the chart was not: "
            f"{exc.reason}",
            file=stderr,
        )
        return 1
    except NotifyError as exc:
        print(f"invoice-watch report: {name}: not sent: {exc}", file=stderr)
        return 1
    finally:
        await notifier.aclose()
    print(f"{name}: sent {msg.title}", file=stdout)
    return 0
