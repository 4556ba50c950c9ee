"""What delivery counts: the messages of a pass by outcome, and the metrics it sets.

:class:`DeliveryStats` is a tally of messages (sent, retried, failed): one per pass
(returned by :meth:`~invoice_watch.deliver.deliverer.Deliverer.deliver_due`), and the
process's running total (``Deliverer.totals``, which ``run --once`` reports).
:func:`count` adds one outcome to a pass's tally and to
``invoice_watch_notifications_total``; :func:`publish_depth` sets
``invoice_watch_outbox_depth`` (messages by state) from the outbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from invoice_watch.metrics import Metrics
from invoice_watch.store import Delivery, Store

Counted = Literal["sent", "retry", "failed"]


@dataclass
class DeliveryStats:
    """Messages by outcome: ``sent``, ``retried`` (kept for a later attempt), ``failed``."""

    sent: int = 0
    retried: int = 0
    failed: int = 0

    def add(self, other: DeliveryStats) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed


def count(metrics: Metrics, stats: DeliveryStats, delivery: Delivery, outcome: Counted) -> None:
    """One attempt's ``outcome`` for ``delivery``: in ``stats`` and the metric."""
    metrics.notifications.labels(notifier=delivery.notifier, outcome=outcome).inc()
    if outcome == "sent":
        stats.sent += 1
    elif outcome == "retry":
        stats.retried += 1
    else:
        stats.failed += 1


async def publish_depth(store: Store, metrics: Metrics) -> None:
    """Set the outbox depth gauge: pending and failed messages (raises StateError)."""
    counts = await store.outbox.counts()
    for state in ("pending", "failed"):
        metrics.outbox_depth.labels(state=state).set(counts.get(state, 0))
