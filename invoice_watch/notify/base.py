"""What every notifier does alike, once: :class:`BaseNotifier`.

The :class:`~invoice_watch.types.Notifier` contract's ``send`` is here: a message of no
events is nothing to send; any other is the notifier's own :meth:`BaseNotifier._send`.
A notifier holds nothing open between sends (each attempt opens and closes its own
connection; the console's stream is its caller's), so ``aclose`` has nothing to close.
HTTP notifiers build on :class:`~invoice_watch.notify.http.HttpNotifier`.
"""

from __future__ import annotations

from collections.abc import Sequence

from invoice_watch.types import AlertEvent, Part

Recipients = Sequence[str] | None  # the notifier's own recipients owed a message (None: all)


class BaseNotifier:
    """A notifier: ``send`` (the contract) and ``aclose``; subclasses say how one
    message goes (:meth:`_send`)."""

    name: str

    async def send(
        self,
        events: Sequence[AlertEvent],
        *,
        part: Part | None = None,
        recipients: Recipients = None,
    ) -> None:
        """Send one message of ``events`` (:class:`~invoice_watch.types.Notifier`);
        nothing when there are none."""
        if events:
            await self._send(events, part, recipients)

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        """Send one message of ``events`` (at least one), ``part`` of a larger group
        (None: whole), to ``recipients`` (a notifier with one destination ignores it).
        Raises :class:`~invoice_watch.errors.RetryableNotifyError` or
        :class:`~invoice_watch.errors.PermanentNotifyError`."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Nothing to close: each attempt opens and closes its own connection."""
