"""The outbox in the SQLite state file: one row per event and notifier (``outbox``).

A running cycle's rows are held (state ``held``, tagged with the cycle) and released when
it ends, or while it runs: per notifier one by one, or, above ``group_over``, as grouped
messages (:func:`~invoice_watch.store.grouping.message_parts`), each led by its first row
(``grp`` = the leader's id) so that grouping rewrites nothing. The unit of work does this
in its transactions (:func:`hold_events`, :func:`release_held`). Delivery reads the due
messages (the queries are :mod:`invoice_watch.store.sql.outbox_reads`), and marks each
sent, failed, or to be retried (:class:`SqlOutbox`); retention deletes those done long
ago (:func:`prune_done`). The outbox is not cached: delivery reads it a bounded batch at
a time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.store.encoding import OWED_PREFIX, event_json, outbox_error
from invoice_watch.store.grouping import (
    group_summary,
    message_parts,
    notifiers,
    split,
    summarize,
)
from invoice_watch.store.protocols import AlertChange
from invoice_watch.store.sql import SqlConnection
from invoice_watch.store.sql.outbox_reads import MESSAGE_ROWS, SqlOutboxReads
from invoice_watch.store.sql.silences import silence_held
from invoice_watch.types import instant


def _group(conn: SqlConnection, ids: Sequence[int], sizes: Sequence[int], now: str | None) -> None:
    """Make the rows ``ids`` (in order) grouped messages of ``sizes`` (at most
    MESSAGE_MAX_EVENTS each): each part led by its first row, pending (due ``now`` when
    given, else when it already was)."""
    for members, part in split(ids, sizes):
        first = members[0]
        marks = ",".join("?" * len(members))
        if now is None:
            conn.execute(f"UPDATE outbox SET grp=? WHERE id IN ({marks})", (first, *members))
        else:
            conn.execute(
                f"UPDATE outbox SET state='pending', grp=?, next_attempt_at=? "
                f"WHERE id IN ({marks})",
                (first, now, *members),
            )
        conn.execute(
            "UPDATE outbox SET summary=? WHERE id=?", (group_summary(len(members), part), first)
        )


# -- written in a transaction of the unit of work -------------------------------------


def hold_events(
    conn: SqlConnection,
    cycle: int,
    transitions: Iterable[AlertChange],
    routes: Mapping[str, Sequence[str]],
    now: str,
    written: Mapping[int, str],
) -> None:
    """The transitions' events, held by ``cycle``: one row per notifier
    (``written``: the JSON already made of an event, by ``id(event)``)."""
    rows: list[tuple[str, str, str, str, str, int]] = []
    for t in transitions:
        event = t.event
        if event is None:
            continue
        text = written.get(id(event))
        events = f"[{text if text is not None else event_json(event)}]"
        summary = summarize((event,))
        rows.extend((name, events, summary, now, now, cycle) for name in notifiers(t, routes))
    conn.executemany(
        "INSERT INTO outbox (notifier, events, summary, created_at, next_attempt_at, "
        "state, cycle) VALUES (?,?,?,?,?,'held',?)",
        rows,
    )


def retag_held(conn: SqlConnection, cycle: int, tag: int) -> None:
    """The rows ``cycle`` holds so far are held by ``tag`` now."""
    conn.execute("UPDATE outbox SET cycle=? WHERE state='held' AND cycle=?", (tag, cycle))


def release_held(
    conn: SqlConnection,
    group_over: int,
    now: str,
    cycle: int | None = None,
    *,
    only: bool = False,
) -> int:
    """Release held rows (of every cycle, or of ``cycle`` ``only``; ``cycle``'s own
    count is returned, or all of them). More than ``group_over`` of one cycle for one
    notifier become grouped messages (:func:`message_parts`): the first row of each
    leads it (its summary says so), the others follow (``grp``), and they are sent,
    retried and marked together, in order; the parts of a group go in order, each on
    its own."""
    silence_held(conn, instant(now), cycle, only=only)
    counted = 0
    if only:
        groups = conn.execute(
            "SELECT cycle, notifier, COUNT(*) FROM outbox WHERE state='held' AND "
            "cycle=? GROUP BY cycle, notifier ORDER BY notifier",
            (cycle,),
        ).fetchall()
    else:
        groups = conn.execute(
            "SELECT cycle, notifier, COUNT(*) FROM outbox WHERE state='held' "
            "GROUP BY cycle, notifier ORDER BY cycle, notifier"
        ).fetchall()
    for held_by, notifier, count in groups:
        if cycle is None or held_by == cycle:
            counted += count
        where = "state='held' AND COALESCE(cycle, 0)=? AND notifier=?"
        due = max(now, _waiting_behind(conn, notifier))
        sizes = message_parts(count, group_over)
        if sizes is None:
            conn.execute(
                "UPDATE outbox SET state='pending', next_attempt_at=CASE WHEN "
                f"next_attempt_at > ? THEN next_attempt_at ELSE ? END WHERE {where}",
                (due, due, held_by or 0, notifier),
            )
            continue
        ids = [
            row[0]
            for row in conn.execute(
                f"SELECT id FROM outbox WHERE {where} ORDER BY id", (held_by or 0, notifier)
            )
        ]
        _group(conn, ids, sizes, due)
    return counted


def released_messages(conn: SqlConnection, cycle: int) -> int:
    """How many messages the rows ``cycle`` released went out as (a grouped message
    counts once; a silenced row not at all): call it in the releasing transaction."""
    row = conn.execute(
        "SELECT COUNT(*) FROM outbox WHERE cycle=? AND state='pending' AND (grp IS NULL OR grp=id)",
        (cycle,),
    ).fetchone()
    return int(row[0])


def _waiting_behind(conn: SqlConnection, notifier: str) -> str:
    """When the notifier's pending messages that wait for a retry are next tried ('' when
    none does): a message released now waits until then too, so that one notifier's
    messages go in order (a RESOLVED never overtakes its FIRING). A retry owed to some
    recipients only holds up nothing (deliver/)."""
    row = conn.execute(
        "SELECT MAX(next_attempt_at) FROM outbox WHERE notifier=? AND state='pending' "
        "AND attempts > 0 AND (last_error IS NULL OR last_error NOT LIKE ?)",
        (notifier, OWED_PREFIX + "%"),
    ).fetchone()
    return row[0] or ""


def split_oversized(conn: SqlConnection) -> None:
    """Split each pending group larger than a message may be into parts (written
    by an earlier version)."""
    oversized = conn.execute(
        "SELECT grp FROM outbox WHERE grp IS NOT NULL AND state='pending' "
        "GROUP BY grp HAVING COUNT(*) > ?",
        (MESSAGE_MAX_EVENTS,),
    ).fetchall()
    for (leader,) in oversized:
        rows = conn.execute("SELECT id FROM outbox WHERE grp=? ORDER BY id", (leader,))
        ids = [row[0] for row in rows]
        sizes = message_parts(len(ids), 1)
        assert sizes is not None
        _group(conn, ids, sizes, None)


def prune_done(conn: SqlConnection, cutoff: str, limit: int) -> int:
    """Delete messages sent or failed before ``cutoff`` (a grouped one whole; at most
    ``limit``); pending and held ones are never touched. Returns how many rows."""
    done = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM outbox WHERE state IN ('sent', 'failed', 'muted') "
            f"AND next_attempt_at < ? AND done_at < ? AND {MESSAGE_ROWS} LIMIT ?",
            (cutoff, cutoff, limit),
        )
    ]
    deleted = 0
    for start in range(0, len(done), 400):
        chunk = done[start : start + 400]
        marks = ",".join("?" * len(chunk))
        deleted += conn.execute(
            f"DELETE FROM outbox WHERE id IN ({marks}) OR grp IN ({marks})",
            (*chunk, *chunk),
        ).rowcount
    return deleted


class SqlOutbox(SqlOutboxReads):
    """The outbox (:class:`~invoice_watch.store.protocols.Outbox`): the queries of
    :class:`~invoice_watch.store.sql.outbox_reads.SqlOutboxReads`, and the writes of
    delivery (the marks of an attempt, a retry's schedule, merged messages)."""

    async def bound_schedule(self, now: datetime, latest: datetime) -> int:
        """Make every pending message scheduled after ``latest`` due ``now``: a retry is
        never further away than ``delivery.max_backoff``, so a later one was scheduled by
        a wall clock that has since been set back (an NTP fix, a VM restore), or before a
        reload shortened ``max_backoff``. Returns how many were brought forward."""

        def run(conn: SqlConnection) -> int:
            return conn.execute(
                "UPDATE outbox SET next_attempt_at=? WHERE state='pending' AND next_attempt_at > ?",
                (now.isoformat(), latest.isoformat()),
            ).rowcount

        return await self._db.write(run, "update the outbox")

    async def merge(self, ids: Sequence[int]) -> None:
        """Make the pending messages ``ids`` one grouped message led by the first
        (:meth:`~invoice_watch.store.protocols.Outbox.merge`): their rows, and those of
        the groups they lead, follow it (``grp``); its summary counts them."""
        if len(ids) < 2:
            return
        first = ids[0]
        marks = ",".join("?" * len(ids))

        def run(conn: SqlConnection) -> None:
            conn.execute(
                f"UPDATE outbox SET grp=? WHERE state='pending' AND (id IN ({marks}) OR "
                f"grp IN ({marks}))",
                (first, *ids, *ids),
            )
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE grp=?", (first,)).fetchone()
            conn.execute(
                "UPDATE outbox SET summary=? WHERE id=?", (group_summary(count, None), first)
            )

        await self._db.write(run, "update the outbox")

    async def mark_sent(self, delivery_id: int, now: datetime) -> None:
        await self._update(
            (
                "UPDATE outbox SET state='sent', attempts=attempts+1, done_at=?, "
                "last_error=NULL WHERE id=? OR grp=?",
                (now.isoformat(), delivery_id, delivery_id),
            )
        )

    async def mark_retry(
        self,
        delivery_id: int,
        next_attempt_at: datetime,
        error: str,
        owed: Sequence[str] | None = None,
        *,
        hold: bool = True,
    ) -> None:
        """Schedule the row's next attempt (for the recipients ``owed``, when some got it
        already: :func:`~invoice_watch.store.encoding.outbox_error`); the same
        notifier's other pending rows that were due earlier wait until then too
        (``hold``; not when the failure was only some recipients')."""
        at = next_attempt_at.isoformat()
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (
                "UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=? "
                "WHERE id=? OR grp=?",
                (at, outbox_error(error, owed), delivery_id, delivery_id),
            )
        ]
        if hold:
            statements.append(self._defer_notifier(delivery_id, at))
        await self._update(*statements)

    async def postpone(
        self, delivery_id: int, until: datetime, error: str, owed: Sequence[str] | None = None
    ) -> None:
        """Look at the row again at ``until``, as :meth:`mark_retry` does, but without
        counting an attempt: none was made (its notifier is not configured)."""
        at = until.isoformat()
        await self._update(
            (
                "UPDATE outbox SET next_attempt_at=?, last_error=? WHERE id=? OR grp=?",
                (at, outbox_error(error, owed), delivery_id, delivery_id),
            ),
            self._defer_notifier(delivery_id, at),
        )

    @staticmethod
    def _defer_notifier(delivery_id: int, at: str) -> tuple[str, tuple[Any, ...]]:
        """The statement that makes the row's notifier's other pending rows due at
        ``at`` at the earliest."""
        return (
            "UPDATE outbox SET next_attempt_at=? WHERE state='pending' AND "
            "notifier=(SELECT notifier FROM outbox WHERE id=?) AND next_attempt_at<?",
            (at, delivery_id, at),
        )

    async def mark_failed(
        self, delivery_id: int, now: datetime, error: str, owed: Sequence[str] | None = None
    ) -> None:
        await self._update(
            (
                "UPDATE outbox SET state='failed', attempts=attempts+1, done_at=?, "
                "last_error=? WHERE id=? OR grp=?",
                (now.isoformat(), outbox_error(error, owed), delivery_id, delivery_id),
            )
        )

    async def make_due(self, notifiers: Collection[str], now: datetime) -> int:
        """Make every pending message for ``notifiers`` due ``now`` (a notifier configured
        again); returns how many."""
        names = sorted(notifiers)
        if not names:  # (`IN ()` is SQLite's only)
            return 0
        marks = ",".join("?" * len(names))

        def run(conn: SqlConnection) -> int:
            return conn.execute(
                f"UPDATE outbox SET next_attempt_at=? WHERE state='pending' "
                f"AND notifier IN ({marks})",
                (now.isoformat(), *names),
            ).rowcount

        return await self._db.write(run, "update the outbox")

    async def _update(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run outbox updates in one transaction."""

        def run(conn: SqlConnection) -> None:
            for sql, params in statements:
                conn.execute(sql, params)

        await self._db.write(run, "update the outbox")
