"""How a cycle's messages to one notifier go out (flood control), and how a message is
named in the outbox: pure, the same for every backend.

A transition's event goes to its alert's notifiers (:func:`notifiers`). More than
``delivery.group_over`` messages of one cycle for one notifier go as one grouped message
(:func:`grouped`), split into parts of at most
:data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` events when too many for one
(:func:`message_parts`); each message's summary is :func:`summarize`'s. The outbox
releases a cycle's rows so, and a cycle reports its messages so
(:func:`cycle_messages`: what ``run --once`` says, a dry run's messages).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.safe_text import one_line
from invoice_watch.store.protocols import AlertChange
from invoice_watch.types import AlertEvent, Part, usage_subject

T = TypeVar("T")


def notifiers(change: AlertChange, routes: Mapping[str, Sequence[str]]) -> Sequence[str]:
    """The notifiers a transition's event goes to: its alert's (``state.notifiers``:
    :func:`~invoice_watch.alerts.recipients`), else, for a transition made without
    them, its rule's route (``routes``: rule name -> notifier names)."""
    event = change.event
    if event is None:
        return ()
    return change.state.notifiers or routes.get(event.rule, ())


def grouped(count: int, group_over: int) -> bool:
    """Whether a notifier's ``count`` messages of one cycle go as one grouped message
    (flood control): more than ``group_over`` of them, and more than one."""
    return count > max(group_over, 1)


def message_parts(count: int, group_over: int) -> list[int] | None:
    """How a notifier's ``count`` messages of one cycle go out: one by one (None: not
    :func:`grouped`), or grouped, as messages of these sizes in order: one, or parts of
    at most :data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` events, as even as can
    be (120 -> 40, 40, 40; 81 -> 27, 27, 27), each a message of its own in the outbox,
    so that each fits its channel and is sent and recorded on its own."""
    if not grouped(count, group_over):
        return None
    parts = -(-count // MESSAGE_MAX_EVENTS)
    size, extra = divmod(count, parts)
    return [size + 1 if number < extra else size for number in range(parts)]


def split(items: Sequence[T], sizes: Sequence[int]) -> list[tuple[Sequence[T], Part | None]]:
    """``items`` (in order) cut into the grouped messages of ``sizes``
    (:func:`message_parts`), each with which part it is (None: the only one)."""
    cut: list[tuple[Sequence[T], Part | None]] = []
    start = 0
    for number, size in enumerate(sizes, 1):
        cut.append(
            (items[start : start + size], Part(number, len(sizes)) if len(sizes) > 1 else None)
        )
        start += size
    return cut


def messages(items: Sequence[T], group_over: int) -> list[tuple[Sequence[T], Part | None]]:
    """The messages a notifier's ``items`` of one cycle go as: one each, or grouped
    (:func:`message_parts`, :func:`split`). The one decision of how a cycle's
    messages go out: the outbox releases its rows so, and a cycle's report says so."""
    sizes = message_parts(len(items), group_over)
    if sizes is None:
        return [(items[n : n + 1], None) for n in range(len(items))]
    return split(items, sizes)


def cycle_messages(
    changes: Iterable[AlertChange], routes: Mapping[str, Sequence[str]], group_over: int
) -> list[tuple[str, list[AlertEvent], Part | None]]:
    """A cycle's messages, as the outbox releases them: per notifier (:func:`notifiers`,
    in the order they first come), its events one by one or grouped
    (:func:`messages`), as (notifier, events, which part)."""
    per_notifier: dict[str, list[AlertEvent]] = {}
    for change in changes:
        if change.event is not None:
            for name in notifiers(change, routes):
                per_notifier.setdefault(name, []).append(change.event)
    return [
        (name, list(events), part)
        for name, batch in per_notifier.items()
        for events, part in messages(batch, group_over)
    ]


def summarize(events: Sequence[AlertEvent], part: Part | None = None) -> str:
    """One line naming a message, for `history` and logs (no secrets in events), and
    storable: its names may come from a server (:func:`~invoice_watch.safe_text.
    one_line`)."""
    if len(events) == 1:
        e = events[0]
        parts = [str(e.kind), e.rule, e.org_name]
        if e.invoice_id:
            parts.append(e.invoice_id)
        elif subject := usage_subject(e.key, e.rule, e.org_id):
            parts.append(subject)  # which project, cluster or SKU
        return one_line(" ".join(parts))
    return group_summary(len(events), part)


def group_summary(count: int, part: Part | None) -> str:
    """The summary of a grouped message of ``count`` events (``part``: which part)."""
    return f"{count} alerts (grouped, {part})" if part else f"{count} alerts (grouped)"
