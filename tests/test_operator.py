"""Operator paths (issue 14): no command ends in a traceback. One table, command x
fault, each run as a real ``python -m invoice_watch`` process: its exit status (SPEC §7)
and the one line it says, never a ``Traceback``.

Faults are real where the OS can make them: a closed or full stdout, a folder or file
another user owns (run as ``nobody`` when the tests run as root), a size limit that
fills the "disk" (RLIMIT_FSIZE), a port in use, SIGINT. Only what no server can produce
is patched in the process (``prelude``): a file system without locks (ENOLCK), and the
service's state location.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_watch.cli.commands import run_once
from invoice_watch.store import OrgWrite, open_store
from tests.conftest import inv

ORG = "5f8a1c2e9b3d4a6f7e0c1b2a"
ROOT = os.geteuid() == 0
NOBODY = 65534
EXIT_TIMEOUT = 60  # seconds a command may take to end after its fault


@dataclass
class Place:
    """A folder of its own for one command: config.yaml, state/state.db, and a loopback
    server that accepts connections and never answers (a hanging Atlas)."""

    dir: Path
    hang_port: int
    env: dict[str, str] = field(default_factory=dict)
    holds: list[Any] = field(default_factory=list)  # kept open while the command runs
    output: bytes = b""  # what the command wrote to stdout

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def state(self) -> Path:
        return self.dir / "state" / "state.db"

    def write_config(self, **changes: Any) -> None:
        data: dict[str, Any] = {
            "atlas": {
                "base_url": "http://127.0.0.1:9",  # refused at once
                "auth": {"public_key": "pubkey", "private_key": "privkey-secret"},
                "retries": 0,
                "timeout": "5s",
            },
            "organizations": [{"id": ORG, "name": "Production"}],
            "state": {"path": str(self.state)},
            "notifiers": {"out": {"type": "console"}},
            "rules": [{"name": "failed", "type": "invoice_status", "notify": ["out"]}],
        }
        data.update(changes)
        self.config.write_text(yaml.safe_dump(data))
        self.config.chmod(0o644)


@dataclass(frozen=True)
class Case:
    """One command under one fault: what it must end with."""

    argv: tuple[str, ...]
    code: int | tuple[int, ...]
    says: str = ""  # regex the stderr must match ("" = stderr must be empty)
    never: str = ""  # regex the stderr must not match
    setup: Callable[[Place], None] = lambda place: None
    stdout: str = "pipe"  # pipe | closed | full | two-lines (read two, then close) |
    # none (started with it closed: `>&-`) | none-both (stderr too: `>&- 2>&-`)
    unprivileged: bool = False  # as `nobody` when root (files of "another user")
    needs_root: bool = False  # the fault needs a file of another user
    prelude: str = ""  # Python run first: only for faults no server can produce
    limit_file_size: int | None = None  # RLIMIT_FSIZE: writes past it fail (EFBIG)
    tiny_disk: bool = False  # the state folder on a 16 KiB tmpfs (a private mount)
    interrupt_when: str = ""  # send SIGINT once this shows on stdout/stderr ("connect"
    # = once the hanging Atlas gets a connection)
    sends: int = signal.SIGINT  # the signal interrupt_when sends
    after: Callable[[Place], None] | None = None  # checks once the command ended
    during: Callable[[Place], None] | None = None  # once "cycle:" is logged
    quick: float | None = None  # seconds it must end within, after its fault


# -- what the faults need ------------------------------------------------------------


def state_with_an_invoice(place: Place) -> None:
    async def make() -> None:
        store = await open_store(place.state)
        cycle = store.begin_cycle()
        from tests.conftest import NOW

        await store.commit_orgs(
            cycle, NOW, [OrgWrite(ORG, True, upserts=[inv(1, org=ORG)])], [], {}
        )
        await store.close()

    asyncio.run(make())


def many_rows(place: Place) -> None:
    """A state file whose tables overflow a pipe's buffer (64 KiB)."""

    async def make() -> None:
        store = await open_store(place.state)
        cycle = store.begin_cycle()
        from tests.conftest import NOW

        invoices = [inv(n, org=ORG) for n in range(1, 3000)]
        await store.commit_orgs(cycle, NOW, [OrgWrite(ORG, True, upserts=invoices)], [], {})
        await store.close()

    asyncio.run(make())


def state_folder(place: Place) -> None:
    place.state.parent.mkdir(mode=0o755)


def state_is_a_folder(place: Place) -> None:
    place.state.mkdir(parents=True)


def state_is_a_symlink(place: Place) -> None:
    state_folder(place)
    target = place.dir / "elsewhere.db"
    target.write_bytes(b"")
    place.state.symlink_to(target)


def state_folder_is_a_file(place: Place) -> None:
    place.state.parent.write_text("")


def state_garbage(place: Place) -> None:
    state_folder(place)
    place.state.write_bytes(b"not a database" * 100)


HOSTILE = "\x1b[2J\x1b]0;pwned\x07 \u202egnp.exe\x00 two\nlines"


def state_with_hostile_text(place: Place) -> None:
    """Text from Atlas and a receiver that a terminal would act on (A12-15): an
    organization's last error, a message's summary and error, an invoice's id."""
    state_folder(place)

    async def make() -> None:
        from tests.conftest import NOW

        store = await open_store(place.state)
        cycle = store.begin_cycle()
        invoice = inv(1, org=ORG)
        await store.commit_orgs(cycle, NOW, [OrgWrite(ORG, True, upserts=[invoice])], [], {})
        cycle = store.begin_cycle()
        await store.commit_orgs(
            cycle, NOW, [OrgWrite(ORG, False, error=HOSTILE, failing_since=NOW)], [], {}
        )
        await store.close()

    asyncio.run(make())
    with sqlite3.connect(place.state) as conn:
        conn.execute("UPDATE invoices SET id = ? || id", (HOSTILE,))
        conn.execute(
            "INSERT INTO outbox (notifier, events, summary, created_at, next_attempt_at, "
            "state, last_error) VALUES ('out', '[]', ?, '2026-01-01T00:00:00+00:00', "
            "'2026-01-01T00:00:00+00:00', 'pending', ?)",
            (HOSTILE, HOSTILE),
        )
    conn.close()


def nothing_a_terminal_acts_on(place: Place) -> None:
    text = place.output.decode()
    assert "pwned" in text, text  # shown...
    for raw in ("\x1b", "\x07", "\x00", "\u202e"):
        assert raw not in text, text  # ...but escaped
    assert "\\u001b[2J\\u001b]0;pwned\\u0007 \\u202egnp.exe\\u0000 two\\u000alines" in text


def state_of_another_program(place: Place) -> None:
    state_folder(place)
    with sqlite3.connect(place.state) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()


def state_of_a_newer_invoice_watch(place: Place) -> None:
    state_with_an_invoice(place)
    with sqlite3.connect(place.state) as conn:
        conn.execute("PRAGMA user_version=99")
    conn.close()


