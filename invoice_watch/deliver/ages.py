"""How long each waiting message has waited, against ``delivery.max_age``.

A message's age is measured on the monotonic clock (:class:`~invoice_watch.elapsed.
Elapsed`), so a wall clock set forward a day never gives up a message seconds old, nor
does one set back keep it past ``max_age``: exact from its commit for a message this
process's cycle made (the cycle's ``Elapsed`` stamped it), else from when a delivery
pass first saw it, by the wall clock then (a message found at start). Every pass asks
the age of every waiting message (:meth:`Ages.refresh`), so none is forgotten while it
waits, however long its notifier makes it wait. The time a machine spends suspended
does not count (its monotonic clock stops): a message is kept longer, never given up
early.

The time a notifier's quiet hours held a message does not count toward its age
(:func:`~invoice_watch.quiet.quiet_time`, by the wall clock): a window longer than
``max_age`` (a weekend) delays the messages it holds and never fails them; they get
what is left of ``max_age`` once it ends.

Owns, in :class:`Ages`, the messages' creation times (wall) and their ages, for as long
as they wait (at most :data:`AGED_MAX` read a pass).
"""

from __future__ import annotations

from invoice_watch.deliver.context import Context, log
from invoice_watch.elapsed import Elapsed
from invoice_watch.errors import StateError
from invoice_watch.quiet import quiet_time
from invoice_watch.store import Delivery

AGED_MAX = 10_000  # creation times of waiting messages one pass keeps the age of


class Ages:
    """The waiting messages' ages (module docstring). ``origin``: the cycle's
    ``Elapsed``, which stamped the messages' creation times."""

    def __init__(self, context: Context, origin: Elapsed | None) -> None:
        self._context = context
        self._ages = Elapsed(context.clock, origin=origin)

    async def refresh(self) -> None:
        """Ask the age of every waiting message (the first time: it is known from then
        on, on the monotonic clock), and forget the ages of messages no longer waiting
        (:meth:`Elapsed.sweep <invoice_watch.elapsed.Elapsed.sweep>`: not asked for two
        passes)."""
        try:
            times = await self._context.store.outbox.waiting_since(AGED_MAX)
        except StateError as exc:  # asked again next pass; a message attempted is anyway
            log.debug("could not read when the waiting messages were created: %s", exc)
            return
        for when in times:
            self._ages.age(when)
        self._ages.sweep()

    def too_old(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` has waited ``max_age``, not counting the time its
        notifier's quiet hours held it (none for a message of a severity in
        ``except``: not held)."""
        context = self._context
        max_age = context.limits.max_age
        age = self._ages.age(delivery.created_at)
        if age < max_age:
            return False
        window = context.quiet.get(delivery.notifier)
        if window is None or any(e.severity in window.except_ for e in delivery.events):
            return True
        return age - quiet_time(window, delivery.created_at, context.clock.now()) >= max_age
