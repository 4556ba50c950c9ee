"""Silences in the state (``silences``), and what they do to the outbox; the statements
run on both backends (:mod:`invoice_watch.store.sql`).

A silence is written by the ``silence`` commands, also while the daemon runs: they open
the file read-write for one short transaction (:func:`~.database.open_writer`; WAL
lets it go beside the daemon's connection, ``busy_timeout`` waits for the daemon's
transaction to end), and the daemon reads the table whenever it releases messages and
at every delivery pass: no restart, no cache to refresh.

Releasing a cycle's messages applies the silences (:func:`silence_held`, in the unit of
work's transaction, before grouping): a silenced message waits in state ``silenced``,
a RESOLVED whose FIRING was silenced is ``muted`` (recorded, never sent) with the
silenced messages of its episode. :meth:`SqlSilences.lift` makes what no silence
matches any more pending (a FIRING whose alert still fires) or muted. Delivery applies
them again to the pending messages it is about to send (:meth:`SqlSilences.
silence_pending`: a silence added while a message waits for its receiver holds it too);
a silenced or muted row leaves its grouped message, whose other rows stay one message.
The decisions are :mod:`invoice_watch.silences`'s, pure.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any, TypeVar

from invoice_watch.silences import Effect, on_delivery, on_lift, on_release, silencing
from invoice_watch.store.encoding import OWED_PREFIX
from invoice_watch.store.grouping import group_summary, summarize
from invoice_watch.store.records import Lifted, Silence
from invoice_watch.store.sql import SqlConnection, SqlDatabase, json_text
from invoice_watch.types import AlertEvent, EventKind, events_from_json, instant

T = TypeVar("T")

_COLUMNS = "id, rule, org_id, invoice_id, starts_at, ends_at, comment, created_at"
# Bounds: silences looked at per release, silenced messages looked at per pass.
_ACTIVE_MAX = 1000
_LIFT_MAX = 1000


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _silence(row: tuple[Any, ...]) -> Silence:
    return Silence(
        id=row[0],
        rule=row[1],
        org_id=row[2],
        invoice_id=row[3],
        starts_at=instant(row[4]),
        ends_at=instant(row[5]),
        comment=row[6],
        created_at=instant(row[7]),
    )


def active_silences(conn: SqlConnection, now: datetime) -> list[Silence]:
    """The silences that hold at ``now`` (at most ``_ACTIVE_MAX``, those ending last)."""
    at = _utc(now)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM silences WHERE ends_at > ? AND starts_at <= ? "
        "ORDER BY ends_at DESC LIMIT ?",
        (at, at, _ACTIVE_MAX),
    )
    return [_silence(row) for row in rows]


def _episode_where(conn: SqlConnection) -> str:
    key, since = json_text(conn, "events", "key"), json_text(conn, "events", "firing_since")
    return f"notifier=? AND {key}=? AND {since}=?"


def _firing_silenced(conn: SqlConnection, notifier: str, event: AlertEvent) -> bool:
    """Whether the FIRING of ``event``'s episode was silenced for ``notifier`` and never
    sent (its message is silenced or muted)."""
    row = conn.execute(
        "SELECT 1 FROM outbox WHERE state IN ('silenced', 'muted') AND "
        f"{_episode_where(conn)} AND {json_text(conn, 'events', 'kind')}='FIRING' LIMIT 1",
        (notifier, event.key, _iso(event.firing_since)),
    ).fetchone()
    return row is not None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def silence_held(
    conn: SqlConnection, now: datetime, cycle: int | None = None, *, only: bool = False
) -> int:
    """Apply the silences to the held messages about to be released (``cycle``'s
    ``only``, or all): each is one event (held messages are never grouped). Returns how
    many were silenced or muted. Costs two indexed queries when no silence holds and
    nothing was silenced."""
    silences = active_silences(conn, now)
    if (
        not silences
        and not conn.execute(
            "SELECT 1 FROM outbox WHERE state IN ('silenced', 'muted') LIMIT 1"
        ).fetchone()
    ):
        return 0
    where = "state='held' AND cycle=?" if only else "state='held'"
    params: tuple[Any, ...] = (cycle,) if only else ()
    changed = 0
    at = now.isoformat()
    for row_id, notifier, text in conn.execute(
        f"SELECT id, notifier, events FROM outbox WHERE {where} ORDER BY id", params
    ).fetchall():
        events = events_from_json(text)
        if len(events) != 1:
            continue
        event = events[0]
        firing_silenced = event.kind == EventKind.RESOLVED and _firing_silenced(
            conn, notifier, event
        )
        effect = on_release(event, silences, now, firing_silenced=firing_silenced)
        if effect == Effect.SILENCE:
            silence = silencing(event, silences, now)
            assert silence is not None
            conn.execute(
                "UPDATE outbox SET state='silenced', last_error=? WHERE id=?",
                (f"silenced by {silence.id} until {silence.ends_at.isoformat()}", row_id),
            )
            changed += 1
        elif effect == Effect.MUTE:
            why = "muted: its FIRING was silenced and never sent"
            conn.execute(
                "UPDATE outbox SET state='muted', done_at=?, last_error=? WHERE id=? "
                f"OR (state='silenced' AND {_episode_where(conn)})",
                (at, why, row_id, notifier, event.key, _iso(event.firing_since)),
            )
            changed += 1
    return changed


# A pending row not yet delivered to any of its recipients (one owed to some has been
# notified: it counts as sent).
_UNSENT = f"(last_error IS NULL OR last_error NOT LIKE '{OWED_PREFIX}%')"


def _firing_waiting(conn: SqlConnection, notifier: str, event: AlertEvent) -> bool:
    """Whether the FIRING of ``event``'s episode waits for ``notifier``, unsent."""
    row = conn.execute(
        f"SELECT 1 FROM outbox WHERE state='pending' AND {_UNSENT} AND "
        f"{_episode_where(conn)} AND {json_text(conn, 'events', 'kind')}='FIRING' LIMIT 1",
        (notifier, event.key, _iso(event.firing_since)),
    ).fetchone()
    return row is not None


