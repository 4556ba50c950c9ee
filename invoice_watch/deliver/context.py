"""What every part of delivery reads, and the one logger they all write to.

Owns nothing that changes by itself: :class:`Context` is set only by
:class:`~invoice_watch.deliver.deliverer.Deliverer` (at start, on a configuration
reload, and ``may_send`` by leader.py through it); every other module of the package
reads it. :class:`Limits` holds the ``delivery:`` settings as :class:`~datetime.
timedelta`; :attr:`Limits.cap` is ``max_backoff`` in seconds, the bound of every wait.

Every module of the package logs as ``invoice_watch.deliver`` (:data:`log`): the name
operators see in each line and filter by, whichever module says it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from invoice_watch.clock import Clock
from invoice_watch.metrics import Metrics
from invoice_watch.quiet import QuietWindow
from invoice_watch.store import Store
from invoice_watch.types import Notifier

log = logging.getLogger("invoice_watch.deliver")

BASE_BACKOFF = 2.0  # seconds: the first wait after a failure (then doubling, to the cap)
DEFAULT_RETENTION = timedelta(days=180)


def always() -> bool:
    """``may_send`` of a process that is alone on its state (no lease to hold)."""
    return True


@dataclass(frozen=True)
class Limits:
    """``delivery.max_age``, ``delivery.max_backoff`` and ``delivery.retention``."""

    max_age: timedelta
    max_backoff: timedelta
    retention: timedelta = DEFAULT_RETENTION

    @property
    def cap(self) -> float:
        """``max_backoff`` in seconds: no wait of delivery is longer."""
        return self.max_backoff.total_seconds()


@dataclass
class Context:
    """The store, clocks and settings every part of delivery works with (module
    docstring). ``state`` names the store in messages: "state file" (SQLite) or "state
    database" (PostgreSQL). ``may_send``: whether this process may send now (a replica
    on a PostgreSQL state only while it holds the lease), asked before every send."""

    store: Store
    notifiers: Mapping[str, Notifier]
    clock: Clock
    limits: Limits
    metrics: Metrics
    rng: random.Random
    quiet: Mapping[str, QuietWindow]
    state: str = "state file"
    may_send: Callable[[], bool] = always
