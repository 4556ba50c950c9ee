"""A hand-made Atlas invoice API on loopback, for the cycle's tests that need answers the
simulator never gives: a raw body for one organization, a ``fromDate`` read as an
exclusive bound, a listing held until the test lets it go, line items no serializer
takes.

    async with HandAtlas() as atlas:
        atlas.invoices[ORG_A] = [invoice(1, ORG_A, "FAILED")]
        atlas.gates[ORG_B] = asyncio.Event()   # ORG_B's listing waits until set
        config = hand_config(tmp_path, atlas.url)

The listing is v2's (``/api/atlas/v2/orgs/{org}/invoices``), one page, no
authentication asked (the client's Digest middleware sends its first request plain).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from invoice_watch.config import Config
from tests.conftest import ORG_A, ORG_B, base_config, make_config
from tests.loopback import LoopbackServer


def invoice(
    n: int,
    org: str,
    status: str = "PENDING",
    cents: int = 100_00,
    *,
    start: str = "2026-11-01",
    end: str = "2026-12-01",
    **extra: Any,
) -> dict[str, Any]:
    """An invoice as Atlas lists it (``BillingInvoiceMetadata``): id ``n`` in hex."""
    return {
        "id": f"{n:024x}",
        "orgId": org,
        "statusName": status,
        "startDate": f"{start}T00:00:00Z",
        "endDate": f"{end}T00:00:00Z",
        "amountBilledCents": cents,
        "amountPaidCents": 0,
        **extra,
    }


class HandAtlas(LoopbackServer):
    """Per organization: the invoices it lists (``invoices``), or a raw answer
    (``answers``: status and body), a gate its listing waits on (``gates``), and the body
    of its pending invoices (``pending``). ``from_exclusive``: list only invoices that
    start after ``fromDate`` (Atlas documents "greater than or equal").
    ``full_answers``: the answer to a full listing (no ``fromDate``) of that
    organization, as a gateway that times out on a long listing gives. Every listing's
    ``fromDate`` (None: full) is recorded in ``asked``."""

    def __init__(self) -> None:
        self.invoices: dict[str, list[dict[str, Any]]] = {}
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.pending: dict[str, bytes] = {}
        self.from_exclusive = False
        self.full_answers: dict[str, tuple[int, bytes]] = {}
        self.asked: list[tuple[str, str | None]] = []
        app = web.Application()
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices", self._list)
        app.router.add_get("/api/atlas/v2/orgs/{org}/invoices/pending", self._pending)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        from_date = request.query.get("fromDate")
        self.asked.append((org, from_date))
        if org in self.gates:
            await self.gates[org].wait()
        answer = self.answers.get(org)
        if from_date is None and org in self.full_answers:
            answer = self.full_answers[org]
        if answer is not None:
            status, body = answer
            return web.Response(status=status, body=body, content_type="application/json")
        listed = [
            entry
            for entry in self.invoices.get(org, [])
            if from_date is None
            or (
                entry["startDate"][:10] > from_date
                if self.from_exclusive
                else entry["startDate"][:10] >= from_date
            )
        ]
        body = json.dumps({"results": listed, "totalCount": len(listed)}).encode()
        return web.Response(body=body, content_type="application/json")

    async def _pending(self, request: web.Request) -> web.Response:
        body = self.pending.get(request.match_info["org"], b'{"results": []}')
        return web.Response(body=body, content_type="application/json")


def hand_config(
    tmp_path: Path,
    url: str,
    *,
    rules: list[dict[str, Any]] | None = None,
    orgs: tuple[str, ...] = (ORG_A, ORG_B),
    **sections: Any,
) -> Config:
    """A config reading ``orgs`` from the hand-made Atlas at ``url`` (no retries), the
    console notifier, and ``rules`` (default: failed-charge and poll failure after 1h)."""
    names = {ORG_A: "Production", ORG_B: "Analytics"}
    data = base_config()
    data["atlas"] |= {"base_url": url, "retries": 0, "timeout": "5s"}
    data["organizations"] = [{"id": org, "name": names.get(org, org)} for org in orgs]
    data["rules"] = rules or [
        {"name": "failed-charge", "type": "invoice_status", "notify": ["console"]},
        {"name": "atlas-down", "type": "poll_failure", "after": "1h", "notify": ["console"]},
    ]
    data.update(sections)
    return make_config(tmp_path, data)