def state_of_another_user(place: Place) -> None:
    """A state file created 0666 by root; the command runs as nobody."""
    state_folder(place)
    place.state.parent.chmod(0o777)
    place.state.write_bytes(b"")
    place.state.chmod(0o666)


def state_unreadable(place: Place) -> None:
    state_with_an_invoice(place)
    place.state.chmod(0)


def state_shm_private(place: Place) -> None:
    """The daemon (root here) holds the state open: its -shm is 0600, while the state
    file itself is readable by others (the operator, nobody)."""
    state_with_an_invoice(place)
    place.state.chmod(0o644)
    conn = sqlite3.connect(place.state)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("SELECT COUNT(*) FROM invoices").fetchone()
    place.holds.append(conn)
    Path(f"{place.state}-shm").chmod(0o600)


def state_folder_closed(place: Place) -> None:
    state_with_an_invoice(place)
    place.state.parent.chmod(0)


def state_folder_read_only(place: Place) -> None:
    state_folder(place)
    place.state.parent.chmod(0o555)


def state_held(place: Place) -> None:
    """Another daemon holds the state file's lock."""
    state_with_an_invoice(place)
    fd = os.open(place.state, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    place.holds.append(fd)


def config_is_a_folder(place: Place) -> None:
    place.config.unlink()
    place.config.mkdir()


def config_unreadable(place: Place) -> None:
    place.config.chmod(0)


def config_broken(place: Place) -> None:
    place.config.write_text("rules: [\n")


def config_unsafe(place: Place) -> None:
    """A config that test-notify cannot use: an email notifier whose CA file is no CA."""
    (place.dir / "ca.pem").write_text("not a certificate\n")
    place.write_config(
        notifiers={
            "mail": {
                "type": "email",
                "host": "127.0.0.1",
                "port": 9,
                "tls": "starttls",
                "ca_file": "ca.pem",
                "from": "a@example.com",
                "to": ["b@example.com"],
            }
        },
        rules=[{"name": "failed", "type": "invoice_status", "notify": ["mail"]}],
    )


def port_in_use(place: Place) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    place.holds.append(listener)
    place.env["BUSY_PORT"] = str(listener.getsockname()[1])


def http_port_in_use(place: Place) -> None:
    port_in_use(place)
    place.write_config(http={"listen": f"127.0.0.1:{place.env['BUSY_PORT']}"})


def http_port_privileged(place: Place) -> None:
    state_folder(place)
    place.state.parent.chmod(0o777)  # the daemon (nobody) may create its state there
    place.write_config(http={"listen": "127.0.0.1:80"})


def hanging_atlas(place: Place) -> None:
    place.write_config(
        atlas={
            "base_url": f"http://127.0.0.1:{place.hang_port}",
            "auth": {"public_key": "pubkey", "private_key": "privkey-secret"},
            "retries": 0,
        }
    )


def scenario_broken(place: Place) -> None:
    (place.dir / "scenario.yaml").write_text("orgs: [\n")


def not_a_scenario(place: Place) -> None:
    (place.dir / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")


def write_config_folder_closed(place: Place) -> None:
    (place.dir / "closed").mkdir(mode=0o555)


def foreign_file(place: Place) -> None:
    (place.dir / "mine.yaml").write_text("# my own notes\n")


def service_state_elsewhere(place: Place) -> None:
    """The service keeps a state file; this run's default ($STATE_DIRECTORY) names none."""
    service = place.dir / "var-lib" / "state.db"
    service.parent.mkdir()
    service.write_bytes(b"")
    config = yaml.safe_load(place.config.read_text())
    del config["state"]  # the default
    place.config.write_text(yaml.safe_dump(config))
    place.env["STATE_DIRECTORY"] = str(place.dir / "fresh")


def delete_state(place: Place) -> None:
    place.state.unlink()


def delete_wal_and_shm(place: Place) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{place.state}{suffix}").unlink()


def state_kept_its_cycle(place: Place) -> None:
    """What the daemon committed before its -wal was deleted is in the state file."""

    async def read() -> None:
        store = await open_store(place.state, exclusive=False)
        try:
            assert await store.cycles.last() is not None
            assert store.snapshot.org_states(), "the organization's read state was lost"
        finally:
            await store.close()

    asyncio.run(read())


NO_LOCKS = (
    "import errno, fcntl, os\n"
    "def flock(fd, operation):\n"
    "    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n"
    "fcntl.flock = flock\n"
)
SERVICE_HERE = (
    "import os, pathlib\n"
    "from invoice_watch import constants\n"
    "constants.SERVICE_STATE_PATH = pathlib.Path(os.getcwd(), 'var-lib', 'state.db')\n"
)


def signal_while_importing(module: str, signum: int) -> str:
    """A prelude that sends ``signum`` to the process while ``module`` is being
    imported: Ctrl-C or SIGTERM in the first instant of a command."""
    return (
        "import importlib.abc, os, sys\n"
        "class _Interrupt(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == {module!r}:\n"
        f"            os.kill(os.getpid(), {int(signum)})\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Interrupt())\n"
    )


def ascii_output_with_an_invoice(place: Place) -> None:
    """Output in ASCII (PYTHONIOENCODING; LANG=C on Pythons before 3.7); the state holds
    an invoice, whose period is written with an en dash, of an organization whose name
    is not ASCII either."""
    place.write_config(organizations=[{"id": ORG, "name": "Produção"}])
    state_folder(place)
    state_with_an_invoice(place)
    place.env["PYTHONIOENCODING"] = "ascii"


def escaped_dash(place: Place) -> None:
    """What the command wrote holds no character ASCII lacks: the en dash of periods and
    the rules around console messages are escaped (``\\u2013``)."""
    text = place.output.decode("ascii")
    assert re.search(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4})", text), text


def demo_folder(place: Place) -> None:
    """The demo's temporary folder goes under the place's own tmp/."""
    (place.dir / "tmp").mkdir()
    place.env["TMPDIR"] = str(place.dir / "tmp")


def demo_folder_removed(place: Place) -> None:
    left = list((place.dir / "tmp").iterdir())
    assert not left, f"the demo left {left}"


CONFIG = ("-c", "config.yaml")
CASES: dict[str, Case] = {
    # -- the config file (every command that reads one) --
    "check-config/config-is-a-folder": Case(
        ("check-config", *CONFIG),
        2,
        "cannot read the configuration file: Is a directory",
        setup=config_is_a_folder,
    ),
    "status/config-missing": Case(
        ("status", "-c", "nowhere.yaml"), 2, "nowhere.yaml:1:1: cannot read .* No such file"
    ),
    "run-once/config-unreadable": Case(
        ("run", "--once", *CONFIG),
        2,
        "cannot read the configuration file: Permission denied",
        setup=config_unreadable,
        unprivileged=True,
    ),
    "invoices/config-broken": Case(
        ("invoices", *CONFIG),
        2,
        "config.yaml:2:1: invalid YAML",
        setup=config_broken,
    ),
    "test-notify/ca-file-not-a-certificate": Case(
        ("test-notify", *CONFIG),
        (1, 2),
        "mail.ca_file: .*holds no certificate",
        setup=config_unsafe,
    ),
    # -- standard output closed (`| head`) or full --
    "status/stdout-closed": Case(
        ("status", *CONFIG), 0, setup=many_rows, stdout="closed", quick=10
    ),
    "invoices/stdout-closed": Case(
        ("invoices", *CONFIG), 0, setup=many_rows, stdout="closed", quick=10
    ),
    "history/stdout-closed": Case(
        ("history", *CONFIG), 0, setup=state_with_an_invoice, stdout="closed", quick=10
    ),
    "check-config/stdout-closed": Case(("check-config", *CONFIG), 0, stdout="closed"),
    "invoices/started-without-stdout": Case(
        ("invoices", *CONFIG), 0, setup=state_with_an_invoice, stdout="none"
    ),
    "run-once/started-without-stdout-or-stderr": Case(  # its error lines go nowhere
        ("run", "--once", *CONFIG), 1, stdout="none-both"
    ),
    "run-once-dry-run/started-without-stdout-or-stderr": Case(  # its output has no reader
        ("run", "--once", "--dry-run", *CONFIG), 0, stdout="none-both"
    ),
    "status/started-without-stdout-config-missing": Case(
        ("status", "-c", "nowhere.yaml"), 2, "cannot read the configuration file", stdout="none"
    ),
    "run-once-dry-run/stdout-closed": Case(  # ends at its first line, quietly
        ("run", "--once", "--dry-run", *CONFIG),
        0,
        "WARNING .*Production: .*127.0.0.1:9",
        stdout="closed",
    ),
    "simulate/stdout-closed": Case(("simulate", "--port", "0"), 0, stdout="closed", quick=10),
    "demo/stdout-closed": Case(("demo",), 0, stdout="two-lines", quick=5),
    "status/stdout-full": Case(
        ("status", *CONFIG),
        1,
        "cannot write to standard output: No space left",
        setup=state_with_an_invoice,
        stdout="full",
    ),
    "test-notify/stdout-full": Case(
        ("test-notify", *CONFIG),
        1,
        "out: FAILED: cannot write to standard output",
        stdout="full",
    ),
    # -- an output encoding that cannot write every character (A14-7) --
    "invoices/ascii-output": Case(
        ("invoices", *CONFIG), 0, setup=ascii_output_with_an_invoice, after=escaped_dash
    ),
    "status/ascii-output": Case(
        ("status", *CONFIG), 0, setup=ascii_output_with_an_invoice, after=escaped_dash
    ),
    "test-notify/ascii-output": Case(
        ("test-notify", *CONFIG), 0, setup=ascii_output_with_an_invoice, after=escaped_dash
    ),
    # -- text from servers holds what a terminal would act on (A12-15) --
    "status/hostile-text": Case(
        ("status", *CONFIG), 0, setup=state_with_hostile_text, after=nothing_a_terminal_acts_on
    ),
    "history/hostile-text": Case(
        ("history", *CONFIG), 0, setup=state_with_hostile_text, after=nothing_a_terminal_acts_on
    ),
    "invoices/hostile-text": Case(
        ("invoices", *CONFIG), 0, setup=state_with_hostile_text, after=nothing_a_terminal_acts_on
    ),
    # -- the state file --
    "status/no-state-yet": Case(("status", *CONFIG), 1, "no state file at .*state.db yet"),
    "run-once/state-is-a-folder": Case(
        ("run", "--once", *CONFIG), 1, "is a folder, not a file", setup=state_is_a_folder
    ),
    "status/state-is-a-folder": Case(
        ("status", *CONFIG), 1, "is a folder, not a file", setup=state_is_a_folder
    ),
    "run-once/state-is-a-symlink": Case(
        ("run", "--once", *CONFIG), 1, "is a symbolic link", setup=state_is_a_symlink
    ),
    "run-once-dry-run/state-is-a-symlink": Case(
        ("run", "--once", "--dry-run", *CONFIG),
        1,
        "is a symbolic link",
        setup=state_is_a_symlink,
    ),
    "invoices/state-is-a-symlink": Case(
        ("invoices", *CONFIG), 1, "is a symbolic link", setup=state_is_a_symlink
    ),
    "run-once/state-folder-is-a-file": Case(
        ("run", "--once", *CONFIG),
        1,
        "cannot create the state folder",
        setup=state_folder_is_a_file,
    ),
    "run-once/state-not-a-database": Case(
        ("run", "--once", *CONFIG),
        1,
        "cannot be used: file is not a database",
        setup=state_garbage,
    ),
    "status/state-of-another-program": Case(  # names the file (A14-13: it said None)
        ("status", *CONFIG),
        1,
        r"/state/state.db is an SQLite file of another program \(tables: notes\)",
        setup=state_of_another_program,
    ),
    "run-once-dry-run/state-of-a-newer-invoice-watch": Case(
        ("run", "--once", "--dry-run", *CONFIG),
        1,
        r"state file /.*/state/state.db has schema version 99, newer than",
        setup=state_of_a_newer_invoice_watch,
    ),
    "run-once-dry-run/no-state-yet": Case(  # it migrates nothing: it writes nothing
        ("run", "--once", "--dry-run", *CONFIG),
        1,
        "dry run|Production",
        never="migrated",
    ),
    "run-once/state-of-another-user": Case(
        ("run", "--once", *CONFIG),
        1,
        r"belongs to root \(uid 0\), not to .*mode 0666",
        setup=state_of_another_user,
        unprivileged=True,
        needs_root=True,
    ),
    "run-once/state-folder-not-writable": Case(
        ("run", "--once", *CONFIG),
        1,
        "state folder .* is not writable by",
        setup=state_folder_read_only,
        unprivileged=True,
    ),
    "status/state-unreadable": Case(
        ("status", *CONFIG),
        1,
        "cannot read state file .*permission denied .*sudo",
        setup=state_unreadable,
        unprivileged=True,
    ),
    "status/state-shm-of-the-daemon": Case(  # an operator's message, not the daemon's
        ("status", *CONFIG),
        1,
        r"cannot open state file .*state.db-shm .*for nobody .*run this command as the "
        r"daemon's user, or with sudo",
        setup=state_shm_private,
        unprivileged=True,
        needs_root=True,
    ),
    "history/state-folder-closed": Case(
        ("history", *CONFIG),
        1,
        "cannot reach state file .*permission denied",
        setup=state_folder_closed,
        unprivileged=True,
    ),
    "run-once/state-held-by-a-daemon": Case(
        ("run", "--once", *CONFIG),
        1,
        "in use by another invoice-watch daemon",
        setup=state_held,
    ),
    "run-once/file-system-without-locks": Case(
        ("run", "--once", *CONFIG), 1, "cannot lock files .*local disk", prelude=NO_LOCKS
    ),
    "run-once/disk-full": Case(("run", "--once", *CONFIG), 1, "the disk is full", tiny_disk=True),
    "run-once/file-size-limit": Case(
        ("run", "--once", *CONFIG),
        1,
        "I/O error .*has space .*file size limit",
        limit_file_size=4096,
    ),
    "run-once/second-state-beside-the-service": Case(
        ("run", "--once", *CONFIG),
        2,
        r"does not exist yet, while .*var-lib/state.db \(the invoice-watch service.s "
        r"state file\) holds one",
        setup=service_state_elsewhere,
        prelude=SERVICE_HERE,
    ),
    "run/state-deleted-under-the-daemon": Case(
        ("run", *CONFIG),
        1,
        "state.db was deleted while this daemon was running",
        setup=lambda place: place.write_config(poll={"interval": "1s"}),
        during=delete_state,
        quick=15,
    ),
    "run/state-wal-deleted-under-the-daemon": Case(  # A12-13
        ("run", *CONFIG),
        1,
        r"state.db-wal, the write-ahead log SQLite keeps beside state file .* was deleted",
        setup=lambda place: place.write_config(poll={"interval": "1s"}),
        during=delete_wal_and_shm,
        quick=15,
        after=state_kept_its_cycle,
    ),
    # -- arguments --
    "invoices/unknown-org": Case(
        ("invoices", "--org", "nope", *CONFIG),
        2,
        f"--org nope: no such organization; known: {ORG} \\(Production\\)",
        setup=state_with_an_invoice,
    ),
    "invoices/unknown-status": Case(
        ("invoices", "--status", "BOGUS", *CONFIG),
        2,
        "--status BOGUS: no such invoice status; Atlas's are PENDING, CLOSED",
        setup=state_with_an_invoice,
    ),
    "invoices/config-before-the-command": Case(  # `invoice-watch -c FILE invoices` (A14-13)
        ("-c", "config.yaml", "invoices"), 0, "", setup=state_with_an_invoice
    ),
    "status/config-empty": Case(  # `-c "$UNSET"` is no reason to read another config
        ("status", "-c", ""), 2, "-c/--config: the path is empty; name the config file"
    ),
    "demo/config-given": Case(("-c", "config.yaml", "demo"), 2, "demo reads no config file"),
    "history/limit-zero": Case(
        ("history", "--limit", "0", *CONFIG), 2, "--limit: 0 is not between 1 and"
    ),
    "test-notify/unknown-notifier": Case(
        ("test-notify", "nope", *CONFIG), 2, r"no notifier named 'nope' \(configured: out\)"
    ),
    "simulate/port-out-of-range": Case(
        ("simulate", "--port", "70000"), 2, "--port: 70000 is not between 0 and 65535"
    ),
    "simulate/port-in-use": Case(
        ("simulate", "--port", "$BUSY_PORT"),
        1,
        "the port is in use; choose another",
        setup=port_in_use,
    ),
    "simulate/port-privileged": Case(
        ("simulate", "--port", "80"), 1, "ports below 1024 need root", unprivileged=True
    ),
    "simulate/scenario-missing": Case(
        ("simulate", "--scenario", "nowhere.yaml"), 2, "nowhere.yaml: cannot read scenario"
    ),
    "simulate/scenario-broken": Case(
        ("simulate", "--scenario", "scenario.yaml"),
        2,
        "scenario.yaml:2:1: not valid YAML",
        setup=scenario_broken,
    ),
    "simulate/write-config-folder-closed": Case(
        ("simulate", "--port", "0", "--write-config", "closed/sim.yaml"),
        1,
        "cannot write .*closed.*Permission denied",
        setup=write_config_folder_closed,
        unprivileged=True,
    ),
    "simulate/write-config-is-a-device": Case(  # not read without end (A14-8)
        ("simulate", "--port", "0", "--write-config", "/dev/zero"),
        2,
        "--write-config /dev/zero: it is a character device, not a file",
        quick=10,
    ),
    "simulate/write-config-is-a-pipe": Case(  # `--write-config /dev/stdout | cat`: no hang
        ("simulate", "--port", "0", "--write-config", "/dev/stdout"),
        2,
        r"--write-config /dev/stdout: it is a named pipe \(FIFO\), not a file",
        quick=10,
    ),
    "simulate/write-config-onto-a-folder": Case(
        ("simulate", "--port", "0", "--write-config", "closed"),
        2,
        "--write-config closed: it is a folder, not a file; name a file in it, e.g. closed/sim",
        setup=write_config_folder_closed,
    ),
    "simulate/write-config-folder-missing": Case(  # names the file, not its temporary one
        ("simulate", "--port", "0", "--write-config", "nowhere/sim.yaml"),
        1,
        r"cannot write nowhere/sim.yaml: No such file or directory; check --write-config$",
    ),
    "simulate/scenario-is-a-device": Case(
        ("simulate", "--scenario", "/dev/zero"),
        2,
        "/dev/zero: cannot read scenario: it is a character device, not a file; name a",
        quick=10,
    ),
    "simulate/scenario-not-a-mapping": Case(
        ("simulate", "--scenario", "passwd"),
        2,
        "passwd: not a scenario: a scenario is a mapping of orgs, invoices and timeline",
        setup=not_a_scenario,
    ),
    "simulate/write-config-over-a-foreign-file": Case(
        ("simulate", "--port", "0", "--write-config", "mine.yaml"),
        2,
        "was not written by `invoice-watch simulate`",
        setup=foreign_file,
    ),
    "demo/bad-slack-webhook-url": Case(
        ("demo",),
        2,
        r"demo: \$SLACK_WEBHOOK_URL: .*https://",
        setup=lambda place: place.env.update(SLACK_WEBHOOK_URL="not-a-url"),
    ),
    # -- Ctrl-C --
    "run-once/interrupted": Case(
        ("run", "--once", *CONFIG), 0, setup=hanging_atlas, interrupt_when="connect", quick=10
    ),
    "simulate/interrupted": Case(
        ("simulate", "--port", "0"), 0, interrupt_when="listening", quick=10
    ),
    "demo/interrupted": Case(
        ("demo",), 0, setup=demo_folder, interrupt_when="[demo", quick=10, after=demo_folder_removed
    ),
    "demo/terminated": Case(
        ("demo",),
        0,
        setup=demo_folder,
        interrupt_when="[demo",
        sends=signal.SIGTERM,
        quick=10,
        after=demo_folder_removed,
    ),
    "simulate/terminated": Case(
        ("simulate", "--port", "0"), 0, interrupt_when="listening", sends=signal.SIGTERM, quick=10
    ),
    "run/terminated": Case(
        ("run", *CONFIG), 0, setup=hanging_atlas, interrupt_when="connect", sends=signal.SIGTERM
    ),
    "status/interrupted-while-importing": Case(
        ("status", *CONFIG),
        0,
        prelude=signal_while_importing("invoice_watch.redact", signal.SIGINT),
    ),
    "status/terminated-while-importing": Case(
        ("status", *CONFIG),
        0,
        prelude=signal_while_importing("invoice_watch.redact", signal.SIGTERM),
    ),
    "run/terminated-while-starting": Case(
        ("run", *CONFIG),
        0,
        prelude=signal_while_importing("invoice_watch.app", signal.SIGTERM),
    ),
    # A SIGHUP (a reload sent right after a restart) before `run` takes the signal: the
    # daemon runs on (it ended silently, exit 129: attack r6), and stops on SIGTERM.
    "run/hung-up-while-starting": Case(
        ("run", *CONFIG),
        0,
        setup=hanging_atlas,
        prelude=signal_while_importing("invoice_watch.app", signal.SIGHUP),
        interrupt_when="connect",
        sends=signal.SIGTERM,
    ),
    # `run --once` takes it as the terminal closing: the run stops, exit 0.
    "run-once/hung-up-while-starting": Case(
        ("run", "--once", *CONFIG),
        0,
        setup=hanging_atlas,
        prelude=signal_while_importing("invoice_watch.app", signal.SIGHUP),
        quick=10,
    ),
    # Any other command keeps SIGHUP's default: the terminal closed ends it.
    "status/hung-up-while-importing": Case(
        ("status", *CONFIG),
        -signal.SIGHUP,
        prelude=signal_while_importing("invoice_watch.redact", signal.SIGHUP),
    ),
    # -- the daemon helper's part of issue 14 §1: `http.listen` errors (app.py/health.py) --
    "run/http-listen-port-privileged": Case(
        ("run", *CONFIG),
        1,
        r"http.listen: cannot listen on 127.0.0.1:80: ",
        setup=http_port_privileged,
        unprivileged=True,
    ),
    "run/http-listen-port-in-use": Case(
        ("run", *CONFIG),
        1,
        r"http.listen: cannot listen on 127.0.0.1:\d+: the port is already in use",
        setup=http_port_in_use,
    ),
}


@pytest.fixture
def place() -> Iterator[Place]:
    """A folder others may enter (the unprivileged runs), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="invoice-watch-op-"))
    folder.chmod(0o755)
    hang = socket.create_server(("127.0.0.1", 0))
    where = Place(folder, hang.getsockname()[1])
    where.holds.append(hang)
    where.write_config()
    try:
        yield where
    finally:
        for held in where.holds:
            held.close() if hasattr(held, "close") else os.close(held)
        for path in (folder, *folder.rglob("*")):  # chmod 0 folders would stop rmtree
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in CASES])
def test_command_fault_ends_without_traceback(name: str, place: Place) -> None:
    case = CASES[name]
    if case.needs_root and not ROOT:
        pytest.skip("making a file of another user needs root")
    case.setup(place)
    argv = [place.env.get(a[1:], a) if a.startswith("$") else a for a in case.argv]
    env = {**os.environ, **place.env, "PYTHONUNBUFFERED": "1"}
    interpreter = sys.executable
    if case.unprivileged and ROOT:
        found = unprivileged_python()
        if found is None:
            pytest.skip(f"no Python that user {NOBODY} may run (and import this project)")
        interpreter, env["PYTHONPATH"] = found
    python = (
        [interpreter, "-c", case.prelude + RUN_MAIN]
        if case.prelude
        else [interpreter, "-m", "invoice_watch"]
    )
    if case.tiny_disk:
        python = [*tiny_disk(place), *python]
    stdout: Any = subprocess.PIPE
    if case.stdout == "full":
        stdout = open(os.devnull if not Path("/dev/full").exists() else "/dev/full", "w")  # noqa: SIM115
    options: dict[str, Any] = {}
    if case.unprivileged and ROOT:
        options.update(user=NOBODY, group=NOBODY, extra_groups=[])
    if case.limit_file_size is not None:
        size = case.limit_file_size
        options["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    stderr: Any = subprocess.PIPE
    if case.stdout == "none":
        stdout = subprocess.DEVNULL
        options["preexec_fn"] = lambda: os.close(1)
    if case.stdout == "none-both":
        stdout = stderr = subprocess.DEVNULL
        options["preexec_fn"] = lambda: os.closerange(1, 3)
    proc = subprocess.Popen(
        [*python, *argv],
        cwd=place.dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        **options,
    )
    try:
        faulted = _apply_fault(case, proc, place)
        out, err = _finish(proc)
        ended = time.monotonic() - faulted
        place.output = out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr, stdout if case.stdout == "full" else None):
            if stream is not None:
                stream.close()
    text = err.decode(errors="replace")
    shown = out.decode(errors="replace") + text
    for sign in ("Traceback", "Exception ignored", "KeyboardInterrupt", "CancelledError"):
        assert sign not in shown, shown
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert proc.returncode in codes, f"exit {proc.returncode}, expected {codes}:\n{shown}"
    if case.says:
        assert re.search(case.says, text), f"stderr lacks {case.says!r}:\n{text}"
    elif case.stdout in ("closed", "two-lines", "none", "none-both"):
        assert text == "", f"a closed output ends the command quietly:\n{text}"
    if case.never:
        assert not re.search(case.never, text), f"stderr says {case.never!r}:\n{text}"
    if case.quick is not None:
        assert ended < case.quick, f"took {ended:.1f}s after its fault"
    if case.after is not None:
        case.after(place)


@functools.cache
def unprivileged_python() -> tuple[str, str] | None:
    """A Python that user ``nobody`` may run, and the PYTHONPATH that lets it import this
    project and its dependencies: this interpreter, unless it lives in a private folder
    (pyenv under /root), else the system's Python of the same version."""
    path = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), sysconfig.get_paths()["purelib"]]
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")):
        if candidate is None:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import invoice_watch.cli, aiohttp"],
                env={**os.environ, "PYTHONPATH": path},
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                capture_output=True,
                timeout=60,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate, path
    return None


