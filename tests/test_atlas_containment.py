"""One organization's answer, whatever it holds, fails that organization's read only
(issue 12 §1, SPEC §10 "Bounds"): the parser and the per-org read turn any body into an
:class:`OrgRead` (ok, or with an error), never an exception; the other organizations are
read; the cycle's ``take`` raising for one organization makes that one a failed read
(:func:`invoice_watch.cycle.take_reads`); a caller that stops early cancels the rest.

Bodies come from a hand-made listing server on loopback; hypothesis writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from invoice_watch.atlas.client import AtlasClient
from invoice_watch.atlas.errors import parse_api_error
from invoice_watch.atlas.parse import parse_invoice, parse_page, pending_items
from invoice_watch.cli.commands import run_once
from invoice_watch.config import Config
from invoice_watch.cycle import take_reads
from invoice_watch.errors import FetchError
from invoice_watch.redact import printable
from invoice_watch.types import OrgRead, Snapshot
from tests.conftest import ORG_A, ORG_B, base_config, make_config
from tests.loopback import LoopbackServer

START, END = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"
DEEP = 100_000


def item(n: int, org: str = ORG_B, status: str = "FAILED", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"{n:024x}",
        "orgId": org,
        "statusName": status,
        "startDate": START,
        "endDate": END,
        "amountBilledCents": 100_00,
        "amountPaidCents": 0,
        **extra,
    }


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def linked_chain(depth: int) -> dict[str, Any]:
    """An invoice whose linked invoice has a linked invoice ... ``depth`` levels deep."""
    top = link = item(1, ORG_A)
    for n in range(2, depth + 2):
        link["linkedInvoices"] = [item(n, ORG_A)]
        link = link["linkedInvoices"][0]
    return top


async def read_all(
    client: AtlasClient, org_ids: Sequence[str], **kwargs: Any
) -> dict[str, OrgRead]:
    """Every organization's read, by organization."""
    return {read.org_id: read async for read in client.read_orgs(org_ids, **kwargs)}


