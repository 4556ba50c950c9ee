"""The report's chart: this period's cumulative daily spend against last period's, with
the budget line and the forecast to the period's end, as a PNG of :data:`SIZE` pixels
drawn by matplotlib's Agg canvas (no pyplot, no display, no system fonts: the wheel's
DejaVu fonts).

matplotlib costs about a second of CPU and 56 MiB to import (``../shared/LIBRARIES.md``),
and once imported it stays: the daemon never imports it. It draws in a short-lived child
process, ``python -m invoice_watch.report.chart`` (:func:`main`: :class:`ChartData` as
JSON on standard input, the PNG on standard output), that
:mod:`invoice_watch.report.render` starts, bounds and reads. :func:`chart_png` draws in
the calling process (the child, and tests). Before matplotlib's import, its cache folder
is set (``MPLCONFIGDIR``, unless the environment sets it): without one and with a home
folder the service cannot write, every render would warn on stderr and rebuild the font
cache. A render takes 0.15–0.3 s of CPU, plus about a second to import matplotlib.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Protocol

from invoice_watch.format import usd

SIZE = (900, 400)  # pixels: 9 x 4 inches at 100 dpi
_DPI = 100
INPUT_MAX = 1024 * 1024  # bytes of JSON the child reads: a chart's is about 2 KB


class ChartInput(Protocol):
    """What the chart draws (a :class:`~invoice_watch.report.data.ReportData` is one)."""

    @property
    def title(self) -> str: ...
    @property
    def period_start(self) -> date: ...
    @property
    def period_days(self) -> int: ...
    @property
    def cumulative(self) -> tuple[int, ...]: ...
    @property
    def last_cumulative(self) -> tuple[int, ...]: ...
    @property
    def forecast_cents(self) -> int | None: ...
    @property
    def budget_cents(self) -> int | None: ...


@dataclass(frozen=True)
class ChartData:
    """What the chart draws of a report (:class:`ChartInput`), as the child process gets
    it: cents, the period's first day and its length in days."""

    title: str
    period_start: date
    period_days: int
    cumulative: tuple[int, ...]
    last_cumulative: tuple[int, ...]
    forecast_cents: int | None
    budget_cents: int | None

    @classmethod
    def of(cls, data: ChartInput) -> ChartData:
        return cls(
            title=data.title,
            period_start=data.period_start,
            period_days=data.period_days,
            cumulative=tuple(data.cumulative),
            last_cumulative=tuple(data.last_cumulative),
            forecast_cents=data.forecast_cents,
            budget_cents=data.budget_cents,
        )

    def to_json(self, folder: Path | None = None) -> str:
        """The child's input: these fields, and ``cache``, the folder of
        :func:`cache_dir` (or null)."""
        return json.dumps(
            {
                "title": self.title,
                "period_start": self.period_start.isoformat(),
                "period_days": self.period_days,
                "cumulative": list(self.cumulative),
                "last_cumulative": list(self.last_cumulative),
                "forecast_cents": self.forecast_cents,
                "budget_cents": self.budget_cents,
                "cache": None if folder is None else str(folder),
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> tuple[ChartData, Path | None]:
        """What :meth:`to_json` wrote; :class:`ValueError` when ``text`` is not that."""
        try:
            body = json.loads(text)
            cache = body["cache"]
            return cls(
                title=str(body["title"]),
                period_start=date.fromisoformat(body["period_start"]),
                period_days=int(body["period_days"]),
                cumulative=tuple(int(v) for v in body["cumulative"]),
                last_cumulative=tuple(int(v) for v in body["last_cumulative"]),
                forecast_cents=_cents(body["forecast_cents"]),
                budget_cents=_cents(body["budget_cents"]),
            ), None if cache is None else Path(str(cache))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a chart's data: {type(exc).__name__}: {exc}") from None


def _cents(value: Any) -> int | None:
    return None if value is None else int(value)


log = logging.getLogger(__name__)


def cache_dir(state_path: Path, env: Mapping[str, str] | None = None) -> Path:
    """Where matplotlib keeps its font cache: ``$CACHE_DIRECTORY/matplotlib`` (systemd
    ``CacheDirectory=``) when set, else ``matplotlib-cache`` beside the state file (the
    container's state volume): both writable by the service."""
    env = os.environ if env is None else env
    cache = env.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(cache) / "matplotlib" if cache else state_path.parent / "matplotlib-cache"


def _configure(folder: Path | None) -> None:
    """Point matplotlib's config and cache at ``folder`` before its first import (a
    later import reads it; once imported, the setting is the one it read). Called in
    the process that draws (the child), never in the daemon. A folder that cannot be
    made or written (``CACHE_DIRECTORY=/dev/null``) gives a private temporary one
    instead (removed when the process ends), with one warning: the chart is still
    drawn, never a traceback."""
    # matplotlib's INFO ("generated new fontManager") is noise on our stderr.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if folder is None or "MPLCONFIGDIR" in os.environ:
        return
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as exc:
        # Setting MPLCONFIGDIR makes this the only warning: later calls return above.
        fallback = tempfile.mkdtemp(prefix="invoice-watch-matplotlib-")  # 0700
        atexit.register(shutil.rmtree, fallback, ignore_errors=True)
        log.warning(
            "matplotlib's cache folder %s cannot be used (%s); using %s, rebuilt at "
            "each start: set CACHE_DIRECTORY or MPLCONFIGDIR to a writable folder",
            folder,
            exc.strerror or exc,
            fallback,
        )
        folder = Path(fallback)
    os.environ["MPLCONFIGDIR"] = str(folder)


def _plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` would start math text."""
    return text.replace("$", r"\$")


def _dollars(cents: float, _position: Any = None) -> str:
    return _plain(usd(round(cents)).removesuffix(".00"))


def chart_png(data: ChartInput, folder: Path | None = None) -> bytes:
    """The chart of ``data`` as PNG bytes (:data:`SIZE`), drawn in this process: imports
    matplotlib (its cache in ``folder``, see :func:`cache_dir`) on first use, and
    blocks. The daemon draws in a child process instead
    (:func:`invoice_watch.report.render.render_chart`)."""
    _configure(folder)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    # "constrained" fits the labels inside the figure, whose size stays SIZE (unlike
    # savefig's bbox_inches="tight").
    figure = Figure(figsize=(SIZE[0] / _DPI, SIZE[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    last = data.last_cumulative
    if last:
        axes.plot(range(1, len(last) + 1), last, "--", color="#9aa5b1", label="Last period")
    this = data.cumulative
    if this:
        axes.plot(
            range(1, len(this) + 1), this, "-", color="#1f6feb", linewidth=2.2, label="This period"
        )
    if data.forecast_cents is not None and this:
        axes.plot(
            [len(this), data.period_days],
            [this[-1], data.forecast_cents],
            ":",
            color="#1f6feb",
            label=_plain(f"Forecast {usd(data.forecast_cents)}"),
        )
    if data.budget_cents is not None:
        axes.axhline(
            data.budget_cents,
            color="#d1242f",
            linewidth=1.2,
            label=_plain(f"Budget {usd(data.budget_cents)}"),
        )
    axes.set_xlim(1, max(data.period_days, len(last), 2))
    highest = max([*this, *last, data.budget_cents or 0, data.forecast_cents or 0, 100])
    axes.set_ylim(0, highest * 1.12)  # room above the budget line and the legend
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_formatter(FuncFormatter(_dollars))
    axes.set_xlabel("Day of the billing period")
    axes.set_title(_plain(f"{data.title}: cumulative spend, {data.period_start:%B %Y}"), loc="left")
    axes.grid(True, color="#eaeef2")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", frameon=False)  # the lines rise: empty there
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=_DPI)
    return out.getvalue()


def main() -> int:
    """The child process (``python -m invoice_watch.report.chart``): :class:`ChartData`
    as JSON (:meth:`ChartData.to_json`, at most :data:`INPUT_MAX` bytes) on standard
    input, the PNG on standard output; exit status 0, or 1 with one line on standard
    error saying why not."""
    try:
        text = sys.stdin.buffer.read(INPUT_MAX + 1)
        if len(text) > INPUT_MAX:
            raise ValueError(f"more than {INPUT_MAX} bytes of input")
        data, folder = ChartData.from_json(text)
        png = chart_png(data, folder)
        sys.stdout.buffer.write(png)
        sys.stdout.buffer.flush()
    except Exception as exc:  # one line for the daemon's log, no traceback
        print(" ".join(f"{type(exc).__name__}: {exc}".split())[:500], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
