"""Stage 6, deliver: send the outbox through the notifiers, after the commit.

Each outbox row is one message for one notifier. Rows of one notifier go in order; the
notifiers go concurrently, so a slow or failing Slack never holds up email (and the poll
cycle never waits on either: the daemon runs delivery as its own task). A transient
failure is retried with exponential backoff (honouring Retry-After, capped at
``delivery.max_backoff``) across restarts until ``delivery.max_age``, then marked failed;
a permanent failure is marked failed at once. Nothing leaves the outbox unsent but by
being marked failed, which ``status`` shows.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from invoice_watch.clock import Clock
from invoice_watch.commit import Delivery, StateStore, summarize
from invoice_watch.errors import PermanentNotifyError, RetryableNotifyError
from invoice_watch.health import Metrics
from invoice_watch.retry import retry_delay
from invoice_watch.types import Notifier

log = logging.getLogger(__name__)

_BASE_BACKOFF = 2.0


@dataclass
class DeliveryStats:
    sent: int = 0
    retried: int = 0
    failed: int = 0

    def add(self, other: DeliveryStats) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed


class Deliverer:
    def __init__(
        self,
        store: StateStore,
        notifiers: Mapping[str, Notifier],
        *,
        clock: Clock,
        max_age: timedelta,
        max_backoff: timedelta,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._notifiers = notifiers
        self._clock = clock
        self._max_age = max_age
        self._cap = max_backoff.total_seconds()
        self._rng = rng or random.Random()
        self.wake = asyncio.Event()
        self._stopping = False
        self.totals = DeliveryStats()

    def configure(
        self, notifiers: Mapping[str, Notifier], *, max_age: timedelta, max_backoff: timedelta
    ) -> None:
        """Take new notifiers and limits (configuration reload)."""
        self._notifiers = notifiers
        self._max_age = max_age
        self._cap = max_backoff.total_seconds()

    async def deliver_due(self) -> DeliveryStats:
        """One pass over the due rows: each gets one attempt."""
        now = self._clock.now()
        due = await self._store.due_deliveries(now, limit=500)
        by_notifier: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in due:
            by_notifier[delivery.notifier].append(delivery)
        stats = DeliveryStats()
        async with asyncio.TaskGroup() as group:
            for name, rows in by_notifier.items():
                group.create_task(self._deliver_in_order(name, rows, stats))
        self.totals.add(stats)
        counts = await self._store.outbox_counts()
        for state in ("pending", "failed"):
            self._metrics.outbox_depth.labels(state=state).set(counts.get(state, 0))
        return stats

    async def _deliver_in_order(
        self, name: str, rows: list[Delivery], stats: DeliveryStats
    ) -> None:
        for delivery in rows:
            if not await self._attempt(delivery, stats):
                # The receiver is down or rate-limiting: the rest of this notifier's rows
                # wait for the next pass instead of hammering it.
                return

    async def _attempt(self, delivery: Delivery, stats: DeliveryStats) -> bool:
        """One attempt; True when the notifier may be tried again in this pass."""
        what = f"{delivery.notifier}: {summarize(delivery.events, delivery.part)}"
        notifier = self._notifiers.get(delivery.notifier)
        if notifier is None:
            await self._mark_failed(
                delivery, f"notifier {delivery.notifier!r} is no longer in the configuration"
            )
            stats.failed += 1
            return True
        try:
            await notifier.send(delivery.events, part=delivery.part)
        except PermanentNotifyError as exc:
            log.error("%s: not delivered, and retrying cannot help: %s", what, exc)
            await self._mark_failed(delivery, str(exc))
            self._count(delivery, "failed")
            stats.failed += 1
            return True
        except RetryableNotifyError as exc:
            return await self._retry_later(delivery, what, str(exc), exc.retry_after, stats)
        except Exception as exc:  # a bug in a notifier must not lose the message
            log.exception("%s: unexpected error while sending", what)
            return await self._retry_later(delivery, what, repr(exc), None, stats)
        await asyncio.shield(self._store.mark_sent(delivery.id, self._clock.now()))
        log.info("%s: delivered", what)
        self._count(delivery, "sent")
        stats.sent += 1
        return True

    async def _retry_later(
        self,
        delivery: Delivery,
        what: str,
        error: str,
        retry_after: float | None,
        stats: DeliveryStats,
    ) -> bool:
        now = self._clock.now()
        if now - delivery.created_at >= self._max_age:
            log.error("%s: giving up after %s: %s", what, self._max_age, error)
            await self._mark_failed(delivery, f"gave up after {self._max_age}: {error}")
            self._count(delivery, "failed")
            stats.failed += 1
            return True
        delay = retry_delay(
            delivery.attempts, retry_after, base=_BASE_BACKOFF, cap=self._cap, rng=self._rng
        )
        if delivery.attempts == 0 or retry_after is not None:
            log.warning("%s: %s; retrying in %.0fs", what, error, delay)
        else:
            log.debug("%s: %s; retrying in %.0fs", what, error, delay)
        # This row and the notifier's other pending rows wait together: a receiver
        # that is down or rate-limiting is not sent the rest of the queue meanwhile.
        await asyncio.shield(
            self._store.mark_retry(delivery.id, now + timedelta(seconds=delay), error)
        )
        self._count(delivery, "retry")
        stats.retried += 1
        return False

    def _count(self, delivery: Delivery, outcome: str) -> None:
        self._metrics.notifications.labels(notifier=delivery.notifier, outcome=outcome).inc()

    async def _mark_failed(self, delivery: Delivery, error: str) -> None:
        await asyncio.shield(self._store.mark_failed(delivery.id, self._clock.now(), error))

    async def drain(self, budget: float) -> int:
        """Deliver until the outbox is empty or no row can be retried within ``budget``
        seconds (``run --once``); returns how many rows are still pending."""
        deadline = self._clock.now() + timedelta(seconds=budget)
        while True:
            await self.deliver_due()
            next_at = await self._store.next_attempt_at()
            if next_at is None:
                return 0
            if next_at > deadline:
                break
            await self._clock.sleep(max(0.0, (next_at - self._clock.now()).total_seconds()))
        counts = await self._store.outbox_counts()
        return counts.get("pending", 0)

    async def run(self) -> None:
        """The daemon's delivery loop: deliver, then sleep until the next row is due or
        a cycle committed new rows (``wake``). :meth:`stop` ends it after one last pass
        over what is due (the caller bounds that in time and cancels beyond)."""
        self._stopping = False
        while True:
            # A pass that began before stop() may have missed rows committed since: the
            # last pass is one that begins after stop() was asked.
            last_pass = self._stopping
            self.wake.clear()
            try:
                await self.deliver_due()
            except Exception:
                log.exception("delivery pass failed; trying again shortly")
                await self._wait(5.0)
                continue
            if last_pass:
                return
            next_at = await self._store.next_attempt_at()
            seconds = None
            if next_at is not None:
                seconds = max(0.0, (next_at - self._clock.now()).total_seconds())
            await self._wait(seconds)

    def stop(self) -> None:
        """Ask :meth:`run` to make one last pass and return."""
        self._stopping = True
        self.wake.set()

    async def _wake_wait(self) -> None:
        await self.wake.wait()

    async def _wait(self, seconds: float | None) -> None:
        tasks: set[asyncio.Future[object]] = {asyncio.ensure_future(self._wake_wait())}
        if seconds is not None:
            tasks.add(asyncio.ensure_future(self._clock.sleep(seconds)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
