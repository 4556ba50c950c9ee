"""The SQLite backend of the state (invoice_watch.store.sqlite): the file (mode, WAL,
links, owners, its lock, a file that goes away), migrations, SQLite's faults and limits,
the copy --dry-run reads."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from dataclasses import replace
from datetime import timedelta

import pytest

from invoice_watch.errors import StateError, StateFileGoneError, StateLockedError
from invoice_watch.store import OrgWrite
from invoice_watch.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from invoice_watch.store.sqlite.store import SqliteStore
from invoice_watch.types import Part
from tests.conftest import NOW, ORG_A, ORG_B, inv
from tests.test_store import ROUTES, commit, event, firing


async def test_store_file_mode_is_0600_and_wal(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    await store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_store_second_daemon_is_refused(tmp_path, open_state):
    path = tmp_path / "state.db"
    first = await open_state(path)
    with pytest.raises(StateLockedError, match="in use by another invoice-watch"):
        await open_state(path)
    reader = await open_state(path, exclusive=False)  # operator commands may read
    await reader.close()
    await first.close()
    second = await open_state(path)  # released on close
    await second.close()


async def test_store_open_cancelled_midway_closes_the_file_and_lets_go_of_its_lock(
    tmp_path, open_state
):
    """Ctrl-C while the state file is being opened (a demo stopped at once): the opening
    thread is waited for and the file closed, so nothing writes it afterwards (the demo
    then removes its folder) and a new daemon can take it at once."""
    path = tmp_path / "state.db"
    for _ in range(5):
        opening = asyncio.create_task(SqliteStore.open(path))
        await asyncio.sleep(0)  # the opening thread is under way
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        store = await open_state(path)  # the lock was let go
        await store.close()


async def test_store_read_only_directory_is_a_clear_error(tmp_path, open_state):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only directory is still writable")
        with pytest.raises(StateError, match="cannot create or open state file"):
            await open_state(folder / "state.db")
    finally:
        folder.chmod(0o700)


async def test_store_unusable_folder_is_a_clear_error(tmp_path, open_state):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(StateError, match=r"cannot create the state folder .*in the way"):
        await open_state(blocker / "state.db")


async def test_store_corrupted_file_is_a_clear_error(tmp_path, open_state):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StateError, match="cannot be used"):
        await open_state(path)
    assert path.read_bytes().startswith(b"this is not")  # untouched


async def test_store_foreign_sqlite_file_is_refused(tmp_path, open_state):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="another program"):
        await open_state(path)


async def test_store_newer_schema_is_refused(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="upgrade invoice-watch"):
        await open_state(path, exclusive=False)


async def test_store_disk_full_rolls_back_file_and_cache(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    await commit(store, OrgWrite(ORG_A, True, upserts=[inv(1)]))
    # SQLite's own size limit produces the real "database or disk is full" error.
    pages = store.database.connection.execute("PRAGMA page_count").fetchone()[0]
    store.database.connection.execute(f"PRAGMA max_page_count={pages}")
    big = [inv(n, cents=n) for n in range(2, 3000)]
    with pytest.raises(StateError, match="full"):
        await commit(store, OrgWrite(ORG_A, True, upserts=big), transitions=[firing()])
    assert set(store.snapshot.get(ORG_A)) == {inv(1).id}  # cache unchanged
    assert store.alerts.firing() == {}
    assert await store.outbox.due(NOW + timedelta(days=1)) == []


async def test_store_errors_are_chained_to_the_sqlite_or_os_error_behind_them(tmp_path, open_state):
    """errors.py: a library's exception is converted where our code calls it with
    ``raise ... from exc``; the StateError says what to do, and its cause keeps what
    SQLite or the OS said (no secret is in either: paths and SQLite's own words)."""
    corrupted = tmp_path / "corrupted.db"
    corrupted.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StateError) as opening:
        await open_state(corrupted)
    assert isinstance(opening.value.__cause__, sqlite3.DatabaseError)

    held = tmp_path / "held.db"
    await open_state(held)
    with pytest.raises(StateLockedError) as locked:
        await open_state(held)
    assert isinstance(locked.value.__cause__, BlockingIOError)

    store = await open_state(tmp_path / "state.db")
    store.database.connection.execute("DROP TABLE alerts")  # the next transaction fails
    with pytest.raises(StateError) as writing:
        await commit(store, OrgWrite(ORG_A, True), transitions=[firing()])
    assert isinstance(writing.value.__cause__, sqlite3.OperationalError)
    store.database.connection.execute("DROP TABLE outbox")
    with pytest.raises(StateError) as reading:
        await store.outbox.counts()
    assert isinstance(reading.value.__cause__, sqlite3.OperationalError)


