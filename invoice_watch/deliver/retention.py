"""Retention: sent and failed messages older than ``delivery.retention`` are pruned a
bounded batch at a time (:data:`PRUNE_BATCH` rows of each kind), as a pass ends
(:meth:`Store.prune <invoice_watch.store.protocols.UnitOfWork.prune>`), never in a
cycle's way. A full batch may leave more: the next pass goes on; else the next prune is
:data:`PRUNE_EVERY` seconds later. A standby replica prunes nothing: the leader does.

Owns, in :class:`Pruner`, the monotonic time (seconds) of the next prune.
"""

from __future__ import annotations

from invoice_watch.deliver.context import Context, log
from invoice_watch.errors import NotLeaderError, StateError

PRUNE_BATCH = 500  # rows of each kind one prune deletes
PRUNE_EVERY = 3600.0  # monotonic seconds between prunes once nothing is left to prune


class Pruner:
    """Prunes old messages when due (module docstring)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._prune_at = 0.0  # monotonic time of the next prune

    async def prune(self) -> None:
        """Prune one batch, when due and this process may write (module docstring)."""
        context = self._context
        clock, retention, state = context.clock, context.limits.retention, context.state
        if clock.monotonic() < self._prune_at or not context.may_send():
            return  # (a standby prunes nothing: the leader does)
        before = clock.now() - retention
        try:
            deleted = await context.store.prune(before, limit=PRUNE_BATCH)
        except NotLeaderError:  # deposed meanwhile: the new leader prunes
            deleted = 0
        except StateError as exc:
            log.warning("could not prune the %s: %s", state, exc)
            deleted = 0
        # A full batch may leave more: the next pass goes on, else in an hour.
        more = deleted >= PRUNE_BATCH
        self._prune_at = clock.monotonic() + (0.0 if more else PRUNE_EVERY)
        if deleted:
            log.info("pruned %d row(s) older than %s from the %s", deleted, retention, state)
