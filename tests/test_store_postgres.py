"""What the PostgreSQL backend does apart from what every backend does (test_store.py):
its migrations, its URL and password, and what its errors show."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import pytest

from invoice_watch.errors import ConfigError, StateError
from invoice_watch.store import StateUrl, location, open_store
from invoice_watch.store.postgres.schema import SCHEMA_VERSION
from tests.conftest import base_config, make_config
from tests.postgres import PostgresServer


async def test_postgres_a_newer_schema_is_refused(postgres_url):
    store = await open_store(StateUrl(postgres_url))
    await store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version=%s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match="newer than this invoice-watch understands"):
        await open_store(StateUrl(postgres_url))


async def test_postgres_an_operator_command_migrates_nothing(postgres_url):
    with pytest.raises(StateError, match="has not run on it yet"):
        await open_store(StateUrl(postgres_url), exclusive=False)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('outbox')").fetchone() == (None,)


async def test_postgres_the_password_never_shows(postgres_server: PostgresServer, caplog):
    """A wrong password (the server trusts everyone, so a missing database stands in for
    any failure) is named nowhere: not in the error, its repr, or the logs."""
    caplog.set_level(logging.DEBUG)
    url = StateUrl(
        f"postgresql://postgres:hunter2-sekret@127.0.0.1:{postgres_server.port}/nosuchdb"
    )
    assert "hunter2" not in repr(url) and "hunter2" not in str(url)
    with pytest.raises(StateError) as caught:
        await open_store(url)
    assert "nosuchdb" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(caught.value)
    assert caught.value.__cause__ is None  # libpq's own text is not chained to it
    assert "hunter2" not in caplog.text


def test_postgres_config_takes_the_url_password_file_and_validates(tmp_path: Path):
    secret = tmp_path / "pgpass"
    secret.write_text("s3cret-pw\n")
    config = make_config(
        tmp_path,
        base_config(
            state={
                "url": "postgresql://watch@db.example:5432/iw?sslmode=verify-full",
                "password_file": str(secret),
            }
        ),
    )
    where = location(config.state)
    assert isinstance(where, StateUrl)
    assert "password='s3cret-pw'" in where.conninfo() or "password=s3cret-pw" in where.conninfo()
    assert "s3cret" not in where.display and "sslmode=verify-full" in where.display
    assert config.ha.lease_ttl.total_seconds() == 30
    text = (
        "atlas: {auth: {public_key: a, private_key: b}}\n"
        "organizations: [{id: aaaaaaaaaaaaaaaaaaaaaaaa}]\n"
        "notifiers: {c: {type: console}}\n"
        "rules: [{name: r, type: invoice_status, notify: [c]}]\n"
        "state:\n"
        "  url: postgresql://u:topsecret@h/db?sslmode=sometimes\n"
        "ha:\n"
        "  lease_ttl: 1s\n"
    )
    from invoice_watch.config import load

    with pytest.raises(ConfigError) as caught:
        load(text, filename="c.yaml", env={}, base_dir=tmp_path)
    message = str(caught.value)
    assert "c.yaml:6" in message and "sslmode" in message
    assert "c.yaml:8" in message and "at least 3s" in message
    assert "topsecret" not in message
