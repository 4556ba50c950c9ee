"""The report's chart drawn in a short-lived child process, so that the daemon never
imports matplotlib (~56 MiB that would stay for good: issue 19 §2, "the daemon's idle
RSS must not grow because reports exist").

:func:`render_chart` starts ``python -m invoice_watch.report.chart`` (the same
interpreter, :data:`COMMAND`), writes the chart's data to its standard input as JSON
(:meth:`~invoice_watch.report.chart.ChartData.to_json`, with matplotlib's cache folder,
which the child sets as ``MPLCONFIGDIR`` unless the environment already does) and reads
the PNG from its standard output, bounded: at most :data:`TIMEOUT` seconds (wall time:
the child's own; then it is killed), at most ``limit`` bytes of PNG (more: killed), the
last :data:`STDERR_MAX` bytes of its standard error kept. Whatever goes wrong (the
child cannot start, exits non-zero, is killed by a signal, times out, writes too much
or no PNG) is a :class:`ChartError` of one line, with the last line the child wrote on
standard error; the child is always gone (killed and reaped) when this returns, also
when the caller is cancelled. A render takes about 1.5 s of CPU in all (the child's
start and matplotlib's import included), none of it on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from invoice_watch.report.chart import ChartData, ChartInput
from invoice_watch.report.outbox import CHART_MAX
from invoice_watch.safe_text import server_text

log = logging.getLogger(__name__)

COMMAND = (sys.executable, "-m", "invoice_watch.report.chart")
TIMEOUT = 60.0  # seconds a render may take (a normal one: 1-2 s)
STDERR_MAX = 8192  # bytes of the child's standard error kept (its tail)
_PNG = b"\x89PNG\r\n\x1a\n"
_CHUNK = 65536


class ChartError(Exception):
    """The chart could not be drawn; the message is one line saying why."""


async def _read_png(process: asyncio.subprocess.Process, limit: int) -> bytes | None:
    """The child's standard output until its end; None, the child killed, as soon as it
    exceeds ``limit`` bytes."""
    assert process.stdout is not None
    kept = bytearray()
    while chunk := await process.stdout.read(_CHUNK):
        kept += chunk
        if len(kept) > limit:
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # it would write on; nothing more of it is read
            return None
    return bytes(kept)


async def _read_tail(stream: asyncio.StreamReader) -> bytes:
    """Everything ``stream`` gives until its end, keeping the last :data:`STDERR_MAX`
    bytes."""
    kept = b""
    while chunk := await stream.read(_CHUNK):
        kept = (kept + chunk)[-STDERR_MAX:]
    return kept


def _last_line(stderr: bytes) -> str:
    """The last line the child wrote on its standard error (": why"), or nothing."""
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return f": {server_text(lines[-1], 300)}" if lines else ""


async def _feed(stdin: asyncio.StreamWriter, payload: bytes) -> None:
    """Write the child's input and close it; a child that exits without reading it is
    judged by its exit status."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(payload)
        await stdin.drain()
    stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stdin.wait_closed()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kill the child unless it has exited, and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


async def render_chart(
    data: ChartInput,
    folder: Path | None = None,
    *,
    command: Sequence[str] = COMMAND,
    time_limit: float = TIMEOUT,
    limit: int = CHART_MAX,
) -> bytes:
    """The chart of ``data`` as PNG bytes, drawn by ``command`` (a child process, see
    the module docstring) with matplotlib's cache in ``folder``. :class:`ChartError`
    (one line) when it could not be drawn within ``time_limit`` seconds and ``limit``
    bytes."""
    payload = ChartData.of(data).to_json(folder).encode()
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ChartError(f"the chart's renderer could not start: {server_text(exc)}") from None
    assert process.stdin and process.stdout and process.stderr
    try:
        async with asyncio.timeout(time_limit):
            png, stderr, _ = await asyncio.gather(
                _read_png(process, limit),
                _read_tail(process.stderr),
                _feed(process.stdin, payload),
            )
            if png is None:
                raise ChartError(f"the chart's renderer wrote more than {limit:,} bytes")
            code = await process.wait()
    except TimeoutError:
        raise ChartError(
            f"the chart's renderer did not finish within {time_limit:g} s and was killed"
        ) from None
    except OSError as exc:  # a pipe that failed
        raise ChartError(f"the chart's renderer: {server_text(exc)}") from None
    finally:
        await _stop(process)
    if code != 0:
        raise ChartError(f"the chart's renderer {_status(code)}{_last_line(stderr)}")
    if not png.startswith(_PNG):
        raise ChartError(f"the chart's renderer wrote no PNG ({len(png):,} bytes)")
    return png


@dataclass(frozen=True)
class Renderer:
    """How a report's chart is drawn: the child's ``command``, and its bounds
    (``timeout`` seconds, ``limit`` bytes of PNG). The daemon's is the default; tests
    give another."""

    command: tuple[str, ...] = COMMAND
    timeout: float = TIMEOUT
    limit: int = CHART_MAX

    async def draw(self, data: ChartInput, folder: Path | None) -> bytes | None:
        """The chart (:func:`render_chart`), or None when it could not be drawn: one
        WARNING says why, and the report goes without it (its text and HTML say so)."""
        try:
            return await render_chart(
                data, folder, command=self.command, time_limit=self.timeout, limit=self.limit
            )
        except ChartError as exc:
            log.warning(
                "the report's chart could not be drawn (the report goes without it): %s", exc
            )
            return None
