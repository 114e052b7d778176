"""Figures and a markdown table for the latency / accuracy part of the report.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot,
so no display, no global backend switch and no figure registry to leak), at a fixed size
and dpi so every PNG has the same pixel dimensions, and are written atomically with
:func:`medkd.toolchain.atomic.atomic_save`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medkd.toolchain.atomic import atomic_save
from medkd.toolchain.errors import UserError

__all__ = ["plot_latency_distribution", "plot_accuracy_size_latency", "latency_table_markdown"]

FIGSIZE_IN = (8.0, 5.0)
DPI = 100  # 800 x 500 px
_P50_COLOR = "tab:blue"
_P99_COLOR = "tab:red"


def _new_figure():
    """A figure bound to the Agg canvas (never to a GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> Path:
    # No bbox_inches="tight": it would make the pixel size depend on the labels.
    return atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _latency_samples(times_by_precision: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validated 1-D float arrays of finite, positive times, in the given order."""
    if not times_by_precision:
        raise UserError("latency distribution plot needs at least one precision")
    out = {}
    for name, times in times_by_precision.items():
        arr = np.asarray(times, dtype=np.float64).ravel()
        if arr.size == 0 or not np.all(np.isfinite(arr)) or arr.min() <= 0:
            raise UserError(f"latency times for {name!r} must be a non-empty array of finite positive ms")
        out[str(name)] = arr
    return out


def _latency_axis_scale(ax, times: np.ndarray) -> None:
    """Log scale when the tail spans over a decade (CPU latency often does), else linear
    from 0: on a linear axis a long tail would squash the boxes to a line."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    if times.max() / times.min() > 10:
        ax.set_yscale("log")
        # 1-2-5 ticks as plain numbers: powers of ten alone leave the boxes unlabelled
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("latency per inference (ms, log scale)")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel("latency per inference (ms)")


def plot_latency_distribution(
    times_by_precision: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    title: str = "ONNX Runtime CPU latency, batch 1",
) -> Path:
    """Box plot of per-run latency (ms) per precision, raw runs overlaid, p50 and p99 marked."""
    samples = _latency_samples(times_by_precision)
    names, data = list(samples), list(samples.values())
    pos = np.arange(1, len(names) + 1)

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.boxplot(data, positions=pos, widths=0.5, showfliers=False,
               medianprops={"color": _P50_COLOR, "linewidth": 2})
    jitter = np.random.default_rng(0)  # fixed seed: the same data draws the same picture
    for x, arr in zip(pos, data):
        ax.scatter(x + jitter.uniform(-0.12, 0.12, arr.size), arr, s=8, color="0.35", alpha=0.5, zorder=2)
    p50 = [np.percentile(a, 50) for a in data]
    p99 = [np.percentile(a, 99) for a in data]
    ax.scatter(pos, p50, marker="o", s=50, color=_P50_COLOR, zorder=3, label="p50")
    ax.scatter(pos, p99, marker="v", s=60, color=_P99_COLOR, zorder=3, label="p99")
    for x, a, b in zip(pos, p50, p99):
        ax.annotate(f"p50 {a:.3g} ms\np99 {b:.3g} ms", (x + 0.3, a), fontsize=9, va="center")
    ax.set_xticks(pos, names)
    ax.set_xlim(0.4, len(names) + 0.9)  # room for the value labels right of each box
    _latency_axis_scale(ax, np.concatenate(data))
    ax.set_xlabel("precision")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    return _save_png(fig, path)


def _scatter_point(p: Mapping) -> dict:
    """One validated point: label, accuracy (fraction), size (bytes), p50 latency (ms)."""
    label = p.get("name", p.get("precision"))
    try:
        acc, size, lat = float(p["accuracy"]), float(p["size_bytes"]), float(p["p50_ms"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"accuracy/size/latency point needs numeric accuracy, size_bytes, p50_ms: {dict(p)}") from e
    if label is None or not (0 <= acc <= 1) or not (size > 0 and math.isfinite(size)) or not (lat > 0 and math.isfinite(lat)):
        raise UserError(
            f"accuracy/size/latency point needs a name or precision, accuracy in [0, 1], "
            f"size_bytes > 0 and p50_ms > 0: {dict(p)}"
        )
    return {"label": str(label), "accuracy": acc, "size_bytes": size, "p50_ms": lat}


def _marker_areas(sizes: np.ndarray) -> np.ndarray:
    """Marker areas (pt^2) proportional to model size, largest 1500, floor 30 so tiny models stay visible."""
    return np.maximum(1500.0 * sizes / sizes.max(), 30.0)


def plot_accuracy_size_latency(
    points: Sequence[Mapping],
    path: str | os.PathLike,
    title: str = "Accuracy vs CPU latency (marker area proportional to model size)",
) -> Path:
    """Scatter of accuracy against p50 latency, marker area proportional to model size,
    each point labelled with its name and size. Points: ``name`` (or ``precision``),
    ``accuracy`` (fraction in [0, 1]), ``size_bytes``, ``p50_ms``."""
    from matplotlib.ticker import PercentFormatter

    if not points:
        raise UserError("accuracy/size/latency plot needs at least one point")
    pts = [_scatter_point(p) for p in points]
    lat = np.array([p["p50_ms"] for p in pts])
    acc = np.array([p["accuracy"] for p in pts])
    sizes = np.array([p["size_bytes"] for p in pts])

    fig = _new_figure()
    ax = fig.add_subplot()
    areas = _marker_areas(sizes)
    ax.scatter(lat, acc, s=areas, c=[f"C{i % 10}" for i in range(len(pts))],
               alpha=0.6, edgecolors="black", linewidths=0.8, zorder=2)
    for p, area in zip(pts, areas):
        radius_pt = math.sqrt(area / math.pi)  # put the label just right of its marker's edge
        ax.annotate(f"{p['label']}\n{p['size_bytes'] / 1e6:.2f} MB", (p["p50_ms"], p["accuracy"]),
                    xytext=(radius_pt + 4, 0), textcoords="offset points", fontsize=9, va="center")
    ax.margins(x=0.25, y=0.2)  # room for the markers and labels at the extremes
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, symbol=""))
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save_png(fig, path)


_TABLE_KEYS = ("precision", "batch_size", "threads", "p50_ms", "p90_ms", "p99_ms", "throughput_ips")


def latency_table_markdown(rows: Sequence[Mapping]) -> list[str]:
    """Markdown table lines (header, rule, one line per row) of latency-matrix rows.

    Each row is a :func:`medkd.export.profile.profile_onnx_matrix` row plus ``precision``.
    """
    if not rows:
        raise UserError("latency table needs at least one row")
    lines = [
        "| precision | batch | threads | p50 (ms) | p90 (ms) | p99 (ms) | throughput (img/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        missing = [k for k in _TABLE_KEYS if k not in r]
        if missing:
            raise UserError(f"latency table row lacks {missing}: {dict(r)}")
        lines.append(
            f"| {r['precision']} | {int(r['batch_size'])} | {int(r['threads'])} | {r['p50_ms']:.3f} "
            f"| {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput_ips']:.1f} |"
        )
    return lines
