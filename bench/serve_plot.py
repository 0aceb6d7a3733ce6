"""PNG chart of a serving benchmark: latency (TTFT and TPOT, p50 and p99) and throughput per level.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch, no display needed).
Levels are placed at equal spacing and labelled with their concurrency or request rate.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.serve_metrics import LevelSummary


def level_label(level: LevelSummary) -> str:
    if level.request_rate is not None:
        return "inf" if math.isinf(level.request_rate) else f"{level.request_rate:g}"
    return str(level.concurrency)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def plot_levels(levels: list[LevelSummary], path: str | Path, title: str = "") -> Path:
    """Write the chart to `path` (PNG) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not levels:
        raise ValueError("nothing to plot: no levels")
    path = Path(path)
    xs = list(range(len(levels)))
    labels = [level_label(lv) for lv in levels]
    xname = "request rate (req/s)" if levels[0].request_rate is not None else "concurrent requests"

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    lat, thr = fig.subplots(1, 2)

    series = [
        ("TTFT p50", [lv.ttft_ms.p50 for lv in levels], "tab:blue", "-"),
        ("TTFT p99", [lv.ttft_ms.p99 for lv in levels], "tab:blue", "--"),
        ("TPOT p50", [lv.tpot_ms.p50 for lv in levels], "tab:orange", "-"),
        ("TPOT p99", [lv.tpot_ms.p99 for lv in levels], "tab:orange", "--"),
    ]
    for name, ys, color, style in series:
        lat.plot(xs, [_nan(y) for y in ys], style, color=color, marker="o", label=name)
    finite = [y for _, ys, _, _ in series for y in ys if y is not None and y > 0]
    if finite and max(finite) / min(finite) > 50:
        lat.set_yscale("log")
    lat.set_title("latency")
    lat.set_xlabel(xname)
    lat.set_ylabel("ms")
    lat.legend(loc="best", fontsize="small")

    thr.plot(xs, [lv.output_tokens_per_s for lv in levels], "-", color="tab:green", marker="o", label="output tok/s")
    thr.set_ylabel("output tokens / s")
    thr.set_title("throughput")
    thr.set_xlabel(xname)
    req = thr.twinx()
    req.plot(xs, [lv.requests_per_s for lv in levels], "--", color="tab:purple", marker="s", label="requests/s")
    req.set_ylabel("requests / s")
    handles = thr.get_legend_handles_labels()[0] + req.get_legend_handles_labels()[0]
    thr.legend(handles, [h.get_label() for h in handles], loc="best", fontsize="small")

    for ax in (lat, thr):
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
