"""Operator commands over the state file: ``status``, ``invoices``, ``history``.

They read the file the daemon writes (WAL lets them read while it runs), read-only: they
never take the daemon's lock, create, migrate or chmod anything. Tables have aligned
columns, amounts as $1,234.56, relative times, and text from Atlas or a receiver with
its control characters escaped. An argument naming an organization or a
status that does not exist is a :class:`~invoice_watch.errors.UsageError` listing those
that do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from invoice_watch import format as fmt
from invoice_watch.config import Config, state_files_elsewhere
from invoice_watch.constants import INVOICE_STATUSES
from invoice_watch.errors import StateError, UsageError
from invoice_watch.health import health, in_flight_from_reads, progress_limit
from invoice_watch.store import Store, location, open_store
from invoice_watch.types import usage_subject


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns; a column whose header starts with '$' is right-aligned. Each cell
    is one line with nothing a terminal would act on (:func:`~invoice_watch.format.cell`):
    last errors, summaries and ids come from Atlas and the receivers."""
    names = [h.lstrip("$") for h in headers]
    right = [h.startswith("$") for h in headers]
    rows = [[fmt.cell(value) for value in row] for row in rows]
    widths = [len(n) for n in names]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(names), *(line(row) for row in rows)])


async def _open(config: Config) -> Store:
    """The daemon's state file, read-only (StateError when missing or unusable, or when
    the default names none while another documented place holds one)."""
    if config.state.url is not None:
        return await open_store(location(config.state), exclusive=False)
    if (elsewhere := state_elsewhere(config)) is not None:
        path, _ = elsewhere[0]
        raise StateError(
            f"no state file at {config.state.path} ({config.state.origin}) yet, while "
            f"{_places(elsewhere)}: set state.path in {_config_name(config)} to "
            f"{path} to read it"
        )
    return await open_store(config.state.path, exclusive=False)


def state_elsewhere(config: Config) -> list[tuple[Path, str]] | None:
    """The other documented places that hold a state file (see
    :func:`~invoice_watch.config.state_files_elsewhere`) when ``state.path`` is left
    to its default and that names no file yet; None otherwise. A command must then not
    guess: a new state file would send every firing alert again, and reading another
    would show a state that ``run`` with this config does not use."""
    if config.state.explicit:
        return None
    try:
        os.lstat(config.state.path)
    except FileNotFoundError:
        pass
    except OSError:
        return None  # opening it says what is wrong
    else:
        return None
    folder = config.source.parent if config.source is not None else Path()
    return state_files_elsewhere(config.state.path, os.environ, folder) or None


def refuse_second_state(config: Config) -> str | None:
    """Why ``run`` (``--once``, ``--baseline`` and ``--dry-run`` too) must not start:
    its default state file does not exist yet while another documented place holds
    one (:func:`state_elsewhere`), or None."""
    elsewhere = state_elsewhere(config)
    if elsewhere is None:
        return None
    path, new = elsewhere[0][0], config.state.path
    return (
        f"state file {new} ({config.state.origin}) does not exist yet, while "
        f"{_places(elsewhere)}: a second state file would send every firing alert again. "
        f"Set state.path in {_config_name(config)} to {path} to go on with it, or to {new} "
        "to start a new one (`run --once --baseline` first records the firing alerts "
        "without sending them)"
    )


def _places(found: Sequence[tuple[Path, str]]) -> str:
    names = [f"{path} ({what})" for path, what in found]
    held = "holds one" if len(names) == 1 else "hold one each"
    return f"{' and '.join(names)} {held}"


def _config_name(config: Config) -> str:
    return str(config.source) if config.source is not None else "the config"


def _status_arg(status: str | None) -> str | None:
    """``--status``: an Atlas invoice status, any case (UsageError otherwise)."""
    if status is None:
        return None
    if status.upper() not in INVOICE_STATUSES:
        raise UsageError(
            f"--status {status}: no such invoice status; Atlas's are {', '.join(INVOICE_STATUSES)}"
        )
    return status.upper()


def _org_arg(config: Config, org: str | None, stored: set[str]) -> str | None:
    """``--org``: a configured organization's id or name, or the id of one whose
    invoices the snapshot holds (a linked organization); UsageError otherwise."""
    if org is None:
        return None
    for known in config.organizations:
        if org in (known.id, known.name):
            return known.id
    if org in stored:
        return org
    names = [f"{o.id} ({o.display_name})" for o in config.organizations]
    names += sorted(stored - {o.id for o in config.organizations})
    raise UsageError(f"--org {org}: no such organization; known: {', '.join(names)}")


