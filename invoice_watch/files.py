"""Reading a file an operator names on the command line (``simulate --scenario``,
``simulate --write-config``): a regular file only, read up to a bound, never blocking.

A FIFO, a device or a folder named by mistake (``/dev/zero``, ``/dev/stdout`` piped to
another command) is refused at once, saying what it is, instead of being read without
end, filling memory, or waiting for a writer that never comes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class NotARegularFile(ValueError):
    """The path names something other than a regular file; ``kind`` says what."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        super().__init__(f"{path} is {kind}, not a regular file")


class FileTooLarge(ValueError):
    """The file holds more than the bound the caller gave."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        super().__init__(f"{path} is larger than {limit // 1024:,} KiB")


def kind_of(mode: int) -> str:
    """What a ``st_mode`` names, in words ("a folder", "a named pipe (FIFO)", ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path`` (symbolic links followed), at most
    ``limit`` of them. Opened without blocking, so that a FIFO is refused rather than
    waited on. Raises :class:`NotARegularFile`, :class:`FileTooLarge`, or the OSError of
    opening or reading it (``FileNotFoundError`` when there is none)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(path, kind_of(mode))
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileTooLarge(path, limit)
    return b"".join(chunks)
