"""PNG plots of one or more runs: throughput vs latency across the sweep, and TTFT / ITL distributions.

matplotlib is imported lazily (the `bench` extra), with the Agg backend so no display is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from aisandbox.bench.report import BenchResult, PointResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_all", "plot_distribution", "plot_sweep"]

_DPI = 80
DistributionMetric = Literal["ttft", "itl"]


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")


def _short(label: str) -> str:
    return label.removeprefix("C=")


def plot_sweep(results: Sequence[BenchResult], path: Path) -> Path:
    """Median TTFT and median TPOT against output tokens/s, one line per run, one marker per load point."""
    _use_agg()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    panels: tuple[tuple[str, Callable[[PointResult], float | None]], ...] = (
        ("TTFT p50 (ms)", lambda p: p.aggregates.ttft_ms.median),
        ("TPOT p50 (ms)", lambda p: p.aggregates.tpot_ms.median),
    )
    for ax, (ylabel, get) in zip(axes, panels, strict=True):
        for result in results:
            points = [p for p in result.points if get(p) is not None]
            xs = [p.aggregates.output_throughput for p in points]
            ys = [get(p) for p in points]
            ax.plot(xs, ys, marker="o", label=result.label)
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(_short(p.label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Throughput vs latency (labels: concurrency or rate)", fontsize=9)
    return _save(fig, path)


def _values_ms(point: PointResult, metric: DistributionMetric) -> np.ndarray:
    ok = [r for r in point.requests if r.ok]
    if metric == "ttft":
        values = [r.ttft_s for r in ok if r.ttft_s is not None]
    else:
        values = [gap for r in ok for gap in r.itl_s]
    return np.sort(np.asarray(values, dtype=np.float64) * 1000.0)


def _ecdf(ax: Axes, values_ms: np.ndarray, label: str) -> None:
    if values_ms.size == 0:
        return
    ax.step(values_ms, np.arange(1, values_ms.size + 1) / values_ms.size, where="post", label=label)


def plot_distribution(results: Sequence[BenchResult], metric: DistributionMetric, path: Path) -> Path:
    """Empirical CDFs of TTFT or ITL: one curve per point for one run; one panel per point for several."""
    _use_agg()
    import matplotlib.pyplot as plt

    name = {"ttft": "TTFT", "itl": "Inter-token latency"}[metric]
    if len(results) == 1:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for point in results[0].points:
            _ecdf(ax, _values_ms(point, metric), point.label)
        axes = [ax]
        titles = [results[0].label]
    else:
        labels = list(dict.fromkeys(p.label for r in results for p in r.points))
        fig, grid = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.4), squeeze=False, sharey=True)
        axes = list(grid[0])
        titles = labels
        for ax, label in zip(axes, labels, strict=True):
            for result in results:
                for point in (p for p in result.points if p.label == label):
                    _ecdf(ax, _values_ms(point, metric), result.label)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{name} (ms, log)")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of samples")
    fig.suptitle(f"{name} distribution", fontsize=9)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_all(results: Sequence[BenchResult], folder: Path, stem: str) -> list[Path]:
    """Write `<stem>-sweep.png`, `<stem>-ttft.png` and `<stem>-itl.png` into `folder`; return their paths."""
    return [
        plot_sweep(results, folder / f"{stem}-sweep.png"),
        plot_distribution(results, "ttft", folder / f"{stem}-ttft.png"),
        plot_distribution(results, "itl", folder / f"{stem}-itl.png"),
    ]