def tiny_disk(place: Place) -> list[str]:
    """A command prefix that runs it with the state folder on a 16 KiB tmpfs, mounted in
    a mount namespace of its own (gone with the process); skips where that is denied."""
    place.state.parent.mkdir()
    probe = (
        subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "size=16k",
                "tmpfs",
                str(place.state.parent),
            ],
            capture_output=True,
        )
        if shutil.which("unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("mounting a small tmpfs (a full disk) is not permitted here")
    script = 'mount -t tmpfs -o size=16k tmpfs "$0" && exec "$@"'
    return [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(place.state.parent),
    ]


RUN_MAIN = (
    "\nimport runpy\nrunpy.run_module('invoice_watch', run_name='__main__', alter_sys=True)\n"
)


def _apply_fault(case: Case, proc: subprocess.Popen[bytes], place: Place) -> float:
    """Cause the fault that happens while the command runs; returns when it happened."""
    if case.stdout == "closed":
        assert proc.stdout is not None
        proc.stdout.close()
    elif case.stdout == "two-lines":
        assert proc.stdout is not None
        for _ in range(2):
            assert proc.stdout.readline(), "the command ended before two lines"
        proc.stdout.close()
    elif case.interrupt_when == "connect":
        hang = place.holds[0]
        hang.settimeout(EXIT_TIMEOUT)
        conn, _ = hang.accept()  # the cycle has started reading Atlas
        place.holds.append(conn)
        proc.send_signal(case.sends)
    elif case.interrupt_when:
        assert proc.stdout is not None
        _wait_for(proc.stdout, case.interrupt_when)
        proc.send_signal(case.sends)
    elif case.during is not None:
        assert proc.stderr is not None
        _wait_for(proc.stderr, "cycle:")
        case.during(place)
    return time.monotonic()


def _wait_for(stream: Any, text: str) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while time.monotonic() < deadline:
        line = stream.readline()
        assert line, f"the command ended before printing {text!r}"
        if text.encode() in line:
            return
    raise AssertionError(f"no {text!r} within {EXIT_TIMEOUT}s")


def _finish(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    out = b""
    if proc.stdout is not None and not proc.stdout.closed:
        stdout_data, err = proc.communicate(timeout=EXIT_TIMEOUT)
        out = stdout_data or b""
    else:
        proc.wait(timeout=EXIT_TIMEOUT)
        err = proc.stderr.read() if proc.stderr is not None else b""
    return out, err


# -- admin commands read the daemon's state (issue 14 §3) --------------------------------


def service_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The service's layout, under tmp_path: its state file (one invoice in it) at the
    documented location, and /etc/invoice-watch/config.yaml without state.path."""
    from invoice_watch import constants

    service = tmp_path / "var/lib/invoice-watch/state.db"
    monkeypatch.setattr(constants, "SERVICE_STATE_PATH", service)
    place = Place(tmp_path, 0)
    place.write_config()
    place.state.parent.mkdir()
    state_with_an_invoice(place)
    service.parent.mkdir(parents=True)
    place.state.rename(service)
    etc = tmp_path / "etc/invoice-watch"
    etc.mkdir(parents=True)
    config = yaml.safe_load(place.config.read_text())
    del config["state"]
    (etc / "config.yaml").write_text(yaml.safe_dump(config))
    return service, etc / "config.yaml"


def test_the_services_config_names_its_state_for_the_daemon_and_a_shell(
    tmp_path, monkeypatch, capsys
):
    """The documented service config sets state.path to the service's file: the daemon
    ($STATE_DIRECTORY set) and `invoice-watch status -c /etc/invoice-watch/config.yaml`
    from a shell (nothing exported) use that one file."""
    from invoice_watch.cli import main
    from invoice_watch.config import load_file

    service, config = service_install(tmp_path, monkeypatch)
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "state": {"path": str(service)}}))
    assert load_file(config).state.path == service
    assert load_file(config, env={"STATE_DIRECTORY": str(service.parent)}).state.path == service
    assert main(["invoices", "-c", str(config)]) == 0
    assert "1 invoice(s)" in capsys.readouterr().out
    assert not (config.parent / "invoice-watch.db").exists()


def test_a_default_that_names_no_file_never_reads_or_starts_another(tmp_path, monkeypatch, capsys):
    """A config without state.path whose default (beside the config) names no file,
    while the service's state exists: `status` does not read a state that `run` with
    this config would not use, and `run` does not start a second one; both name the
    two files and the setting to write, and nothing is created."""
    from invoice_watch.cli import main

    service, config = service_install(tmp_path, monkeypatch)
    beside = config.parent / "invoice-watch.db"
    for argv in (["status"], ["status", "--check"], ["invoices"], ["history"]):
        assert main([*argv, "-c", str(config)]) == 1
        err = capsys.readouterr().err
        assert f"no state file at {beside} (beside the config file) yet, while" in err
        assert f"{service} (the invoice-watch service's state file) holds one" in err
        assert f"set state.path in {config} to {service}" in err
    for argv in (["run"], ["run", "--once"], ["run", "--once", "--baseline"]):
        assert main([*argv, "-c", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"state file {beside} (beside the config file) does not exist yet" in err
        assert f"Set state.path in {config} to {service} to go on with it" in err
    assert main(["run", "--once", "--dry-run", "-c", str(config)]) == 2
    assert main(["check-config", "-c", str(config)]) == 0
    captured = capsys.readouterr()
    assert f"State: {beside} (default: beside the config file)" in captured.out
    assert f"warning: state file {beside} (beside the config file) does not exist" in (captured.err)
    assert not beside.exists()


def test_the_default_state_never_depends_on_which_files_exist(tmp_path, monkeypatch):
    """SPEC §6: $STATE_DIRECTORY/state.db when set, else invoice-watch.db beside the
    config, whether or not the service's file exists (A14-2 b: a file beside the config
    used to be swapped for the service's once that appeared)."""
    from invoice_watch.config import load_file

    service, config = service_install(tmp_path, monkeypatch)
    assert load_file(config).state.path == config.parent / "invoice-watch.db"
    service.unlink()
    assert load_file(config).state.path == config.parent / "invoice-watch.db"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "units-own"))
    assert load_file(config).state.path == tmp_path / "units-own/state.db"


