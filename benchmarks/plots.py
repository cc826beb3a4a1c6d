"""The suite's two figures. They take plain data (no training code), so a new figure
or a change of style touches this file only."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np


class Interval(Protocol):
    """A paired difference: its mean and 95% interval (as fractions, not points)."""

    @property
    def mean(self) -> float: ...
    @property
    def low(self) -> float: ...
    @property
    def high(self) -> float: ...


class Row(NamedTuple):
    """One row of `delta_accuracy.png`: a configuration, pooled over the workloads and
    per workload (interval of Δ accuracy, geometric-mean max-grad-norm ratio)."""

    label: str
    pooled: Interval
    ratio: float
    per_workload: Mapping[str, tuple[Interval, float]]


def _save(fig, path: Path) -> None:
    """Saves `fig` as a PNG with a 256-colour palette: a third of the size of a full
    colour one, for figures of a few flat colours (they go into the pull request)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def delta_accuracy(rows: Sequence[Row], out: Path, title: str) -> None:
    """Per configuration: Δ held-out accuracy against the baseline with its 95%
    interval, per workload and pooled (left), and the max-grad-norm ratio (right)."""
    plt = _pyplot()
    names = list(rows[0].per_workload)
    colours = [plt.get_cmap("tab10")(i) for i in range(len(names))]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.4 * len(rows) + 1.6), sharey=True, width_ratios=(3, 2)
    )
    low, high = -15.0, 6.0
    for y0, row in enumerate(rows):
        for i, name in enumerate(names):
            y = y0 + (i - (len(names) - 1) / 2) * 0.11
            interval, ratio = row.per_workload[name]
            mean = 100 * interval.mean
            lo, hi = 100 * interval.low, 100 * interval.high
            left.plot([max(lo, low), min(hi, high)], [y, y], color=colours[i], lw=0.8)
            marker = "<" if mean < low else ">" if mean > high else "o"
            left.plot(
                min(max(mean, low), high),
                y,
                marker,
                color=colours[i],
                ms=3.5,
                label=name if y0 == 0 else None,
            )
            right.plot(ratio, y, "o", color=colours[i], ms=3.5)
        left.plot(
            min(max(100 * row.pooled.mean, low), high),
            y0,
            "D",
            color="black",
            ms=5,
            label="pooled" if y0 == 0 else None,
        )
        right.plot(row.ratio, y0, "D", color="black", ms=5)
    left.axvline(0, color="grey", lw=0.8)
    left.set_xlim(low - 0.5, high + 0.5)
    left.set_yticks(range(len(rows)), [row.label for row in rows])
    left.invert_yaxis()
    left.set_xlabel(
        "held-out accuracy − batch @0.9's, points\n(paired by seed; 95% CI)"
    )
    left.legend(loc="lower left", fontsize=7)
    right.axvline(1, color="grey", lw=0.8)
    right.axvline(1.25, color="grey", lw=0.8, ls=":")
    right.set_xscale("log")
    right.set_xticks([1, 1.25, 2, 3, 5], ["1", "1.25", "2", "3", "5"])
    right.minorticks_off()
    right.set_xlabel("max gradient norm / batch @0.9's\n(geometric mean over seeds)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out / "delta_accuracy.png")
    plt.close(fig)


def gradient_curves(
    curves: Mapping[float, Sequence[tuple[str, np.ndarray]]],
    title: str,
    out: Path,
) -> None:
    """One panel per momentum: each configuration's per-step gradient norm (median over
    seeds), smoothed over 10 steps, on a log scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(11, 3.6), sharey=True)
    window = np.ones(10) / 10
    for ax, (momentum, lines) in zip(axes, curves.items()):
        for i, (name, median) in enumerate(lines):
            curve = np.convolve(median, window, "valid")
            ax.plot(curve, label=name, color=plt.get_cmap("tab10")(i), lw=1.2)
        ax.set_yscale("log")
        ax.set_title(f"{title}, momentum {momentum}", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("gradient norm\n(median over seeds, mean of 10 steps)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "curves.png")
    plt.close(fig)
