"""An organization's invoice listing, page by page, and its bounds.

Pages of ``itemsPerPage=500`` sorted by start date ascending (new invoices land on the
last page, so an invoice created while paging cannot shift another one out of view),
until a page comes back shorter than asked. Page 1 asks for ``totalCount``; when that
estimate promises more pages, they are requested together (each within the transport's
bound on requests in flight, at most :data:`_PAGES_AT_ONCE`), then paging goes on one
page at a time for as long as the estimate fell short. A full page that lists nothing
new (a server repeating page 1) ends the listing as a failed read, and so does going past
:func:`page_cap` pages. A page whose body comes back byte for byte as in the last
listing is not parsed again, when the caller held all it lists and holds the same
settled invoices still (:attr:`~invoice_watch.types.Snapshot.generation`). The pages
after the first can hand what the caller need not hold to a :class:`Stage` as they are
parsed.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import operator
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date
from typing import Protocol

from invoice_watch.atlas import parse
from invoice_watch.atlas.bounds import PARSE_INLINE
from invoice_watch.atlas.errors import explain
from invoice_watch.atlas.parse import Known, Page
from invoice_watch.atlas.transport import Transport
from invoice_watch.constants import ITEMS_PER_PAGE, MAX_PAGES
from invoice_watch.errors import FetchDataError, FetchError
from invoice_watch.types import Invoice

# At most this many pages are requested together on the strength of `totalCount` (an
# estimate: a wild one must not turn into thousands of requests); paging goes on past it.
_PAGES_AT_ONCE = 100

# A parsed page with the SHA-256 of the body it came from.
_Seen = tuple[bytes, Page]


def _entries(page: Page) -> int:
    """Invoices the page lists (linked ones included)."""
    return len(page.invoices) + len(page.settled) + len(page.staged)


class _Listed:
    """What a listing's pages list, as it is paged: the ids of their invoices and of
    those staged, and their settled keys ascending, in a list rather than a set (8 bytes
    a key, not about 40: a restart's first full listing of 100,000 settled invoices held
    4 MB for a set of them, and as much again for a frozenset in its read)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.keys: list[int] = []  # ascending: the listing's settled keys (Listing.settled)

    def add(self, page: Page) -> bool:
        """The page's entries added; whether it listed one not listed before."""
        ids, held = self.ids, self.keys
        before = len(ids)
        ids.update(invoice.id for invoice in page.invoices)
        ids.update(page.staged)
        if not page.settled:
            return len(ids) > before
        keys = sorted(page.settled)
        new = len(ids) > before or not all(holds(held, key) for key in keys)
        # Pages list invoices by start date, the keys' high bits: a page's keys come after
        # the last one's but for those of a day the two share, merged here.
        if held and keys[0] < held[-1]:
            at = bisect.bisect_right(held, keys[0])
            keys = sorted(held[at:] + keys)
            del held[at:]
        held.extend(keys)
        return new

    def distinct(self) -> int:
        """Entries listed, each counted once."""
        keys = self.keys
        twice: int = sum(map(operator.eq, keys, itertools.islice(keys, 1, None)))
        return len(self.ids) + len(keys) - twice


def holds(ascending: Sequence[int], key: int) -> bool:
    """Whether ``key`` is in ``ascending`` (settled keys in ascending order, as a
    :class:`Listing` and an :class:`~invoice_watch.types.OrgRead` hold them), by
    bisection."""
    at = bisect.bisect_left(ascending, key)
    return at < len(ascending) and ascending[at] == key


