"""Which read each organization gets in a cycle: an incremental one (Atlas's
``fromDate``: the invoices that can still change, and the newest) or a full listing
(every invoice, however old), which makes the snapshot converge to Atlas for the
invoices an incremental read no longer lists.

:func:`incremental_from` is an incremental read's window (a UTC day: the diff, the
settled invoices to load and the linked invoices Atlas hides all take that day, as a
``date``), :func:`asked_from` the ``fromDate`` it asks for, :class:`FullListings`
when an organization is listed in full (the one owner of that schedule), and
:class:`Windows` what one cycle reads of each organization.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, timedelta

from invoice_watch.clock import Clock
from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.retry import backoff
from invoice_watch.types import OrgRead, Snapshot

log = logging.getLogger(__name__)

# How much earlier than the window it needs an incremental read asks Atlas to list
# (``fromDate``): a server that reads the boundary another way (exclusive, another time
# zone) then lists a few more rows, and never misses the oldest invoice of the window.
FROM_DATE_MARGIN = timedelta(days=1)


def incremental_from(snapshot: Snapshot) -> date | None:
    """The window of an incremental read: the (UTC) day on which the oldest invoice that
    can still change starts (not PAID, FORGIVEN, FREE or PREPAID), else the newest
    invoice's (so new ones are still seen); None (a full listing) when nothing is known
    yet. The read asks ``fromDate`` :data:`FROM_DATE_MARGIN` earlier (:func:`asked_from`),
    and only invoices starting on this day or later can be "gone" from it.

    A change Atlas makes to an older invoice all the same (a refund, a PAID invoice
    FORGIVEN, one removed) is outside this window: the periodic full listing sees it
    (:class:`FullListings`)."""
    if not snapshot:
        return None
    live = snapshot.live.values()
    open_starts = [i.start_date for i in live if i.status not in FINAL_STATUSES]
    if open_starts:
        return min(open_starts).astimezone(UTC).date()
    days = [i.start_date.astimezone(UTC).date() for i in live]
    newest_settled = snapshot.newest_settled_day()
    return max([*days, newest_settled] if newest_settled else days)


def asked_from(window: date | None) -> date | None:
    """The ``fromDate`` a read of the window :func:`incremental_from` gives asks for (see
    :data:`FROM_DATE_MARGIN`); None (a full listing) for None."""
    return None if window is None else window - FROM_DATE_MARGIN


# A full listing that fails (a timeout on a long history) while an incremental read can
# stand in for it is tried again after a backoff: from this many seconds, doubling up to
# FULL_RETRY_CAP (or poll.full_listing_every when shorter), with jitter.
FULL_RETRY_BASE = 300.0
FULL_RETRY_CAP = 6 * 3600.0


def _phase(org_id: str) -> float:
    """Where in each period an organization's full listing falls, in [0, 1): a stable
    hash of its id (the same in every process), so that organizations spread theirs."""
    digest = hashlib.blake2b(org_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class FullListings:
    """When an organization's read is a full listing (every invoice, however old: no
    ``fromDate``) instead of an incremental one (:func:`incremental_from`): what makes the
    snapshot converge to Atlas for the invoices an incremental read no longer lists.

    Every organization is listed in full by the first cycle of a process (a start, a
    reload that adds it, each ``run --once``), then once per ``every`` (config
    ``poll.full_listing_every``), timed on the monotonic clock (:meth:`Clock.monotonic`:
    a wall-clock step neither postpones nor hurries it). Each organization's period is
    shifted by its own phase (:func:`_phase`), so that 1,000 organizations do theirs over
    the cycles of a period, not all in one cycle. A full listing that fails while an
    incremental read can stand in for it (the organization was read before: the cycle
    reads it so, :meth:`failed`) is tried again after a backoff (from
    :data:`FULL_RETRY_BASE`, doubling up to :data:`FULL_RETRY_CAP` or ``every``); one that
    fails with nothing to stand in for it, at the next cycle. So two successful full
    listings of an organization are at most ``every`` apart, plus the wait for the next
    cycle and the failures between.
    """

    def __init__(self, every: timedelta, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._origin = clock.monotonic()
        self._seconds = every.total_seconds()
        self._done: dict[str, int] = {}  # org id -> period of its last full listing
        # org id -> (full listings failed in a row, monotonic time the next one is due)
        self._retry: dict[str, tuple[int, float]] = {}
        self._last: dict[str, float] = {}  # org id -> when its last full listing started
        # org id -> the latest its next full listing is due (after a shorter period)
        self._latest: dict[str, float] = {}

    def _period(self, org_id: str, at: float) -> int:
        return math.floor((at - self._origin) / self._seconds + _phase(org_id))

    def due(self, org_id: str, at: float) -> bool:
        """Whether a read of ``org_id`` starting at monotonic ``at`` lists in full."""
        retry = self._retry.get(org_id)
        if retry is not None:
            return at >= retry[1]
        done = self._done.get(org_id)
        latest = self._latest.get(org_id)
        return (
            done is None or self._period(org_id, at) > done or (latest is not None and at >= latest)
        )

    def listed(self, org_id: str, at: float) -> None:
        """A full listing of ``org_id`` that started at monotonic ``at`` was committed."""
        self._done[org_id] = self._period(org_id, at)
        self._last[org_id] = at
        self._retry.pop(org_id, None)
        self._latest.pop(org_id, None)

    def failed(self, org_id: str, at: float) -> float:
        """A full listing of ``org_id`` that started at monotonic ``at`` failed, and an
        incremental read stood in for it: the next one is due after a backoff. Returns
        the seconds until then."""
        failures = self._retry.get(org_id, (0, 0.0))[0]
        cap = max(FULL_RETRY_BASE, min(FULL_RETRY_CAP, self._seconds))
        delay = backoff(failures, base=FULL_RETRY_BASE, cap=cap, rng=self._rng)
        self._retry[org_id] = (failures + 1, at + delay)
        return delay

    def configure(self, every: timedelta) -> None:
        """A new period (a reload): each organization's next full listing is due at the
        next boundary of its phase under it, at most ``every`` away, but no later than
        ``every`` after its last one (a shorter period: 7d -> 1d must not leave 7d + 1d
        between two)."""
        if every.total_seconds() == self._seconds:
            return
        now = self._clock.monotonic()
        self._origin, self._seconds = now, every.total_seconds()
        self._done = {org_id: self._period(org_id, now) for org_id in self._done}
        self._latest = {org_id: last + self._seconds for org_id, last in self._last.items()}

    def force(self) -> None:
        """Every organization lists in full at the next cycle (as after a start)."""
        self._done.clear()
        self._retry.clear()
        self._latest.clear()


class Windows:
    """Which read each organization gets in one cycle (``known``: their snapshots as it
    begins; ``full``: the schedule of full listings): its window (None: a full
    listing), the one that replaced a failed full listing (:meth:`stand_in`), and, once
    the cycle is committed, the full listings it did or failed (:meth:`done`)."""

    def __init__(self, known: Mapping[str, Snapshot], full: FullListings, at: float) -> None:
        self._known, self._full, self._at = known, full, at
        # Incremental reads, but a full listing at start and once a day (FullListings).
        self.window: dict[str, date | None] = {
            org_id: None if full.due(org_id, at) else incremental_from(snapshot)
            for org_id, snapshot in known.items()
        }
        self.in_full: list[str] = []  # committed full listings: marked done at the end
        self._full_failed: list[str] = []  # read incrementally instead: tried again later
        self.instead: dict[str, OrgRead] = {}  # org -> the incremental read that stood in

    def from_dates(self) -> dict[str, date | None]:
        """The ``fromDate`` each organization's read asks for (None: a full listing)."""
        return {org_id: asked_from(window) for org_id, window in self.window.items()}

    async def stand_in(
        self,
        failed: OrgRead,
        read_org: Callable[[str, date | None, Snapshot], Awaitable[OrgRead]],
        name: str,
    ) -> OrgRead:
        """A full listing that failed (a timeout on a long history): the organization
        is read incrementally instead (``read_org``), when it was read before."""
        org_id = failed.org_id
        window = incremental_from(self._known[org_id])
        if window is None or failed.refused:
            return failed  # nothing can stand in for it: tried again next cycle
        self._full_failed.append(org_id)
        self.window[org_id] = window
        read = await read_org(org_id, asked_from(window), self._known[org_id])
        self.instead[org_id] = read.outcome()
        if read.ok:  # (a failed one is logged as any failed read is)
            log.warning(
                "%s: the full listing failed (%s); the invoices that can still change "
                "were read instead, and the full listing is tried again later",
                name,
                failed.error,
            )
        return read

    def done(self) -> None:
        """The cycle is committed: its full listings are done, those that failed are
        tried again after a backoff."""
        for org_id in self.in_full:
            self._full.listed(org_id, self._at)
        for org_id in self._full_failed:
            self._full.failed(org_id, self._at)
