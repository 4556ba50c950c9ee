"""The bounds of one Atlas answer (SPEC §10 "Bounds"): how much of a body is read, and
how many JSON values it may hold before it is parsed.

Every answer's decoded body is capped (``atlas.max_response_size``; answers read only for
a message, :data:`SMALL_BODY`), and so is the number of JSON values it may hold (memory,
not only bytes: :func:`json_values`); a large answer is parsed in a worker thread
(:data:`PARSE_INLINE`).
"""

from __future__ import annotations

from typing import Final

from aiohttp import ClientResponse, hdrs

from invoice_watch.constants import MAX_RESPONSE_SIZE

# Every number Atlas sends is an int64 (cents, counts); a larger one is refused.
INT64_MAX: Final = 2**63 - 1
# Bodies that are only read for a message (error answers, the OAuth token) are read up
# to this much; the rest is dropped.
SMALL_BODY: Final = 64 * 1024
_CHUNK = 64 * 1024
# Memory, not only bytes: an answer of empty arrays (`[],[],...`, 3 bytes each) takes
# some 40 times its size once parsed (about 120 bytes a value), where Atlas's answers
# hold one JSON value per 26 bytes or so (a listing page of 500 invoices: about 260 KB,
# 10,000 values). An answer with more than one value per this many bytes of
# atlas.max_response_size is refused before it is parsed: with the default of 16 MiB,
# at most 838,860 values (about 100 MB once parsed, in well under a second).
BYTES_PER_VALUE: Final = 20
MAX_VALUES: Final = MAX_RESPONSE_SIZE // BYTES_PER_VALUE
# Answers larger than this are parsed in a worker thread, so that the event loop
# (health checks, signals, other organizations' reads) goes on meanwhile; smaller ones,
# every real listing page among them, are parsed on the loop.
PARSE_INLINE: Final = 2**20


class TooLarge(Exception):
    """An answer's body is larger than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the answer is larger than {limit} bytes")


async def read_body(resp: ClientResponse, limit: int, *, truncate: bool = False) -> bytes:
    """The decoded body, read in chunks: at most ``limit`` bytes. Beyond it the
    connection is closed and :class:`TooLarge` raised, or with ``truncate`` the first
    ``limit`` bytes are returned. (``read()`` has no cap: aiohttp's notes in
    LIBRARIES.md; the chunks are already decompressed, so a gzip bomb stops here.)"""
    length = resp.content_length
    # With a Content-Encoding, the wire size says little about the decoded one.
    plain = hdrs.CONTENT_ENCODING not in resp.headers
    if length is not None and length > limit and plain and not truncate:
        resp.close()
        raise TooLarge(limit)
    # A plain body of a known length within the limit: read() reads that many bytes, no
    # more, at once (a steady cycle: 0.6 % fewer instructions than chunk by chunk).
    whole = plain and hdrs.TRANSFER_ENCODING not in resp.headers
    if length is not None and length <= limit and whole:
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            resp.close()
            if not truncate:
                raise TooLarge(limit)
            chunks.append(chunk[: limit - (size - len(chunk))])
            break
        chunks.append(chunk)
    return b"".join(chunks)


def json_values(body: bytes) -> int:
    """How many JSON values ``body`` may hold, counted without parsing it: every array
    and object opens with a bracket, every value but the first of one follows a comma
    (those within strings are counted too: an overestimate, never an underestimate of
    what parsing it would build)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{")


def max_values(max_response_size: int) -> int:
    """How many JSON values an answer may hold under ``atlas.max_response_size``."""
    return max_response_size // BYTES_PER_VALUE
