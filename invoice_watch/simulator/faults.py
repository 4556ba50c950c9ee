"""Fault injection and the request log of the simulator: what tests and benchmarks
queue (error statuses, hangs, broken bodies, latency) and what they read back.

Faults are matched in the order queued, by request path (an ``fnmatch`` pattern: ``*``
matches anything, ``*/invoices`` only the listing, ``*/invoices/pending`` only the
pending endpoint) and optionally by organization id, and apply to requests that passed
authentication and rate limiting. Each fault fires ``times`` times, then is gone.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["status", "hang", "reset", "malformed_json", "truncated", "content_type"]


@dataclass
class Fault:
    kind: FaultKind
    path: str = "*"
    org_id: str | None = None
    times: int = 1
    status: int = 500  # kind "status"
    retry_after: int | None = None  # kind "status": a Retry-After header, in seconds
    seconds: float = 3600.0  # kind "hang": how long before answering normally

    def matches(self, path: str, org_id: str | None) -> bool:
        return fnmatch.fnmatchcase(path, self.path) and self.org_id in (None, org_id)


class Faults:
    """The fault queue of one simulator, plus ``latency`` (seconds added to every
    request, e.g. ``0.02`` in benchmarks)."""

    def __init__(self) -> None:
        self.latency = 0.0
        self._queue: list[Fault] = []

    def status(
        self,
        status: int,
        *,
        times: int = 1,
        path: str = "*",
        org_id: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer ``status`` with an ``ApiError`` body (a 5xx, 429, 401, ...). 429
        always carries ``Retry-After`` (default 1 s); 401 carries a fresh challenge."""
        if status < 400:
            raise ValueError("a status fault needs an error status (>= 400)")
        self._add(Fault("status", path, org_id, times, status=status, retry_after=retry_after))

    def hang(
        self, *, seconds: float = 3600.0, times: int = 1, path: str = "*", org_id: str | None = None
    ) -> None:
        """Say nothing for ``seconds`` (longer than any client timeout), then answer."""
        self._add(Fault("hang", path, org_id, times, seconds=seconds))

    def reset(self, *, times: int = 1, path: str = "*", org_id: str | None = None) -> None:
        """Send the headers and half the body, then reset the connection (TCP RST)."""
        self._add(Fault("reset", path, org_id, times))

    def truncated(self, *, times: int = 1, path: str = "*", org_id: str | None = None) -> None:
        """Announce the full Content-Length, send half the body, close the connection."""
        self._add(Fault("truncated", path, org_id, times))

    def malformed_json(self, *, times: int = 1, path: str = "*", org_id: str | None = None) -> None:
        """A complete, well-framed 200 whose JSON is cut in half (not parseable)."""
        self._add(Fault("malformed_json", path, org_id, times))

    def wrong_content_type(
        self, *, times: int = 1, path: str = "*", org_id: str | None = None
    ) -> None:
        """A 200 ``text/html`` page, as a captive portal or a proxy would answer."""
        self._add(Fault("content_type", path, org_id, times))

    def take(self, path: str, org_id: str | None) -> Fault | None:
        """The first queued fault matching this request, counting one use of it."""
        for fault in self._queue:
            if fault.matches(path, org_id):
                fault.times -= 1
                if fault.times <= 0:
                    self._queue.remove(fault)
                return fault
        return None

    @property
    def pending(self) -> list[Fault]:
        """Faults not used up yet."""
        return list(self._queue)

    def clear(self) -> None:
        self._queue.clear()
        self.latency = 0.0

    def _add(self, fault: Fault) -> None:
        if fault.times < 1:
            raise ValueError("a fault must fire at least once (times >= 1)")
        self._queue.append(fault)


@dataclass
class RequestRecord:
    """One request the simulator received, filled in as it is answered.

    ``status`` stays 0 when no answer was sent (the client went away during a hang).
    ``challenge`` is true for a 401 carrying a ``WWW-Authenticate`` challenge. ``auth``
    is the scheme the request presented (``"digest"``, ``"bearer"``, ``"basic"``) or None.
    ``body``: the request body, for the one operation that takes one (``lineItems:search``).
    """

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    org_id: str | None = None
    status: int = 0
    challenge: bool = False
    auth: str | None = None
    fault: FaultKind | None = None
    body: str | None = None
