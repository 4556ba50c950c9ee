"""An aiohttp app served on 127.0.0.1, port 0, for ``async with``: the base of the test
suite's stand-in servers (fake Slack, hand-made Atlas listings)."""

from __future__ import annotations

from typing import Self

from aiohttp import web


class LoopbackServer:
    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self.url = ""  # http://127.0.0.1:PORT once started

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
