"""The ``silence`` commands: ``add``, ``list``, ``expire`` (issue 18).

They write the state file's ``silences`` beside a running daemon (one short transaction
through :func:`~invoice_watch.store.silences_writer`: the daemon's lock is its own, and
SQLite's WAL lets the write in between the daemon's transactions, waiting up to 5 s for
one to end); the daemon reads them at its next release of messages and delivery pass,
without a restart. What a silence does is :mod:`invoice_watch.silences`'.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

from invoice_watch.config import Config
from invoice_watch.errors import UsageError
from invoice_watch.format import ago
from invoice_watch.ops import table
from invoice_watch.silences import new_silence, parse_for, parse_until
from invoice_watch.store import location, silences_writer
from invoice_watch.store.records import Silence


def _ends(silence: Silence, now: datetime) -> str:
    if silence.ends_at <= now:
        return f"ended {silence.ends_at:%Y-%m-%d %H:%M}Z"
    return f"{silence.ends_at:%Y-%m-%d %H:%M}Z ({ago(silence.ends_at, now)})"


def silence_rows(silences: list[Silence], now: datetime) -> str:
    """The silences as a table (``status`` and ``silence list``)."""
    rows = [
        [s.id, s.rule, s.org_id or "any", s.invoice_id or "any", _ends(s, now), s.comment[:60]]
        for s in silences
    ]
    return table(["Id", "Rule", "Organization", "Invoice", "Ends", "Comment"], rows)


async def add(
    config: Config,
    *,
    rule: str,
    org: str | None,
    invoice: str | None,
    duration: str | None,
    until: str | None,
    comment: str,
    now: datetime | None = None,
    out: TextIO | None = None,
) -> int:
    """``silence add``: a :class:`UsageError` for arguments that make no silence."""
    out = out or sys.stdout
    now = now or datetime.now(UTC)
    if rule not in {r.name for r in config.rules}:
        known = ", ".join(sorted(r.name for r in config.rules)) or "none"
        raise UsageError(f"--rule {rule}: no such rule in the configuration; known: {known}")
    if org is not None and org not in {o.id for o in config.organizations}:
        known = ", ".join(f"{o.id} ({o.display_name})" for o in config.organizations)
        raise UsageError(f"--org {org}: no such organization; known: {known}")
    try:
        silence = new_silence(
            rule,
            org_id=org,
            invoice_id=invoice,
            comment=comment,
            now=now,
            duration=parse_for(duration) if duration is not None else None,
            until=parse_until(until) if until is not None else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    async with silences_writer(location(config.state)) as silences:
        await silences.add(silence)
    print(f"silence {silence.id} added, until {silence.ends_at:%Y-%m-%d %H:%M %Z}", file=out)
    return 0


async def listing(
    config: Config, *, expired: bool = False, now: datetime | None = None, out: TextIO | None = None
) -> int:
    """``silence list``: the silences that have not ended (``--expired``: all kept)."""
    out = out or sys.stdout
    now = now or datetime.now(UTC)
    async with silences_writer(location(config.state)) as silences:
        found = await silences.listing(now, expired=expired)
    print(silence_rows(found, now) if found else "no silences", file=out)
    return 0


async def expire(
    config: Config, silence_id: str, *, now: datetime | None = None, out: TextIO | None = None
) -> int:
    """``silence expire ID``: end it now."""
    out = out or sys.stdout
    now = now or datetime.now(UTC)
    async with silences_writer(location(config.state)) as silences:
        found = await silences.expire(silence_id, now)
    if found is None:
        raise UsageError(f"no silence {silence_id!r}: `silence list --expired` shows them all")
    print(f"silence {silence_id} expired; what it silenced and still fires is sent", file=out)
    return 0