async def test_store_open_copy_writes_nothing(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    await commit(store, OrgWrite(ORG_A, True, upserts=[inv(1)]))
    await store.close()
    before = path.read_bytes()
    copy = await open_state(path, copy=True)
    await commit(copy, OrgWrite(ORG_A, True, upserts=[inv(2)]))
    assert set(copy.snapshot.get(ORG_A)) == {inv(1).id, inv(2).id}
    await copy.close()
    assert path.read_bytes() == before
    missing = await open_state(tmp_path / "nothing.db", copy=True)
    await missing.close()
    assert not (tmp_path / "nothing.db").exists()


async def test_store_open_copy_reads_a_path_with_uri_characters(tmp_path, open_state):
    folder = tmp_path / "billing #1?"
    folder.mkdir()
    path = folder / "state.db"
    store = await open_state(path)
    await commit(store, OrgWrite(ORG_A, True, upserts=[inv(1)]))
    await store.close()
    copy = await open_state(path, copy=True)  # what --dry-run reads
    assert set(copy.snapshot.get(ORG_A)) == {inv(1).id}


async def test_store_a_failed_part_of_a_cycle_changes_nothing(store):
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [OrgWrite(ORG_A, True, upserts=[inv(1)])], [], ROUTES)
    store.database.connection.execute("DROP TABLE alerts")  # the next transaction fails midway
    with pytest.raises(StateError):
        await store.commit_orgs(
            number, NOW, [OrgWrite(ORG_B, True, upserts=[inv(2)])], [firing()], ROUTES
        )
    assert not store.snapshot.get(ORG_B)
    assert store.alerts.firing() == {}
    assert set(store.snapshot.get(ORG_A)) == {inv(1).id}


