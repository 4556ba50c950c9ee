"""The console notifier: prints each message's plain text to stdout (demo, dry runs).

A terminal has no size limit; a message is as bounded as every other (:mod:`.render`)."""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from typing import TextIO

from invoice_watch.errors import PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify import render
from invoice_watch.types import AlertEvent, Part

SEPARATOR = "─" * 72


class ConsoleNotifier:
    """Writes every message to ``stream`` (stdout when not given), each after a rule."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self._stream = stream

    def __repr__(self) -> str:
        return f"ConsoleNotifier(name={self.name!r})"

    async def send(self, events: Sequence[AlertEvent], *, part: Part | None = None) -> None:
        if not events:
            return
        # Looked up at each send, so a redirected sys.stdout (tests, --dry-run) is honoured.
        stream = self._stream or sys.stdout
        try:
            stream.write(f"{SEPARATOR}\n{render.text(events, part)}")
            stream.flush()
        except OSError as exc:  # a closed pipe stays closed; a full disk may clear
            error = f"cannot write to standard output: {exc.strerror or exc}"
            if exc.errno in (errno.EPIPE, errno.EBADF):
                raise PermanentNotifyError(error) from None
            raise RetryableNotifyError(error) from None

    async def aclose(self) -> None:
        """Nothing to close: the stream belongs to the caller."""
