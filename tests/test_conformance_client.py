"""The client's half of spec conformance: every request AtlasClient sends uses a path,
query parameters (names and values) and a media type that the official spec declares.
Reads ../shared/atlas-openapi/invoices.openapi.json; skips with the reason when absent."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed
import yaml

from invoice_watch.atlas.client import AtlasClient
from invoice_watch.clock import FakeClock
from invoice_watch.config import load
from invoice_watch.constants import V2_CSV_MEDIA_TYPE, V2_MEDIA_TYPE
from invoice_watch.simulator import Simulator
from tests.test_conformance import declared_media_types, load_spec
from tests.world import PROD, scenario


def _parameters(spec: dict[str, Any], template: str) -> dict[str, dict[str, Any]]:
    out = {}
    for parameter in spec["paths"][template]["get"].get("parameters", []):
        if "$ref" in parameter:
            parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        out[parameter["name"]] = parameter
    return out


def _template_of(spec: dict[str, Any], path: str) -> str:
    for template in spec["paths"]:
        pattern = "^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return str(template)
    raise AssertionError(f"the client requested {path}, which the spec does not declare")


def _value(schema: dict[str, Any], raw: str) -> Any:
    kind = schema.get("type")
    if kind == "integer":
        return int(raw)
    if kind == "boolean":
        assert raw in ("true", "false"), raw
        return raw == "true"
    if kind == "array":
        return [raw]
    if schema.get("format") == "date":
        date.fromisoformat(raw)
    return raw


async def test_client_requests_conform_to_the_spec(tmp_path: Path):
    spec = load_spec()
    async with Simulator(scenario()) as sim:
        text = yaml.safe_dump(
            {
                "atlas": {
                    "base_url": sim.base_url,
                    "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
                },
                "organizations": [{"id": PROD}],
                "notifiers": {"c": {"type": "console"}},
                "rules": [{"name": "r", "type": "invoice_status", "notify": ["c"]}],
            }
        )
        config = load(text, env={}, base_dir=tmp_path)
        failed, pending = sim.scenario.invoice("failed"), sim.scenario.invoice("pending")
        async with AtlasClient(config.atlas, clock=FakeClock()) as client:
            everything = (await client.read_org(PROD)).invoices
            assert len(everything) == 3  # PAID, FAILED, PENDING
            # fromDate: the FAILED invoice's month on (the PAID one, a month earlier, not)
            since = (await client.read_org(PROD, failed.start.date())).invoices
            assert {i.id for i in since} == {failed.id, pending.id}
            assert await client.pending_line_items(PROD)
            assert await client.invoice_line_items(PROD, failed.id)
        requests = [r for r in sim.requests if r.path.startswith("/api/atlas/v2/")]
    assert len(requests) >= 4
    for record in requests:
        template = _template_of(spec, record.path)
        assert record.method == "GET"
        declared = _parameters(spec, template)
        for name, values in record.query.items():
            assert name in declared and declared[name]["in"] == "query", (template, name)
            for raw in values:
                jsonschema.validate(_value(declared[name]["schema"], raw), declared[name]["schema"])
        assert record.status == 200 or record.challenge, (record.path, record.status)


def test_client_media_types_are_declared():
    load_spec()
    orgs = "/api/atlas/v2/orgs/{orgId}/invoices"
    assert V2_MEDIA_TYPE in declared_media_types(orgs, "get", 200)
    assert V2_MEDIA_TYPE in declared_media_types(orgs + "/pending", "get", 200)
    assert V2_CSV_MEDIA_TYPE in declared_media_types(orgs + "/{invoiceId}/csv", "get", 200)


async def test_a_request_url_is_the_one_aiohttp_builds_and_is_kept():
    """Connection sends a URL built once for a URL string and its query, and kept for
    the next cycle: it is the one aiohttp builds from them (query order and encoding),
    and the same object when asked again."""
    import asyncio

    from aiohttp import ClientRequest
    from yarl import URL

    from invoice_watch.atlas.connection import request_url

    base = "https://cloud.mongodb.com/api/atlas/v2/orgs/5f8a1c2e9b3d4a6f7e0c1b2a/invoices"
    params = {"itemsPerPage": "500", "pageNum": "2", "fromDate": "2026-10-01", "q": "a b&c/é"}
    url = request_url(base, tuple(params.items()))
    # What aiohttp itself makes of the URL string and `params` (ClientSession.get's).
    built = ClientRequest("GET", URL(base), params=params, loop=asyncio.get_running_loop())
    assert url == built.url
    assert str(url).endswith("?itemsPerPage=500&pageNum=2&fromDate=2026-10-01&q=a+b%26c/%C3%A9")
    assert request_url(base, tuple(params.items())) is url
    assert request_url(f"{base}/pending", ()) == URL(f"{base}/pending")
    # A query the URL string has already is kept, the params added after it (aiohttp's).
    kept = request_url(f"{base}?envelope=false", (("pageNum", "1"),))
    assert str(kept).endswith("/invoices?envelope=false&pageNum=1")
