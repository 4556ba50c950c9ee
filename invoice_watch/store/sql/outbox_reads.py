"""The outbox's queries (``outbox``, read-only): what delivery sends next
(:meth:`SqlOutboxReads.due`, and when: :meth:`~SqlOutboxReads.next_attempt_at`), what
waits (the health check's :meth:`~SqlOutboxReads.waiting_since`, the FIRINGs not sent yet
that a reload must not lose: :meth:`~SqlOutboxReads.unnotified`), and what the operator
sees (``status``, ``history``: :meth:`~SqlOutboxReads.counts`,
:meth:`~SqlOutboxReads.messages`). Every one is a query (``SqlDatabase.read``: SELECTs,
no transaction) and changes nothing; what changes the outbox (a cycle's rows, the marks
of delivery) is :mod:`invoice_watch.store.sql.outbox`.

A grouped message is one row that leads it and the rows that follow it (``grp`` = the
leader's id): a query counts and returns the leader (:data:`MESSAGE_ROWS`), with the
events of them all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from typing import TypeVar

from invoice_watch.report.outbox import ReportMessage, is_report_json
from invoice_watch.store.encoding import OWED_PREFIX, owed_of
from invoice_watch.store.records import Delivery, OutboxRow
from invoice_watch.store.sql import SqlConnection, SqlDatabase, json_text
from invoice_watch.types import Part, events_from_json, instant

T = TypeVar("T")

# A row that is a message of its own, or leads a group (the others follow it).
MESSAGE_ROWS = "(grp IS NULL OR grp = id)"


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _part_of(conn: SqlConnection, leader: int, cycle: int | None, notifier: str) -> Part | None:
    """Which part the grouped message led by ``leader`` is of its cycle's grouped
    messages to ``notifier`` (None: the only one). A cycle's rows are numbered together
    (cycles commit one after another, and nothing else adds rows), so its parts lie
    between the nearest rows of other cycles: found by rowid, without a scan."""
    tag = cycle or 0  # (cycles are numbered from 1; a row of schema 1 has none)
    before = conn.execute(
        "SELECT id FROM outbox WHERE id < ? AND COALESCE(cycle, 0) <> ? ORDER BY id DESC LIMIT 1",
        (leader, tag),
    ).fetchone()
    after = conn.execute(
        "SELECT id FROM outbox WHERE id > ? AND COALESCE(cycle, 0) <> ? ORDER BY id LIMIT 1",
        (leader, tag),
    ).fetchone()
    leaders = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM outbox WHERE id > ? AND id < ? AND COALESCE(cycle, 0) = ? "
            "AND notifier=? AND grp=id ORDER BY id",
            (before[0] if before else 0, after[0] if after else sys.maxsize, tag, notifier),
        )
    ]
    if len(leaders) < 2 or leader not in leaders:
        return None
    return Part(leaders.index(leader) + 1, len(leaders))


class SqlOutboxReads:
    """The outbox's read-only queries (module docstring); :class:`~invoice_watch.store.
    sql.outbox.SqlOutbox` adds the writes."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db

    # -- delivery --------------------------------------------------------------------

    async def due(
        self, now: datetime, limit: int = 100, *, exclude: Collection[int] = ()
    ) -> list[Delivery]:
        skip = sorted(exclude)
        marks = ",".join("?" * len(skip))

        def query(conn: SqlConnection) -> list[Delivery]:
            rows = conn.execute(
                "SELECT id, notifier, events, created_at, attempts, grp, cycle, last_error "
                f"FROM outbox WHERE state='pending' AND next_attempt_at <= ? AND {MESSAGE_ROWS} "
                f"{f'AND id NOT IN ({marks}) ' if skip else ''}ORDER BY id LIMIT ?",
                (now.isoformat(), *skip, limit),
            ).fetchall()
            out = []
            for row in rows:
                created = _dt(row[3])
                assert created is not None
                if is_report_json(row[2]):  # a report: never grouped, never owed a part
                    report = ReportMessage.from_json(row[2])
                    owed = owed_of(row[7])
                    out.append(
                        Delivery(row[0], row[1], [], created, row[4], None, row[7], owed, report)
                    )
                    continue
                events = events_from_json(row[2])
                part = None
                if row[5] is not None:  # a group: its leader's events, then the others'
                    for (more,) in conn.execute(
                        "SELECT events FROM outbox WHERE grp=? AND id!=? ORDER BY id",
                        (row[0], row[0]),
                    ):
                        events.extend(events_from_json(more))
                    part = _part_of(conn, row[0], row[6], row[1])
                owed = owed_of(row[7])
                out.append(Delivery(row[0], row[1], events, created, row[4], part, row[7], owed))
            return out

        return await self._read(query)

    async def waiting_since(self, limit: int = 10_000) -> list[datetime]:
        def query(conn: SqlConnection) -> list[datetime]:
            rows = conn.execute(
                "SELECT DISTINCT created_at FROM outbox WHERE state IN ('held', 'pending') "
                f"AND {MESSAGE_ROWS} ORDER BY created_at LIMIT ?",
                (limit,),
            )
            return [when for (text,) in rows if (when := _dt(text)) is not None]

        return await self._read(query)

    async def unnotified(self, notifier: str, limit: int = 10_000) -> set[tuple[str, datetime]]:
        """The episodes whose FIRING for ``notifier`` waits unsent
        (:meth:`~invoice_watch.store.protocols.Outbox.unnotified`): rows held, silenced,
        or pending and owed to none of their recipients yet (``state`` is indexed)."""

        def query(conn: SqlConnection) -> set[tuple[str, datetime]]:
            key, since = json_text(conn, "events", "key"), json_text(conn, "events", "firing_since")
            rows = conn.execute(
                f"SELECT {key}, {since} FROM outbox WHERE state IN ('held', 'silenced', "
                "'pending') AND notifier=? AND (state != 'pending' OR last_error IS NULL OR "
                f"last_error NOT LIKE ?) AND {json_text(conn, 'events', 'kind')}='FIRING' "
                "LIMIT ?",
                (notifier, OWED_PREFIX + "%", limit),
            )
            return {(k, instant(at)) for k, at in rows if k is not None and at is not None}

        return await self._read(query)

    async def next_attempt_at(self) -> datetime | None:
        def query(conn: SqlConnection) -> datetime | None:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'"
            ).fetchone()
            return _dt(row[0]) if row else None

        return await self._read(query)

    async def pending_by_notifier(self) -> dict[str, int]:
        """How many messages are pending, per notifier."""

        def query(conn: SqlConnection) -> dict[str, int]:
            rows = conn.execute(
                f"SELECT notifier, COUNT(*) FROM outbox WHERE state='pending' AND {MESSAGE_ROWS} "
                "GROUP BY notifier"
            )
            return {notifier: count for notifier, count in rows}

        return await self._read(query)

    async def _read(self, query: Callable[[SqlConnection], T]) -> T:
        return await self._db.read(query, f"the outbox of {self._db.kind} {self._db.name}")

    # -- for the operator ------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        def query(conn: SqlConnection) -> dict[str, int]:
            rows = conn.execute(
                f"SELECT state, COUNT(*) FROM outbox WHERE {MESSAGE_ROWS} GROUP BY state"
            )
            return {state: count for state, count in rows}

        return await self._read(query)

    async def messages(self, states: Iterable[str], limit: int = 50) -> list[OutboxRow]:
        wanted = tuple(states)
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))

        def query(conn: SqlConnection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT id, notifier, summary, created_at, state, attempts, next_attempt_at, "
                f"last_error, done_at FROM outbox WHERE state IN ({marks}) AND {MESSAGE_ROWS} "
                "ORDER BY id DESC LIMIT ?",
                (*wanted, limit),
            ).fetchall()
            result = []
            for r in rows:
                created, next_at = _dt(r[3]), _dt(r[6])
                assert created is not None and next_at is not None
                result.append(
                    OutboxRow(r[0], r[1], r[2], created, r[4], r[5], next_at, r[7], _dt(r[8]))
                )
            return result

        return await self._read(query)