def test_an_existing_state_beside_the_config_is_never_swapped_for_the_services(
    tmp_path, monkeypatch, capsys
):
    """A14-2 b: `run --once -c user/config.yaml` made user/invoice-watch.db; then the
    service's state appeared. `invoices` and `run` with that config go on with the
    user's file, not the service's."""
    from invoice_watch.cli import main
    from invoice_watch.config import load_file

    _, config = service_install(tmp_path, monkeypatch)
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text(config.read_text())
    place = Place(tmp_path / "mine", 0)
    place.dir.mkdir()
    place.write_config()
    place.state.parent.mkdir()
    state_with_an_invoice(place)
    place.state.rename(user / "invoice-watch.db")
    assert load_file(user / "config.yaml").state.path == user / "invoice-watch.db"
    assert main(["status", "-c", str(user / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Production" in out
    assert main(["invoices", "-c", str(user / "config.yaml")]) == 0
    assert "1 invoice(s)" in capsys.readouterr().out
    assert main(["check-config", "-c", str(user / "config.yaml")]) == 0
    captured = capsys.readouterr()
    assert f"State: {user / 'invoice-watch.db'} (default: beside the config file)" in (captured.out)
    assert "warning" not in captured.err


def test_a_baseline_from_a_shell_is_not_lost_to_the_services_default(tmp_path, monkeypatch, capsys):
    """A14-2 a: `run --once --baseline -c etc/config.yaml` (no state.path) recorded
    etc/invoice-watch.db; the service ($STATE_DIRECTORY) would start var/state.db
    afresh and send every firing alert again. It refuses, naming both, and creates
    nothing."""
    from invoice_watch.cli import main

    service, config = service_install(tmp_path, monkeypatch)
    service.rename(config.parent / "invoice-watch.db")  # the baseline's file
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "unit"))
    assert main(["run", "--once", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"state file {tmp_path}/unit/state.db ($STATE_DIRECTORY) does not exist yet" in err
    assert f"{config.parent}/invoice-watch.db (beside the config file) holds one" in err
    assert not (tmp_path / "unit").exists()


def test_a_daemon_on_its_default_state_reloads_after_the_service_state_appears(place):
    """A14-2 c: a daemon on the default state path (beside its config) keeps taking
    reloads after the service's state file appears; the default is not recomputed
    into another file."""
    config = yaml.safe_load(place.config.read_text())
    del config["state"]
    config["poll"] = {"interval": "1h"}
    place.config.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE_HERE + RUN_MAIN, "run", *CONFIG],
        cwd=place.dir,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        _wait_for(proc.stderr, "cycle:")
        service = place.dir / "var-lib" / "state.db"
        service.parent.mkdir()
        service.write_bytes(b"")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + EXIT_TIMEOUT
        line = b""
        while time.monotonic() < deadline and b"config" not in line:
            line = proc.stderr.readline()
            assert line, "the daemon ended"
        assert b"configuration reloaded" in line and b"nothing changed" in line, line
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=EXIT_TIMEOUT)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert (place.dir / "invoice-watch.db").exists()


# -- usage errors and help (issue 14 §2, §5) ---------------------------------------------


def test_every_command_and_option_explains_itself():
    import argparse

    from invoice_watch.cli.parser import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(helps) == set(commands.choices)
    for name, sub in commands.choices.items():
        assert helps[name], f"{name} has no summary"
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = commands.choices["history"].format_help()
    assert "--limit N" in text and "newest" in text
    simulate = commands.choices["simulate"].format_help()
    assert "address to listen on" in simulate and "TCP port" in simulate


async def test_invoices_by_configured_name_and_status_in_any_case(tmp_path, capsys):
    from invoice_watch import ops
    from tests.conftest import make_config

    place = Place(tmp_path, 0)
    place.state.parent.mkdir()
    await asyncio.to_thread(state_with_an_invoice, place)
    config = make_config(
        tmp_path,
        state={"path": str(place.state)},
        organizations=[{"id": ORG, "name": "Production"}],
    )
    import io

    out = io.StringIO()
    assert await ops.invoices(config, org="Production", status="pending", out=out) == 0
    assert "1 invoice(s)" in out.getvalue()


# -- simulate --write-config (issue 14 §5) ------------------------------------------------


async def test_simulate_writes_a_config_that_works_and_keeps_its_keys(tmp_path, capsys):
    """The written config reaches the simulator with its keys and organizations, its
    timeline starts at the first request (still ahead when the daemon arrives), and
    the keys survive a restart of the simulator."""
    import io

    from invoice_watch.app import App
    from invoice_watch.config import load_file
    from invoice_watch.simulator import serve

    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "orgs": [{"name": "Production", "id": ORG}],
                "invoices": [
                    {
                        "name": "due",
                        "org": "Production",
                        "period": -1,
                        "status": "CLOSED",
                        "amount": 100,
                    }
                ],
                "timeline": [{"at": 0, "invoice": "due", "set_status": "FAILED"}],
            }
        )
    )
    path = tmp_path / "sim.yaml"

    class Out(io.StringIO):
        """What serve prints; ``started`` is set once it says the timeline waits."""

        def __init__(self) -> None:
            super().__init__()
            self.started = asyncio.Event()

        def write(self, text: str) -> int:
            if text.startswith("Timeline:"):
                self.started.set()
            return super().write(text)

    async def start() -> tuple[asyncio.Task[None], Out]:
        out = Out()
        task = asyncio.create_task(
            serve(str(scenario), "127.0.0.1", 0, out, write_config=str(path))
        )
        await asyncio.wait_for(out.started.wait(), 10)
        for _ in range(20):
            await asyncio.sleep(0)
        assert "t+0s" not in out.getvalue()  # no request yet: the timeline waits
        return task, out

    task, out = await start()
    try:
        assert f"Config written to {path}" in out.getvalue()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        config = load_file(path)
        assert [o.id for o in config.organizations] == [ORG]
        assert config.state.path == tmp_path / "sim.state.db"
        for _ in range(2):  # the first read starts the timeline: FAILED at t+0
            async with App(config) as app:
                await run_once(app)
        assert "FIRING: failed-charge" in capsys.readouterr().out
        assert "t+0s" in out.getvalue()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    keys = yaml.safe_load(path.read_text())["atlas"]["auth"]
    task, _ = await start()  # restarted: same keys
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert yaml.safe_load(path.read_text())["atlas"]["auth"] == keys