async def test_store_a_schema_1_file_is_migrated_with_everything_in_it(tmp_path, open_state):
    """A state file written by the first schema (invoices keyed by id alone, no outbox
    cycle) opens with its invoices, alerts and pending messages intact."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute(
        "INSERT INTO invoices VALUES (?,?,?,'FAILED','2026-10-01T00:00:00+00:00',"
        "'2026-11-01T00:00:00+00:00',500,0,0,0,0,500,NULL,NULL,'x','x')",
        (inv(1).id, ORG_A, ORG_A),
    )
    conn.execute(
        "INSERT INTO outbox (notifier, events, summary, created_at, next_attempt_at) "
        "VALUES ('slack', ?, 's', ?, ?)",
        (f"[{json.dumps(event().to_json())}]", NOW.isoformat(), NOW.isoformat()),
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()

    store = await open_state(path)
    assert store.snapshot.get(ORG_A).live[inv(1).id].status == "FAILED"
    assert [d.events for d in await store.outbox.due(NOW)] == [[event()]]
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


@pytest.mark.parametrize("exclusive", [True, False], ids=["daemon", "operator"])
async def test_store_refuses_a_symlinked_state_file_before_touching_its_target(
    tmp_path, exclusive, open_state
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    empty = elsewhere / "empty"
    empty.write_bytes(b"")
    empty.chmod(0o644)
    path = tmp_path / "state.db"
    path.symlink_to(empty)
    with pytest.raises(StateError, match="symbolic link"):
        await open_state(path, exclusive=exclusive)
    assert empty.read_bytes() == b""  # not turned into a database
    assert stat.S_IMODE(empty.stat().st_mode) == 0o644  # not chmod-ed
    with pytest.raises(StateError, match="symbolic link"):
        await open_state(path, copy=True)  # --dry-run reads what the daemon would


async def test_store_refuses_a_dangling_symlink_without_creating_its_target(tmp_path, open_state):
    target = tmp_path / "nowhere" / "state.db"
    path = tmp_path / "state.db"
    path.symlink_to(target)
    with pytest.raises(StateError, match="symbolic link"):
        await open_state(path)
    assert not target.parent.exists()


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
async def test_store_refuses_a_symlinked_side_file(tmp_path, suffix, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    await store.close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, f"{path}{suffix}")
    for exclusive in (True, False):
        with pytest.raises(StateError, match=f"state.db{suffix} is a symbolic link"):
            await open_state(path, exclusive=exclusive)
    assert victim.read_bytes() == b"keep"


async def test_store_state_path_that_is_a_folder_is_a_clear_error(tmp_path, open_state):
    path = tmp_path / "state.db"
    path.mkdir()
    for exclusive in (True, False):
        with pytest.raises(StateError, match="is a folder, not a file"):
            await open_state(path, exclusive=exclusive)


async def test_store_file_of_another_user_is_refused_before_any_change(
    tmp_path, monkeypatch, open_state
):
    """A state file created 0666 by another user: the daemon (not root) cannot make it
    private, so it refuses it, naming the owner, instead of a PermissionError."""
    path = tmp_path / "state.db"
    store = await open_state(path)
    await store.close()
    path.chmod(0o666)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 4242)
    with pytest.raises(StateError, match=r"belongs to .*not to uid \d+ .*mode 0666"):
        await open_state(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666


async def test_store_side_file_of_another_user_is_refused(tmp_path, monkeypatch, open_state):
    if os.geteuid() != 0:
        pytest.skip("needs root to give files to other users")
    path = tmp_path / "state.db"
    store = await open_state(path)
    await store.close()
    wal = f"{path}-wal"
    os.close(os.open(wal, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chown(path, 4242, -1)  # the daemon's user
    os.chown(wal, 4343, -1)  # someone else's
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(StateError, match=r"state.db-wal belongs to uid 4343, not to uid 4242"):
        await open_state(path)


async def test_store_on_a_file_system_without_locks_says_so(tmp_path, monkeypatch, open_state):
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(StateError, match=r"cannot lock files .*local disk") as caught:
        await open_state(tmp_path / "state.db")
    assert "Traceback" not in str(caught.value)


async def test_store_operator_read_creates_migrates_and_chmods_nothing(tmp_path, open_state):
    path = tmp_path / "state.db"
    with pytest.raises(StateError, match="no state file at"):
        await open_state(path, exclusive=False)
    assert not path.exists()
    conn = sqlite3.connect(path)  # an old (schema 1) file, group-readable
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.close()
    path.chmod(0o640)
    before = path.read_bytes()
    reader = await open_state(path, exclusive=False)
    assert await reader.outbox.messages(("sent",)) == []
    await reader.close()
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_store_check_held_notices_a_deleted_or_replaced_file(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    store.check_held()  # the same file: nothing to say
    path.unlink()
    with pytest.raises(StateFileGoneError, match="was deleted"):
        store.check_held()
    other = await open_state(path)  # a second daemon on a new file
    await other.close()
    with pytest.raises(StateFileGoneError, match="was replaced"):
        store.check_held()


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
async def test_store_check_held_notices_its_wal_or_shm_deleted_and_a_stop_keeps_the_state(
    tmp_path, suffix, open_state
):
    """A12-13: `rm state.db-wal state.db-shm` under a running daemon: the next check
    stops it, and closing (as the daemon does when it stops) writes what the deleted
    log held back into the state file: the pending notification and the firing alert
    are still there."""
    path = tmp_path / "state.db"
    store = await open_state(path)
    store.check_held()
    number = store.begin_cycle()
    await store.commit_orgs(number, NOW, [], [firing("k1")], {"failed": ["slack"]})
    await store.finish_cycle(
        number, NOW, NOW, [], [], {"failed": ["slack"]}, 5, orgs_ok=1, orgs_failed=0
    )
    os.unlink(f"{path}{suffix}")
    with pytest.raises(StateFileGoneError, match=rf"state.db{suffix}, the .* was deleted"):
        store.check_held()
    await store.close()
    reader = await open_state(path, exclusive=False)
    assert set(reader.alerts.firing()) == {"k1"}
    assert len(await reader.outbox.messages(("pending",))) == 1


async def test_store_check_held_notices_its_wal_replaced(tmp_path, open_state):
    path = tmp_path / "state.db"
    store = await open_state(path)
    wal = f"{path}-wal"
    os.rename(wal, tmp_path / "elsewhere")
    os.close(os.open(wal, os.O_CREAT | os.O_WRONLY, 0o600))
    with pytest.raises(StateFileGoneError, match=r"state.db-wal, the write-ahead log .*replaced"):
        store.check_held()


async def test_store_a_cycle_released_while_it_runs_numbers_each_releases_parts_apart(
    tmp_path, store
):
    """What a running cycle holds is released before its end (a slow organization, see
    App's HOLD_SECONDS): 50 held then, two parts of one grouped message; 45 more held
    at the end, two parts of another. Each release's parts say "of 2", in order; the
    cycle counts all 95 events."""
    number = store.begin_cycle()
    early = [f"e{n:02d}" for n in range(50)]
    late = [f"l{n:02d}" for n in range(45)]
    await store.commit_orgs(number, NOW, [], [firing(k) for k in early], {"failed": ["slack"]})
    released = await store.release_cycle(number, 5, NOW)
    assert released == 50
    first = await store.outbox.due(NOW)
    assert [[e.key for e in d.events] for d in first] == [early[:25], early[25:]]
    assert [d.part for d in first] == [Part(1, 2), Part(2, 2)]
    await store.commit_orgs(number, NOW, [], [firing(k) for k in late], {"failed": ["slack"]})
    assert len(await store.outbox.due(NOW)) == 2  # the late ones are held
    await store.finish_cycle(
        number, NOW, NOW, [], [], {}, 5, orgs_ok=2, orgs_failed=0, released=released
    )
    due = await store.outbox.due(NOW)
    assert [[e.key for e in d.events] for d in due[2:]] == [late[:23], late[23:]]
    assert [d.part for d in due] == [Part(1, 2), Part(2, 2), Part(1, 2), Part(2, 2)]
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("SELECT events FROM cycles").fetchall() == [(95,)]
    conn.close()


@pytest.mark.parametrize(
    "value",
    [
        {"status": "FAILED\ud800"},  # UTF-8 cannot encode a lone surrogate
        {"amount_billed_cents": 2**64},  # beyond SQLite's INTEGER
    ],
    ids=["lone surrogate", "beyond int64"],
)
async def test_store_a_value_it_cannot_take_is_unstorable_not_a_state_error(
    tmp_path, value, open_state
):
    """What a read holds and SQLite cannot take is an UnstorableError (the cycle keeps it
    to that organization), not a StateError (the whole cycle); nothing is written, and
    the failed read recorded instead stores its cause, surrogate and all."""
    from invoice_watch.errors import UnstorableError

    store = await open_state(tmp_path / "state.db")
    bad = replace(inv(1), **value)
    with pytest.raises(UnstorableError, match="cannot store a value"):
        await commit(store, OrgWrite(ORG_A, True, upserts=[bad]))
    assert list(store.snapshot.get(ORG_A)) == []
    await commit(
        store, OrgWrite(ORG_A, False, error="bad status 'FAILED\ud800'", failing_since=NOW)
    )
    assert store.snapshot.org_state(ORG_A).last_error == "bad status 'FAILED\ud800'"
    await store.close()
    reopened = await open_state(tmp_path / "state.db")
    assert reopened.snapshot.org_state(ORG_A).last_error == "bad status 'FAILED\\ud800'"


async def test_store_a_pending_group_too_large_from_an_earlier_version_is_split(
    tmp_path, open_state
):
    """A grouped message of 100 written before groups were split (one leader, 99
    followers) is split into parts when the state file is next opened."""
    path = tmp_path / "state.db"
    store = await open_state(path)
    number = store.begin_cycle()
    await store.commit_orgs(
        number, NOW, [], [firing(f"k{n:03d}") for n in range(100)], {"failed": ["slack"]}
    )
    await store.close()
    conn = sqlite3.connect(path)  # what the earlier version's release wrote
    leader = conn.execute("SELECT MIN(id) FROM outbox").fetchone()[0]
    conn.execute("UPDATE outbox SET state='pending', grp=?", (leader,))
    conn.commit()
    conn.close()

    store = await open_state(path)
    await store.release_held(5, NOW)
    due = await store.outbox.due(NOW)
    assert [len(d.events) for d in due] == [34, 33, 33]
    assert [str(d.part) for d in due] == ["part 1 of 3", "part 2 of 3", "part 3 of 3"]
    assert [e.key for d in due for e in d.events] == [f"k{n:03d}" for n in range(100)]


def test_an_sqlite_state_file_loads_no_psycopg():
    """The daemon, its config and the store, imported for an SQLite state file, load
    nothing of psycopg (about 0.15 s of CPU and 10 MB at every start and `run --once`):
    the PostgreSQL backend is loaded when first used."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import invoice_watch.app, invoice_watch.cli.commands, invoice_watch.config\n"
        "import invoice_watch.daemon, invoice_watch.store, invoice_watch.store.postgres.url\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
        "from invoice_watch.store.postgres import PostgresStore\n"
        "assert PostgresStore.__name__ == 'PostgresStore'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
