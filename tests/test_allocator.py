"""The daemon's C allocator (invoice_watch/allocator.py): set where the C library is
glibc, left alone elsewhere and where the environment sets it."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from invoice_watch import allocator


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_one_arena_is_set_on_glibc():
    # In a process of its own: the setting is the whole process's.
    code = "from invoice_watch.allocator import one_arena; print(one_arena())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "True"


def test_one_arena_leaves_other_platforms_alone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.one_arena() is False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_one_arena_leaves_what_the_environment_sets():
    code = "from invoice_watch.allocator import one_arena; print(one_arena())"
    env = {"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "262144", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert done.stdout.strip() == "False"
