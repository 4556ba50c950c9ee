"""The report's chart: this period's cumulative daily spend against last period's, with
the budget line and the forecast to the period's end, as a PNG of :data:`SIZE` pixels
drawn by matplotlib's Agg canvas (no pyplot, no display, no system fonts: the wheel's
DejaVu fonts).

matplotlib costs about a second of CPU and 56 MiB to import (``../shared/LIBRARIES.md``),
so it is imported only here, inside :func:`chart_png`, the first time a report is
drawn: a daemon whose reports are never due never loads it. Before that import, its
cache folder is set (``MPLCONFIGDIR``, unless the environment sets it): without one
and with a home folder the service cannot write, every start would warn on stderr and
rebuild the font cache. A render takes 0.15–0.3 s of CPU: :func:`render_chart` draws off
the event loop, in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from invoice_watch.format import usd
from invoice_watch.report.data import ReportData

SIZE = (900, 400)  # pixels: 9 x 4 inches at 100 dpi
_DPI = 100
_setup = threading.Lock()


def cache_dir(state_path: Path, env: Mapping[str, str] | None = None) -> Path:
    """Where matplotlib keeps its font cache: ``$CACHE_DIRECTORY/matplotlib`` (systemd
    ``CacheDirectory=``) when set, else ``matplotlib-cache`` beside the state file (the
    container's state volume): both writable by the service."""
    env = os.environ if env is None else env
    cache = env.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(cache) / "matplotlib" if cache else state_path.parent / "matplotlib-cache"


def _configure(folder: Path | None) -> None:
    """Point matplotlib's config and cache at ``folder`` before its first import (a
    later import reads it; once imported, the setting is the one it read)."""
    with _setup:
        if folder is None or "MPLCONFIGDIR" in os.environ:
            return
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(folder)


def _plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` would start math text."""
    return text.replace("$", r"\$")


def _dollars(cents: float, _position: Any = None) -> str:
    return _plain(usd(round(cents)).removesuffix(".00"))


def chart_png(data: ReportData, folder: Path | None = None) -> bytes:
    """The chart of ``data`` as PNG bytes (:data:`SIZE`). Imports matplotlib (its cache
    in ``folder``, see :func:`cache_dir`) on first use. Blocking: call it off the event
    loop (:func:`render_chart`)."""
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


async def render_chart(data: ReportData, folder: Path | None = None) -> bytes:
    """:func:`chart_png` in a worker thread: the event loop (health checks, signals, the
    poll cycle) goes on while matplotlib imports and draws."""
    return await asyncio.to_thread(chart_png, data, folder)
