"""The delivery loop: passes over the outbox, one after another, for as long as the
daemon runs (:meth:`Deliverer.run`) or until it is empty (:meth:`Deliverer.drain`,
``run --once``).

A pass (:meth:`Deliverer.deliver_due`) goes in this order: the outcomes kept in memory
are written (:mod:`.outcomes`); every waiting message's age is read (:mod:`.ages`); the
messages scheduled too far ahead are made due; those of notifiers configured again too
(:mod:`.unrouted`); silences that ended are lifted, then the due messages are read (up
to :data:`PASS_LIMIT`) and the active silences applied (:mod:`.silencing`); then each
notifier's share (:meth:`.sending.Sender.notifier_pass`: its mirror's re-post, its rows
in order), the notifiers concurrently, so a slow or failing Slack never holds up email
(and the poll cycle never waits on either: the daemon runs delivery as its own task);
last the gauges are set and old messages pruned (:mod:`.retention`).

Every wait is bounded by ``delivery.max_backoff`` whatever the wall clock does: no wait
is longer, a message scheduled further than that from now (by a wall clock since set
back, an NTP fix or a VM restore) is due at once (:meth:`Outbox.bound_schedule`), and
``drain``'s budget is measured on the monotonic clock. A wall clock set forward makes
messages due early, once.

A pass that fails as a whole (the state unreadable) is said once until passes work
again, and the next is tried with backoff.

Owns, in :class:`Deliverer`: the parts of delivery (each owns its own state: see the
package docstring), the :class:`~.context.Context` they share (it alone sets it), the
``wake`` event a cycle sets when it commits messages, whether :meth:`Deliverer.stop` was
asked, the count of passes failed in a row, and the running totals.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from invoice_watch.clock import Clock
from invoice_watch.deliver.ages import Ages
from invoice_watch.deliver.context import (
    BASE_BACKOFF,
    DEFAULT_RETENTION,
    Context,
    Limits,
    log,
)
from invoice_watch.deliver.mirrors import Mirrors
from invoice_watch.deliver.outcomes import Recorder
from invoice_watch.deliver.retention import Pruner
from invoice_watch.deliver.sending import Sender
from invoice_watch.deliver.silencing import Silencing
from invoice_watch.deliver.stats import DeliveryStats, publish_depth
from invoice_watch.deliver.telling import FailureWarnings
from invoice_watch.deliver.unrouted import Unrouted
from invoice_watch.elapsed import Elapsed
from invoice_watch.errors import StateError
from invoice_watch.metrics import Metrics
from invoice_watch.quiet import QuietWindow
from invoice_watch.retry import backoff
from invoice_watch.store import Delivery, Store
from invoice_watch.types import Notifier

PASS_LIMIT = 500  # messages one pass reads


class Deliverer:
    """Sends the outbox through the notifiers (module docstring)."""

    def __init__(
        self,
        store: Store,
        notifiers: Mapping[str, Notifier],
        *,
        clock: Clock,
        max_age: timedelta,
        max_backoff: timedelta,
        retention: timedelta = DEFAULT_RETENTION,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        elapsed: Elapsed | None = None,
        quiet: Mapping[str, QuietWindow] | None = None,
    ) -> None:
        """``elapsed``: the cycle's, which stamped the messages' creation times
        (:mod:`.ages`); ``quiet``: the notifiers' quiet hours, by name."""
        self._context = context = Context(
            store=store,
            notifiers=notifiers,
            clock=clock,
            limits=Limits(max_age, max_backoff, retention),
            metrics=metrics or Metrics(),
            rng=rng or random.Random(),
            quiet=quiet or {},
            # "state file" (SQLite) or "state database" (PostgreSQL), as messages name it
            state=getattr(getattr(store, "database", None), "kind", "state file"),
        )
        self._warnings = FailureWarnings(clock)
        self._recorder = Recorder(context, self._warnings)
        self._ages = Ages(context, elapsed)
        self._unrouted = Unrouted(context)
        self._mirrors = Mirrors(context)
        self._silencing = Silencing(context)
        self._pruner = Pruner(context)
        self._sender = Sender(
            context, self._recorder, self._warnings, self._ages, self._unrouted, self._mirrors
        )
        self.wake = asyncio.Event()
        self._stopping = False
        self._pass_failures = 0  # passes failed in a row
        self.totals = DeliveryStats()

    @property
    def may_send(self) -> Callable[[], bool]:
        """Whether this process may send now: a replica on a PostgreSQL state only
        while it holds the lease (leader.py sets it), asked before every send."""
        return self._context.may_send

    @may_send.setter
    def may_send(self, may_send: Callable[[], bool]) -> None:
        self._context.may_send = may_send

    @property
    def limits(self) -> Limits:
        """``delivery.max_age``, ``max_backoff`` and ``retention`` in force."""
        return self._context.limits

    def configure(
        self,
        notifiers: Mapping[str, Notifier],
        *,
        max_age: timedelta,
        max_backoff: timedelta,
        retention: timedelta = DEFAULT_RETENTION,
        quiet: Mapping[str, QuietWindow] | None = None,
    ) -> None:
        """Take new notifiers and limits (configuration reload)."""
        context = self._context
        context.quiet = quiet or {}
        context.limits = Limits(max_age, max_backoff, retention)
        if self._unrouted.configure(notifiers):
            self.wake.set()
        context.notifiers = notifiers

    @property
    def unrecorded(self) -> int:
        """Outcomes kept in memory because the state file could not record them."""
        return len(self._recorder.kept)

    def drop_unrecorded(self) -> None:
        """This replica stepped down (leader.py): :meth:`.outcomes.Recorder.drop`."""
        self._recorder.drop()

    async def deliver_due(self) -> DeliveryStats:
        """One pass over the due rows (module docstring): each gets one attempt."""
        context = self._context
        store, recorder = context.store, self._recorder
        await recorder.record_kept()
        await self._ages.refresh()
        self._warnings.sweep()
        now = context.clock.now()
        await bound_schedule(context, now)
        await self._unrouted.make_due(now)
        await self._silencing.lift(now)
        due = await store.outbox.due(now, limit=PASS_LIMIT, exclude=recorder.kept)
        due = await self._silencing.apply(now, due)
        by_notifier = queues(due, paused=recorder.paused())
        mirrors = self._mirrors.due()
        stats = DeliveryStats()
        async with asyncio.TaskGroup() as group:
            for name in by_notifier.keys() | mirrors.keys():
                group.create_task(
                    self._sender.notifier_pass(name, mirrors.get(name), by_notifier[name], stats)
                )
        self.totals.add(stats)
        await publish_depth(store, context.metrics)
        await self._unrouted.count()
        await self._pruner.prune()
        return stats

    async def _next_wait(self, *, reposts: bool = True) -> float | None:
        """Seconds until the next pass is due, never more than ``max_backoff``: until
        the next write of outcomes kept in memory while there are any (passes then go
        at the pace of those writes), else until the next pending message, or the next
        re-post of a mirror (``reposts``); None when nothing is due at all."""
        context = self._context
        cap = context.limits.cap
        write = self._recorder.wait()
        if write is not None:
            return min(write, cap)
        waits = []
        next_at = await context.store.outbox.next_attempt_at()
        if next_at is not None:
            waits.append((next_at - context.clock.now()).total_seconds())
        if reposts:
            waits += self._mirrors.waits()
        if self._silencing.waiting:  # silenced messages: looked at again when one may end
            waits.append(cap)
        if not waits:
            return None
        return min(max(0.0, min(waits)), cap)

    async def drain(self, budget: float) -> int:
        """Deliver until the outbox is empty or nothing more can be done within
        ``budget`` seconds of monotonic time (``run --once``); returns how many messages
        are still undelivered (:attr:`unrecorded` says how many outcomes are not
        recorded)."""
        clock = self._context.clock
        end = clock.monotonic() + budget
        while True:
            await self.deliver_due()
            # Mirrors got what fires in the first pass; waiting for their next re-post
            # would only use the budget up.
            wait = await self._next_wait(reposts=False)
            if wait is None or clock.monotonic() + wait > end:
                break
            await clock.sleep(wait)
        await self._recorder.record_kept(now=True)
        counts = await self._context.store.outbox.counts()
        return max(0, counts.get("pending", 0) - self._recorder.delivered())

    async def run(self) -> None:
        """The daemon's delivery loop: deliver, then sleep until the next row is due or
        a cycle committed new rows (``wake``), at most ``max_backoff``. :meth:`stop` ends
        it after one last pass over what is due (the caller bounds that in time and
        cancels beyond)."""
        self._stopping = False
        while True:
            # A pass that began before stop() may have missed rows committed since: the
            # last pass is one that begins after stop() was asked.
            last_pass = self._stopping
            self.wake.clear()
            try:
                if last_pass:
                    await self._recorder.record_kept(now=True)
                await self.deliver_due()
                wait = None if last_pass else await self._next_wait()
            except Exception as exc:
                if last_pass:
                    log.error("the last delivery pass failed: %s", exc)
                    return
                await self._wait(self._pass_failed(exc))
                continue
            if self._pass_failures:
                log.info("delivery passes work again")
                self._pass_failures = 0
            if last_pass:
                if self.unrecorded:
                    log.error(
                        "stopping with %d delivery outcome(s) the %s could not "
                        "record: the messages among them that were sent may be sent again "
                        "at the next start",
                        self.unrecorded,
                        self._context.state,
                    )
                return
            await self._wait(wait)

    def _pass_failed(self, exc: Exception) -> float:
        """Log a failed pass (once until passes work again) and say how long to wait."""
        context = self._context
        cap = context.limits.cap
        delay = backoff(self._pass_failures, base=BASE_BACKOFF, cap=cap, rng=context.rng)
        if self._pass_failures == 0:
            log.error(
                "delivery pass failed: %s; trying again with backoff (up to %.0fs)",
                exc,
                cap,
                exc_info=not isinstance(exc, StateError),
            )
        else:
            log.debug("delivery pass failed again: %s", exc)
        self._pass_failures += 1
        return delay

    def stop(self) -> None:
        """Ask :meth:`run` to make one last pass and return."""
        self._stopping = True
        self.wake.set()

    async def _wake_wait(self) -> None:
        await self.wake.wait()

    async def _wait(self, seconds: float | None) -> None:
        tasks: set[asyncio.Future[object]] = {asyncio.ensure_future(self._wake_wait())}
        if seconds is not None:
            cap = self._context.limits.cap
            tasks.add(asyncio.ensure_future(self._context.clock.sleep(min(seconds, cap))))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()


def queues(due: list[Delivery], *, paused: set[str]) -> defaultdict[str, list[Delivery]]:
    """The due messages by notifier, each notifier's in their order, but for the
    ``paused`` notifiers (a retry of theirs is kept in memory: it goes first, once
    recorded)."""
    by_notifier: defaultdict[str, list[Delivery]] = defaultdict(list)
    for delivery in due:
        if delivery.notifier not in paused:
            by_notifier[delivery.notifier].append(delivery)
    return by_notifier


async def bound_schedule(context: Context, now: datetime) -> None:
    """Make due the messages scheduled more than ``max_backoff`` ahead of ``now``."""
    bound = context.limits.max_backoff
    try:
        moved = await context.store.outbox.bound_schedule(now, now + bound)
    except StateError as exc:  # the waits stay bounded: tried again next pass
        log.debug("could not bring forward messages scheduled too far ahead: %s", exc)
        return
    if moved:
        log.warning(
            "%d message(s) were scheduled more than %s ahead (the wall clock was set "
            "back?): they are due now",
            moved,
            bound,
        )
