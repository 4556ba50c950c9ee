"""The SQLite state file on disk: the checks made before anything is touched, the
daemon's lock, and what an OS or SQLite error on opening it means in words.

The file (and SQLite's ``-wal``/``-shm``/``-journal`` beside it) must be a regular
file, never a symbolic link (a link would have invoice-watch chmod and write a file
elsewhere), and, unless running as root, belong to this user. The daemon opens it
read-write (created 0600 with its folder) and takes an exclusive ``flock`` so that one
daemon owns one file; the operator commands only read it. Every problem is a
:class:`~invoice_watch.errors.StateError` saying what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import sqlite3
import stat
from pathlib import Path

from invoice_watch.errors import StateError, StateLockedError

# Files SQLite keeps beside the state file (WAL mode; a rollback journal before it).
SIDE_FILES = ("-wal", "-shm", "-journal")


def wal_files(path: Path) -> dict[str, tuple[int, int]]:
    """(st_dev, st_ino) of the ``-wal`` and ``-shm`` beside an open WAL-mode state file
    (SQLite keeps both open and in place until its last connection closes)."""
    found = {}
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(OSError):
            info = os.lstat(f"{path}{suffix}")
            found[suffix] = (info.st_dev, info.st_ino)
    return found


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# What an OS error means for the state file, and what to do about it, by errno.
_REASONS = {
    errno.ENOSPC: "the disk is full: free some space on it",
    errno.EDQUOT: "the disk quota of this user is exhausted",
    errno.EROFS: "the file system is read-only: point state.path at a writable one",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check state.path",
    errno.EEXIST: "a file of that name is in the way of a folder: check state.path",
    errno.ELOOP: "it is a symbolic link, which invoice-watch does not follow",
}


def reason(exc: OSError) -> str:
    """An OS error in words, with what to do about it when the error says."""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied for {user_name(os.geteuid())}: run as the user that owns it"
    if code in _REASONS:
        return _REASONS[code]
    return exc.strerror or str(exc)


def existing(path: Path) -> os.stat_result | None:
    """``lstat`` of a state file (or one beside it): None when there is none; a
    StateError when it cannot be looked at, is a symbolic link (never followed: a link
    would have invoice-watch chmod and write a file elsewhere), or is not a regular
    file."""
    info = _lstat(path, "reach")
    if info is None:
        return None
    if stat.S_ISLNK(info.st_mode):
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        raise StateError(
            f"{path} is a symbolic link{target}: invoice-watch does not follow links to "
            "its state; set state.path to the real file's path (its folder may be a link)"
        )
    if stat.S_ISDIR(info.st_mode):
        raise StateError(
            f"state.path {path} is a folder, not a file: name a file in it, e.g. "
            f"{path / 'state.db'}"
        )
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"{path} is not a regular file: point state.path at a file")
    return info


def check_owner(path: Path, info: os.stat_result) -> None:
    """The daemon keeps its state private (0600) to the user it runs as; a file of
    another user (root excepted) is refused before anything is changed."""
    me = os.geteuid()
    if me != 0 and info.st_uid != me:
        raise StateError(
            f"{path} belongs to {user_name(info.st_uid)}, not to {user_name(me)} that runs "
            "invoice-watch (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): the state must be private to the daemon's "
            "user; run invoice-watch as its owner, or move the file aside (a new state "
            "file sends the firing alerts again unless you start with `run --once "
            "--baseline`)"
        )


def open_for_daemon(path: Path) -> int:
    """The state file opened read-write (created 0600 when missing, with its folder),
    checked before anything is touched: not a link, a regular file, this user's, in a
    folder this user can write (SQLite creates its -wal and -shm there)."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create the state folder {folder}: {reason(exc)}") from exc
    info = existing(path)
    if info is not None:
        check_owner(path, info)
    for suffix in SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if (side_info := existing(side)) is not None:
            check_owner(side, side_info)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StateError(
            f"the state folder {folder} is not writable by {user_name(os.geteuid())}: SQLite "
            f"creates {path.name}-wal and {path.name}-shm beside the state file; make the "
            "folder this user's, or point state.path elsewhere"
        )
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise StateError(f"cannot create or open state file {path}: {reason(exc)}") from exc
    opened = os.fstat(fd)
    try:
        if not stat.S_ISREG(opened.st_mode):  # swapped since the checks above
            raise StateError(f"{path} is not a regular file: point state.path at a file")
        check_owner(path, opened)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_file(fd: int, path: Path) -> None:
    """The daemon's exclusive lock on its state file (one daemon per file)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise StateLockedError(
            f"state file {path} is in use by another invoice-watch daemon; run "
            "one daemon per state file (or point state.path elsewhere)"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOLCK:
            raise StateError(
                f"state file {path} is on a file system that cannot lock files (NFS or "
                "CIFS without a lock manager?): invoice-watch locks its state so that one "
                "daemon uses it, and SQLite needs locks too. Keep the state on a local "
                "disk: point state.path there"
            ) from exc
        raise StateError(f"cannot lock state file {path}: {reason(exc)}") from exc


def check_readable(path: Path) -> None:
    """An operator command's checks before reading: the file and its -wal/-shm are no
    links, and this user may read them."""
    if not os.access(path, os.R_OK):
        raise StateError(
            f"cannot read state file {path}: permission denied for "
            f"{user_name(os.geteuid())}; run this command as the daemon's user, or with sudo"
        )
    for suffix in SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if existing(side) is not None and not os.access(side, os.R_OK):
            raise StateError(
                f"cannot open state file {side} (SQLite's, beside {path.name}, while the "
                f"daemon runs): permission denied for {user_name(os.geteuid())}; run this "
                "command as the daemon's user, or with sudo"
            )


def connect_read_only(path: Path) -> sqlite3.Connection:
    # as_uri() escapes what a URI would misread (?, #, %, spaces); absolute(), not
    # resolve(): the folder may be a link (systemd's DynamicUser), the file is not.
    return sqlite3.connect(
        f"{path.absolute().as_uri()}?mode=ro",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )


def disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (next to) no space left for this
    user: less than 64 KiB."""
    try:
        info = os.statvfs(path.parent)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < 64 * 1024


