"""Silences: pausing an alert's notifications for a while (Alertmanager's silences,
issue 18). Pure: every function here is of the event, the silences and ``now``.

A :class:`~invoice_watch.store.records.Silence` matches an event by its rule, and, when
it names them, its organization and invoice; it is active from ``starts_at`` until
``ends_at`` (expiring one sets ``ends_at`` to now). A silenced event is never lost: its
outbox message waits (state ``silenced``) and is recorded as such (``history``):

- a FIRING or REMINDER matched by an active silence waits (:func:`on_release`);
- when no active silence matches it any more (:func:`on_lift`), a FIRING whose alert
  still fires (the same episode: the same ``firing_since``) is sent then; a REMINDER,
  a NOTICE (one-shot) and a FIRING whose alert has resolved since are muted (state
  ``muted``: recorded, never sent);
- a RESOLVED is sent only if its FIRING was: muted when its FIRING was silenced and not
  sent (whatever the silences say now), sent at once otherwise.

Silences apply at notification time, as Alertmanager's do: to a message as a cycle
releases it, and again to a pending message as delivery is about to send it
(:func:`on_delivery`), so that a silence added while a message waits (its receiver down,
retried for an hour) holds it too. A message already delivered to some of its
recipients (email's ``to``: owed to the others) counts as sent, and is not silenced.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from invoice_watch.store.records import Silence
from invoice_watch.types import AlertEvent, EventKind

# A silence longer than a year is a rule change, not a pause.
MAX_SILENCE = timedelta(days=366)
COMMENT_MAX = 500
_FOR = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?", re.ASCII)  # 0-9 only


class Effect(enum.StrEnum):
    """What a silence does to an outbox message."""

    SEND = "send"  # pending: delivered as any message
    SILENCE = "silenced"  # waits until no silence matches it
    MUTE = "muted"  # recorded, never sent


def active(silence: Silence, now: datetime) -> bool:
    """Whether ``silence`` holds at ``now`` (``starts_at`` <= now < ``ends_at``)."""
    return silence.starts_at <= now < silence.ends_at


def matches(silence: Silence, event: AlertEvent) -> bool:
    """Whether ``silence`` is about ``event``: the same rule, and the organization and
    invoice it names, if any."""
    return (
        silence.rule == event.rule
        and (silence.org_id is None or silence.org_id == event.org_id)
        and (silence.invoice_id is None or silence.invoice_id == event.invoice_id)
    )


def silencing(event: AlertEvent, silences: Iterable[Silence], now: datetime) -> Silence | None:
    """The active silence matching ``event`` that ends last (None: none does)."""
    found = [s for s in silences if active(s, now) and matches(s, event)]
    return max(found, key=lambda s: s.ends_at) if found else None


def on_release(
    event: AlertEvent, silences: Iterable[Silence], now: datetime, *, firing_silenced: bool
) -> Effect:
    """What becomes of ``event``'s message as a cycle releases it. ``firing_silenced``:
    (for a RESOLVED) the FIRING of the same episode was silenced and never sent."""
    if event.kind == EventKind.RESOLVED:
        return Effect.MUTE if firing_silenced else Effect.SEND
    return Effect.SILENCE if silencing(event, silences, now) is not None else Effect.SEND


def on_delivery(
    event: AlertEvent,
    silences: Iterable[Silence],
    now: datetime,
    *,
    firing_silenced: bool,
    firing_waiting: bool,
) -> Effect:
    """What becomes of ``event``'s pending message as delivery is about to send it.
    ``firing_silenced`` as for :func:`on_release`; ``firing_waiting``: (for a RESOLVED)
    the FIRING of the same episode waits unsent too. A RESOLVED whose FIRING waits and is
    silenced now (the same rule, organization and invoice: the silence matches both) is
    muted with it: an alert that fired and resolved within a silence is not notified."""
    if event.kind == EventKind.RESOLVED and firing_waiting and not firing_silenced:
        firing_silenced = silencing(event, silences, now) is not None
    return on_release(event, silences, now, firing_silenced=firing_silenced)


def on_lift(
    event: AlertEvent, silences: Iterable[Silence], now: datetime, *, still_firing: bool
) -> Effect:
    """What becomes of a silenced message at ``now``. ``still_firing``: its alert fires
    now, in the same episode as the event (the same ``firing_since``)."""
    if silencing(event, silences, now) is not None:
        return Effect.SILENCE
    if event.kind == EventKind.FIRING and still_firing:
        return Effect.SEND
    return Effect.MUTE


def new_silence(
    rule: str,
    *,
    org_id: str | None,
    invoice_id: str | None,
    comment: str,
    now: datetime,
    duration: timedelta | None = None,
    until: datetime | None = None,
) -> Silence:
    """A silence from now for ``duration`` or until ``until`` (one of them);
    :class:`ValueError` saying what is wrong with the arguments."""
    if (duration is None) == (until is None):
        raise ValueError("give one of --for (e.g. 4h) or --until (a time)")
    ends = now + duration if duration is not None else until
    assert ends is not None
    if ends.tzinfo is None:
        raise ValueError("--until needs a time zone, e.g. 2025-07-01T08:00+02:00 or ...Z")
    if ends <= now:
        raise ValueError(f"the silence would end at {ends.isoformat()}, which is not in the future")
    if ends - now > MAX_SILENCE:
        raise ValueError("a silence lasts at most 366 days; change the rule instead")
    text = " ".join(comment.split())
    if not text:
        raise ValueError("--comment is required: say why (e.g. the billing dispute's ticket)")
    if len(text) > COMMENT_MAX:
        raise ValueError(f"--comment is at most {COMMENT_MAX} characters")
    if not rule.strip():
        raise ValueError("--rule names the rule to silence")
    return Silence(
        id=secrets.token_hex(4),
        rule=rule,
        org_id=org_id,
        invoice_id=invoice_id,
        starts_at=now,
        ends_at=ends,
        comment=text,
        created_at=now,
    )


def parse_for(text: str) -> timedelta:
    """``--for``: ``30m``, ``4h``, ``2d``, ``1d12h``; :class:`ValueError` otherwise."""
    m = _FOR.fullmatch(text.strip())
    if not m or not any(m.groups()) or any(g is not None and len(g) > 6 for g in m.groups()):
        raise ValueError(f"--for {text!r}: use a number and a unit m, h or d (e.g. 4h, 2d)")
    days, hours, minutes = (int(g or 0) for g in m.groups())
    delta = timedelta(days=days, hours=hours, minutes=minutes)
    if delta <= timedelta(0):
        raise ValueError("--for must be longer than 0")
    return delta


def parse_until(text: str) -> datetime:
    """``--until``: an ISO 8601 time with its offset (``2025-07-01T08:00+02:00``,
    ``...Z``); :class:`ValueError` otherwise."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(
            f"--until {text!r}: use an ISO 8601 time with its offset, e.g. "
            "2025-07-01T08:00+02:00 or 2025-07-01T06:00Z"
        ) from exc
    if when.tzinfo is None:
        raise ValueError(f"--until {text!r} needs an offset, e.g. +02:00 or Z")
    return when
