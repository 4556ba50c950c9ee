"""The notification log in the SQLite state file: one row per alert (``alerts``), its
state (:class:`~invoice_watch.store.records.AlertState`) and the last event sent for it.

Firing alerts are cached in memory from the opening on (the cycle reads them), and the
cache changes only once a transaction committed (:meth:`SqlNotificationLog.apply`);
a resolved alert stays in the file until retention forgets it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from invoice_watch.store.encoding import event_json, last_event, with_recipients
from invoice_watch.store.protocols import AlertChange
from invoice_watch.store.records import AlertState
from invoice_watch.store.sql import SqlConnection
from invoice_watch.types import AlertEvent, Invoice, Snapshot, instant


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _alert_row(state: AlertState, last_event: str | None) -> tuple[Any, ...]:
    return (
        state.key,
        state.rule,
        state.org_id,
        state.source_org_id,
        state.invoice_id,
        int(state.firing),
        state.firing_since.isoformat(),
        _ts(state.last_notified),
        _ts(state.resolved_at),
        last_event,
    )


def _alert_from_row(row: Sequence[Any], invoice_ids: Mapping[str, Invoice]) -> AlertState:
    """A stored alert; its rule, organizations and times shared with the others', its
    invoice id with the snapshot's (``invoice_ids``: the source organization's)."""
    invoice_id = row[4]
    if invoice_id is not None and (known := invoice_ids.get(invoice_id)) is not None:
        invoice_id = known.id
    event: AlertEvent | None = None
    notifiers: tuple[str, ...] = ()
    send_resolved = True
    if row[9]:
        event, notifiers, send_resolved = last_event(row[9], row[0], invoice_id)
    return AlertState(
        key=row[0],
        rule=sys.intern(row[1]),
        org_id=sys.intern(row[2]),
        source_org_id=sys.intern(row[3]),
        invoice_id=invoice_id,
        firing=bool(row[5]),
        firing_since=instant(row[6]),
        last_notified=instant(row[7]) if row[7] else None,
        resolved_at=instant(row[8]) if row[8] else None,
        last_event=event,
        notifiers=notifiers,
        send_resolved=send_resolved,
    )


class SqlNotificationLog:
    """The notification log (:class:`~invoice_watch.store.protocols.NotificationLog`)
    and its cache of firing alerts."""

    def __init__(self) -> None:
        self._firing: dict[str, AlertState] = {}

    def load(self, conn: SqlConnection, snapshot: Callable[[str], Snapshot]) -> None:
        """Read the firing alerts (``snapshot``: an organization's, whose invoice ids
        they share)."""
        self._firing = {}
        for row in conn.execute(
            "SELECT key, rule, org_id, source_org_id, invoice_id, firing, firing_since, "
            "last_notified, resolved_at, last_event FROM alerts WHERE firing = 1"
        ):
            self._firing[row[0]] = _alert_from_row(row, snapshot(row[3]).live)

    def firing(self) -> dict[str, AlertState]:
        return dict(self._firing)

    def write(self, conn: SqlConnection, transitions: Iterable[AlertChange]) -> dict[int, str]:
        """The alerts' rows; returns the JSON of each event written, by ``id(event)``
        (an event is stored as its alert's last event and as an outbox message)."""
        written: dict[int, str] = {}

        def rows() -> Iterator[tuple[Any, ...]]:
            for t in transitions:
                state = t.state
                event = state.last_event
                text = None
                if event is not None:
                    text = written[id(event)] = event_json(event)
                    text = with_recipients(text, state)
                yield _alert_row(state, text)

        conn.executemany(
            "INSERT INTO alerts (key, rule, org_id, source_org_id, invoice_id, "
            "firing, firing_since, last_notified, resolved_at, last_event) "
            "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (key) DO UPDATE SET "
            "rule=excluded.rule, org_id=excluded.org_id, source_org_id=excluded.source_org_id, "
            "invoice_id=excluded.invoice_id, firing=excluded.firing, "
            "firing_since=excluded.firing_since, last_notified=excluded.last_notified, "
            "resolved_at=excluded.resolved_at, last_event=excluded.last_event",
            rows(),
        )
        return written

    def apply(self, transitions: Iterable[AlertChange]) -> None:
        """Bring the cache in line with what was just committed."""
        for transition in transitions:
            state = transition.state
            if state.firing:
                self._firing[state.key] = state
            else:
                self._firing.pop(state.key, None)

    @staticmethod
    def prune(conn: SqlConnection, cutoff: str, limit: int) -> int:
        """Delete alerts resolved before ``cutoff``, and notices (one-shot, never
        firing) sent before it (at most ``limit``; a firing alert is never touched: SPEC
        §3, its state does not expire); returns how many."""
        return conn.execute(
            "DELETE FROM alerts WHERE key IN (SELECT key FROM alerts "
            "WHERE firing=0 AND resolved_at < ? LIMIT ?)",
            (cutoff, limit),
        ).rowcount
