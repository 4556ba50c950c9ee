"""The migrations that shipped never change, not even in white space: an existing state
file or database opens unchanged, and SQLite keeps each table's text as written. Their
statements are put together from the tables both backends spell once
(invoice_watch.store.sql.tables); this holds each one's text to what it was when it
shipped (a migration added later is added here once it ships)."""

from __future__ import annotations

import hashlib

import pytest

from invoice_watch.store.postgres import schema as postgres
from invoice_watch.store.sqlite import schema as sqlite

# sha256 of each migration's text, in order, as it shipped.
SHIPPED = {
    "sqlite": (
        "61ec99c6250b8760b0465f0e8f7d883a4273f72c163fc123e1821d2e9c070e87",
        "55c0bb7e15f3b08b75984b0559afdbb183745202f0cd315e846e315438b71233",
        "622ac7ece36994fbd748378c01391a4662638b5c7001c4e10107a6b50a9beb38",
        "048458f5a504be0f5cf2ed99915f2a719eae265b4c5f7189b0458c2ef94391dc",
        "855de49668c9273d1a82b43e34f7a136463addb8083b8cf5322d684a70ea4fa4",
    ),
    "postgres": (
        "6286c438e4de445e823c2c399ba247bf1e180cc667c2cb334ab4b68622ede4e3",
        "855de49668c9273d1a82b43e34f7a136463addb8083b8cf5322d684a70ea4fa4",
    ),
}


@pytest.mark.parametrize("backend", sorted(SHIPPED))
def test_store_schema_migrations_that_shipped_keep_their_text(backend: str):
    migrations = {"sqlite": sqlite.MIGRATIONS, "postgres": postgres.MIGRATIONS}[backend]
    shipped = SHIPPED[backend]
    assert len(migrations) >= len(shipped)
    digests = [hashlib.sha256(text.encode()).hexdigest() for text in migrations]
    assert digests[: len(shipped)] == list(shipped)
