"""sd_notify against real AF_UNIX datagram sockets, as systemd listens for them."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from invoice_watch import sdnotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, as systemd's notify socket; yields it and the
    value of NOTIFY_SOCKET that reaches it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fsencode(path))
        sock.settimeout(5)
        yield sock, str(path)


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda env: sdnotify.notify("READY=1\nSTATUS=x", env=env), b"READY=1\nSTATUS=x"),
        (lambda env: sdnotify.ready(env=env), b"READY=1"),
        (
            lambda env: sdnotify.ready("polling 2 orgs", env=env),
            b"READY=1\nSTATUS=polling 2 orgs",
        ),
        (lambda env: sdnotify.status("cycle 3 done", env=env), b"STATUS=cycle 3 done"),
        (lambda env: sdnotify.watchdog(env=env), b"WATCHDOG=1"),
        (lambda env: sdnotify.stopping(env=env), b"STOPPING=1"),
        (lambda env: sdnotify.status("two\nlines", env=env), b"STATUS=two lines"),
    ],
    ids=["notify", "ready", "ready-status", "status", "watchdog", "stopping", "status-newline"],
)
def test_notify_sends_exact_datagram(
    listener: tuple[socket.socket, str],
    send: Callable[[dict[str, str]], bool],
    expected: bytes,
) -> None:
    sock, address = listener
    assert send({"NOTIFY_SOCKET": address}) is True
    assert sock.recv(4096) == expected


def test_notify_reaches_abstract_address() -> None:
    name = f"invoice-watch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert sdnotify.watchdog(env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_reads_process_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sdnotify.ready() is True
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_notify_without_socket_returns_false(env: dict[str, str]) -> None:
    assert sdnotify.notify("READY=1", env=env) is False


def test_notify_without_socket_in_process_environment_returns_false() -> None:
    # The autouse clean_environ fixture removed NOTIFY_SOCKET.
    assert sdnotify.ready() is False


def test_notify_missing_socket_returns_false_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="invoice_watch.sdnotify"):
        assert sdnotify.watchdog(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    assert "cannot notify systemd" in caplog.text


def test_notify_to_a_manager_that_does_not_read_never_waits(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A notify socket nobody reads fills up (net.unix.max_dgram_qlen, 10 by default):
    the next message is dropped and logged, where a blocking send froze the daemon's
    event loop (found by a watchdog test whose socket was read only at the end)."""
    _, address = listener
    env = {"NOTIFY_SOCKET": address}
    with caplog.at_level(logging.WARNING, logger="invoice_watch.sdnotify"):
        sent = [sdnotify.watchdog(env=env) for _ in range(1000)]
    assert sent[0] is True and sent[-1] is False
    assert "cannot notify systemd" in caplog.text


def test_notify_non_unix_address_returns_false(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="invoice_watch.sdnotify"):
        assert sdnotify.ready(env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert "not a unix socket path" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "60s"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "self"}, None),
    ],
    ids=[
        "unset",
        "60s",
        "1s",
        "zero",
        "negative",
        "empty",
        "not-a-number",
        "our-pid",
        "other-pid",
        "bad-pid",
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_interval_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 10.0
