"""Re-posts to the notifiers that mirror what is firing (Alertmanager).

A notifier that mirrors what is firing (:class:`~invoice_watch.types.FiringMirror`) is
also given, every ``resend_every``, every firing alert whose messages go to it (the
alert state's last event: what was notified), so that it keeps them firing; after a
restart too, since they come from the state file. An alert whose FIRING was never sent
to it (a silence holds it, quiet hours do, or its receiver failed) is not among them:
once its FIRING is sent, it is given again with the others. Such a re-post is not a
message: it is not in the outbox, and one that fails is tried again at the next
``resend_every`` (said once until it works again). It comes before the notifier's due
messages in a pass (:meth:`~invoice_watch.deliver.sending.Sender.notifier_pass`), so a
RESOLVED always follows the last re-post of its alert.

Owns, in :class:`Mirrors`, each mirror's monotonic time (seconds) of its next re-post,
and the mirrors whose last re-post failed.
"""

from __future__ import annotations

import logging

from invoice_watch.deliver.context import Context, log
from invoice_watch.errors import NotifyError, StateError
from invoice_watch.safe_text import server_text, traceback_text
from invoice_watch.store import ERROR_MAX
from invoice_watch.types import AlertEvent, EventKind, FiringMirror


class Mirrors:
    """When each mirror is posted what fires again, and doing it (module docstring)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._repost_at: dict[str, float] = {}  # notifier -> monotonic time of next re-post
        self._failing: set[str] = set()  # notifiers whose last re-post failed (told once)

    def all(self) -> dict[str, FiringMirror]:
        """The configured notifiers that are mirrors, by name."""
        notifiers = self._context.notifiers
        return {n: m for n, m in notifiers.items() if isinstance(m, FiringMirror)}

    def due(self) -> dict[str, FiringMirror]:
        """The mirrors whose re-post is due, by name."""
        now = self._context.clock.monotonic()
        return {
            name: mirror
            for name, mirror in self.all().items()
            if now >= self._repost_at.get(name, 0.0)
        }

    def waits(self) -> list[float]:
        """Seconds until each mirror's next re-post (0 or less: due)."""
        now = self._context.clock.monotonic()
        return [self._repost_at.get(name, 0.0) - now for name in self.all()]

    async def _firing_for(self, name: str) -> list[AlertEvent] | None:
        """The last event of each firing alert whose messages go to notifier ``name``,
        oldest alert first, but for those whose FIRING it was never sent (held by a
        silence or quiet hours, waiting for its receiver: :meth:`Outbox.unnotified
        <invoice_watch.store.protocols.Outbox.unnotified>`): a re-post is no way around
        what holds a message. None when the state cannot say which those are."""
        store = self._context.store
        states = sorted(store.alerts.firing().values(), key=lambda s: s.firing_since)
        states = [
            state
            for state in states
            if state.firing
            and name in state.notifiers
            and state.last_event is not None
            and state.last_event.kind in (EventKind.FIRING, EventKind.REMINDER)
        ]
        if not states:
            return []
        try:
            unsent = await store.outbox.unnotified(name)
        except StateError as exc:
            log.debug("%s: could not read which firing alerts were sent: %s", name, exc)
            return None
        return [
            state.last_event
            for state in states
            if state.last_event is not None and (state.key, state.firing_since) not in unsent
        ]

    async def repost(self, name: str, mirror: FiringMirror) -> None:
        """Post what fires to ``mirror`` again (module docstring). When the state cannot
        be read, none is posted (one that is silenced could be): tried again at the next
        ``resend_every``, well within the ``endsAt`` the last post gave."""
        if not self._context.may_send():
            return
        self._repost_at[name] = self._context.clock.monotonic() + mirror.resend_every
        events = await self._firing_for(name)
        if not events:
            return
        try:
            await mirror.repost(events)
        except NotifyError as exc:
            error = server_text(exc, ERROR_MAX)
            level = logging.DEBUG if name in self._failing else logging.WARNING
            log.log(
                level,
                "%s: could not post the %d firing alert(s) again: %s; trying again in %.0fs",
                name,
                len(events),
                error,
                mirror.resend_every,
            )
            self._failing.add(name)
            return
        except Exception as exc:  # a bug in a notifier must not stop delivery
            if name not in self._failing:
                log.error(
                    "%s: unexpected error while posting the firing alerts again (a bug: "
                    "please report it):\n%s",
                    name,
                    traceback_text(exc),
                )
            self._failing.add(name)
            return
        if name in self._failing:
            self._failing.discard(name)
            log.info("%s: posting the firing alerts again works again", name)
