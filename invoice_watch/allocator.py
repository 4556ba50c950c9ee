"""The daemon's C allocator (glibc's malloc), set once as ``run`` starts a daemon
(:func:`one_arena`): one arena for every thread, and blocks of 128 KiB or more always
mapped apart, so that what is freed goes back to the system or to the next allocation.

Why (issue 16, the daemon's peak RSS at 100,000 invoices): the state file's
transactions run in a thread of their own (:mod:`invoice_watch.store.sqlite.database`),
and glibc gives each thread an arena of its own, whose free memory no other thread's
allocations use; and once a mapped block (a page's body, its JSON text) is freed,
glibc raises the size under which blocks come from the heap, where what is freed stays
in the process. Measured with ``python -m benchmarks.cycle one-50k --pairs 1 --no-peer``:
the daemon's peak RSS 80 -> 78 MB fresh, 73 -> 71 MB restarted (``large``: 79 MB
either way; benchmarks/README.md, "Memory").

Only where the C library is glibc (most Linux distributions, the python:3.11-slim image);
elsewhere (musl, macOS) nothing is set. ``MALLOC_ARENA_MAX`` and
``MALLOC_MMAP_THRESHOLD_`` in the environment are not overridden.
"""

from __future__ import annotations

import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept fixed


def one_arena() -> bool:
    """Set glibc's allocator as the module says; False where it is not glibc (or the
    environment sets it already), True once set. Never raises."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # only here: `run --once` and the other commands never load it

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own: not musl's libc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = False
    if "MALLOC_ARENA_MAX" not in os.environ:
        done = bool(mallopt(M_ARENA_MAX, 1))
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or done
    return done