async def _lease_line(config: Config, store: Store, now: datetime) -> str | None:
    """Who leads the replicas of a PostgreSQL state (None: an SQLite file, one daemon)."""
    if config.state.url is None:
        return None
    from invoice_watch.store.postgres import PostgresStore  # psycopg, loaded when used

    assert isinstance(store, PostgresStore)
    lease = await store.lease_now()
    if lease is None:
        return "Lease: no replica has taken it yet (none has run on this database)"
    holder, token, expires = lease
    replicas, stuck = await store.replicas()
    running = (
        "no replica is running on this database"
        if replicas == 0
        else f"{replicas} replica(s) running on this database"
    )
    if expires is None:
        return f"Lease: free (given up by {holder} as it stopped; fencing token {token}); {running}"
    if expires <= now:
        if stuck:
            takes = (
                "no replica can take it until the database ends a write transaction "
                "that still holds the lease row"
            )
        elif replicas:
            takes = "a standby takes it at its next try"
        else:
            takes = "no replica is running to take it"
        return (
            f"Lease: expired {fmt.ago(expires, now)}: no leader (last held by {holder}, "
            f"fencing token {token}); {takes} ({running})"
        )
    left = (expires - now).total_seconds()
    return (
        f"Lease: leader {holder} (fencing token {token}), expires in {left:.0f}s unless "
        f"renewed; {running} (the leader and its standbys)"
    )


async def status(
    config: Config, *, check: bool = False, out: TextIO | None = None, now: datetime | None = None
) -> int:
    """``status`` (``--check``: the health line only, exit 1 when unhealthy). Health is
    judged from the state file as the daemon's ``/healthz`` judges it: a cycle in
    flight is seen by the progress the daemon records while it runs (its requests to
    Atlas, every 30 s) and by its reads. ``now``: the wall clock's, unless given."""
    out = out or sys.stdout
    now = now or datetime.now(UTC)
    store = await _open(config)
    try:
        finished, orgs_ok, orgs_failed = await store.cycles.last() or (None, 0, 0)
        reads = (org.last_attempt for org in store.snapshot.org_states())
        limit = progress_limit(config.atlas.timeout, config.atlas.max_backoff)
        in_flight = in_flight_from_reads(finished, reads, now, limit)
        ok, why = health(
            finished, orgs_ok, orgs_failed, config.poll.interval, now, in_flight=in_flight
        )
        if check:
            print(("healthy: " if ok else "unhealthy: ") + why, file=out)
            return 0 if ok else 1
        print(f"Health: {'OK' if ok else 'UNHEALTHY'} ({why})\n", file=out)
        if (lease := await _lease_line(config, store, now)) is not None:
            print(f"{lease}\n", file=out)
        orgs = {o.org_id: o for o in store.snapshot.org_states()}
        rows = []
        for org in config.organizations:
            state = orgs.get(org.id)
            rows.append(
                [
                    org.display_name,
                    org.id,
                    fmt.ago(state.last_success if state else None, now),
                    str(state.invoice_count if state else 0),
                    (state.last_error or "") if state and state.failing_since else "ok",
                ]
            )
        print(table(["Organization", "Id", "Last read", "Invoices", "State"], rows), file=out)
        await _usage_lines(config, store, now, out)
        await _report_lines(config, store, now, out)
        firing = sorted(store.alerts.firing().values(), key=lambda a: a.firing_since)
        print(f"\nFiring alerts: {len(firing)}", file=out)
        if firing:
            rows = [
                [
                    a.rule,
                    config.org_name(a.org_id),
                    a.invoice_id or usage_subject(a.key, a.rule, a.org_id) or "—",
                    fmt.ago(a.firing_since, now),
                ]
                for a in firing
            ]
            header = ["Rule", "Organization", "Invoice or dimension", "Since"]
            print(table(header, rows), file=out)
        # held: written by a cycle that has not ended (or was cut short: they go out at
        # the end of the next cycle, or when the daemon next starts)
        silences = await store.silences.listing(now)
        print(f"\nActive silences: {len(silences)}", file=out)
        if silences:
            from invoice_watch.silence_cmd import silence_rows

            print(silence_rows(silences, now), file=out)
        waiting = await store.outbox.messages(("held", "pending", "silenced", "failed"))
        print(f"\nUndelivered notifications: {len(waiting)}", file=out)
        if waiting:
            rows = [
                [
                    r.state.upper(),
                    r.notifier,
                    r.summary,
                    str(r.attempts),
                    fmt.ago(r.created_at, now),
                    (r.last_error or "")[:80],
                ]
                for r in waiting
            ]
            print(
                table(["State", "Notifier", "Message", "Tries", "Queued", "Last error"], rows),
                file=out,
            )
        return 0
    finally:
        await store.close()