def _leave_group(conn: SqlConnection, row_id: int) -> None:
    """Take row ``row_id`` out of the grouped message it is in, if any: its summary is
    its own event's again, and the group's other rows stay one message, led by the
    first of them (one left alone is a message of its own)."""
    row = conn.execute("SELECT grp, events FROM outbox WHERE id=?", (row_id,)).fetchone()
    if row is None or row[0] is None:
        return
    leader, own = row
    conn.execute(
        "UPDATE outbox SET grp=NULL, summary=? WHERE id=?",
        (summarize(events_from_json(own)), row_id),
    )
    rest = conn.execute(
        "SELECT id, events FROM outbox WHERE grp=? ORDER BY id", (leader,)
    ).fetchall()
    if not rest:
        return
    first = rest[0][0]
    if len(rest) == 1:
        summary = summarize(events_from_json(rest[0][1]))
        conn.execute("UPDATE outbox SET grp=NULL, summary=? WHERE id=?", (summary, first))
        return
    conn.execute("UPDATE outbox SET grp=? WHERE grp=?", (first, leader))
    conn.execute("UPDATE outbox SET summary=? WHERE id=?", (group_summary(len(rest), None), first))


def silence_pending(conn: SqlConnection, now: datetime, ids: Collection[int]) -> dict[str, int]:
    """Apply the silences active at ``now`` to the pending messages ``ids`` (and the
    rows grouped with them), which delivery is about to send
    (:func:`~invoice_watch.silences.on_delivery`): a silenced row waits in state
    ``silenced``, a RESOLVED whose FIRING was or would be silenced is ``muted`` with the
    unsent messages of its episode; each leaves its grouped message. Returns how many
    rows were silenced or muted, per notifier. One indexed query when no silence holds."""
    silences = active_silences(conn, now)
    if not silences:
        return {}
    changed: dict[str, int] = {}
    at = now.isoformat()
    for leader in sorted(ids):
        rows = conn.execute(
            f"SELECT id, notifier, events FROM outbox WHERE (id=? OR grp=?) AND "
            f"state='pending' AND {_UNSENT} ORDER BY id",
            (leader, leader),
        ).fetchall()
        for row_id, notifier, text in rows:
            events = events_from_json(text)
            if len(events) != 1:  # rows hold one event each; grouping is by rows
                continue
            event = events[0]
            resolved = event.kind == EventKind.RESOLVED
            effect = on_delivery(
                event,
                silences,
                now,
                firing_silenced=resolved and _firing_silenced(conn, notifier, event),
                firing_waiting=resolved and _firing_waiting(conn, notifier, event),
            )
            if effect == Effect.SEND:
                continue
            if effect == Effect.SILENCE:
                silence = silencing(event, silences, now)
                assert silence is not None
                _leave_group(conn, row_id)
                conn.execute(
                    "UPDATE outbox SET state='silenced', last_error=? WHERE id=?",
                    (f"silenced by {silence.id} until {silence.ends_at.isoformat()}", row_id),
                )
                changed[notifier] = changed.get(notifier, 0) + 1
                continue
            episode = (notifier, event.key, _iso(event.firing_since))
            muting = [row_id] + [
                other
                for (other,) in conn.execute(
                    f"SELECT id FROM outbox WHERE (state='silenced' OR (state='pending' AND "
                    f"{_UNSENT} AND {json_text(conn, 'events', 'kind')}='FIRING')) AND "
                    f"{_episode_where(conn)} AND id != ? ORDER BY id",
                    (*episode, row_id),
                ).fetchall()
            ]
            why = "muted: its FIRING was silenced and never sent"
            for other in muting:
                _leave_group(conn, other)
                conn.execute(
                    "UPDATE outbox SET state='muted', done_at=?, last_error=? WHERE id=?",
                    (at, why, other),
                )
            changed[notifier] = changed.get(notifier, 0) + len(muting)
    return changed


