"""Runs the poll cycle (:class:`~invoice_watch.cycle.Cycle`), one at a time, and owns
what outlives one cycle: when each organization is next listed in full
(:class:`~invoice_watch.listing.FullListings`), the monotonic ages of stored times
(:class:`~invoice_watch.elapsed.Elapsed`), the warning about hidden linked invoices,
the last cycle's result and when it ended (what health and liveness are judged on),
the cycle metrics, and the line items stage started after each cycle
(:class:`~invoice_watch.usage_watch.UsageWatch`).

The line items stage runs as its own task (:attr:`CycleRunner.line_items`), outside
:attr:`CycleRunner.lock`: a slow or hanging ``lineItems:search`` never delays the next
poll, a reload or ``run --once``'s delivery. One at a time: a cycle that ends while the
last one is still under way starts none. Each organization's fetch is bounded in time
(:data:`~invoice_watch.usage_watch.FETCH_SECONDS`); a stop or a reload that replaces the
Atlas client cancels it (:meth:`CycleRunner.cancel_line_items`): what it had not
recorded is fetched again later, the cycle it followed is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable

from invoice_watch import sdnotify
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.clock import Clock
from invoice_watch.config import Config
from invoice_watch.cycle import Cycle, CycleResult
from invoice_watch.deliver.stats import publish_depth
from invoice_watch.elapsed import Elapsed
from invoice_watch.errors import StateError
from invoice_watch.linked import HiddenLinkedWarning
from invoice_watch.listing import FullListings
from invoice_watch.metrics import Metrics
from invoice_watch.redact import redact
from invoice_watch.store import AlertState, Store
from invoice_watch.usage_watch import UsageWatch


class CycleRunner:
    """One cycle at a time (:attr:`lock`: a reload waits for the cycle in flight)."""

    def __init__(self, config: Config, clock: Clock, metrics: Metrics, rng: random.Random) -> None:
        self.config = config  # the running configuration (a reload replaces it)
        self.clock = clock
        self.metrics = metrics
        self.lock = asyncio.Lock()
        # Which organizations list in full at the next cycle: all of them at first.
        self.full_listings = FullListings(config.poll.full_listing_every, clock, rng)
        # How long ago stored times were, on the monotonic clock (poll_failure, repeat).
        self.elapsed = Elapsed(clock)
        self._warning = HiddenLinkedWarning()
        self._firing_labels: set[str] = set()  # rules the alerts_firing gauge names
        self.last: CycleResult | None = None
        self.finished_at: float | None = None  # monotonic end of the last cycle
        # Why the cycles since the last one recorded were not (health: no progress).
        self.unrecorded: str | None = None
        self.done = asyncio.Event()  # set after every committed cycle
        self.usage = UsageWatch(metrics)  # line items: fetched, judged (usage_anomaly)
        self.line_items: asyncio.Task[None] | None = None  # the stage under way, if any
        self._line_items_closed = False  # stopping: no stage starts any more

    async def run(
        self,
        store: Store,
        client: AtlasClient,
        *,
        baseline: bool = False,
        delivering: bool = False,
        wake: Callable[[], None] = lambda: None,
    ) -> CycleResult:
        """One cycle (see :class:`~invoice_watch.cycle.Cycle`; ``delivering``, ``wake``
        as there), recorded; then ``wake`` (delivery). Raises
        :class:`~invoice_watch.errors.StateFileGoneError` before it starts when the
        state file was deleted or replaced."""
        began = time.monotonic()
        async with self.lock:
            try:
                store.check_held()  # deleted or replaced under us: stop
                await self.usage.before_cycle(self.config, store, self.clock.now())
                cycle = Cycle(
                    self.config,
                    store,
                    client,
                    self.clock,
                    elapsed=self.elapsed,
                    full=self.full_listings,
                    warning=self._warning,
                    baseline=baseline,
                    delivering=delivering,
                    wake=wake,
                    usage=self.usage.detections,
                )
                result = await cycle.run()
            except BaseException as exc:
                self.metrics.cycles.labels(outcome="error").inc()
                if isinstance(exc, StateError):
                    self.unrecorded = str(exc)
                elif isinstance(exc, Exception):
                    self.unrecorded = redact(f"{type(exc).__name__}: {exc}")[:300]
                raise
        self.unrecorded = None
        self.last = result
        self.finished_at = self.clock.monotonic()
        firing = store.alerts.firing()
        self._record(result, time.monotonic() - began, firing.values())
        # The outbox gauge follows the messages this cycle enqueued at once, not after
        # the next delivery pass (a scrape in between, or a hung receiver, saw none).
        # Not recorded when the read fails: the delivery pass reports the state's error.
        with contextlib.suppress(StateError):
            await publish_depth(store, self.metrics)
        self.done.set()
        sdnotify.status(
            f"last cycle {result.finished_at:%H:%M:%S} UTC: {result.orgs_ok} org(s) read, "
            f"{len(result.orgs_failed)} failed, {len(firing)} alert(s) firing"
        )
        wake()
        self._start_line_items(store, client)  # after the cycle: its messages are out
        return result

    def _start_line_items(self, store: Store, client: AtlasClient) -> None:
        """The line items stage, as its own task, unless one is under way or the
        runner is stopping."""
        if self._line_items_closed or (self.line_items is not None and not self.line_items.done()):
            return
        self.line_items = asyncio.create_task(
            self.usage.after_cycle(self.config, store, client, self.elapsed, self.clock.now()),
            name="line items",
        )

    async def line_items_done(self, within: float | None = None) -> bool:
        """Wait for the line items stage under way (if any) to end, at most ``within``
        seconds (None: no bound). Whether none is under way now."""
        task = self.line_items
        if task is None or task.done():
            return True
        await asyncio.wait({task}, timeout=within)
        return task.done()

    async def cancel_line_items(self, *, close: bool = False) -> None:
        """Cancel the line items stage under way (a stop; a reload that replaces the
        Atlas client): what it had not recorded is fetched again later. ``close``:
        none starts any more (the runner is stopping)."""
        if close:
            self._line_items_closed = True
        task, self.line_items = self.line_items, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _record(self, result: CycleResult, seconds: float, alerts: Iterable[AlertState]) -> None:
        m = self.metrics
        failed = len(result.orgs_failed)
        outcome = "ok" if not failed else ("partial" if result.orgs_ok else "failed")
        m.cycles.labels(outcome=outcome).inc()
        m.cycle_seconds.observe(seconds)
        m.orgs_failing.set(failed)
        m.invoices_seen.set(result.invoices)  # counted by the cycle already
        m.last_cycle_finished.set(result.finished_at.timestamp())
        firing: dict[str, int] = {rule.name: 0 for rule in self.config.rules}
        for alert in alerts:
            firing[alert.rule] = firing.get(alert.rule, 0) + 1
        for rule_name in self._firing_labels - firing.keys():  # a rule gone, none firing
            with contextlib.suppress(KeyError):
                m.alerts_firing.remove(rule_name)
        for rule_name, count in firing.items():
            m.alerts_firing.labels(rule=rule_name).set(count)
        self._firing_labels = set(firing)