# -- the billing period as people read it (issue 14 §5) -----------------------------------


def test_period_shows_the_last_day_not_atlas_exclusive_end():
    from datetime import UTC, date, datetime

    from invoice_watch import format as fmt

    october = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    assert fmt.period(*october) == "2026-10-01 – 2026-10-31"
    assert fmt.period(date(2026, 2, 1), date(2026, 3, 1)) == "2026-02-01 – 2026-02-28"
    assert fmt.period(date(2026, 2, 1), date(2026, 2, 1)) == "2026-02-01 – 2026-02-01"
    assert fmt.period(None, date(2026, 2, 1)) == "—"


@pytest.mark.parametrize(
    ("end", "last"),
    [
        ("2026-11-01T00:00:00+00:00", "2026-10-31"),  # Atlas's usual exclusive end
        ("2026-10-31T23:59:59+00:00", "2026-10-31"),  # the last second of October
        ("2026-10-31T12:00:00+00:00", "2026-10-31"),  # part of October 31 is billed
    ],
)
def test_a_message_and_the_invoices_table_show_one_last_day(tmp_path, end, last):
    """A14-13: the billing period is computed once: a message (from the alert event,
    which keeps dates) and the `invoices` table (from the stored datetimes) show the
    same last day, whatever time of day the period ends."""
    from datetime import UTC, datetime

    from invoice_watch import format as fmt
    from invoice_watch.alerts import EventFactory
    from invoice_watch.notify.render import plain
    from invoice_watch.rules import Condition
    from invoice_watch.types import EventKind
    from tests.conftest import make_config

    config = make_config(tmp_path)
    invoice = inv(
        1,
        org=config.organizations[0].id,
        start=datetime(2026, 10, 1, tzinfo=UTC),
        end=datetime.fromisoformat(end),
    )
    rule = config.rules[0]
    condition = Condition("k", rule.name, invoice.org_id, invoice.org_id, "s", invoice)
    event = EventFactory(config).event(EventKind.FIRING, rule, condition, invoice.end_date)
    shown = f"2026-10-01 – {last}"
    assert fmt.period(invoice.start_date, invoice.end_date) == shown  # the table's
    assert shown in plain.text([event])  # the message's


