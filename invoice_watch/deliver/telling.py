"""The warning rate of failing messages: one WARNING, then at most one an hour.

A message failing again is not a log line per attempt: a failure is logged as a WARNING
when it is the message's first, or unlike its last one (the stored ``last_error``, so a
restart does not say it again), and no other about that message was logged within the
hour (:data:`TELL_EVERY`: a receiver whose every answer differs, a session id in each
SMTP reply, is told about once an hour); otherwise at DEBUG. ``status`` always shows the
last error. Notifiers log no failure of their own (they raise it, with the same words for
the same answer), so delivery is the one place that says it.

Owns, in :class:`FailureWarnings`, the monotonic time (seconds) each message's last
WARNING was logged, by outbox id; forgotten an hour later, or when the message is done.
"""

from __future__ import annotations

from invoice_watch.clock import Clock
from invoice_watch.store import Delivery, outbox_error

TELL_EVERY = 3600.0  # monotonic seconds: at most one WARNING a message in that time


class FailureWarnings:
    """Which failures are logged as a WARNING (module docstring)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._told: dict[int, float] = {}  # outbox id -> monotonic time of its WARNING

    def tell(self, delivery: Delivery, error: str, owed: tuple[str, ...] | None) -> bool:
        """Whether this failure of ``delivery`` (``error``, for the recipients ``owed``)
        is logged as a WARNING: its first, or one unlike its last, and the first about
        it within :data:`TELL_EVERY`. Remembered when it is."""
        if delivery.attempts and outbox_error(error, owed) == delivery.last_error:
            return False
        now = self._clock.monotonic()
        told = self._told.get(delivery.id)
        if told is not None and now - told < TELL_EVERY:
            return False
        self._told[delivery.id] = now
        return True

    def forget(self, row: int) -> None:
        """The message ``row`` is done (sent, failed, or another replica's now)."""
        self._told.pop(row, None)

    def sweep(self) -> None:
        """Forget the WARNINGs older than :data:`TELL_EVERY` (once a pass: bounded)."""
        since = self._clock.monotonic() - TELL_EVERY
        self._told = {row: told for row, told in self._told.items() if told > since}
