"""How the state writes values as text, the same for every backend: an event as JSON
(an outbox message's events, an alert's last event with where its messages went), and a
delivery error bounded and storable, with the recipients a message is still owed to
(:func:`outbox_error`, :func:`owed_of`). :func:`unstorable` says ahead of a write which
event could not be written at all.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

from invoice_watch.safe_text import storable
from invoice_watch.store.records import AlertState
from invoice_watch.types import AlertEvent

ERROR_MAX = 1000  # characters of a delivery error kept (a receiver's answer can be long)


def _error_text(error: str) -> str:
    """A delivery error as the outbox keeps it: storable whatever a receiver put in it
    (a lone surrogate would make the mark fail, and the message be sent again for
    ever), at most :data:`ERROR_MAX` characters."""
    return storable(error, ERROR_MAX)


# A message that reached some of its notifier's recipients (an email some took and
# another refused for now) is still owed to the others: its ``last_error`` says so first,
# as a JSON list, which is how the outbox remembers them (no column of their own).
OWED_PREFIX = "still owed to "


def outbox_error(error: str, owed: Sequence[str] | None = None) -> str:
    """The ``last_error`` the outbox stores for ``error``: made storable and bounded
    (:data:`ERROR_MAX`), after ``still owed to ["a@example.com"]: `` when ``owed`` says
    which recipients still need the message (:func:`owed_of` reads them back; the list
    is the configured ``to``'s, so bounded by it, and kept whole)."""
    text = _error_text(error)
    if owed is None:
        return text
    return f"{OWED_PREFIX}{json.dumps(list(owed))}: {text}"


def owed_of(last_error: str | None) -> tuple[str, ...] | None:
    """The recipients a stored ``last_error`` says are still owed the message, None
    when it names none (all of them are)."""
    if not last_error or not last_error.startswith(OWED_PREFIX):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(last_error, len(OWED_PREFIX))
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def event_json(event: AlertEvent) -> str:
    """``event`` as compact JSON (an object): :meth:`AlertEvent.to_json`."""
    return json.dumps(event.to_json(), separators=(",", ":"))


def unstorable(event: AlertEvent) -> str | None:
    """Why the state could not store ``event`` (its JSON cannot be made: an amount of
    more than 4,300 digits), or None when it can."""
    try:
        event_json(event)
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


@functools.lru_cache(maxsize=256)
def _notifiers_json(notifiers: tuple[str, ...]) -> str:
    return ',"notifiers":' + json.dumps(list(notifiers), separators=(",", ":"))


def with_recipients(text: str, state: AlertState) -> str:
    """An alert's last event as its entry keeps it: the event's JSON (``text``, an
    object) and, beside the event's own keys, the notifiers its messages went to and
    whether its rule sends RESOLVED (which :meth:`AlertEvent.from_json` leaves alone: no
    schema change, and an older invoice-watch reads the entry as before)."""
    extra = ""
    if state.notifiers:
        extra += _notifiers_json(state.notifiers)
    if not state.send_resolved:
        extra += ',"send_resolved":false'
    return text[:-1] + extra + "}" if extra else text


def last_event(
    text: str, key: str, invoice_id: str | None
) -> tuple[AlertEvent, tuple[str, ...], bool]:
    """An alert's last event as :func:`with_recipients` wrote it: (the event, the
    notifiers its messages went to, whether its rule sends RESOLVED). The event shares
    its alert's ``key`` and ``invoice_id`` strings (thousands of alerts stay in memory)."""
    data: dict[str, Any] = json.loads(text)
    if data.get("key") == key:
        data["key"] = key
    if invoice_id is not None and data.get("invoice_id") == invoice_id:
        data["invoice_id"] = invoice_id
    event = AlertEvent.from_json(data)
    named = data.get("notifiers")
    notifiers: tuple[str, ...] = ()
    if isinstance(named, list):
        notifiers = tuple(sys.intern(str(name)) for name in named)
    return event, notifiers, data.get("send_resolved") is not False