async def test_invoices_table_prints_the_last_day_of_the_period(tmp_path):
    import io

    from invoice_watch import ops
    from tests.conftest import make_config

    place = Place(tmp_path, 0)
    place.state.parent.mkdir()
    await asyncio.to_thread(state_with_an_invoice, place)  # November 2026
    config = make_config(tmp_path, state={"path": str(place.state)})
    out = io.StringIO()
    assert await ops.invoices(config, out=out) == 0
    assert "2026-11-01 – 2026-11-30" in out.getvalue()
    assert "2026-12-01" not in out.getvalue()


# -- a plain `pytest` says what it skipped (issue 14 §5) ----------------------------------


def test_pytest_says_how_many_conformance_tests_it_skipped(tmp_path):
    """A checkout without ../shared: one line names the skipped spec tests and why."""
    repo = Path(__file__).resolve().parent.parent
    copy = tmp_path / "checkout" / "repo"
    shutil.copytree(repo / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo / "pyproject.toml", copy)
    shutil.copytree(
        repo / "invoice_watch", copy / "invoice_watch", ignore=shutil.ignore_patterns("__pycache__")
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/test_conformance.py",
            "tests/test_conformance_client.py",
        ],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(
        r"\n(\d+) spec conformance test\(s\) SKIPPED: they read "
        r"\.\./shared/atlas-openapi/invoices\.openapi\.json, which is not beside",
        run.stdout,
    ), run.stdout


