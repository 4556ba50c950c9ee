"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, port 0, keeping what it gets.

LIBRARIES.md: aiosmtpd's ``Controller(port=0)`` does not work, so the server is started
with ``loop.create_server``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    """An aiosmtpd handler keeping every message, or answering DATA with ``reply``."""

    def __init__(self, reply: str = "250 OK") -> None:
        self.reply = reply
        self.envelopes: list[Envelope] = []
        self.sessions: list[Session] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.reply.startswith("250"):
            self.envelopes.append(envelope)
            self.sessions.append(session)
        return self.reply

    def message(self, index: int = -1) -> EmailMessage:
        content = self.envelopes[index].original_content
        assert isinstance(content, bytes)
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


StartServer = Callable[..., Awaitable[int]]


@pytest.fixture
async def smtp_server() -> AsyncIterator[StartServer]:
    """Starts aiosmtpd servers on 127.0.0.1, port 0; returns each one's port."""
    servers: list[asyncio.Server] = []
    loop = asyncio.get_running_loop()

    async def start(
        handler: Sink, *, implicit_tls: ssl.SSLContext | None = None, **smtp: Any
    ) -> int:
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="smtp.test", loop=loop, **smtp),
            "127.0.0.1",
            0,
            ssl=implicit_tls,
        )
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
