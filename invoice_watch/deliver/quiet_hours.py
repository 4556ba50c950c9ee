"""Quiet hours at delivery (:mod:`invoice_watch.quiet`): a notifier's messages wait
while its window is open, and go as one summary when it ends.

Inside a window, a message waits (postponed to the window's end, or ``max_backoff``
when sooner: no wait is longer), but one with an event of a severity in ``except``. When
the window has ended, the messages that waited (their last error says so:
:data:`~invoice_watch.quiet.QUIET_PREFIX`) go as one summary (as few messages as
:data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` allows), made a grouped message in
the outbox before it is sent (:meth:`Outbox.merge <invoice_watch.store.protocols.
Outbox.merge>`): a summary that fails is retried, after a restart too, as that same
summary. (That quiet hours do not count toward a message's age: :mod:`.ages`.)

Owns nothing: what waits is in the outbox.
"""

from __future__ import annotations

from dataclasses import replace

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.deliver.context import Context, log
from invoice_watch.errors import StateError
from invoice_watch.quiet import QUIET_PREFIX, QuietWindow, holds
from invoice_watch.store import Delivery


async def quiet_hours(
    context: Context, window: QuietWindow, rows: list[Delivery]
) -> list[Delivery]:
    """Of a notifier's due ``rows`` (in order), those to send now: the ones ``window``
    holds are postponed; those that waited for it are made summaries (module docstring)."""
    now = context.clock.now()
    go: list[Delivery] = []
    for delivery in rows:
        until = holds(window, delivery.events, now)
        if until is None:
            go.append(delivery)
            continue
        at = min(until, now + context.limits.max_backoff)
        why = f"{QUIET_PREFIX} until {until.astimezone(window.tz):%Y-%m-%d %H:%M %Z}"
        try:
            await context.store.outbox.postpone(delivery.id, at, why, delivery.owed)
        except StateError as exc:  # looked at again next pass
            log.debug("%s: could not hold a message for quiet hours: %s", delivery.id, exc)
    return await summaries(context, go)


async def summaries(context: Context, rows: list[Delivery]) -> list[Delivery]:
    """``rows``, with those that waited for quiet hours to end joined into summaries of
    at most MESSAGE_MAX_EVENTS events each, in place of the first of them. Each summary
    is made a grouped message in the outbox before it is sent; one the state cannot
    record waits for the next pass."""
    out: list[Delivery] = []
    summary: list[Delivery] = []

    async def flush() -> None:
        if len(summary) == 1:
            out.append(summary[0])
        elif summary:
            first = summary[0]
            try:
                await context.store.outbox.merge([d.id for d in summary])
            except StateError as exc:  # still pending: summarized next pass
                log.debug("%s: could not make the quiet hours summary: %s", first.id, exc)
            else:
                events = [event for d in summary for event in d.events]
                out.append(replace(first, events=events, part=None))
        summary.clear()

    for delivery in rows:
        waited = (delivery.last_error or "").startswith(QUIET_PREFIX)
        if not waited or delivery.owed is not None or delivery.report is not None:
            out.append(delivery)
            continue
        count = sum(len(d.events) for d in summary)
        if summary and count + len(delivery.events) > MESSAGE_MAX_EVENTS:
            await flush()
        summary.append(delivery)
    await flush()
    return out
