"""The console notifier on the standard outputs operators give it (issue 14 §7, §12): an
encoding lacking characters, a reader that went away, an output closed from the start.
Real processes where the finding involved one."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any, TextIO, cast

import pytest
import yaml

from invoice_watch.errors import RetryableNotifyError
from invoice_watch.notify import ConsoleNotifier
from tests.test_notify_render import grouped_events, pending_event
from tests.world import World


def latin1() -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="latin-1")


async def test_console_an_encoding_without_some_characters_writes_escapes() -> None:
    """Issue 14 §7: with ``PYTHONIOENCODING=latin-1`` the console raised
    UnicodeEncodeError (the period's en dash, the separator rule): a traceback a try."""
    stream = latin1()
    await ConsoleNotifier("out", stream).send([pending_event()])
    stream.flush()
    assert isinstance(stream.buffer, io.BytesIO)
    out = stream.buffer.getvalue().decode("latin-1")
    assert out.startswith("-" * 72 + "\n")
    assert "2026-11-01 \\u2013 2026-11-30" in out and "· rule type" in out


class NoEncoding(io.TextIOBase):
    """A wrapper that does not say its encoding (as the CLI's stdout does) over a
    latin-1 stream."""

    def __init__(self, inner: io.TextIOWrapper) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        return self.inner.write(text)

    def flush(self) -> None:
        self.inner.flush()


async def test_console_an_encoding_error_from_a_wrapper_writes_escapes() -> None:
    inner = latin1()
    await ConsoleNotifier("out", cast(TextIO, NoEncoding(inner))).send(grouped_events())
    inner.flush()
    assert isinstance(inner.buffer, io.BytesIO)
    assert inner.buffer.getvalue().decode("latin-1").startswith("-" * 72)


def broken_pipe() -> io.TextIOWrapper:
    """A stream whose reader went away (``| head`` exited)."""
    read, write = os.pipe()
    os.close(read)
    return open(write, "w", encoding="utf-8", closefd=True)


@pytest.mark.parametrize("kind", ["broken pipe", "closed file", "none"])
async def test_console_a_closed_output_keeps_the_message(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 §12: EPIPE/EBADF made the message "failed for good": it was shown to no
    one. It is retryable: it stays in the outbox for the next run."""
    stream: Any = None
    if kind == "broken pipe":
        stream = broken_pipe()
    elif kind == "closed file":
        stream = io.StringIO()
        stream.close()
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(RetryableNotifyError) as info:
        await ConsoleNotifier("out").send([pending_event()])
    assert "standard output is closed" in str(info.value)
    assert "stays in the outbox and goes out at the next run" in str(info.value)
    if kind != "none":  # chained to the OSError or ValueError (errors.py)
        assert isinstance(info.value.__cause__, OSError | ValueError)
    if kind == "broken pipe":
        with pytest.raises(OSError):
            stream.close()  # its buffer cannot be flushed either


def console_config(world: World, **sections: Any) -> Path:
    data = world.config_data(**sections)
    data["notifiers"] = {"out": {"type": "console"}}
    for rule in data["rules"]:
        rule["notify"] = ["out"]
    path = world.tmp / "console.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def invoice_watch(
    *args: str, stdout: Any, env: dict[str, str] | None = None
) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "invoice_watch",
        *args,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(90):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_console_run_once_with_latin1_output_prints_escapes_not_a_bug(world: World) -> None:
    """Issue 14 §7 as the operator met it: `run --once` (and the daemon, and the demo)
    with a console notifier and PYTHONIOENCODING=latin-1."""
    path = console_config(world)
    read, write = os.pipe()
    try:
        status, err = await invoice_watch(
            "run", "--once", "-c", str(path), stdout=write, env={"PYTHONIOENCODING": "latin-1"}
        )
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode("latin-1")
    assert status == 0, err
    assert "Traceback" not in err and "bug" not in err
    assert out.count("-" * 72) == 2 and "\\u2013" in out


async def test_console_run_once_into_a_closed_pipe_keeps_the_messages_for_the_next_run(
    world: World,
) -> None:
    """Issue 14 §12: `run --once | head -1` lost the messages head did not read ("not
    delivered, and retrying cannot help: Broken pipe", failed for good). They stay in
    the outbox, `status` says why, and the next run prints them."""
    path = console_config(world)
    stream = broken_pipe()
    try:
        _, err = await invoice_watch("run", "--once", "-c", str(path), stdout=stream.fileno())
    finally:
        with contextlib.suppress(OSError):
            stream.close()
    assert "retrying cannot help" not in err and "Traceback" not in err
    read, write = os.pipe()
    try:
        status, err = await invoice_watch("status", "-c", str(path), stdout=write)
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as pipe:
        shown = pipe.read().decode()
    assert status == 0, err
    assert "Undelivered notifications: 2" in shown
    assert shown.count("PENDING") == 2 and "standard output is closed" in shown
    # The messages wait max_backoff (a closed output stays closed for its process); the
    # next run here comes at once, so it is told max_backoff is 1 s (they are due then).
    path = console_config(world, delivery={"max_backoff": "1s"})
    read, write = os.pipe()
    try:
        status, err = await invoice_watch("run", "--once", "-c", str(path), stdout=write)
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as pipe:
        printed = pipe.read().decode()
    assert status == 0, err
    assert printed.count("FIRING: ") == 2
