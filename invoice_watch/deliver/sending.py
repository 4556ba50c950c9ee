"""Sending a notifier's due messages, in order, and deciding what each attempt's
outcome is: sent, retried later (when), or failed.

:func:`dispatch` is the one place a message reaches its notifier (``Notifier.send``;
a report, the other kind, ``send_report``: :mod:`invoice_watch.report.outbox`): a new
kind of message changes it alone. :class:`Sender` makes the attempts.

Order: each outbox row is one message for one notifier. A notifier's rows go in order,
oldest first, and the first that fails stops them for the pass: the others wait behind
it (a receiver that is down or rate-limiting is not sent the rest of its queue), so a
RESOLVED never overtakes its FIRING. The one exception is a message refused for now
by only some of its recipients (below): it holds up no one. A mirror's re-post of what
fires comes before the notifier's messages (:mod:`.mirrors`).

A transient failure (:class:`~invoice_watch.errors.RetryableNotifyError`) is retried with
exponential backoff (honouring ``Retry-After``, capped at ``delivery.max_backoff``)
across restarts until ``delivery.max_age`` (:mod:`.ages`), then marked failed; a
permanent one is marked failed at once; any other exception is a notifier's bug, logged
with its traceback and retried as a transient failure (the message is never lost).
Repeated 429s escalate: the wait is the longer of the receiver's ``Retry-After`` and the
backoff for the attempts made so far, as the Atlas client does, so ``Retry-After: 0``
answered again and again is not one request a second for ever. Whether a failure is
logged as a WARNING: :mod:`.telling`.

A notifier with recipients of its own (email's ``to``) may deliver a message to some of
them and be refused for now by others (a greylisting server): it raises
:class:`RetryableNotifyError` with ``owed``, the outbox keeps that list with the message
(:func:`~invoice_watch.store.encoding.outbox_error`), and every later attempt is for those
recipients only (``send(recipients=...)``), so the others get no duplicate; the message
stays pending (``status`` and ``history`` say so) until they have it too, or it is
failed at ``max_age`` saying whom it never reached.

Every error text a notifier gives is redacted and its control characters escaped
(:func:`~invoice_watch.safe_text.server_text`) before it is logged or stored.

Owns nothing across passes: outcomes go to :class:`~.outcomes.Recorder`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from invoice_watch.deliver.ages import Ages
from invoice_watch.deliver.context import BASE_BACKOFF, Context, log
from invoice_watch.deliver.mirrors import Mirrors
from invoice_watch.deliver.outcomes import Outcome, Recorder
from invoice_watch.deliver.quiet_hours import quiet_hours
from invoice_watch.deliver.stats import DeliveryStats, count
from invoice_watch.deliver.telling import FailureWarnings
from invoice_watch.deliver.unrouted import Unrouted
from invoice_watch.errors import PermanentNotifyError, RetryableNotifyError
from invoice_watch.report.outbox import send_report
from invoice_watch.retry import backoff, retry_delay
from invoice_watch.safe_text import one_line, server_text, traceback_text
from invoice_watch.store import ERROR_MAX, Delivery, summarize
from invoice_watch.types import FiringMirror, Notifier

Owed = tuple[str, ...] | None  # the notifier's recipients still owed a message (None: all)


def owed_to(owed: Owed) -> str:
    """`` to a@x, b@y`` for the recipients a message is still owed to, else nothing."""
    return f" to {', '.join(owed)}" if owed is not None else ""


async def dispatch(notifier: Notifier, delivery: Delivery, owed: Owed) -> None:
    """Give ``delivery`` to its ``notifier``, for the recipients ``owed`` (None: all of
    them): returns when it was sent, raises what the notifier raises."""
    if delivery.report is not None:  # a report (issue 19 §2) rather than alerts
        await send_report(notifier, delivery.report, recipients=owed)
    elif owed is None:
        await notifier.send(delivery.events, part=delivery.part)
    else:  # some of the notifier's recipients have it already
        await notifier.send(delivery.events, part=delivery.part, recipients=owed)


@dataclass(frozen=True)
class Sender:
    """Attempts of the due messages, and their outcomes (module docstring), with the
    parts of delivery they use."""

    context: Context
    recorder: Recorder
    warnings: FailureWarnings
    ages: Ages
    unrouted: Unrouted
    mirrors: Mirrors

    async def notifier_pass(
        self, name: str, mirror: FiringMirror | None, rows: list[Delivery], stats: DeliveryStats
    ) -> None:
        """One notifier's share of a pass: its re-post of what fires, when due, then
        its due ``rows`` in order (quiet hours first: :mod:`.quiet_hours`)."""
        if mirror is not None:
            await self.mirrors.repost(name, mirror)
        window = self.context.quiet.get(name)
        if rows and window is not None:
            rows = await quiet_hours(self.context, window, rows)
        for delivery in rows:
            if not await self.attempt(delivery, stats):
                # The receiver is down or rate-limiting: the rest of this notifier's rows
                # wait for the next pass instead of hammering it.
                return

    async def attempt(self, delivery: Delivery, stats: DeliveryStats) -> bool:
        """One attempt; True when the notifier may be tried again in this pass."""
        context = self.context
        report = delivery.report.summary if delivery.report is not None else None
        what = one_line(
            f"{delivery.notifier}: {report or summarize(delivery.events, delivery.part)}"
        )
        notifier = context.notifiers.get(delivery.notifier)
        if notifier is None:
            return await self._unrouted_attempt(delivery, what, stats)
        owed = delivery.owed
        if not context.may_send():  # (a deposed leader: the new one sends it)
            return False
        try:
            await dispatch(notifier, delivery, owed)
        except PermanentNotifyError as exc:
            error = server_text(exc, ERROR_MAX)
            log.error(
                "%s: not delivered%s, and retrying cannot help: %s", what, owed_to(owed), error
            )
            await self._fail(delivery, what, error, owed, stats)
            return True
        except RetryableNotifyError as exc:
            error = server_text(exc, ERROR_MAX)
            if exc.owed is not None:  # only some recipients' failure: owed to them
                owed = exc.owed
            return await self.retry_later(
                delivery, what, error, exc.retry_after, stats, owed, alone=exc.owed is not None
            )
        except Exception as exc:  # a bug in a notifier must not lose the message
            error = server_text(f"unexpected error: {exc!r}", ERROR_MAX)
            tell = self.warnings.tell(delivery, error, owed)  # as any error (.telling)
            if tell:
                log.error(
                    "%s: unexpected error while sending (a bug: please report it); the "
                    "message is kept and retried:\n%s",
                    what,
                    traceback_text(exc),
                )
            return await self.retry_later(delivery, what, error, None, stats, owed, tell=tell)
        await self.recorder.record(Outcome(delivery, what, "sent", context.clock.now()))
        log.info("%s: delivered", what)
        count(context.metrics, stats, delivery, "sent")
        return True

    async def _fail(
        self, delivery: Delivery, what: str, error: str, owed: Owed, stats: DeliveryStats
    ) -> None:
        """Mark ``delivery`` failed now (already said) with ``error``."""
        at = self.context.clock.now()
        await self.recorder.record(Outcome(delivery, what, "failed", at, error, owed))
        count(self.context.metrics, stats, delivery, "failed")

    async def _unrouted_attempt(self, delivery: Delivery, what: str, stats: DeliveryStats) -> bool:
        """A message for a notifier no longer configured: kept until ``max_age``, looked
        at again every ``max_backoff`` (:mod:`.unrouted`)."""
        name, context = delivery.notifier, self.context
        limits, now = context.limits, context.clock.now()
        if self.ages.too_old(delivery):
            error = f"notifier {name!r} is no longer in the configuration"
            return await self.retry_later(delivery, what, error, None, stats, delivery.owed)
        self.unrouted.note(name, what)
        error = (
            f"notifier {name!r} is no longer in the configuration: kept until "
            f"delivery.max_age ({limits.max_age}) in case it comes back"
        )
        # The notifier's other rows wait with this one (postpone): one look a pass.
        later = now + timedelta(seconds=limits.cap)
        await self.recorder.record(
            Outcome(delivery, what, "postponed", later, error, delivery.owed)
        )
        return False

    async def retry_later(
        self,
        delivery: Delivery,
        what: str,
        error: str,
        retry_after: float | None,
        stats: DeliveryStats,
        owed: Owed,
        *,
        tell: bool | None = None,
        alone: bool = False,
    ) -> bool:
        """Retry the message later (for the recipients ``owed``), or give it up at
        ``max_age``. ``tell``: whether to log it as a WARNING, when already decided;
        ``alone``: the failure was only some recipients', so the notifier's other
        messages do not wait for this one (True is returned: they go on now)."""
        context = self.context
        max_age, cap, rng = context.limits.max_age, context.limits.cap, context.rng
        now = context.clock.now()
        if self.ages.too_old(delivery):
            log.error("%s: giving up after %s%s: %s", what, max_age, owed_to(owed), error)
            error = f"gave up after {max_age}: {error}"
            await self._fail(delivery, what, error, owed, stats)
            return True
        delay = retry_delay(delivery.attempts, retry_after, base=BASE_BACKOFF, cap=cap, rng=rng)
        if retry_after is not None:
            # Asked to wait again and again (429s in a row): the wait grows with the
            # attempts as backoff does, whatever Retry-After says (0 would be a request
            # a second for ever).
            growing = backoff(delivery.attempts, base=BASE_BACKOFF, cap=cap, rng=rng)
            delay = max(delay, growing)
        # A receiver failing again (a 429 storm, an outage) is not a line per attempt.
        if tell is None:
            tell = self.warnings.tell(delivery, error, owed)
        level = logging.WARNING if tell else logging.DEBUG
        log.log(level, "%s: %s; retrying in %.0fs", what, error, delay)
        # This row and the notifier's other pending rows wait together: a receiver
        # that is down or rate-limiting is not sent the rest of the queue meanwhile.
        # Unless it works, and refused only some recipients for now (one full mailbox
        # must not hold up everyone's alerts for days).
        retry_at = now + timedelta(seconds=delay)
        await self.recorder.record(Outcome(delivery, what, "retry", retry_at, error, owed, alone))
        count(context.metrics, stats, delivery, "retry")
        return alone