def test_secrets_from_a_shell_are_read_where_the_unit_reads_them(tmp_path, monkeypatch):
    """The systemd layout keeps secrets in /etc/invoice-watch/credentials (the unit's
    LoadCredential= source); from a root shell, without $CREDENTIALS_DIRECTORY, the
    config's relative `private_key_file` finds them there, as the daemon does."""
    from invoice_watch.config import DigestAuth, load_file

    etc = tmp_path / "etc/invoice-watch"
    (etc / "credentials").mkdir(parents=True, mode=0o700)
    (etc / "credentials/atlas-private-key").write_text("from-credentials\n")
    place = Place(etc, 0)
    place.write_config(
        atlas={"auth": {"public_key": "pub", "private_key_file": "atlas-private-key"}}
    )
    auth = load_file(place.config).atlas.auth
    assert isinstance(auth, DigestAuth) and auth.private_key.get() == "from-credentials"
    (etc / "atlas-private-key").write_text("beside\n")  # a file beside the config wins
    auth = load_file(place.config).atlas.auth
    assert isinstance(auth, DigestAuth) and auth.private_key.get() == "beside"
    run = tmp_path / "run-credentials"  # under systemd, only $CREDENTIALS_DIRECTORY
    run.mkdir()
    (run / "atlas-private-key").write_text("from-systemd\n")
    auth = load_file(place.config, env={"CREDENTIALS_DIRECTORY": str(run)}).atlas.auth
    assert isinstance(auth, DigestAuth) and auth.private_key.get() == "from-systemd"


