"""A throwaway PostgreSQL server for the tests, started once per test run, and a fresh
database per test (the ``postgres_url`` fixture).

Debian's ``postgresql`` package (``.ci/run`` installs it when missing): ``initdb`` and
``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin`` (or ``$PG_BIN``), data in a temporary
folder, a free port, 127.0.0.1 only, ``fsync=off``. As root the server runs as the
``postgres`` user (``pg_ctl`` refuses root), through ``runuser``. Tests that need it are
skipped, saying why, only where no PostgreSQL binary exists.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def pg_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``, None when PostgreSQL is not installed."""
    given = os.environ.get("PG_BIN")
    candidates = [Path(given)] if given else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


NOT_INSTALLED = (
    "PostgreSQL is not installed (no initdb/pg_ctl under /usr/lib/postgresql/*/bin "
    "or on PATH; set PG_BIN): `apt-get install postgresql` runs these tests"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: ``url(dbname)`` connects to one of its databases."""

    bin: Path
    data: Path
    folder: Path
    port: int
    as_root: bool

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _command(self, *args: str) -> list[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        return ["runuser", "-u", "postgres", "--", *command] if self.as_root else command

    def pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            self._command("pg_ctl", "-D", str(self.data), *args),
            check=check,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl("-l", str(self.folder / "server.log"), "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()


@contextlib.contextmanager
def running_server(found: Path) -> Iterator[PostgresServer]:
    """A new server from the binaries in ``found`` (initdb, start), stopped and removed
    on leaving: the test run's, or a loop's run outside pytest (tests/failoverloop.py)."""
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="invoice-watch-pg-"))
    if as_root:
        shutil.chown(folder, "postgres", "postgres")
    server = PostgresServer(found, folder / "data", folder, free_port(), as_root)
    try:
        subprocess.run(
            server._command(
                "initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E",
                "UTF8", "--no-sync",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: PostgresServer, name: str) -> str:
    """A new, empty database on ``server``: its URL."""
    import psycopg

    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test run (skipped where none is installed)."""
    found = pg_bin()
    if found is None:
        pytest.skip(NOT_INSTALLED)
    with running_server(found) as server:
        yield server


_numbers = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test (dropped after it): its URL."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_numbers)}"
    yield create_database(postgres_server, name)
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(postgres_server.url(), autocommit=True) as conn,
    ):
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class PasswordRole:
    """A role that must give its password (scram-sha-256), unlike ``postgres`` (trust):
    ``url`` has no password in it."""

    name: str
    password: str
    url: str


def password_role(server: PostgresServer, dbname: str, name: str, password: str) -> PasswordRole:
    """Create ``name`` with ``password``, owner of ``dbname``, and make the server ask it
    for its password (a ``pg_hba.conf`` line for that role alone, before the others)."""
    import psycopg

    hba = server.data / "pg_hba.conf"
    line = f"host all {name} 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text()
    if line not in text:
        hba.write_text(line + text)
    with psycopg.connect(server.url(dbname), autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(password)
            )
        )
        conn.execute(
            psycopg.sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                psycopg.sql.Identifier(dbname), psycopg.sql.Identifier(name)
            )
        )
        conn.execute(
            psycopg.sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(psycopg.sql.Identifier(name))
        )
        conn.execute("SELECT pg_reload_conf()")
    return PasswordRole(name, password, f"postgresql://{name}@127.0.0.1:{server.port}/{dbname}")


_roles = itertools.count(1)


@pytest.fixture
def postgres_role(postgres_server: PostgresServer, postgres_url: str) -> Iterator[PasswordRole]:
    """The test's database, owned by a new role that must give its password, one with
    every character a URL reserves (dropped after the test)."""
    import psycopg

    dbname = postgres_url.rsplit("/", 1)[1]
    name = f"iw_{os.getpid()}_{next(_roles)}"
    yield password_role(postgres_server, dbname, name, "S3cr3t-P@ss/wo#rd%:?+x")
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(postgres_server.url(), autocommit=True) as conn,
    ):
        conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.execute(f"DROP ROLE IF EXISTS {name}")
