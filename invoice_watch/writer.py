"""How a cycle's parts reach the store while the cycle goes on.

:class:`GroupCommit` commits organizations' parts (snapshot write, alert transitions) as
they come in, a batch a transaction, and contains a part the store refuses for its data;
:class:`HeldRelease` releases the messages a running cycle's commits hold once they have
waited :data:`~invoice_watch.constants.HOLD_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from invoice_watch.alerts import Transition
from invoice_watch.clock import Clock
from invoice_watch.errors import StateError
from invoice_watch.store import AlertState, OrgWrite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One organization's part of a cycle, as the writer commits it: its snapshot write,
    its alerts' transitions, and the states they replace (see
    :meth:`~invoice_watch.plan.CyclePlan.org`)."""

    write: OrgWrite
    transitions: list[Transition]
    previous: Mapping[str, AlertState | None] = field(default_factory=dict)


class GroupCommit:
    """Commits organizations' parts as they come in, each batch in one transaction:
    whatever arrived while the previous batch was being written (a group commit: as
    few transactions as keep up with the reads).

    A batch refused for a value its data holds (:class:`UnstorableError`, or any other
    error but the state file's) is written again one part at a time, and the part that
    is refused on its own is replaced by what ``contain`` makes of it (that
    organization's failed read, recorded with its cause): one organization's data never
    holds back another's. An error of the state file (:class:`StateError`), or a
    replacement refused too, stops the writer; :meth:`flush` raises it."""

    def __init__(
        self,
        commit: Callable[[list[OrgWrite], list[Transition]], Awaitable[None]],
        contain: Callable[[Part, Exception], Part],
    ) -> None:
        self._commit = commit
        self._contain = contain
        self._parts: list[Part] = []
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    def add(self, part: Part) -> None:
        self._parts.append(part)
        if self._task is None and self._error is None and not self._closed:
            self._task = asyncio.create_task(self._drain(), name="commit")

    async def _drain(self) -> None:
        try:
            while self._parts and not self._closed:
                parts, self._parts = self._parts, []
                await self._write(parts)
        except BaseException as exc:  # kept for flush(): nobody awaits this task
            self._error = exc
        finally:
            self._task = None

    async def _write(self, parts: list[Part]) -> None:
        try:
            await self._commit([p.write for p in parts], [t for p in parts for t in p.transitions])
            return
        except StateError:
            raise  # the state file itself: the whole cycle
        except Exception as exc:
            if len(parts) == 1:
                replacement = self._contain(parts[0], exc)
                await self._commit([replacement.write], replacement.transitions)
                return
        for part in parts:  # whose data it is: each on its own
            await self._write([part])

    def close(self) -> None:
        """No new batch starts (the one being written completes)."""
        self._closed = True

    async def flush(self) -> None:
        """Wait until everything added is committed; raise what stopped the writer."""
        while self._task is not None:
            await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error


class HeldRelease:
    """Releases what a running cycle holds (:meth:`Store.release_cycle`) ``seconds``
    after a commit first held a message (:meth:`held`), on the clock's monotonic time, and
    again after the next one that holds more: no message waits longer for the cycle to
    end (one slow organization never holds back another's). :meth:`stop` at the cycle's
    end: what is held then goes with the end (:meth:`Store.finish_cycle`)."""

    def __init__(
        self,
        release: Callable[[], Awaitable[int]],
        clock: Clock,
        seconds: float,
        released: Callable[[], None],
    ) -> None:
        self._release = release
        self._clock = clock
        self._seconds = seconds
        self._on_released = released
        self._task: asyncio.Task[None] | None = None
        self._releasing = False
        self.released = 0  # rows released before the cycle's end

    def held(self) -> None:
        """A commit held messages: they are released within ``seconds``."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._later(), name="release-held")

    async def _later(self) -> None:
        await self._clock.sleep(self._seconds)
        self._releasing = True
        try:
            self.released += await self._release()
        except Exception as exc:  # they wait for the cycle's end (or the next start)
            log.error("could not release the messages of the cycle in flight: %s", exc)
            return
        finally:
            self._releasing = False
        self._on_released()

    async def stop(self) -> None:
        """No release after this one (one in progress completes)."""
        task, self._task = self._task, None
        if task is None:
            return
        if not self._releasing:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
