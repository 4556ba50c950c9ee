"""Reading the files a configuration names (the configuration itself, ``<secret>_file``,
``ca_file``) without ever blocking: each is opened with ``O_NONBLOCK`` and must be a
regular file (``fstat`` on the open descriptor, so no race with a rename).

A FIFO opened the usual way blocks until a writer comes, forever for a ``mkfifo`` left
behind, and a device (``/dev/zero``) reads without end: either would hang check-config
and wedge every later reload. Opening a FIFO or a device with ``O_NONBLOCK`` returns at
once, and a regular file ignores the flag.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class FileProblem(Exception):
    """Why a file cannot be read, to follow ``cannot read PATH:``: the system's words
    (``No such file or directory``, ``Permission denied``), or ``not a regular file but
    a FIFO (named pipe)``. ``errno`` is the system's error number, if any."""

    def __init__(self, reason: str, errno: int | None = None) -> None:
        super().__init__(reason)
        self.errno = errno


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "something else")


def not_regular(mode: int) -> str:
    """The reason of a file of ``mode`` that is not a regular file."""
    return f"not a regular file but {_kind(mode)}"


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of the regular file at ``path`` (so that the caller can
    tell a file larger than ``limit``); never blocks on a FIFO or a device. Raises
    :class:`FileProblem`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(_open_problem(path, exc), exc.errno) from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileProblem(os.strerror(errno.EISDIR), errno.EISDIR)
        if not stat.S_ISREG(mode):
            raise FileProblem(not_regular(mode))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise FileProblem(exc.strerror or str(exc), exc.errno) from exc
    finally:
        os.close(fd)


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`FileProblem` unless ``path`` is a regular file that this process
    may read (opened as :func:`read_regular_file` does, nothing read)."""
    read_regular_file(path, 0)


def _open_problem(path: str | os.PathLike[str], exc: OSError) -> str:
    """Why ``open`` failed (a socket gives ENXIO, "No such device or address")."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return not_regular(mode)
    return exc.strerror or str(exc)