def sqlite_problem(path: Path, exc: sqlite3.Error, *, reader: bool = False) -> str:
    """What an SQLite error on opening the state file means, and what to do (``reader``:
    for an operator command, which only reads it, rather than the daemon)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and disk_full(path)):
        # (a full disk may also show as an I/O error: growing the -shm file failed)
        return f"cannot write state file {path}: the disk is full; free some space on it"
    if primary == sqlite3.SQLITE_CANTOPEN and reader:
        return (
            f"SQLite cannot open state file {path} or the -wal/-shm files beside it for "
            f"{user_name(os.geteuid())}: run this command as the daemon's user, or with sudo"
        )
    if primary == sqlite3.SQLITE_CANTOPEN:
        return (
            f"SQLite cannot open state file {path} or the -wal/-shm files beside it: the "
            "folder must be readable and writable by the daemon's user"
        )
    if primary == sqlite3.SQLITE_READONLY:
        return (
            f"state file {path} (or its -wal/-shm) is read-only for {user_name(os.geteuid())}: "
            "run as the file's owner"
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"state file {path} stayed locked by another program for 5 s: try again"
    if primary == sqlite3.SQLITE_IOERR:
        return (
            f"I/O error on state file {path} ({exc}): check that its disk is healthy and "
            "has space (and that no file size limit applies), or, on a network file "
            "system, keep the state on a local disk"
        )
    return (
        f"state file {path} cannot be used: {exc}. If it is not an invoice-watch state "
        "file, point state.path elsewhere; if it is damaged, move it aside (the next run "
        "starts a new snapshot)"
    )


def identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at ``path``, None when there is none."""
    info = _lstat(path, "check")
    return None if info is None else (info.st_dev, info.st_ino)


def _lstat(path: Path, verb: str) -> os.stat_result | None:
    """``lstat`` of ``path``, None when there is none; a StateError saying it cannot
    ``verb`` the state file ("reach", "check") and why."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot {verb} state file {path}: {reason(exc)}") from exc
