"""Stage 6, deliver: send the outbox through the notifiers, after the commit.

Each outbox row is one message for one notifier. Rows of one notifier go in order; the
notifiers go concurrently, so a slow or failing Slack never holds up email (and the poll
cycle never waits on either: the daemon runs delivery as its own task). A transient
failure is retried with exponential backoff (honouring Retry-After, capped at
``delivery.max_backoff``) across restarts until ``delivery.max_age``, then marked failed;
a permanent failure is marked failed at once. Nothing leaves the outbox unsent but by
being marked failed, which ``status`` shows.

Every wait is bounded by ``delivery.max_backoff`` whatever the wall clock does: no wait
is longer, a message scheduled further than that from now (by a wall clock since set
back, an NTP fix or a VM restore) is due at once (:meth:`Outbox.bound_schedule`), and
``drain``'s budget is measured on the monotonic clock. A wall clock set forward makes
messages due early, once.

The messages a notifier's quiet hours held go as one summary when the window ends, made
a grouped message in the outbox before it is sent (:meth:`_summaries`): a summary that
fails is retried, after a restart too, as that same summary.

The time a notifier's quiet hours held a message does not count toward its age
(:func:`~invoice_watch.quiet.quiet_time`, by the wall clock): a window longer than
``max_age`` (a weekend) delays the messages it holds and never fails them; they get
what is left of ``max_age`` once it ends.

A message's age (against ``delivery.max_age``) is measured on the monotonic clock too
(:class:`~invoice_watch.elapsed.Elapsed`), so a wall clock set forward a day never gives
up a message seconds old, nor does one set back keep it past ``max_age``: exact from
its commit for a message this process's cycle made (the cycle's ``Elapsed`` stamped
it), else from when a delivery pass first saw it, by the wall clock then (a message
found at start). Every pass asks the age of every waiting message, so none is forgotten
while it waits, however long its notifier makes it wait. The time a machine spends
suspended does not count (its monotonic clock stops): a message is kept longer, never
given up early.

An outcome the state file cannot record (a full disk: Slack took the message, but its
"sent" mark cannot be written; the same for a failed or retry mark) is kept in memory:
the message is not attempted again while it is, the write is retried with backoff, and
the operator is told once, by a log line and by the ``invoice_watch_outbox_unrecorded``
gauge (each failed write counts in ``invoice_watch_outbox_write_errors_total``). Only a
process that ends before the state is writable again can send such a message twice
(once more, at its next start), as a crash between a send and its mark can.

Sent and failed messages older than ``delivery.retention`` are pruned a bounded batch at
a time, as a pass ends (:meth:`Store.prune`), never in a cycle's way.

A message for a notifier that is no longer configured (renamed or removed by a reload,
or since the last run) is kept, pending, until ``delivery.max_age``, so that putting the
notifier back (renaming it back) delivers it: it is looked at again every
``max_backoff``, its last error says why it waits (``status`` shows it), one ERROR line
per notifier says so, and the ``invoice_watch_outbox_unrouted`` gauge counts such
messages. At ``max_age`` it is marked failed, as any message is, loudly.

A notifier with recipients of its own (email's ``to``) may deliver a message to some of
them and be refused for now by others (a greylisting server): it raises
:class:`RetryableNotifyError` with ``owed``, the outbox keeps that list with the message
(:func:`~invoice_watch.store.encoding.outbox_error`), and every later attempt is for those
recipients only (``send(recipients=...)``), so the others get no duplicate; the message
stays pending (``status`` and ``history`` say so) until they have it too, or it is
failed at ``max_age`` saying whom it never reached. Such a retry does not hold up the
notifier's other messages (its server works: one full mailbox must not delay everyone's
alerts for days).

A message failing again is not a log line per attempt: a failure is logged as a WARNING
when it is the message's first, or unlike its last one (the stored ``last_error``, so a
restart does not say it again), and no other about that message was logged within the
hour (``_TELL_EVERY``: a receiver whose every answer differs, a session id in each SMTP
reply, is told about once an hour); otherwise at DEBUG. ``status`` always shows the last
error. Notifiers log no failure of their own (they raise it, with the same words for
the same answer), so this is the one place that says it.

Repeated 429s escalate: the wait is the longer of the receiver's ``Retry-After`` and the
backoff for the attempts made so far, as the Atlas client does, so ``Retry-After: 0``
answered again and again is not one request a second for ever.

Silences apply at notification time: the due messages are looked at against the active
silences just before they are sent (:meth:`~invoice_watch.store.protocols.
SilenceRepository.silence_pending`; one indexed read a pass while none is active), so a
silence added while a message waited for its receiver holds it too. Silenced messages
are lifted every pass (sent if their alert still fires, else muted).

A notifier that mirrors what is firing (Alertmanager, :class:`~invoice_watch.types.
FiringMirror`) is also given, every ``resend_every``, every firing alert whose messages
go to it (the alert state's last event: what was notified), so that it keeps them
firing; after a restart too, since they come from the state file. An alert whose FIRING
was never sent to it (a silence holds it, quiet hours do, or its receiver failed) is not
among them: once its FIRING is sent, it is given again with the others. Such a re-post is
not a message: it is not in the outbox, and one that fails is tried again at the next
``resend_every`` (said once until it works again). It comes before the notifier's due
messages in a pass, so a RESOLVED always follows the last re-post of its alert.

Every error text a notifier gives is redacted and its control characters escaped
(:func:`~invoice_watch.safe_text.server_text`) before it is logged or stored; the
state file's outbox columns are made storable again as they are written
(``invoice_watch.store``), so no character a receiver sends can make a mark fail.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from invoice_watch.clock import Clock
from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.elapsed import Elapsed
from invoice_watch.errors import (
    NotifyError,
    NotLeaderError,
    PermanentNotifyError,
    RetryableNotifyError,
    StateError,
)
from invoice_watch.metrics import Metrics
from invoice_watch.quiet import QUIET_PREFIX, QuietWindow, holds, quiet_time
from invoice_watch.retry import backoff, retry_delay
from invoice_watch.safe_text import one_line, server_text, traceback_text
from invoice_watch.store import ERROR_MAX, Delivery, Store, outbox_error, summarize
from invoice_watch.types import AlertEvent, EventKind, FiringMirror, Notifier

log = logging.getLogger(__name__)

_BASE_BACKOFF = 2.0
_WRITE_BACKOFF = 1.0  # seconds before an unrecorded outcome's first new write
_PASS_LIMIT = 500  # messages one pass reads
_PRUNE_BATCH = 500  # rows of each kind one prune deletes
_PRUNE_EVERY = 3600.0  # monotonic seconds between prunes once nothing is left to prune
_AGED_MAX = 10_000  # creation times of waiting messages one pass keeps the age of
_TELL_EVERY = 3600.0  # monotonic seconds: at most one WARNING a message in that time
DEFAULT_RETENTION = timedelta(days=180)


def _to(owed: tuple[str, ...] | None) -> str:
    """`` to a@x, b@y`` for the recipients a message is still owed to, else nothing."""
    return f" to {', '.join(owed)}" if owed is not None else ""


@dataclass
class DeliveryStats:
    sent: int = 0
    retried: int = 0
    failed: int = 0

    def add(self, other: DeliveryStats) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed


@dataclass(frozen=True)
class _Outcome:
    """A message's outcome, to be recorded: ``at`` is when it was sent or failed, or
    (``retry``) when it is due again."""

    delivery: Delivery
    what: str
    state: Literal["sent", "failed", "retry", "postponed"]
    at: datetime
    error: str | None = None
    owed: tuple[str, ...] | None = None  # the recipients still owed it (None: all)
    alone: bool = False  # a retry that holds up none of the notifier's other messages

    @property
    def retry(self) -> bool:
        """Whether the message stays pending (retried, or postponed: no attempt made)."""
        return self.state in ("retry", "postponed")


_DONE = {
    "sent": "delivered",
    "failed": "marked failed",
    "retry": "to be retried",
    "postponed": "kept for its notifier",
}


class Deliverer:
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
        """``elapsed``: the cycle's, which stamped the messages' creation times (module
        docstring); ``quiet``: the notifiers' quiet hours, by name."""
        self._metrics = metrics or Metrics()
        self._store = store
        # "state file" (SQLite) or "state database" (PostgreSQL), as messages name it
        self._state: str = getattr(getattr(store, "database", None), "kind", "state file")
        self._notifiers = notifiers
        self._clock = clock
        # The messages' ages, on the monotonic clock, for as long as they wait.
        self._ages = Elapsed(clock, origin=elapsed)
        # Message id -> monotonic time its last failure was logged as a WARNING.
        self._told: dict[int, float] = {}
        self._max_age = max_age
        self._cap = max_backoff.total_seconds()
        self._retention = retention
        self._rng = rng or random.Random()
        self.wake = asyncio.Event()
        self._stopping = False
        self.totals = DeliveryStats()
        # Outcomes the state file refused to record, by message id (module docstring).
        self._unrecorded: dict[int, _Outcome] = {}
        self._write_failures = 0  # failed writes since the state file last took one
        self._write_at = 0.0  # monotonic time of the next write of those outcomes
        self._pass_failures = 0  # passes failed in a row
        self._prune_at = 0.0  # monotonic time of the next prune
        # Notifiers no longer configured that messages wait for: told once each.
        self._missing: set[str] = set()
        self._unrouted_labels: set[str] = set()  # notifiers the unrouted gauge names
        self._returned: set[str] = set()  # configured again: their messages due now
        # Mirrors (FiringMirror): monotonic time of each one's next re-post, and the
        # ones whose last re-post failed (told once until one works again).
        self._repost_at: dict[str, float] = {}
        self._repost_failing: set[str] = set()
        self._quiet: Mapping[str, QuietWindow] = quiet or {}
        self._silenced = 0  # messages silenced at the last pass
        # A quiet-hours summary's first message id -> the other messages it carries.
        # Whether this process may send now: a replica on a PostgreSQL state only while
        # it holds the lease (leader.py), checked before every send.
        self.may_send: Callable[[], bool] = lambda: True

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
        self._quiet = quiet or {}
        back = self._missing & set(notifiers)
        if back:
            log.warning(
                "notifier(s) %s are configured again: the messages waiting for them go out "
                "within %s",
                ", ".join(sorted(back)),
                max_backoff,
            )
            self._missing -= back
            self._returned |= back
            self.wake.set()
        self._notifiers = notifiers
        self._max_age = max_age
        self._cap = max_backoff.total_seconds()
        self._retention = retention

    @property
    def unrecorded(self) -> int:
        """Outcomes kept in memory because the state file could not record them."""
        return len(self._unrecorded)

    async def deliver_due(self) -> DeliveryStats:
        """One pass over the due rows: each gets one attempt. Outcomes kept in memory
        are written first when their backoff is over; old rows are pruned last."""
        await self._record_kept()
        await self._age_waiting()
        since = self._clock.monotonic() - _TELL_EVERY
        self._told = {row: told for row, told in self._told.items() if told > since}
        now = self._clock.now()
        await self._bound_schedule(now)
        if self._returned:
            try:
                await self._store.outbox.make_due(self._returned, now)
                self._returned = set()
            except StateError as exc:  # due within max_backoff anyway
                log.debug("could not make the messages of returned notifiers due: %s", exc)
        await self._lift(now)
        due = await self._store.outbox.due(now, limit=_PASS_LIMIT, exclude=self._unrecorded)
        due = await self._silence_due(now, due)
        # A notifier whose retry is kept in memory waits for the state file, as the
        # recorded retry would have it wait: its rows go in order, that one first.
        paused = {
            kept.delivery.notifier
            for kept in self._unrecorded.values()
            if kept.retry and not kept.alone
        }
        by_notifier: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in due:
            if delivery.notifier not in paused:
                by_notifier[delivery.notifier].append(delivery)
        mirrors = self._mirrors_due()
        stats = DeliveryStats()
        async with asyncio.TaskGroup() as group:
            for name in by_notifier.keys() | mirrors.keys():
                group.create_task(
                    self._notifier_pass(name, mirrors.get(name), by_notifier[name], stats)
                )
        self.totals.add(stats)
        counts = await self._store.outbox.counts()
        for state in ("pending", "failed"):
            self._metrics.outbox_depth.labels(state=state).set(counts.get(state, 0))
        await self._count_unrouted()
        await self._prune()
        return stats

    async def _lift(self, now: datetime) -> None:
        """Silenced messages no silence matches any more: sent now or muted
        (:meth:`SilenceRepository.lift`)."""
        try:
            lifted = await self._store.silences.lift(now)
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

    async def _silence_due(self, now: datetime, due: list[Delivery]) -> list[Delivery]:
        """Apply the active silences to the due messages as they are about to be sent
        (:meth:`SilenceRepository.silence_pending`: a silence added while a message
        waited holds it too). A notifier whose messages it changed sends none in this
        pass (its groups may have changed, and its messages go in order): the next
        pass, due at once, sends the rest."""
        if not due:
            return due
        try:
            changed = await self._store.silences.silence_pending(now, [d.id for d in due])
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

    async def _count_unrouted(self) -> None:
        """Set the unrouted gauge: pending messages per notifier no longer configured."""
        if not self._missing and not self._unrouted_labels:
            return
        try:
            pending = await self._store.outbox.pending_by_notifier()
        except StateError as exc:
            log.debug("could not count the messages waiting for a notifier: %s", exc)
            return
        unrouted = {n: c for n, c in pending.items() if n not in self._notifiers}
        for name in self._unrouted_labels - set(unrouted):
            self._metrics.outbox_unrouted.labels(notifier=name).set(0)
        for name, count in unrouted.items():
            self._metrics.outbox_unrouted.labels(notifier=name).set(count)
        self._unrouted_labels = set(unrouted)

    async def _age_waiting(self) -> None:
        """Ask the age of every waiting message (the first time: it is known from then
        on, on the monotonic clock), and forget the ages of messages no longer waiting
        (:meth:`Elapsed.sweep <invoice_watch.elapsed.Elapsed.sweep>`: not asked for two
        passes)."""
        try:
            times = await self._store.outbox.waiting_since(_AGED_MAX)
        except StateError as exc:  # asked again next pass; a message attempted is anyway
            log.debug("could not read when the waiting messages were created: %s", exc)
            return
        for when in times:
            self._ages.age(when)
        self._ages.sweep()

    def _too_old(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` has waited ``max_age`` (module docstring), not counting
        the time its notifier's quiet hours held it (:func:`~invoice_watch.quiet.
        quiet_time`; none for a message of a severity in ``except``: not held)."""
        age = self._ages.age(delivery.created_at)
        if age < self._max_age:
            return False
        window = self._quiet.get(delivery.notifier)
        if window is None or any(e.severity in window.except_ for e in delivery.events):
            return True
        return age - quiet_time(window, delivery.created_at, self._clock.now()) >= self._max_age

    async def _bound_schedule(self, now: datetime) -> None:
        try:
            moved = await self._store.outbox.bound_schedule(now, now + timedelta(seconds=self._cap))
        except StateError as exc:  # the waits stay bounded: tried again next pass
            log.debug("could not bring forward messages scheduled too far ahead: %s", exc)
            return
        if moved:
            log.warning(
                "%d message(s) were scheduled more than %s ahead (the wall clock was set "
                "back?): they are due now",
                moved,
                timedelta(seconds=self._cap),
            )

    async def _notifier_pass(
        self,
        name: str,
        mirror: FiringMirror | None,
        rows: list[Delivery],
        stats: DeliveryStats,
    ) -> None:
        """One notifier's share of a pass: its re-post of what fires, when due, then
        its due messages in order."""
        if mirror is not None:
            await self._repost(name, mirror)
        if rows:
            await self._deliver_in_order(name, rows, stats)

    # -- mirrors: what fires, posted again -------------------------------------------

    def _mirrors(self) -> dict[str, FiringMirror]:
        return {n: m for n, m in self._notifiers.items() if isinstance(m, FiringMirror)}

    def _mirrors_due(self) -> dict[str, FiringMirror]:
        now = self._clock.monotonic()
        return {
            name: mirror
            for name, mirror in self._mirrors().items()
            if now >= self._repost_at.get(name, 0.0)
        }

    async def _firing_for(self, name: str) -> list[AlertEvent] | None:
        """The last event of each firing alert whose messages go to notifier ``name``,
        oldest alert first, but for those whose FIRING it was never sent (held by a
        silence or quiet hours, waiting for its receiver: :meth:`Outbox.unnotified
        <invoice_watch.store.protocols.Outbox.unnotified>`): a re-post is no way around
        what holds a message. None when the state cannot say which those are."""
        states = sorted(self._store.alerts.firing().values(), key=lambda s: s.firing_since)
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
            unsent = await self._store.outbox.unnotified(name)
        except StateError as exc:
            log.debug("%s: could not read which firing alerts were sent: %s", name, exc)
            return None
        return [
            state.last_event
            for state in states
            if state.last_event is not None and (state.key, state.firing_since) not in unsent
        ]

    async def _repost(self, name: str, mirror: FiringMirror) -> None:
        """Post what fires to ``mirror`` again (module docstring). When the state cannot
        be read, none is posted (one that is silenced could be): tried again at the next
        ``resend_every``, well within the ``endsAt`` the last post gave."""
        if not self.may_send():
            return
        self._repost_at[name] = self._clock.monotonic() + mirror.resend_every
        events = await self._firing_for(name)
        if not events:
            return
        try:
            await mirror.repost(events)
        except NotifyError as exc:
            error = server_text(exc, ERROR_MAX)
            level = logging.DEBUG if name in self._repost_failing else logging.WARNING
            log.log(
                level,
                "%s: could not post the %d firing alert(s) again: %s; trying again in %.0fs",
                name,
                len(events),
                error,
                mirror.resend_every,
            )
            self._repost_failing.add(name)
            return
        except Exception as exc:  # a bug in a notifier must not stop delivery
            if name not in self._repost_failing:
                log.error(
                    "%s: unexpected error while posting the firing alerts again (a bug: "
                    "please report it):\n%s",
                    name,
                    traceback_text(exc),
                )
            self._repost_failing.add(name)
            return
        if name in self._repost_failing:
            self._repost_failing.discard(name)
            log.info("%s: posting the firing alerts again works again", name)

    async def _deliver_in_order(
        self, name: str, rows: list[Delivery], stats: DeliveryStats
    ) -> None:
        window = self._quiet.get(name)
        if window is not None:
            rows = await self._quiet_hours(window, rows)
        for delivery in rows:
            if not await self._attempt(delivery, stats):
                # The receiver is down or rate-limiting: the rest of this notifier's rows
                # wait for the next pass instead of hammering it.
                return

    async def _quiet_hours(self, window: QuietWindow, rows: list[Delivery]) -> list[Delivery]:
        """Quiet hours (:mod:`invoice_watch.quiet`): inside a window, the messages wait
        (postponed to its end, or ``max_backoff`` when sooner: no wait is longer), but
        those with an event of a severity in ``except``; when it has ended, the
        messages that waited go as one summary (as few messages as
        :data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` allows)."""
        now = self._clock.now()
        go: list[Delivery] = []
        for delivery in rows:
            until = holds(window, delivery.events, now)
            if until is None:
                go.append(delivery)
                continue
            at = min(until, now + timedelta(seconds=self._cap))
            why = f"{QUIET_PREFIX} until {until.astimezone(window.tz):%Y-%m-%d %H:%M %Z}"
            try:
                await self._store.outbox.postpone(delivery.id, at, why, delivery.owed)
            except StateError as exc:  # looked at again next pass
                log.debug("%s: could not hold a message for quiet hours: %s", delivery.id, exc)
        return await self._summaries(go)

    async def _summaries(self, rows: list[Delivery]) -> list[Delivery]:
        """``rows``, with those that waited for quiet hours to end (their last error
        says so) joined into summaries of at most MESSAGE_MAX_EVENTS events each, in
        place of the first of them. Each summary is made a grouped message in the
        outbox before it is sent (:meth:`Outbox.merge <invoice_watch.store.protocols.
        Outbox.merge>`), so that a retry, after a restart too, is that same summary; one
        the state cannot record waits for the next pass."""
        out: list[Delivery] = []
        summary: list[Delivery] = []

        async def flush() -> None:
            if len(summary) == 1:
                out.append(summary[0])
            elif summary:
                first = summary[0]
                try:
                    await self._store.outbox.merge([d.id for d in summary])
                except StateError as exc:  # still pending: summarized next pass
                    log.debug("%s: could not make the quiet hours summary: %s", first.id, exc)
                else:
                    events = [event for d in summary for event in d.events]
                    out.append(replace(first, events=events, part=None))
            summary.clear()

        for delivery in rows:
            waited = (delivery.last_error or "").startswith(QUIET_PREFIX)
            if not waited or delivery.owed is not None:
                out.append(delivery)
                continue
            count = sum(len(d.events) for d in summary)
            if summary and count + len(delivery.events) > MESSAGE_MAX_EVENTS:
                await flush()
            summary.append(delivery)
        await flush()
        return out

    async def _attempt(self, delivery: Delivery, stats: DeliveryStats) -> bool:
        """One attempt; True when the notifier may be tried again in this pass."""
        what = one_line(f"{delivery.notifier}: {summarize(delivery.events, delivery.part)}")
        notifier = self._notifiers.get(delivery.notifier)
        if notifier is None:
            return await self._unrouted(delivery, what, stats)
        owed = delivery.owed
        if not self.may_send():  # (a deposed leader: the new one sends it)
            return False
        try:
            if owed is None:
                await notifier.send(delivery.events, part=delivery.part)
            else:  # some of the notifier's recipients have it already
                await notifier.send(delivery.events, part=delivery.part, recipients=owed)
        except PermanentNotifyError as exc:
            error = server_text(exc, ERROR_MAX)
            log.error("%s: not delivered%s, and retrying cannot help: %s", what, _to(owed), error)
            await self._record(_Outcome(delivery, what, "failed", self._clock.now(), error, owed))
            self._count(delivery, "failed")
            stats.failed += 1
            return True
        except RetryableNotifyError as exc:
            error = server_text(exc, ERROR_MAX)
            if exc.owed is not None:  # only some recipients' failure: owed to them
                owed = exc.owed
            return await self._retry_later(
                delivery, what, error, exc.retry_after, stats, owed, alone=exc.owed is not None
            )
        except Exception as exc:  # a bug in a notifier must not lose the message
            error = server_text(f"unexpected error: {exc!r}", ERROR_MAX)
            tell = self._tell(delivery, error, owed)  # as any error (module docstring)
            if tell:
                log.error(
                    "%s: unexpected error while sending (a bug: please report it); the "
                    "message is kept and retried:\n%s",
                    what,
                    traceback_text(exc),
                )
            return await self._retry_later(delivery, what, error, None, stats, owed, tell=tell)
        await self._record(_Outcome(delivery, what, "sent", self._clock.now()))
        log.info("%s: delivered", what)
        self._count(delivery, "sent")
        stats.sent += 1
        return True

    async def _unrouted(self, delivery: Delivery, what: str, stats: DeliveryStats) -> bool:
        """A message for a notifier no longer configured: kept until ``max_age``, looked
        at again every ``max_backoff`` (module docstring)."""
        name = delivery.notifier
        now = self._clock.now()
        if self._too_old(delivery):
            error = f"notifier {name!r} is no longer in the configuration"
            return await self._retry_later(delivery, what, error, None, stats, delivery.owed)
        if name not in self._missing:
            self._missing.add(name)
            log.error(
                "notifier %r is no longer in the configuration, but messages wait for it "
                "(%s, and maybe more): they are kept until delivery.max_age (%s) and go out "
                "if it is configured again under that name (renamed? rename it back); "
                "then they are marked failed. `status` lists them",
                name,
                what,
                self._max_age,
            )
        error = (
            f"notifier {name!r} is no longer in the configuration: kept until "
            f"delivery.max_age ({self._max_age}) in case it comes back"
        )
        # The notifier's other rows wait with this one (postpone): one look a pass.
        later = now + timedelta(seconds=self._cap)
        await self._record(_Outcome(delivery, what, "postponed", later, error, delivery.owed))
        return False

    async def _retry_later(
        self,
        delivery: Delivery,
        what: str,
        error: str,
        retry_after: float | None,
        stats: DeliveryStats,
        owed: tuple[str, ...] | None,
        *,
        tell: bool | None = None,
        alone: bool = False,
    ) -> bool:
        """Retry the message later (for the recipients ``owed``), or give it up at
        ``max_age``. ``tell``: whether to log it as a WARNING, when already decided;
        ``alone``: the failure was only some recipients', so the notifier's other
        messages do not wait for this one (True is returned: they go on now)."""
        now = self._clock.now()
        if self._too_old(delivery):
            log.error("%s: giving up after %s%s: %s", what, self._max_age, _to(owed), error)
            error = f"gave up after {self._max_age}: {error}"
            await self._record(_Outcome(delivery, what, "failed", now, error, owed))
            self._count(delivery, "failed")
            stats.failed += 1
            return True
        delay = retry_delay(
            delivery.attempts, retry_after, base=_BASE_BACKOFF, cap=self._cap, rng=self._rng
        )
        if retry_after is not None:
            # Asked to wait again and again (429s in a row): the wait grows with the
            # attempts as backoff does, whatever Retry-After says (0 would be a request
            # a second for ever).
            growing = backoff(delivery.attempts, base=_BASE_BACKOFF, cap=self._cap, rng=self._rng)
            delay = max(delay, growing)
        # A receiver failing again (a 429 storm, an outage) is not a line per attempt.
        if tell is None:
            tell = self._tell(delivery, error, owed)
        level = logging.WARNING if tell else logging.DEBUG
        log.log(level, "%s: %s; retrying in %.0fs", what, error, delay)
        # This row and the notifier's other pending rows wait together: a receiver
        # that is down or rate-limiting is not sent the rest of the queue meanwhile.
        # Unless it works, and refused only some recipients for now (one full mailbox
        # must not hold up everyone's alerts for days).
        retry_at = now + timedelta(seconds=delay)
        await self._record(_Outcome(delivery, what, "retry", retry_at, error, owed, alone))
        self._count(delivery, "retry")
        stats.retried += 1
        return alone

    def _tell(self, delivery: Delivery, error: str, owed: tuple[str, ...] | None) -> bool:
        """Whether this failure of ``delivery`` is logged as a WARNING (else at DEBUG):
        its first, or one unlike its last, and the first about it within
        :data:`_TELL_EVERY` (module docstring)."""
        if delivery.attempts and outbox_error(error, owed) == delivery.last_error:
            return False
        now = self._clock.monotonic()
        told = self._told.get(delivery.id)
        if told is not None and now - told < _TELL_EVERY:
            return False
        self._told[delivery.id] = now
        return True

    def _count(self, delivery: Delivery, outcome: str) -> None:
        self._metrics.notifications.labels(notifier=delivery.notifier, outcome=outcome).inc()

    # -- recording outcomes ----------------------------------------------------------

    async def _write(self, outcome: _Outcome) -> None:
        """Record one outcome (shielded: once begun, the transaction completes)."""
        outbox, row = self._store.outbox, outcome.delivery.id
        error, owed = outcome.error or "", outcome.owed
        if outcome.state == "sent":
            write = outbox.mark_sent(row, outcome.at)
        elif outcome.state == "failed":
            write = outbox.mark_failed(row, outcome.at, error, owed)
        elif outcome.state == "postponed":
            write = outbox.postpone(row, outcome.at, error, owed)
        else:
            write = outbox.mark_retry(row, outcome.at, error, owed, hold=not outcome.alone)
        await asyncio.shield(write)

    async def _record(self, outcome: _Outcome) -> None:
        """Record an outcome, or keep it in memory when the state file refuses."""
        if not outcome.retry:
            self._told.pop(outcome.delivery.id, None)
        if self._unrecorded:  # the state file refused: kept ones are written first
            self._keep(outcome)
            return
        try:
            await self._write(outcome)
        except NotLeaderError as exc:  # deposed while it sent: the new leader owns it
            self._told.pop(outcome.delivery.id, None)
            log.warning(
                "%s: %s, but this replica is no longer the leader and cannot record it "
                "(%s): the new leader owns the outbox and may send it a second time",
                outcome.what,
                _DONE[outcome.state],
                exc,
            )
            return
        except StateError as exc:
            told = bool(self._unrecorded)  # another notifier's write failed meanwhile
            self._write_failed()
            self._keep(outcome)
            if told:
                return
            log.error(
                "%s: %s, but the %s cannot record it (%s). Kept in memory: it is "
                "not attempted again, and the write is retried with backoff (see the "
                "invoice_watch_outbox_unrecorded metric); only a stop before the %s "
                "is writable again can send it twice",
                outcome.what,
                _DONE[outcome.state],
                self._state,
                exc,
                self._state,
            )

    def drop_unrecorded(self) -> None:
        """This replica stepped down (leader.py): the outcomes it kept in memory are
        forgotten, since the new leader owns the outbox (and sends those messages again:
        a failover's duplicates). Said once, when there were any."""
        if not self._unrecorded:
            return
        count = len(self._unrecorded)
        self._unrecorded.clear()
        self._write_failures = 0
        self._metrics.outbox_unrecorded.set(0)
        log.warning(
            "this replica is no longer the leader: %d delivery outcome(s) it could not "
            "record are dropped; the new leader owns the outbox and may send those "
            "messages a second time",
            count,
        )

    def _keep(self, outcome: _Outcome) -> None:
        self._unrecorded[outcome.delivery.id] = outcome
        self._metrics.outbox_unrecorded.set(len(self._unrecorded))

    def _write_failed(self) -> None:
        self._metrics.outbox_write_errors.inc()
        delay = backoff(self._write_failures, base=_WRITE_BACKOFF, cap=self._cap, rng=self._rng)
        self._write_failures += 1
        self._write_at = self._clock.monotonic() + delay

    async def _record_kept(self, *, now: bool = False) -> None:
        """Write the outcomes kept in memory, oldest first, once their backoff is over
        (``now``: whatever it says); stop at the first the state file refuses."""
        if not self._unrecorded or (not now and self._clock.monotonic() < self._write_at):
            return
        count = len(self._unrecorded)
        for row, outcome in list(self._unrecorded.items()):
            try:
                await self._write(outcome)
            except StateError as exc:
                self._write_failed()
                log.debug("%s still refuses delivery outcomes: %s", self._state, exc)
                return
            del self._unrecorded[row]
            self._metrics.outbox_unrecorded.set(len(self._unrecorded))
        self._write_failures = 0
        log.warning(
            "the %s is writable again: recorded %d delivery outcome(s) kept in memory",
            self._state,
            count,
        )

    # -- retention -------------------------------------------------------------------

    async def _prune(self) -> None:
        if self._clock.monotonic() < self._prune_at or not self.may_send():
            return  # (a standby prunes nothing: the leader does)
        before = self._clock.now() - self._retention
        try:
            deleted = await self._store.prune(before, limit=_PRUNE_BATCH)
        except NotLeaderError:  # deposed meanwhile: the new leader prunes
            deleted = 0
        except StateError as exc:
            log.warning("could not prune the %s: %s", self._state, exc)
            deleted = 0
        # A full batch may leave more: the next pass goes on, else in an hour.
        more = deleted >= _PRUNE_BATCH
        self._prune_at = self._clock.monotonic() + (0.0 if more else _PRUNE_EVERY)
        if deleted:
            log.info(
                "pruned %d row(s) older than %s from the %s", deleted, self._retention, self._state
            )

    # -- loops -----------------------------------------------------------------------

    async def _next_wait(self, *, reposts: bool = True) -> float | None:
        """Seconds until the next pass is due, never more than ``max_backoff``: until
        the next write of outcomes kept in memory while there are any (passes then go
        at the pace of those writes), else until the next pending message, or the next
        re-post of a mirror (``reposts``); None when nothing is due at all."""
        monotonic = self._clock.monotonic()
        if self._unrecorded:
            return min(max(0.0, self._write_at - monotonic), self._cap)
        waits = []
        next_at = await self._store.outbox.next_attempt_at()
        if next_at is not None:
            waits.append((next_at - self._clock.now()).total_seconds())
        if reposts:
            waits += [self._repost_at.get(name, 0.0) - monotonic for name in self._mirrors()]
        if self._silenced:  # silenced messages: looked at again when a silence may end
            waits.append(self._cap)
        if not waits:
            return None
        return min(max(0.0, min(waits)), self._cap)

    async def drain(self, budget: float) -> int:
        """Deliver until the outbox is empty or nothing more can be done within
        ``budget`` seconds of monotonic time (``run --once``); returns how many messages
        are still undelivered (:attr:`unrecorded` says how many outcomes are not
        recorded)."""
        end = self._clock.monotonic() + budget
        while True:
            await self.deliver_due()
            # Mirrors got what fires in the first pass; waiting for their next re-post
            # would only use the budget up.
            wait = await self._next_wait(reposts=False)
            if wait is None or self._clock.monotonic() + wait > end:
                break
            await self._clock.sleep(wait)
        await self._record_kept(now=True)
        counts = await self._store.outbox.counts()
        delivered = sum(1 for kept in self._unrecorded.values() if not kept.retry)
        return max(0, counts.get("pending", 0) - delivered)

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
                    await self._record_kept(now=True)
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
                if self._unrecorded:
                    log.error(
                        "stopping with %d delivery outcome(s) the %s could not "
                        "record: the messages among them that were sent may be sent again "
                        "at the next start",
                        len(self._unrecorded),
                        self._state,
                    )
                return
            await self._wait(wait)

    def _pass_failed(self, exc: Exception) -> float:
        """Log a failed pass (once until passes work again) and say how long to wait."""
        delay = backoff(self._pass_failures, base=_BASE_BACKOFF, cap=self._cap, rng=self._rng)
        if self._pass_failures == 0:
            log.error(
                "delivery pass failed: %s; trying again with backoff (up to %.0fs)",
                exc,
                self._cap,
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
            tasks.add(asyncio.ensure_future(self._clock.sleep(min(seconds, self._cap))))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