def prune_silences(conn: SqlConnection, cutoff: str, limit: int) -> int:
    """Forget silences that ended before ``cutoff`` (at most ``limit``)."""
    return conn.execute(
        "DELETE FROM silences WHERE id IN (SELECT id FROM silences WHERE ends_at < ? LIMIT ?)",
        (cutoff, limit),
    ).rowcount


class SqlSilences:
    """The silences (:class:`~invoice_watch.store.protocols.SilenceRepository`); not
    cached: the ``silence`` commands write them beside the daemon."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db

    async def add(self, silence: Silence) -> None:
        def run(conn: SqlConnection) -> None:
            conn.execute(
                f"INSERT INTO silences ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (
                    silence.id,
                    silence.rule,
                    silence.org_id,
                    silence.invoice_id,
                    _utc(silence.starts_at),
                    _utc(silence.ends_at),
                    silence.comment,
                    _utc(silence.created_at),
                ),
            )

        await self._db.write(run, f"add a silence to state {self._db.name}")

    async def expire(self, silence_id: str, now: datetime) -> Silence | None:
        def run(conn: SqlConnection) -> Silence | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM silences WHERE id=?", (silence_id,)
            ).fetchone()
            if row is None:
                return None
            found = _silence(row)
            if found.ends_at > now:
                conn.execute("UPDATE silences SET ends_at=? WHERE id=?", (_utc(now), silence_id))
                return Silence(**{**found.__dict__, "ends_at": now.astimezone(UTC)})
            return found

        return await self._db.write(run, f"expire a silence in state {self._db.name}")

    async def listing(
        self, now: datetime, *, expired: bool = False, limit: int = 100
    ) -> list[Silence]:
        def query(conn: SqlConnection) -> list[Silence]:
            if expired:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM silences ORDER BY ends_at DESC LIMIT ?", (limit,)
                )
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM silences WHERE ends_at > ? ORDER BY ends_at LIMIT ?",
                    (_utc(now), limit),
                )
            return [_silence(row) for row in rows]

        return await self._read(query)

    async def silence_pending(self, now: datetime, ids: Collection[int]) -> dict[str, int]:
        """:func:`silence_pending`, in a transaction of its own; no write at all when no
        silence holds (the active silences are read first)."""
        at = _utc(now)

        def any_active(conn: SqlConnection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM silences WHERE ends_at > ? AND starts_at <= ? LIMIT 1", (at, at)
            ).fetchone()
            return row is not None

        if not ids or not await self._read(any_active):
            return {}
        return await self._db.write(
            lambda conn: silence_pending(conn, now, ids),
            f"silence pending messages in state {self._db.name}",
        )

    async def lift(self, now: datetime) -> Lifted:
        """Make each silenced message no silence matches any more pending (a FIRING
        whose alert still fires: due now, its age counted from now) or muted."""

        def run(conn: SqlConnection) -> Lifted:
            rows = conn.execute(
                "SELECT id, events FROM outbox WHERE state='silenced' ORDER BY id LIMIT ?",
                (_LIFT_MAX,),
            ).fetchall()
            if not rows:
                return Lifted()
            silences = active_silences(conn, now)
            at = now.isoformat()
            sent = muted = waiting = 0
            for row_id, text in rows:
                events = events_from_json(text)
                event = events[0]
                alert = conn.execute(
                    "SELECT firing, firing_since FROM alerts WHERE key=?", (event.key,)
                ).fetchone()
                still = (
                    alert is not None
                    and bool(alert[0])
                    and event.firing_since is not None
                    and instant(alert[1]) == event.firing_since
                )
                effect = on_lift(event, silences, now, still_firing=still)
                if effect == Effect.SEND:
                    conn.execute(
                        "UPDATE outbox SET state='pending', next_attempt_at=?, created_at=?, "
                        "last_error=NULL WHERE id=?",
                        (at, at, row_id),
                    )
                    sent += 1
                elif effect == Effect.MUTE:
                    why = (
                        "muted: resolved while silenced"
                        if event.kind == EventKind.FIRING
                        else f"muted: a {event.kind} silenced is not sent later"
                    )
                    conn.execute(
                        "UPDATE outbox SET state='muted', done_at=?, last_error=? WHERE id=?",
                        (at, why, row_id),
                    )
                    muted += 1
                else:
                    waiting += 1
            return Lifted(sent, muted, waiting)

        return await self._db.write(run, f"lift silences in state {self._db.name}")

    async def _read(self, query: Callable[[SqlConnection], T]) -> T:
        return await self._db.read(query, f"the silences of state {self._db.name}")
