"""Messages for a notifier that is no longer configured.

A message for a notifier that is no longer configured (renamed or removed by a reload,
or since the last run) is kept, pending, until ``delivery.max_age``, so that putting the
notifier back (renaming it back) delivers it: it is looked at again every
``max_backoff``, its last error says why it waits (``status`` shows it), one ERROR line
per notifier says so (:meth:`Unrouted.note`), and the ``invoice_watch_outbox_unrouted``
gauge counts such messages (:meth:`Unrouted.count`). At ``max_age`` it is marked failed,
as any message is, loudly (:meth:`~invoice_watch.deliver.sending.Sender.attempt`). A
notifier configured again has its messages made due at the next pass.

Owns, in :class:`Unrouted`, the names of the missing notifiers messages wait for (told
once each), of those configured again (their messages to make due), and of those the
gauge has a series for.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from invoice_watch.deliver.context import Context, log
from invoice_watch.errors import StateError


class Unrouted:
    """Which notifiers messages wait for in vain (module docstring)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._missing: set[str] = set()  # not configured, messages wait for them: told
        self._returned: set[str] = set()  # configured again: their messages due now
        self._labels: set[str] = set()  # notifiers the unrouted gauge names

    def configure(self, notifiers: Collection[str]) -> bool:
        """The configured notifiers changed (a reload): whether some that messages
        waited for are back (said once; their messages are due at the next pass)."""
        back = self._missing & set(notifiers)
        if not back:
            return False
        log.warning(
            "notifier(s) %s are configured again: the messages waiting for them go out within %s",
            ", ".join(sorted(back)),
            self._context.limits.max_backoff,
        )
        self._missing -= back
        self._returned |= back
        return True

    async def make_due(self, now: datetime) -> None:
        """Make the messages of the notifiers configured again due at ``now``."""
        if not self._returned:
            return
        try:
            await self._context.store.outbox.make_due(self._returned, now)
            self._returned = set()
        except StateError as exc:  # due within max_backoff anyway
            log.debug("could not make the messages of returned notifiers due: %s", exc)

    def note(self, name: str, what: str) -> None:
        """A message (``what``) waits for ``name``, not configured: said once a name."""
        if name in self._missing:
            return
        self._missing.add(name)
        log.error(
            "notifier %r is no longer in the configuration, but messages wait for it "
            "(%s, and maybe more): they are kept until delivery.max_age (%s) and go out "
            "if it is configured again under that name (renamed? rename it back); "
            "then they are marked failed. `status` lists them",
            name,
            what,
            self._context.limits.max_age,
        )

    async def count(self) -> None:
        """Set the unrouted gauge: pending messages per notifier no longer configured."""
        if not self._missing and not self._labels:
            return
        context = self._context
        try:
            pending = await context.store.outbox.pending_by_notifier()
        except StateError as exc:
            log.debug("could not count the messages waiting for a notifier: %s", exc)
            return
        unrouted = {n: c for n, c in pending.items() if n not in context.notifiers}
        gauge = context.metrics.outbox_unrouted
        for name in self._labels - set(unrouted):
            gauge.labels(notifier=name).set(0)
        for name, count in unrouted.items():
            gauge.labels(notifier=name).set(count)
        self._labels = set(unrouted)
