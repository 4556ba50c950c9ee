"""Recording what became of each message: its mark in the outbox, or kept in memory.

An :class:`Outcome` is one message's outcome to record: sent, failed, to be retried at
``at``, or postponed (no attempt made: its notifier is not configured) to ``at``.
:class:`Recorder` writes it (``Outbox.mark_sent``, ``mark_failed``, ``mark_retry``,
``postpone``), shielded from cancellation: once begun, the transaction completes.

An outcome the state file cannot record (a full disk: Slack took the message, but its
"sent" mark cannot be written; the same for a failed or retry mark) is kept in memory:
the message is not attempted again while it is, the write is retried with backoff, and
the operator is told once, by a log line and by the ``invoice_watch_outbox_unrecorded``
gauge (each failed write counts in ``invoice_watch_outbox_write_errors_total``). Only a
process that ends before the state is writable again can send such a message twice
(once more, at its next start), as a crash between a send and its mark can. A replica
that steps down forgets them (:meth:`Recorder.drop`): the new leader owns the outbox.
The outbox's columns are made storable as they are written (``invoice_watch.store``), so
no character a receiver sends (in an error text) can make a mark fail.

Owns those kept outcomes (by outbox id, oldest first), the count of writes failed in a
row, and the monotonic time (seconds) of the next write of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from invoice_watch.deliver.context import Context, log
from invoice_watch.deliver.telling import FailureWarnings
from invoice_watch.errors import NotLeaderError, StateError
from invoice_watch.retry import backoff
from invoice_watch.store import Delivery

WRITE_BACKOFF = 1.0  # seconds before an unrecorded outcome's first new write

DONE = {
    "sent": "delivered",
    "failed": "marked failed",
    "retry": "to be retried",
    "postponed": "kept for its notifier",
}


@dataclass(frozen=True)
class Outcome:
    """A message's outcome, to be recorded: ``at`` is when it was sent or failed, or
    (``retry``, ``postponed``) when it is due again; ``what`` names it in log lines."""

    delivery: Delivery
    what: str
    state: Literal["sent", "failed", "retry", "postponed"]
    at: datetime
    error: str | None = None
    owed: tuple[str, ...] | None = None  # the recipients still owed it (None: all)
    alone: bool = False  # a retry that holds up none of the notifier's other messages

    @property
    def retry(self) -> bool:
        """Whether the message stays pending (retried, or postponed: no attempt made)."""
        return self.state in ("retry", "postponed")


class Recorder:
    """Writes outcomes, and keeps those the state refuses (module docstring)."""

    def __init__(self, context: Context, warnings: FailureWarnings) -> None:
        self._context = context
        self._warnings = warnings
        self._unrecorded: dict[int, Outcome] = {}  # outbox id -> outcome kept in memory
        self._write_failures = 0  # failed writes since the state last took one
        self._write_at = 0.0  # monotonic time of the next write of the kept outcomes

    @property
    def kept(self) -> Mapping[int, Outcome]:
        """The outcomes kept in memory, by outbox id: those messages are not attempted."""
        return self._unrecorded

    def paused(self) -> set[str]:
        """The notifiers whose retry is kept in memory: they wait for the state file, as
        the recorded retry would have them wait (their rows go in order, that one first)."""
        return {
            kept.delivery.notifier
            for kept in self._unrecorded.values()
            if kept.retry and not kept.alone
        }

    def delivered(self) -> int:
        """How many kept outcomes are final (sent or failed): pending in the outbox still."""
        return sum(1 for kept in self._unrecorded.values() if not kept.retry)

    def wait(self) -> float | None:
        """Seconds until the next write of the kept outcomes (None: none kept)."""
        if not self._unrecorded:
            return None
        return max(0.0, self._write_at - self._context.clock.monotonic())

    async def _write(self, outcome: Outcome) -> None:
        """Record one outcome (shielded: once begun, the transaction completes)."""
        outbox, row = self._context.store.outbox, outcome.delivery.id
        error, owed = outcome.error or "", outcome.owed
        if outcome.state == "sent":
            write = outbox.mark_sent(row, outcome.at)
        elif outcome.state == "failed":
            write = outbox.mark_failed(row, outcome.at, error, owed)
        elif outcome.state == "postponed":
            write = outbox.postpone(row, outcome.at, error, owed)
        else:
            write = outbox.mark_retry(row, outcome.at, error, owed, hold=not outcome.alone)
        await asyncio.shield(write)

    async def record(self, outcome: Outcome) -> None:
        """Record an outcome, or keep it in memory when the state file refuses."""
        if not outcome.retry:
            self._warnings.forget(outcome.delivery.id)
        if self._unrecorded:  # the state file refused: kept ones are written first
            self._keep(outcome)
            return
        state = self._context.state
        try:
            await self._write(outcome)
        except NotLeaderError as exc:  # deposed while it sent: the new leader owns it
            self._warnings.forget(outcome.delivery.id)
            log.warning(
                "%s: %s, but this replica is no longer the leader and cannot record it "
                "(%s): the new leader owns the outbox and may send it a second time",
                outcome.what,
                DONE[outcome.state],
                exc,
            )
            return
        except StateError as exc:
            told = bool(self._unrecorded)  # another notifier's write failed meanwhile
            self._write_failed()
            self._keep(outcome)
            if told:
                return
            log.error(
                "%s: %s, but the %s cannot record it (%s). Kept in memory: it is "
                "not attempted again, and the write is retried with backoff (see the "
                "invoice_watch_outbox_unrecorded metric); only a stop before the %s "
                "is writable again can send it twice",
                outcome.what,
                DONE[outcome.state],
                state,
                exc,
                state,
            )

    def drop(self) -> None:
        """This replica stepped down (leader.py): the outcomes it kept in memory are
        forgotten, since the new leader owns the outbox (and sends those messages again:
        a failover's duplicates). Said once, when there were any."""
        if not self._unrecorded:
            return
        count = len(self._unrecorded)
        self._unrecorded.clear()
        self._write_failures = 0
        self._context.metrics.outbox_unrecorded.set(0)
        log.warning(
            "this replica is no longer the leader: %d delivery outcome(s) it could not "
            "record are dropped; the new leader owns the outbox and may send those "
            "messages a second time",
            count,
        )

    def _keep(self, outcome: Outcome) -> None:
        self._unrecorded[outcome.delivery.id] = outcome
        self._context.metrics.outbox_unrecorded.set(len(self._unrecorded))

    def _write_failed(self) -> None:
        context = self._context
        context.metrics.outbox_write_errors.inc()
        delay = backoff(
            self._write_failures, base=WRITE_BACKOFF, cap=context.limits.cap, rng=context.rng
        )
        self._write_failures += 1
        self._write_at = context.clock.monotonic() + delay

    async def record_kept(self, *, now: bool = False) -> None:
        """Write the outcomes kept in memory, oldest first, once their backoff is over
        (``now``: whatever it says); stop at the first the state file refuses."""
        clock, state = self._context.clock, self._context.state
        if not self._unrecorded or (not now and clock.monotonic() < self._write_at):
            return
        count = len(self._unrecorded)
        for row, outcome in list(self._unrecorded.items()):
            try:
                await self._write(outcome)
            except StateError as exc:
                self._write_failed()
                log.debug("%s still refuses delivery outcomes: %s", state, exc)
                return
            del self._unrecorded[row]
            self._context.metrics.outbox_unrecorded.set(len(self._unrecorded))
        self._write_failures = 0
        log.warning(
            "the %s is writable again: recorded %d delivery outcome(s) kept in memory",
            state,
            count,
        )