def read_org(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` is an organization's read (AtlasClient.read_org)."""
    return getattr(task.get_coro(), "__qualname__", "") == "AtlasClient.read_org"


class Listings(LoopbackServer):
    """The v2 listing, pending, CSV and token endpoints; per org a status and a raw body
    (default: one invoice of that org), or a callable making the answer; an org in
    ``held`` is answered once its event is set."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.held: dict[str, asyncio.Event] = {}
        self.pending: dict[str, bytes] = {}
        self.csv: bytes = b""
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices/pending", self._pending)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices/{invoice}/csv", self._csv)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        if org in self.held:
            await self.held[org].wait()
        status, body = self.answers.get(
            org, (200, json.dumps({"results": [item(7, org)], "totalCount": 1}).encode())
        )
        return web.Response(status=status, body=body, content_type="application/json")

    async def _pending(self, request: web.Request) -> web.Response:
        body = self.pending.get(request.match_info["org"], b'{"results": []}')
        return web.Response(body=body, content_type="application/json")

    async def _csv(self, request: web.Request) -> web.Response:
        return web.Response(body=self.csv, content_type="text/csv")


@pytest.fixture
async def listings() -> AsyncIterator[Listings]:
    async with Listings() as server:
        yield server


def client_config(tmp_path: Path, url: str, **atlas: Any) -> Config:
    data = base_config()
    data["atlas"] |= {"base_url": url, "retries": 0, **atlas}
    return make_config(tmp_path, data)


BROKEN: dict[str, tuple[int, bytes, str]] = {
    "linkedInvoices is a number": (
        200,
        json.dumps({"results": [item(1, ORG_A, linkedInvoices=5)]}).encode(),
        "`linkedInvoices` is not a list",
    ),
    "linkedInvoices holds a number": (
        200,
        json.dumps({"results": [item(1, ORG_A, linkedInvoices=[5])]}).encode(),
        "not an object",
    ),
    "JSON nested 100,000 deep on a 200": (200, nested(DEEP), "nested too deeply"),
    "results nested 100,000 deep": (
        200,
        b'{"results": ' + nested(DEEP, b"{}") + b"}",
        "nested too deeply",
    ),
    "JSON nested 100,000 deep on a 500": (500, nested(DEEP), "HTTP 500"),
    "linked invoices nested 50 deep": (
        200,
        json.dumps({"results": [linked_chain(50)]}).encode(),
        "nested too deeply",
    ),
    "timestamp beyond year 9999 in UTC": (
        200,
        json.dumps({"results": [item(1, ORG_A, startDate="9999-12-31T23:00:00-05:00")]}).encode(),
        "out of range",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_read_orgs_one_org_broken_body_fails_that_org_only(
    tmp_path: Path, listings: Listings, caplog: pytest.LogCaptureFixture, case: str
):
    status, body, reason = BROKEN[case]
    listings.answers[ORG_A] = (status, body)
    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        taken = [read async for read in client.read_orgs([ORG_A, ORG_B])]
    reads = {read.org_id: read for read in taken}
    assert not reads[ORG_A].ok and reads[ORG_B].ok
    assert reason in (reads[ORG_A].error or ""), reads[ORG_A].error
    assert ORG_A in (reads[ORG_A].error or "")
    (b,) = [r for r in taken if r.org_id == ORG_B]
    assert [i.status for i in b.invoices] == ["FAILED"]  # org B's invoice was read
    assert len((reads[ORG_A].error or "").splitlines()) == 1


async def test_read_org_unexpected_exception_is_a_failed_read_with_its_traceback_logged(
    tmp_path: Path, listings: Listings, caplog: pytest.LogCaptureFixture, monkeypatch
):
    """An exception no check foresaw (a bug) while reading one org: that org's read
    fails, naming the exception; the traceback is logged; the other org is read."""

    def broken(org_id: str, body: bytes, known: Snapshot | None = None, *more: Any) -> Any:
        if org_id == ORG_A:
            raise TypeError("'int' object is not iterable")
        return parse_page(org_id, body, known, *more)

    monkeypatch.setattr("invoice_watch.atlas.parse.parse_page", broken)
    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        reads = await read_all(client, [ORG_A, ORG_B])
    assert reads[ORG_B].ok
    error = reads[ORG_A].error or ""
    assert "failed unexpectedly" in error and "TypeError" in error
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "Traceback" in logged.getMessage() and "in broken" in logged.getMessage()


async def test_take_reads_take_raising_fails_that_org_through_take_again(
    tmp_path: Path, listings: Listings, caplog: pytest.LogCaptureFixture
):
    """The cycle's `take` raising for org A: A's read becomes a failed read handed to
    take again (so it is recorded like any failed read), with the traceback logged; org
    B is read and taken; the TaskGroup is never cancelled."""
    taken: list[OrgRead] = []

    async def take(read: OrgRead) -> None:
        if read.org_id == ORG_A and read.ok:
            await asyncio.sleep(0)
            raise KeyError("a bug in the cycle")
        taken.append(read)

    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        reads = await take_reads(partial(client.read_orgs, [ORG_A, ORG_B]), take)
    assert {r.org_id: r.ok for r in taken} == {ORG_A: False, ORG_B: True}
    assert not reads[ORG_A].ok and "KeyError" in (reads[ORG_A].error or "")
    assert reads[ORG_B].ok
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "Traceback" in logged.getMessage() and "a bug in the cycle" in logged.getMessage()


async def test_take_reads_take_failing_twice_still_spares_the_other_org(
    tmp_path: Path, listings: Listings
):
    taken: list[str] = []

    async def take(read: OrgRead) -> None:
        if read.org_id == ORG_A:
            raise RuntimeError("the state file is gone")
        taken.append(read.org_id)

    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        reads = await take_reads(partial(client.read_orgs, [ORG_A, ORG_B]), take)
    assert taken == [ORG_B] and not reads[ORG_A].ok


async def test_take_reads_cancellation_still_propagates(tmp_path: Path, listings: Listings):
    started = asyncio.Event()

    async def take(read: OrgRead) -> None:
        started.set()
        await asyncio.sleep(3600)

    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        task = asyncio.create_task(take_reads(partial(client.read_orgs, [ORG_A, ORG_B]), take))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_read_orgs_a_caller_that_stops_early_cancels_the_reads_under_way(
    tmp_path: Path, listings: Listings
):
    """The reads are handed back as they complete; a caller that stops after the first
    (a `break`, an exception) closes the iterator, and the reads still under way (org B,
    whose answer never comes) are cancelled, not left running."""
    listings.held[ORG_B] = asyncio.Event()  # B's answer waits until the end
    try:
        async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
            # Well within atlas.timeout (30 s): B's read is not waited for.
            async with asyncio.timeout(10):
                async with contextlib.aclosing(client.read_orgs([ORG_A, ORG_B])) as reads:
                    async for read in reads:
                        assert read.org_id == ORG_A and read.ok
                        break
            reading = [t for t in asyncio.all_tasks() if read_org(t)]
            assert reading == []
    finally:
        listings.held[ORG_B].set()


async def test_pending_line_items_with_a_broken_body_is_a_fetch_error(
    tmp_path: Path, listings: Listings
):
    """The breakdown's pending endpoint: odd shapes are skipped, and only FetchError
    ever leaves (the cycle catches that one: it costs the breakdown only)."""
    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        listings.pending[ORG_A] = json.dumps(
            {"results": [{"id": "x", "linkedInvoices": 5, "lineItems": 5}, 3]}
        ).encode()
        assert await client.pending_line_items(ORG_A) == {}
        listings.pending[ORG_A] = nested(DEEP)
        with pytest.raises(FetchError, match="nested too deeply"):
            await client.pending_line_items(ORG_A)


@pytest.mark.parametrize(
    "body",
    [
        b"Invoice Number,1,\n\nAmount\n" + b"x" * 200_000 + b"\n",  # beyond csv's field limit
        b"Invoice Number,1,\n\nAmount\n1e999999999\n",  # beyond Decimal's exponent range
        b"Invoice Number,1,\n\nAmount\n\x00\n",
        b"\xff\xfe",
    ],
    ids=["field too large", "huge exponent", "NUL byte", "not UTF-8"],
)
async def test_invoice_csv_malformed_is_a_fetch_error(
    tmp_path: Path, listings: Listings, body: bytes
):
    listings.csv = body
    async with AtlasClient(client_config(tmp_path, listings.url).atlas) as client:
        with pytest.raises(FetchError, match="the invoice CSV is malformed"):
            await client.invoice_line_items(ORG_A, "1" * 24)


# --- text a server sends: storable and printable, or refused ------------------------

HOSTILE = "\ud800 \x1b[2J\x1b]0;pwned\x07 \u202eevil\u202c \x00 end"
TEXT_FAULTS: dict[str, tuple[int, bytes]] = {
    "statusName with a lone surrogate": (
        200,
        json.dumps({"results": [item(1, ORG_A, status="FAILED\ud800")]}).encode(),
    ),
    "statusName with NUL and ESC": (
        200,
        json.dumps({"results": [item(1, ORG_A, status="PENDING\x00\x1b[31m")]}).encode(),
    ),
    "id with a trailing newline": (
        200,
        json.dumps({"results": [{**item(1, ORG_A), "id": "1" * 24 + "\n"}]}).encode(),
    ),
    "500 detail": (
        500,
        json.dumps({"error": 500, "errorCode": "UNEXPECTED_ERROR", "detail": HOSTILE}).encode(),
    ),
    "400 detail and errorCode": (
        400,
        json.dumps({"error": 400, "errorCode": "INVALID_QUERY\ud800", "detail": HOSTILE}).encode(),
    ),
}


@pytest.mark.parametrize("case", list(TEXT_FAULTS))
async def test_text_no_log_state_file_or_terminal_can_take_fails_that_org_only(
    tmp_path: Path, listings: Listings, capsys: pytest.CaptureFixture[str], case: str
):
    """Attack 12, A12-1 and A12-15: a lone surrogate, NUL or escape sequence in one
    org's answer. Before, it reached SQLite (UnicodeEncodeError: the cycle failed for
    every org, `run --once` ended in "This is a bug") or a terminal raw (`status`
    cleared the screen). Now: that org's failed read, with the text escaped; org B's
    FAILED invoice alerts; `status` shows nothing a terminal acts on."""
    import io

    from invoice_watch import ops
    from invoice_watch.app import App

    listings.answers[ORG_A] = TEXT_FAULTS[case]
    config = client_config(tmp_path, listings.url)
    async with App(config) as app:
        assert await run_once(app) == 1  # org A unreadable
    out, err = capsys.readouterr()
    assert "FIRING" in out and "Analytics" in out  # org B's FAILED invoice
    report = io.StringIO()
    assert await ops.status(config, out=report) == 0
    for where, text in {"stderr": err, "status": report.getvalue()}.items():
        text.encode("utf-8")  # no lone surrogate
        for raw in ("\x1b", "\x07", "\x00", "\u202e"):
            assert raw not in text, (where, raw)
    if case.endswith("detail") or case.endswith("errorCode"):
        assert "\\x1b[2J" in report.getvalue() and "\\u202eevil" in report.getvalue()


# --- property: any JSON whatsoever ----------------------------------------------------

KEYS = [
    "id",
    "orgId",
    "statusName",
    "startDate",
    "endDate",
    "created",
    "updated",
    "amountBilledCents",
    "amountPaidCents",
    "creditsCents",
    "salesTaxCents",
    "linkedInvoices",
    "results",
    "totalCount",
    "content",
    "status",
    "errorCode",
    "detail",
    "parameters",
]
# Any text at all: st.text() never draws a lone surrogate (category Cs), and rarely a
# control character; these do, often (attack 12, A12-1).
NASTY = ["\ud800", "\udfff", "\x00", "\x1b", "\x07", "\x9b", "\u202e", "\u2028", "\n", "\r"]
TEXT = st.text(st.characters(exclude_categories=()) | st.sampled_from(NASTY), max_size=30)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.sampled_from(["1" * 24, ORG_A, "PAID", "FAILED", START, "9999-12-31T23:59:59-14:00"])
    | TEXT
    | st.builds("{}{}".format, st.sampled_from(["PAID", "1" * 24, "RATE_LIMITED"]), TEXT)
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | TEXT, children, max_size=6)
    ),
    max_leaves=20,
)


def assert_storable(text: str) -> None:
    """What is kept or printed: valid UTF-8, nothing a terminal acts on."""
    text.encode("utf-8")
    assert printable(text) == text, text


SHALLOW = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=3)
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else anything shallow. (Not ``one_of``: it would
    flatten SHALLOW's branches and draw ``valid`` once in a dozen.)"""
    return st.integers(0, 3).flatmap(lambda k: SHALLOW if k == 0 else valid)


# Invoice-shaped objects (every field present, most of them valid), so that the checks
# after the first field's are reached too.
INVOICE_LIKE = st.fixed_dictionaries(
    {
        "id": mostly(st.sampled_from(["1" * 24, "2" * 24])),
        "orgId": mostly(st.just(ORG_A)),
        "statusName": mostly(st.sampled_from(["PAID", "FAILED", "PENDING"]) | TEXT),
        "startDate": mostly(st.just(START)),
        "endDate": mostly(st.just(END)),
        "amountBilledCents": mostly(st.integers(-(2**64), 2**64)),
    },
    optional={
        "linkedInvoices": SHALLOW,
        "amountPaidCents": mostly(st.integers(0, 10**6)),
        "updated": mostly(st.just(END)),
    },
)
LISTINGS = st.builds(
    lambda results, total: {"results": results, "totalCount": total},
    st.lists(st.integers(0, 2).flatmap(lambda k: JSON if k == 0 else INVOICE_LIKE), max_size=4),
    JSON,
)
ENVELOPED = st.builds(
    lambda results: {"content": {"results": results}, "status": 200},
    st.lists(INVOICE_LIKE, max_size=3),
)
BODIES = st.integers(0, 3).flatmap(lambda k: (JSON, LISTINGS, LISTINGS, ENVELOPED)[k])


def known_snapshot() -> Snapshot:
    """A snapshot that knows invoice "1..1" live and "2..2" settled, so that the
    comparison of a listed entry with it (`listed_fields`, `Snapshot.held`) is reached too."""
    live = parse_invoice(ORG_A, {**item(0, ORG_A), "id": "1" * 24})
    paid = parse_invoice(ORG_A, {**item(0, ORG_A, "PAID", amountPaidCents=100_00), "id": "2" * 24})
    return Snapshot(settles=frozenset({"PAID"})).updated([live, paid], [])


KNOWN = known_snapshot()


@settings(max_examples=200, deadline=None)
@given(body=BODIES)
@example(body={"results": [item(1, ORG_A, status="PAID\ud800")]})
@example(body={"results": [item(1, ORG_A, status="PAID\x1b[2J")]})
def test_parse_page_any_json_is_a_page_or_a_fetch_data_error(body: Any):
    """Any JSON: a Page whose text is storable and printable, or a FetchError whose
    message is."""
    raw = json.dumps(body).encode()
    for known in (None, KNOWN):
        try:
            page = parse_page(ORG_A, raw, known)
        except FetchError as exc:  # anything else fails the test
            assert_storable(str(exc))
            continue
        for invoice in page.invoices:
            for text in (invoice.id, invoice.org_id, invoice.status, invoice.source_org_id):
                assert_storable(text)


@settings(max_examples=200, deadline=None)
@given(body=BODIES)
@example(body=[{"groupName": "p\ud800", "sku": "\x1b[2J", "totalPriceCents": 1}])
@example(body=[{"totalPriceCents": 10**30}])
def test_pending_line_items_any_json_are_printable_or_a_fetch_data_error(body: Any):
    raw = json.dumps({"results": [{"id": "2" * 24, "lineItems": body}]}).encode()
    try:
        found = pending_items(ORG_A, raw)
    except FetchError as exc:
        assert_storable(str(exc))
        return
    for line in found.get("2" * 24, []):
        for text in (line.project, line.sku, line.cluster):
            assert_storable(text)
        assert abs(line.amount_cents) < 2**63


@settings(max_examples=200, deadline=None)
@given(body=BODIES)
@example(body={"errorCode": "X", "detail": "\ud800 \x1b[2J \u202e", "parameters": ["\x07"]})
def test_api_error_any_json_gives_printable_text(body: Any):
    error = parse_api_error(json.dumps(body).encode())
    for text in (error.evidence(500), *error.parameters):
        assert_storable(text)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=BODIES.map(lambda body: json.dumps(body).encode()), status=st.sampled_from([200, 500]))
@example(raw=json.dumps({"results": [item(1, ORG_A, linkedInvoices=5)]}).encode(), status=200)
@example(raw=nested(DEEP), status=200)
@example(raw=nested(DEEP), status=500)
@example(raw=json.dumps({"results": [item(1, ORG_A, status="PAID\ud800")]}).encode(), status=200)
@example(raw=json.dumps({"detail": "\ud800 \x1b[2J"}).encode(), status=500)
def test_read_org_any_json_through_a_real_server_ends_as_an_org_read(
    tmp_path: Path, raw: bytes, status: int
):
    """The per-org read against a real loopback server answering ``raw``: an OrgRead,
    ok or with a one-line error, and org B (read in the same call) is unaffected."""

    async def run() -> dict[str, OrgRead]:
        async with Listings() as server:
            server.answers[ORG_A] = (status, raw)
            config = client_config(tmp_path, server.url)
            async with AtlasClient(config.atlas) as client:
                return await read_all(client, [ORG_A, ORG_B], known={ORG_A: KNOWN})

    reads = asyncio.run(run())
    assert isinstance(reads[ORG_A], OrgRead) and reads[ORG_B].ok
    if not reads[ORG_A].ok:
        assert len((reads[ORG_A].error or "").splitlines()) == 1
        assert_storable(reads[ORG_A].error or "")
    for invoice in reads[ORG_A].invoices:
        assert_storable(invoice.status)


# --- the OAuth token answer -----------------------------------------------------------


class TokenServer(Listings):
    """Listings behind a service account whose token endpoint answers ``token_body``."""

    def __init__(self) -> None:
        super().__init__()
        self.token_body = b""
        self.app = self._runner.app
        self.app.router.add_post("/api/oauth/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        return web.Response(body=self.token_body, content_type="application/json")


@pytest.mark.parametrize(
    ("token_body", "ok"),
    [
        (b'{"access_token": "abcdef0123456789", "expires_in": 1e400}', True),  # inf: clamped
        (b'{"access_token": "abcdef0123456789", "expires_in": -5}', True),
        (b'{"access_token": "abcdef0123456789", "expires_in": "soon"}', True),
        (b'{"access_token": "abc\\r\\nX-Injected: 1", "expires_in": 60}', False),
        (b'{"access_token": 12345678901234}', False),
        (nested(DEEP), False),
        (b'["access_token"]', False),
    ],
    ids=["expires_in inf", "expires_in negative", "expires_in text", "CR LF in token",
         "token a number", "nested 100,000 deep", "a list"],
)  # fmt: skip
async def test_oauth_token_answer_of_any_shape_is_contained(
    tmp_path: Path, token_body: bytes, ok: bool
):
    async with TokenServer() as server:
        server.token_body = token_body
        sa = {"client_id": "mdb_sa_id_1", "client_secret": "mdb_sa_sk_0123456789"}
        config = client_config(tmp_path, server.url, auth=sa)
        async with AtlasClient(config.atlas) as client:
            reads = await read_all(client, [ORG_A, ORG_B])
    assert all(read.ok is ok for read in reads.values()), reads
    if not ok:
        assert "the OAuth token endpoint" in (reads[ORG_A].error or "")
        assert "is not an OAuth token" in (reads[ORG_A].error or "")


# --- the cycle around it --------------------------------------------------------------


async def test_cycle_error_while_taking_one_org_records_it_as_failed(
    tmp_path: Path, listings: Listings, monkeypatch: pytest.MonkeyPatch
):
    """The cycle's `take` failing for org A (a bug there): A is recorded as a failed read
    (poll_failure counts from it, `status` shows it), org B is read and alerts, and the
    cycle ends."""
    from invoice_watch import cycle as cycle_module
    from invoice_watch.app import App

    real_step = cycle_module.step_org  # type: ignore[attr-defined]

    def step_org(read: OrgRead, *args: Any, **kwargs: Any) -> Any:
        if read.org_id == ORG_A and read.ok:
            raise ZeroDivisionError("a bug in the diff")
        return real_step(read, *args, **kwargs)

    monkeypatch.setattr(cycle_module, "step_org", step_org)
    config = client_config(tmp_path, listings.url)
    async with App(config) as app:
        result = await app.run_cycle()
        assert result.orgs_failed == [ORG_A]
        assert [e.invoice_id for e in result.events] == [f"{7:024x}"]  # B's FAILED invoice
        state = app.store.snapshot.org_state(ORG_A)
        assert state.failing_since is not None and "ZeroDivisionError" in (state.last_error or "")


async def test_until_one_is_authenticated_requests_go_one_at_a_time(tmp_path: Path):
    """Until a request is answered without a 401, requests go alone, one after another
    (each may learn a nonce): never two at once, whether the one alone was refused or
    its connection broke; once one is answered, the others go together."""
    orgs = [f"{n:024x}" for n in range(1, 9)]
    in_flight, answers, together = [0], [0], [0]  # together: the most at once
    overlapping: list[int] = []  # requests that went while the one alone was unanswered

    async def listing(request: web.Request) -> web.Response:
        in_flight[0] += 1
        if answers[0] < 4 and in_flight[0] > 1:  # before the first 200
            overlapping.append(answers[0])
        together[0] = max(together[0], in_flight[0])
        for _ in range(20):  # loop turns for any other request to come in meanwhile
            await asyncio.sleep(0)
        in_flight[0] -= 1
        answers[0] += 1
        if answers[0] == 1:  # the first one's connection breaks
            assert request.transport is not None
            request.transport.abort()
        body = json.dumps({"results": [], "totalCount": 0}).encode()
        status = 401 if answers[0] <= 3 else 200
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", listing)
    async with LoopbackServer(app) as server:
        config = client_config(tmp_path, server.url)
        async with AtlasClient(config.atlas) as client:
            reads = await read_all(client, orgs)
    assert overlapping == []
    assert 0 < sum(not read.ok for read in reads.values()) <= 3
    assert together[0] > 1  # once one was answered, the others went together
