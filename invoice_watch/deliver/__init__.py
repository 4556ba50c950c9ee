"""Stage 6, deliver: send the outbox through the notifiers, after the commit.

Each outbox row is one message for one notifier. Rows of one notifier go in order; the
notifiers go concurrently. A transient failure is retried with backoff across restarts
until ``delivery.max_age``, then marked failed; a permanent failure is marked failed at
once. Nothing leaves the outbox unsent but by being marked failed, which ``status``
shows. What callers use: :class:`~.deliverer.Deliverer` (``deliver_due``, ``drain``,
``run``, ``stop``, ``configure``) and :class:`~.stats.DeliveryStats`.

One module a job; each piece of state has one owner:

=================  ==============================================  =====================
module             job                                             state it owns
=================  ==============================================  =====================
``deliverer``      the loop and the order of a pass; wiring        ``wake``, stop asked,
                                                                   passes failed, totals
``context``        what every part reads (store, clock, limits,    set by ``Deliverer``
                   notifiers, quiet hours, ``may_send``); the log  alone
``sending``        one notifier's rows in order; ``dispatch`` (the none across passes
                   one call of ``Notifier.send``); retry or fail
``outcomes``       recording marks; outcomes the state refused     kept outcomes, their
                                                                   write backoff
``telling``        one WARNING, then at most one an hour           last WARNING a message
``ages``           a message's age against ``max_age``            ages of waiting ones
``silencing``      silences at delivery                            messages silenced
``quiet_hours``    quiet hours at delivery: hold, then summarize   none (the outbox)
``mirrors``        Alertmanager re-posts of what fires             next re-post, failing
``unrouted``       messages for a notifier no longer configured    missing notifiers
``retention``      pruning old messages                            next prune
``stats``          a pass's tally, the outbox gauges               none
=================  ==============================================  =====================

Every module logs as ``invoice_watch.deliver`` (:data:`.context.log`).
"""
