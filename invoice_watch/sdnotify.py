"""The systemd notification protocol (sd_notify): tells the service manager that the daemon
is ready, what it is doing, that it is still alive (watchdog) and that it is stopping.

Stdlib only. Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op returning False;
no call ever raises or waits: a message the socket cannot take at once (its queue full,
a manager that does not read) is dropped and logged, never a freeze of the event loop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(message: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send `message` (``KEY=value`` lines) as one datagram to $NOTIFY_SOCKET.

    Returns True when it was sent, False when there is no socket or sending failed.
    """
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        if address:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path; not notifying", address)
        return False
    # A leading "@" names a socket in the abstract namespace: a NUL byte on the wire.
    target = os.fsencode("\0" + address[1:] if address.startswith("@") else address)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, target)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of $WATCHDOG_USEC, or None when the
    watchdog is off, the value is invalid, or $WATCHDOG_PID names another process."""
    env = os.environ if env is None else env
    try:
        if "WATCHDOG_PID" in env and int(env["WATCHDOG_PID"]) != os.getpid():
            return None
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def ready(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """Startup is complete (Type=notify), optionally with a status line."""
    return notify("READY=1" if status is None else f"READY=1\n{_status(status)}", env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """The one-line status shown by ``systemctl status``."""
    return notify(_status(text), env=env)


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    """Still alive and healthy: call every watchdog_interval() seconds."""
    return notify("WATCHDOG=1", env=env)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun."""
    return notify("STOPPING=1", env=env)


def _status(text: str) -> str:
    # A newline would start a new KEY=value assignment.
    return "STATUS=" + " ".join(text.splitlines())