def page_cap(total: int | None) -> int:
    """The most pages a listing may take: what ``totalCount`` promises (one page more
    for an invoice created while paging) plus a quarter, at least 3 more; at most
    :data:`~invoice_watch.constants.MAX_PAGES`, which is also the cap when page 1 gave
    no usable estimate."""
    if total is None or total < ITEMS_PER_PAGE:  # none, or contradicted by a full page 1
        return MAX_PAGES
    promised = total // ITEMS_PER_PAGE + 1
    return min(MAX_PAGES, promised + max(3, promised // 4))


@dataclass(frozen=True, slots=True)
class Staged:
    """A listing's settled invoices that its organization's snapshot did not hold,
    written to the store's staging area as its pages arrived (a listing of more than one
    page: :mod:`invoice_watch.store.sql.staging`) instead of being held as
    :class:`Invoice` objects until the organization's commit, which moves them into the
    snapshot. ``listing``: the staging area's tag of its rows; ``keys``: id -> settled
    key (:func:`settled_key`), what the snapshot keeps of each; ``rows``: how many rows
    the move must find (an id listed twice was staged once); ``linked``: the other
    organizations whose invoices, nested in this listing (``linkedInvoices``), were
    staged: its organization pays for them."""

    listing: int
    keys: dict[str, int]
    rows: int
    linked: frozenset[str] = frozenset()


def staged_count(staged: Staged | None) -> int:
    """How many invoices a listing staged (new to the snapshot, settled): 0 for None."""
    return len(staged.keys) if staged is not None else 0


@dataclass(frozen=True, slots=True)
class Listing:
    """One organization's listing: its invoices (linked ones included), but the settled
    ones listed unchanged: their keys, and those a :class:`Stage` took; and how many
    entries were nested in another's ``linkedInvoices``."""

    invoices: list[Invoice]
    settled: list[int]  # ascending, each once
    linked: int
    staged: Staged | None = None


class Stage(Protocol):
    """Where a listing of more than one page puts, as each page after the first is
    parsed, the invoices its caller need not hold (new settled ones: the store's staging
    area, :mod:`invoice_watch.store.sql.staging`), so that a listing's memory does not
    grow with its size."""

    def turn(self) -> AbstractAsyncContextManager[object]:
        """Held by a page after the first from its request until it is staged: a few
        pages at once, whatever the listings, so that pages the network brings faster
        than the state's database takes them do not pile up in memory."""
        ...

    async def page(self, page: Page) -> Page:
        """``page`` without the invoices staged (their ids in :attr:`Page.staged`)."""
        ...

    def done(self, kept: Collection[str]) -> Staged | None:
        """What was staged, but the ids in ``kept`` (listed twice, and kept as an
        invoice the second time); None when nothing was."""
        ...


class Paging:
    """Lists organizations' invoices through ``transport``; remembers each one's pages
    of its last successful listing, by page number (see :meth:`listing`)."""

    def __init__(self, transport: Transport, max_values: int) -> None:
        self._transport = transport
        self._max_values = max_values  # JSON values a page may hold (bounds.max_values)
        # By organization: the generation of the snapshot its pages were parsed against
        # (their settled keys are that snapshot's), and the pages by number.
        self._seen: dict[str, tuple[int | None, dict[int, _Seen]]] = {}

    async def listing(
        self,
        org_id: str,
        from_date: date | None,
        known: Known | None,
        stage: Stage | None = None,
    ) -> Listing:
        """The organization's listing (``fromDate`` ``from_date``, None: in full).

        ``known``: what the caller holds of the listing (its snapshot: see
        :func:`~invoice_watch.atlas.parse.parse_page`); an invoice it holds comes back as
        its own object, so that it is kept in memory once. A page is parsed again when
        its body changed, and when the caller did not hold all it lists: the pages
        remembered hold only the caller's own objects (nothing twice in memory, and no
        invoice the snapshot keeps settled kept as an object). ``stage``: where the
        pages after the first put what the caller need not hold (:class:`Stage`).
        """
        seen = {1: await self._page(org_id, 1, from_date, known)}
        first = seen[1][1]
        cap = page_cap(first.total)
        if first.full and first.total:
            promised = min(first.total // ITEMS_PER_PAGE + 1, _PAGES_AT_ONCE, cap)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = {
                        number: group.create_task(
                            self._page(org_id, number, from_date, known, stage)
                        )
                        for number in range(2, promised + 1)
                    }
            except* Exception as errors:
                failures = errors.exceptions
                first_error = next((e for e in failures if isinstance(e, FetchError)), None)
                # One of the group's own exceptions, raised again as it is (chained to
                # the group it is in, it would be its own cause).
                raise first_error or failures[0] from None
            seen.update((number, task.result()) for number, task in tasks.items())
        listed = _Listed()
        listed.add(first)
        number = 1
        while seen[number][1].full:
            number += 1
            if number > cap:
                raise FetchDataError(org_id, explain("page_cap", cap=str(cap)))
            if number not in seen:
                seen[number] = await self._page(org_id, number, from_date, known, stage)
            if not listed.add(seen[number][1]) and seen[number][1].full:
                raise FetchDataError(org_id, explain("repeated_page", page=str(number)))
        self._seen[org_id] = (
            _generation(known),
            {number: (digest, page) for number, (digest, page) in seen.items() if not page.built},
        )
        pages = [page for _, page in seen.values()]
        # An entry on two pages (the listing moved while it was paged) is kept once. The
        # pages are assembled without a dictionary of every invoice when no entry is: at
        # 50,000 invoices about 5 MB less at once, while the whole listing is held.
        repeated = listed.distinct() < sum(_entries(p) for p in pages)
        settled = listed.keys
        del seen, listed
        invoices = [invoice for page in pages for invoice in page.invoices]
        if repeated:
            invoices = list({invoice.id: invoice for invoice in invoices}.values())
            settled = [key for key, _ in itertools.groupby(settled)]
        staged = None
        if stage is not None:
            staged = stage.done({i.id for i in invoices} if repeated else ())
        # A page holds one entry per result, and one per linked invoice in it.
        nested = sum(_entries(p) - p.size for p in pages)
        return Listing(invoices, settled, nested, staged)

    async def _page(
        self,
        org_id: str,
        number: int,
        from_date: date | None,
        known: Known | None,
        stage: Stage | None = None,
    ) -> _Seen:
        """One page of the listing; parsed only when its body differs from the one this
        page had in the last successful listing; staged (``stage``) after the first."""
        if stage is None or number == 1:  # (page 1 alone: a page's size)
            return await self._fetch(org_id, number, from_date, known)
        async with stage.turn():
            digest, page = await self._fetch(org_id, number, from_date, known)
            if page.built:
                page = await stage.page(page)
            return digest, page

    async def _fetch(
        self, org_id: str, number: int, from_date: date | None, known: Known | None
    ) -> _Seen:
        params = {
            "itemsPerPage": str(ITEMS_PER_PAGE),
            "pageNum": str(number),
            "includeCount": "true" if number == 1 else "false",
            "viewLinkedInvoices": "true",
            "sortBy": "START_DATE",
            "orderBy": "asc",
        }
        if from_date is not None:
            params["fromDate"] = from_date.isoformat()
        body = await self._transport.get(
            org_id, f"/orgs/{org_id}/invoices", params, endpoint="/orgs/{orgId}/invoices"
        )
        digest = hashlib.sha256(body).digest()
        generation, pages = self._seen.get(org_id, (None, {}))
        before = pages.get(number)
        # Parsed against another snapshot's settled invoices (loaded again: a reload that
        # changed which statuses are settled, or one changed since), its keys may not be
        # this one's: a settled invoice the snapshot now holds live would go missing.
        same = generation is not None and generation == _generation(known)
        if before is not None and before[0] == digest and same:
            return before
        if len(body) > PARSE_INLINE:  # off the event loop
            page = await asyncio.to_thread(parse.parse_page, org_id, body, known, self._max_values)
        else:
            page = parse.parse_page(org_id, body, known, self._max_values)
        return digest, page


def _generation(known: Known | None) -> int | None:
    """Which settled invoices ``known`` holds (:attr:`~invoice_watch.types.Snapshot.
    generation`; None: no snapshot, or one that does not tell, whose pages are parsed
    every time)."""
    generation: int | None = getattr(known, "generation", None)
    return generation
