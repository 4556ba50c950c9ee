"""A forward HTTP proxy on 127.0.0.1 (port 0) that records what passes through it.

It serves absolute-form requests (``GET http://127.0.0.1:PORT/path HTTP/1.1``, RFC 9112
§3.2.2), as a client sends them to an HTTP proxy for ``http://`` URLs, and forwards each
to its target with a client of its own, the answer unchanged (status, headers, body
bytes, compression included). ``Proxy-Authorization`` is checked against ``credentials``
when given (407 otherwise) and never forwarded. ``CONNECT`` (tunnels for ``https://``)
is not served: tests stay on plain HTTP over loopback.

A client never sends loopback traffic through an environment proxy
(:func:`invoice_watch.proxy.loopback`), so tests name their servers by a host name the
proxy alone resolves: :data:`ALIAS` (``atlas.test``, ``slack.test``), which the proxy
forwards to 127.0.0.1 (the client never looks the name up).

    async with FakeProxy() as proxy:
        ...HTTP_PROXY=proxy.url, base_url=aliased(sim.base_url)...
        assert proxy.seen[0].url.startswith("http://atlas.test:")
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from tests.loopback import LoopbackServer

# Host names only this proxy resolves (to 127.0.0.1); reserved names (RFC 6761 `.test`).
ALIAS = {"atlas.test", "slack.test"}


def aliased(url: str, name: str = "atlas.test") -> str:
    """``url`` (``http://127.0.0.1:PORT/...``) with its host written as ``name``."""
    return url.replace("://127.0.0.1:", f"://{name}:", 1)


# Hop-by-hop headers (RFC 9110 §7.6.1) and what the proxy sets itself.
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass(frozen=True)
class Passed:
    """One request the proxy received: method, absolute URL, headers as sent to it."""

    method: str
    url: str
    headers: dict[str, str]


class FakeProxy(LoopbackServer):
    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.seen: list[Passed] = []
        self._credentials = credentials
        self._client: aiohttp.ClientSession | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        super().__init__(app)

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        await super().__aexit__(*exc)

    @property
    def authorizations(self) -> list[str]:
        """Every ``Authorization`` header that passed through (meant for the target)."""
        return [p.headers[hdrs.AUTHORIZATION] for p in self.seen if hdrs.AUTHORIZATION in p.headers]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        target = request.raw_path  # the request line's target, absolute-form for a proxy
        if not target.startswith("http://"):
            return web.Response(status=400, text="not a proxy request (origin-form target)")
        self.seen.append(Passed(request.method, target, dict(request.headers)))
        if self._credentials is not None:
            user, password = self._credentials
            expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if request.headers.get(hdrs.PROXY_AUTHORIZATION) != expected:
                return web.Response(
                    status=407, headers={hdrs.PROXY_AUTHENTICATE: 'Basic realm="proxy"'}
                )
        if self._client is None:
            self._client = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        body = await request.read()
        upstream_url = URL(target, encoded=True)
        if upstream_url.host in ALIAS:
            upstream_url = upstream_url.with_host("127.0.0.1")
        async with self._client.request(
            request.method,
            upstream_url,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            answer = web.Response(status=upstream.status, body=payload)
            for name, value in upstream.headers.items():
                if name.lower() not in _NOT_FORWARDED:
                    answer.headers.add(name, value)
            return answer
