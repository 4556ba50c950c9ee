"""What is behind an amount: the top projects and SKUs a FIRING or REMINDER message
about an invoice's amount shows (its breakdown), from the invoice's line items.

Line items come from Atlas's pending-invoice endpoint, fetched only for the messages
that want them (:func:`wants_breakdown`), once a cycle's listings are all read (never
competing with a listing for Atlas's rate limit), once per organization, all
organizations concurrently (:func:`add_breakdowns`). A breakdown that cannot be fetched,
built or stored (whatever the answer holds) costs the breakdown, never the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from invoice_watch.alerts import Transition
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.config import Config
from invoice_watch.errors import FetchError
from invoice_watch.redact import printable
from invoice_watch.rules import BREAKDOWN_RULES
from invoice_watch.safe_text import exception_line, traceback_text
from invoice_watch.store import AlertState, unstorable
from invoice_watch.types import BreakdownLine, EventKind, LineItem

log = logging.getLogger(__name__)


def wants_breakdown(t: Transition) -> bool:
    """A FIRING or REMINDER message about an invoice's amount, which says what is
    behind it."""
    event = t.event
    return (
        event is not None
        and event.rule_type in BREAKDOWN_RULES
        and event.kind in (EventKind.FIRING, EventKind.REMINDER)
        and bool(event.invoice_id)
    )


async def add_breakdowns(
    client: AtlasClient,
    config: Config,
    transitions: Sequence[Transition],
    previous: Mapping[str, AlertState | None],
) -> list[Transition]:
    """``transitions``, those that :func:`wants_breakdown` with their event's breakdown
    (and their state's last event with it). ``previous``: the alerts' states before
    these transitions (a reminder says how the breakdown moved since)."""
    wanted = [t for t in transitions if wants_breakdown(t)]
    if not wanted:
        return list(transitions)
    wanted_ids = {id(t) for t in wanted}

    async def line_items(org_id: str) -> dict[str, list[LineItem]]:
        try:
            return await client.pending_line_items(org_id)
        except FetchError as exc:
            log.warning("no breakdown for %s: %s", config.org_name(org_id), exc)
        except Exception as exc:  # a bug an answer triggers: this org's breakdowns
            log.error(
                "no breakdown for %s: %s\n%s",
                config.org_name(org_id),
                exception_line(exc),
                traceback_text(exc),
            )
        return {}

    async with asyncio.TaskGroup() as group:  # every organization at once
        fetches = [
            group.create_task(line_items(org_id))
            for org_id in sorted({t.state.source_org_id for t in wanted})
        ]
    items: dict[str, list[LineItem]] = {}
    for fetch in fetches:
        items.update(fetch.result())
    out = []
    for t in transitions:
        event = t.event
        if id(t) in wanted_ids and event is not None and event.invoice_id in items:
            t = _with_breakdown(t, items[event.invoice_id], previous.get(t.state.key))
        out.append(t)
    return out


def _with_breakdown(t: Transition, items: list[LineItem], before: AlertState | None) -> Transition:
    """``t`` with its event's breakdown of ``items``, or as it is when the breakdown
    cannot be built or stored (logged)."""
    event = t.event
    assert event is not None
    try:
        last = before.last_event.breakdown if before and before.last_event else ()
        with_lines = replace(event, breakdown=breakdown(items, last))
        why = unstorable(with_lines)
    except Exception as exc:  # a bug the line items trigger
        why = exception_line(exc)
    if why is not None:
        log.warning(
            "no breakdown for %s (invoice %s): its line items cannot be stored (%s); "
            "the message goes without it",
            event.org_name,
            event.invoice_id,
            printable(why),
        )
        return t
    return replace(t, event=with_lines, state=replace(t.state, last_event=with_lines))


def breakdown(
    items: Sequence[LineItem],
    previous: Sequence[BreakdownLine] = (),
    top: int = 3,
) -> tuple[BreakdownLine, ...]:
    """The ``top`` projects and SKUs by amount; with ``previous`` (the breakdown of the
    last message about this alert), how much each grew since."""
    before = {(line.dimension, line.name): line.amount_cents for line in previous}
    lines: list[BreakdownLine] = []
    for dimension in ("project", "sku"):
        totals: dict[str, int] = {}
        for item in items:
            name = item.project if dimension == "project" else item.sku
            totals[name] = totals.get(name, 0) + item.amount_cents
        ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        for name, cents in ranked:
            old = before.get((dimension, name))
            growth_cents = cents - old if previous and old is not None else None
            lines.append(BreakdownLine(dimension, name, cents, growth_cents))
    return tuple(lines)