async def _usage_lines(config: Config, store: Store, now: datetime, out: TextIO) -> None:
    """Each enabled usage_anomaly rule that cannot judge an organization, and why (as
    the daemon would judge the line items the state holds now)."""
    if not any(r.enabled and r.type == "usage_anomaly" for r in config.rules):
        return
    from invoice_watch.usage_watch import cannot_judge

    gaps = await cannot_judge(config, store, now)
    print(f"\nUsage anomaly rules that cannot judge an organization: {len(gaps)}", file=out)
    if gaps:
        rows = [[rule, config.org_name(org_id), why] for rule, org_id, why in gaps]
        print(table(["Rule", "Organization", "Why"], rows), file=out)


async def _report_lines(config: Config, store: Store, now: datetime, out: TextIO) -> None:
    """Each enabled report's scopes: the next time it is due, and the last (from
    ``report_runs``: when the daemon last put it in the outbox, or, before its first
    report, the schedule's time before the daemon first saw it)."""
    reports = [r for r in config.reports if r.enabled]
    if not reports:
        return
    from invoice_watch.report.scheduler import SCOPE_ALL, scope_name, scopes

    last = await store.reports.last_due()
    rows = []
    for report in reports:
        schedule = report.when
        for scope, _ in scopes(report, config):
            since = last.get((report.name, scope))
            missed = schedule.due(since, now) if since is not None else None
            if missed is not None:
                upcoming = f"now (due {missed:%Y-%m-%d %H:%M} UTC; the daemon has not sent it)"
            else:
                nxt = schedule.next_after(now)
                upcoming = f"{nxt:%Y-%m-%d %H:%M} UTC (in {fmt.duration(nxt - now)})"
            name = scope_name(scope) if scope == SCOPE_ALL else config.org_name(scope)
            rows.append(
                [
                    report.name,
                    name,
                    str(schedule),
                    upcoming,
                    f"{since:%Y-%m-%d %H:%M} UTC" if since is not None else "never (not seen yet)",
                ]
            )
    print(f"\nReports: {len(rows)}", file=out)
    print(table(["Report", "Scope", "Schedule", "Next due", "Last due"], rows), file=out)


async def invoices(
    config: Config, *, org: str | None = None, status: str | None = None, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    wanted_status = _status_arg(status)
    store = await _open(config)
    try:
        # An invoice two configured organizations list (a linked one) is shown once.
        unique = {i.id: i for i in await store.snapshot.stored_invoices()}
        wanted_org = _org_arg(config, org, {i.org_id for i in unique.values()})
        selected = [
            i
            for i in unique.values()
            if (wanted_org is None or i.org_id == wanted_org)
            and (wanted_status is None or i.status == wanted_status)
        ]
        selected.sort(key=lambda i: (config.org_name(i.org_id), i.start_date), reverse=True)
        rows = [
            [
                config.org_name(i.org_id),
                i.id,
                fmt.period(i.start_date, i.end_date),
                i.status,
                fmt.usd(i.amount_billed_cents),
                fmt.usd(i.amount_paid_cents),
            ]
            for i in selected
        ]
        print(
            table(["Organization", "Invoice", "Period", "Status", "$Billed", "$Paid"], rows),
            file=out,
        )
        print(f"\n{len(rows)} invoice(s)", file=out)
        return 0
    finally:
        await store.close()


async def history(config: Config, *, limit: int = 50, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    now = datetime.now(UTC)
    store = await _open(config)
    try:
        rows_ = await store.outbox.messages(
            ("sent", "failed", "pending", "silenced", "muted"), limit=limit
        )
        rows = [
            [
                fmt.ago(r.done_at or r.created_at, now),
                r.state,
                r.notifier,
                r.summary,
            ]
            for r in rows_
        ]
        print(table(["When", "State", "Notifier", "Message"], rows), file=out)
        return 0
    finally:
        await store.close()
