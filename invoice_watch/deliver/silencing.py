"""Silences at delivery: the due messages are looked at against the active silences
just before they are sent, and silenced messages are lifted once no silence holds them.

A silence applies at notification time (:meth:`~invoice_watch.store.protocols.
SilenceRepository.silence_pending`; one indexed read a pass while none is active), so a
silence added while a message waited for its receiver holds it too. Silenced messages
are lifted every pass (:meth:`~invoice_watch.store.protocols.SilenceRepository.lift`:
sent if their alert still fires, else muted).

Owns, in :class:`Silencing`, how many messages a silence held at the last pass (while
any is, the loop looks again every ``max_backoff``: a silence may end).
"""

from __future__ import annotations

from datetime import datetime

from invoice_watch.deliver.context import Context, log
from invoice_watch.errors import NotLeaderError, StateError
from invoice_watch.store import Delivery


class Silencing:
    """The silences' part in a pass (module docstring)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._silenced = 0  # messages silenced at the last pass

    @property
    def waiting(self) -> bool:
        """Whether messages wait for a silence to end."""
        return self._silenced > 0

    async def lift(self, now: datetime) -> None:
        """Silenced messages no silence matches any more: sent now or muted."""
        try:
            lifted = await self._context.store.silences.lift(now)
        except StateError as exc:  # tried again next pass
            log.debug("could not look at the silenced messages: %s", exc)
            return
        self._silenced = lifted.waiting
        if lifted.sent or lifted.muted:
            log.info(
                "silences ended: %d silenced message(s) go out now (their alerts still "
                "fire), %d muted",
                lifted.sent,
                lifted.muted,
            )

    async def apply(self, now: datetime, due: list[Delivery]) -> list[Delivery]:
        """Apply the active silences to the due messages as they are about to be sent;
        the messages still to send. A notifier whose messages it changed sends none in
        this pass (its groups may have changed, and its messages go in order): the next
        pass, due at once, sends the rest."""
        if not due:
            return due
        try:
            changed = await self._context.store.silences.silence_pending(now, [d.id for d in due])
        except NotLeaderError as exc:  # a deposed leader: the new one sends them
            log.debug("not applying the silences to the due messages: %s", exc)
            return []
        except StateError as exc:  # the messages are sent: an alert is never lost
            log.debug("could not apply the silences to the due messages: %s", exc)
            return due
        if not changed:
            return due
        self._silenced += sum(changed.values())
        log.info(
            "silenced %d waiting message(s) as they were due (%s): recorded, sent when "
            "their silence ends if their alert still fires",
            sum(changed.values()),
            ", ".join(f"{n}: {c}" for n, c in sorted(changed.items())),
        )
        return [d for d in due if d.notifier not in changed]
