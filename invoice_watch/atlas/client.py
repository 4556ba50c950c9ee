"""The Atlas client a caller uses: :class:`AtlasClient`.

It lists organizations' invoices (:meth:`AtlasClient.read_orgs`: one
:class:`~invoice_watch.types.OrgRead` per organization, each handed back as it
completes; the client knows nothing of what the caller does with it) and fetches line
items for breakdowns (:meth:`AtlasClient.pending_line_items`) and an invoice's daily
usage (:meth:`AtlasClient.usage_line_items`: ``lineItems:search``, else the CSV,
:meth:`AtlasClient.invoice_line_items`).

Containment (SPEC §10 "Bounds"): whatever one organization's answers hold, its read ends
as an :class:`~invoice_watch.types.OrgRead`, ok or failed, and never cancels another
organization's read (an exception no check foresaw included: it is logged with its
traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from datetime import date
from typing import TYPE_CHECKING

from invoice_watch.atlas import parse
from invoice_watch.atlas.bounds import PARSE_INLINE, max_values
from invoice_watch.atlas.paging import Paging, Stage, staged_count
from invoice_watch.atlas.parse import Known
from invoice_watch.atlas.transport import BadProxy, Transport
from invoice_watch.atlas.usage import UsageFetch, UsageReader
from invoice_watch.clock import Clock, SystemClock
from invoice_watch.errors import (
    FetchAuthError,
    FetchDataError,
    FetchError,
    FetchStatusError,
    StateError,
)
from invoice_watch.safe_text import server_text
from invoice_watch.types import LineItem, OrgRead

if TYPE_CHECKING:
    from invoice_watch.config import AtlasConfig
    from invoice_watch.metrics import Metrics


class AtlasClient:
    """Lists invoices of Atlas (or Cloud Manager) organizations.

    One long-lived aiohttp session (:class:`~invoice_watch.atlas.transport.Transport`);
    at most ``max_concurrency`` requests in flight; with Digest keys, the first request
    authenticates alone so the others reuse its nonce instead of each drawing its own
    401 challenge. Requests go through the proxy that
    :func:`invoice_watch.proxy.proxy_for` names (``atlas.proxy``, else ``HTTPS_PROXY``/
    ``HTTP_PROXY`` and ``NO_PROXY`` from ``environ``); ``~/.netrc`` is never read.

    Rate limits: a 429 waits for its ``Retry-After``, and longer when 429s repeat; while
    ``RateLimit-Remaining`` says fewer requests are left than may be in flight, requests
    go one at a time (:mod:`~invoice_watch.atlas.pacing`). An OAuth access token is
    registered for redaction as soon as it is received. ``Deprecation``/``Sunset``
    headers are warned about once per :meth:`read_orgs`, and counted in ``metrics``.
    """

    def __init__(
        self,
        config: AtlasConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        org_names: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock or SystemClock()
        self._transport = Transport(
            config,
            self._clock,
            rng or random.Random(),
            org_names or {},
            metrics=metrics,
            environ=environ,
        )
        self._explain = self._transport.explain
        self._max_values = max_values(config.max_response_size)
        self._paging = Paging(self._transport, self._max_values)
        self._usage = UsageReader(
            self._transport,
            config.api,
            functools.partial(self.invoice_line_items, quiet=True),
            self._clock.monotonic,
        )

    def __repr__(self) -> str:
        return f"AtlasClient(base_url={self._explain.base!r}, api={self._config.api!r})"

    async def __aenter__(self) -> AtlasClient:
        with contextlib.suppress(BadProxy):  # each read reports it
            self._transport.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    @property
    def last_request_at(self) -> float | None:
        """When the last request to Atlas started (monotonic seconds), None before the
        first: the sign of progress of a cycle in flight (the daemon's watchdog)."""
        return self._transport.last_request_at

    # -- listings --------------------------------------------------------------------

    async def read_org(
        self,
        org_id: str,
        from_date: date | None = None,
        known: Known | None = None,
        stage: Stage | None = None,
    ) -> OrgRead:
        """List one organization's invoices; a failure is reported, never raised (an
        unexpected exception included: it is logged with its traceback). Cancellation
        propagates. ``known``: what the caller holds of the listing, its snapshot (see
        :func:`~invoice_watch.atlas.parse.parse_page`): an invoice it holds as listed
        comes back as its own object (a settled one: its key, in ``OrgRead.settled``).
        ``stage``: where a long listing puts what the caller need not hold
        (:class:`~invoice_watch.atlas.paging.Stage`; its database refusing, a
        :class:`StateError`, fails this organization's read, as any failure)."""
        before = self._transport.requests_sent
        try:
            listing = await self._paging.listing(org_id, from_date, known, stage)
        except StateError as exc:  # the staging area's: this listing's, not the others'
            return OrgRead(
                org_id,
                error=f"organization {org_id}: its listing could not wait for its commit in "
                f"the staging area ({exc}); it is read again next cycle",
                requests=self._transport.requests_sent - before,
            )
        except FetchError as exc:  # its server text went through server_text()
            refused = isinstance(exc, FetchAuthError | FetchStatusError)
            return OrgRead(
                org_id,
                error=str(exc),
                requests=self._transport.requests_sent - before,
                refused=refused,
            )
        except Exception as exc:  # any body whatsoever fails this org only
            error = self._explain.unexpected(org_id, "reading its invoices", exc)
            return OrgRead(
                org_id, error=str(error), requests=self._transport.requests_sent - before
            )
        return OrgRead(
            org_id,
            tuple(listing.invoices),
            listing.settled,
            listing.staged,
            requests=self._transport.requests_sent - before,
            listed=len(listing.invoices) + len(listing.settled) + staged_count(listing.staged),
            linked=listing.linked,
        )

    async def read_orgs(
        self,
        org_ids: Sequence[str],
        from_dates: Mapping[str, date | None] | None = None,
        known: Mapping[str, Known] | None = None,
        stage: Callable[[str], Stage | None] | None = None,
        *,
        then: Callable[[OrgRead], Awaitable[OrgRead]] | None = None,
    ) -> AsyncGenerator[OrgRead, None]:
        """Read every organization concurrently, and hand each one's read back as soon as
        it is complete, while the others are still being read: one
        :class:`~invoice_watch.types.OrgRead` per organization of ``org_ids``, in the
        order they complete. One failing never blocks the others (see :meth:`read_org`);
        at most ``atlas.max_concurrency`` requests are in flight. ``from_dates``: each
        organization's ``fromDate`` (absent or None: a full listing); ``known``: its
        snapshot, ``stage``: its :class:`~invoice_watch.atlas.paging.Stage` (both:
        :meth:`read_org`). ``then``: awaited with each read in the task that
        read it, and what it returns handed back instead (the cycle's processing of a
        read: one task per organization, not a second one to process it; what it
        raises is raised here, as its read's own would be).

        A read handed back is held only by the caller. Closing the iterator before the
        last read (the caller stops: ``break``, an exception, its cancellation; consume
        it within :func:`contextlib.aclosing`) cancels the reads still under way.
        ``Deprecation``/``Sunset`` headers seen are warned about when it ends.

        With Digest keys the first request goes alone again: the nonce of the last
        cycle may have gone stale since, and only one request should learn it.
        """
        from_dates = from_dates or {}
        known = known or {}
        self._transport.authenticate_again()
        done: asyncio.Queue[asyncio.Task[OrgRead]] = asyncio.Queue()
        under_way: set[asyncio.Task[OrgRead]] = set()
        for org_id in org_ids:
            staging = stage(org_id) if stage is not None else None
            read = self.read_org(org_id, from_dates.get(org_id), known.get(org_id), staging)
            task = asyncio.create_task(read if then is None else _then(read, then))
            task.add_done_callback(done.put_nowait)
            under_way.add(task)
        try:
            while under_way:
                # No local name keeps a read (nor its task) once it is handed back.
                yield _taken(under_way, await done.get())
        finally:
            for task in under_way:
                task.cancel()
            if under_way:
                await asyncio.wait(under_way)
            self._transport.deprecations.report(self._clock.now())

    # -- line items, for breakdowns --------------------------------------------------

    async def pending_line_items(self, org_id: str) -> dict[str, list[LineItem]]:
        """Line items of the organization's pending invoices, by invoice id (for breakdowns
        in messages; fetched only when a message needs them). Raises FetchError only."""
        body = await self._transport.get(
            org_id,
            f"/orgs/{org_id}/invoices/pending",
            {},
            endpoint="/orgs/{orgId}/invoices/pending",
        )
        try:
            if len(body) > PARSE_INLINE:  # off the event loop
                return await asyncio.to_thread(parse.pending_items, org_id, body, self._max_values)
            return parse.pending_items(org_id, body, self._max_values)
        except FetchError:
            raise
        except Exception as exc:  # a body no check foresaw
            # Not chained: the cause may quote the answer unredacted (it is logged
            # redacted, with its traceback, by unexpected()).
            raise self._explain.unexpected(org_id, "reading its pending invoices", exc) from None

    async def invoice_line_items(
        self, org_id: str, invoice_id: str, *, quiet: bool = False
    ) -> list[LineItem]:
        """Line items of one invoice, from its CSV (``quiet``: retries logged at DEBUG,
        :meth:`Transport.get`; what :meth:`usage_line_items` falls back on). Raises
        FetchError only."""
        body = await self._transport.get(
            org_id,
            f"/orgs/{org_id}/invoices/{invoice_id}/csv",
            {},
            endpoint="/orgs/{orgId}/invoices/{invoiceId}/csv",
            csv_body=True,
            quiet=quiet,
        )
        try:
            if len(body) > PARSE_INLINE:  # off the event loop
                return await asyncio.to_thread(parse.csv_items, body, self._max_values)
            return parse.csv_items(body, self._max_values)
        # Neither is chained: the cause may quote the CSV as it came, unredacted (the
        # message holds it redacted; unexpected() logs the traceback redacted).
        except (UnicodeDecodeError, ValueError, csv.Error, ArithmeticError) as exc:
            raise FetchDataError(
                org_id, f"the invoice CSV is malformed: {server_text(exc, 120)}"
            ) from None
        except Exception as exc:
            raise self._explain.unexpected(org_id, "reading an invoice's CSV", exc) from None

    async def usage_line_items(
        self, org_id: str, invoice_id: str, names: Mapping[str, str] | None = None
    ) -> UsageFetch:
        """An invoice's daily line items (``lineItems:search``, v2; else, or where it
        answers 404/406/415, the CSV's Usage Date column: :mod:`~invoice_watch.atlas.
        usage`); ``names``: project id -> name. Raises FetchError only."""
        try:
            return await self._usage.fetch(org_id, invoice_id, names)
        except FetchError:
            raise
        except Exception as exc:  # a body no check foresaw
            # Not chained: as for the pending invoices (unexpected() logs it redacted).
            raise self._explain.unexpected(org_id, "reading an invoice's line items", exc) from None


async def _then(read: Awaitable[OrgRead], then: Callable[[OrgRead], Awaitable[OrgRead]]) -> OrgRead:
    return await then(await read)


def _taken(under_way: set[asyncio.Task[OrgRead]], task: asyncio.Task[OrgRead]) -> OrgRead:
    """The read of ``task``, which is no longer under way."""
    under_way.discard(task)
    return task.result()
