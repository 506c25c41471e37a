"""PNG plots for the benchmark commands, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(path: str | Path, series: dict[str, tuple[list[float], list[float]]], *, xlabel: str,
              ylabel: str, title: str, logx: bool = False, logy: bool = False) -> Path:
    """Draw one line per series name from (x values, y values) and save it as a PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", markersize=3, label=name)
    if logx:
        axes.set_xscale("log")
    if logy:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