# -- signals at odd moments (A14-11) ------------------------------------------------------


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"]
)
async def test_run_once_stopped_with_a_message_pending_says_so_and_exits_1(place, signum):
    """`run --once` whose FIRING cannot be delivered yet (Slack refuses connections, so
    it waits for a retry): Ctrl-C, SIGTERM or SIGHUP end it as the daemon's stop does,
    within its 10 s, saying what is still waiting; SPEC §7: pending after --once is 1."""
    from invoice_watch.simulator import Simulator
    from invoice_watch.simulator.scenario import parse_scenario

    scenario = parse_scenario(
        {
            "orgs": [{"name": "Production", "id": ORG}],
            "invoices": [{"name": "due", "org": "Production", "period": -1, "status": "FAILED"}],
        }
    )
    async with Simulator(scenario) as sim:
        place.write_config(
            atlas={
                "base_url": sim.base_url,
                "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            },
            notifiers={"team": {"type": "slack", "webhook_url": "http://127.0.0.1:9/hook"}},
            rules=[{"name": "failed", "type": "invoice_status", "notify": ["team"]}],
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "invoice_watch",
            "run",
            "--once",
            *CONFIG,
            cwd=place.dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None and proc.stdout is not None
        try:
            seen = b""
            while b"cycle:" not in seen:
                line = await asyncio.wait_for(proc.stderr.readline(), EXIT_TIMEOUT)
                assert line, f"ended before its cycle:\n{seen.decode()}"
                seen += line
            await asyncio.sleep(0.5)  # its first delivery attempt was refused
            proc.send_signal(signum)
            began = time.monotonic()
            rest, _ = await asyncio.wait_for(
                asyncio.gather(proc.stderr.read(), proc.stdout.read()), EXIT_TIMEOUT
            )
            await proc.wait()
            ended = time.monotonic() - began
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = (seen + rest).decode()
    assert "Traceback" not in text
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{text}"
    assert "error: 1 notification(s) stopped before they could be delivered; they stay in " in (
        text
    )
    assert ended < 10, f"took {ended:.1f}s after the signal"


def test_a_reader_gone_at_the_end_does_not_hide_a_failure(place, monkeypatch):
    """A14-12: `run --once | head -1` whose run failed (here: Atlas unreadable) exits 1,
    although the last flush of its output finds the reader gone."""
    import errno
    import io

    from invoice_watch.cli import main

    class ReaderGone(io.StringIO):
        def flush(self) -> None:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert main(["run", "--once", "-c", str(place.config)]) == 1


async def test_tables_escape_what_a_terminal_acts_on_whatever_the_stream(tmp_path):
    """ops' tables escape server text themselves (a cell is one line), not only the
    command line's stdout: `status` written to any stream shows no control character."""
    import io

    from invoice_watch import ops
    from tests.conftest import make_config

    place = Place(tmp_path, 0)
    await asyncio.to_thread(state_with_hostile_text, place)
    config = make_config(tmp_path, state={"path": str(place.state)})
    for command in (ops.status, ops.history, ops.invoices):
        out = io.StringIO()
        assert await command(config, out=out) == 0
        place.output = out.getvalue().encode()
        nothing_a_terminal_acts_on(place)


@pytest.mark.parametrize("argv", [("simulate", "--port", "0")], ids=["simulate"])
def test_a_command_started_with_sighup_ignored_keeps_it_ignored(argv: tuple[str, ...]) -> None:
    """Under ``nohup`` (SIGHUP ignored as the process starts) a command runs on when the
    terminal closes, as it did before SIGHUP was kept while a command starts: keeping
    it replaced the ignored action, and the command then got SIGHUP's default (exit 129:
    attack on hangup.py). A SIGHUP, then a SIGTERM: the command ends on the second, 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoice_watch", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup does
    )
    try:
        assert proc.stdout is not None
        _wait_for(proc.stdout, "listening")
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
