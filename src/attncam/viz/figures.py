"""Figures: insertion/deletion curves, metric bars and the SCA-CAM ratio plot.

Every function draws on a private :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot,
no global state, safe in worker threads), accepts tensors on any device, and writes its PNG
atomically through :mod:`attncam.io` (a temporary file in the destination folder, then
``os.replace``; the file gets the user's umask permissions). The explanation grid is in
:mod:`attncam.viz.grid`, the per-image overlays in :mod:`attncam.viz.per_image`, the sanity-check
figure in :mod:`attncam.viz.sanity`; all are re-exported by :mod:`attncam.viz`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from torch import Tensor

from attncam.viz.common import (
    LABEL_PT,
    SMALL_PT,
    TITLE_PT,
    as_cpu,
    line_style,
    new_figure,
    save_figure,
)
from attncam.viz.grid import explanation_grid

__all__ = ["curves_plot", "explanation_grid", "metric_bars", "save_figure", "scatter_ratio_plot"]

log = logging.getLogger(__name__)


def curves_plot(
    curves: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    path: str | os.PathLike[str],
    *,
    aucs: Mapping[str, tuple[float, float]] | None = None,
    dpi: float = 100,
) -> Path:
    """Deletion and insertion curves side by side, one line per method.

    Args:
        curves: Method name -> ``(fractions, deletion, insertion)``, each ``(S,)``: the fraction
            of pixels removed/inserted and the target-class probability at that step.
        path: Output PNG.
        aucs: Method name -> ``(deletion AUC, insertion AUC)``, shown in the legends.
        dpi: Output resolution.

    Returns:
        The PNG path.

    Raises:
        ValueError: If a method's three curves differ in length.
    """
    fig = new_figure(10.0, 4.0)
    ax_del, ax_ins = fig.subplots(1, 2)
    for k, (name, (fractions, deletion, insertion)) in enumerate(curves.items()):
        f, d, i = (as_cpu(t).flatten() for t in (fractions, deletion, insertion))
        if not f.numel() == d.numel() == i.numel():
            raise ValueError(
                f"curves[{name!r}]: fractions, deletion, insertion must have equal length; "
                f"got {f.numel()}, {d.numel()}, {i.numel()}"
            )
        auc = None if aucs is None else aucs.get(name)
        label_del = name if auc is None else f"{name} (AUC {auc[0]:.3f})"
        label_ins = name if auc is None else f"{name} (AUC {auc[1]:.3f})"
        style = line_style(k)
        ax_del.plot(f.numpy(), d.numpy(), label=label_del, linewidth=1.5, **style)
        ax_ins.plot(f.numpy(), i.numpy(), label=label_ins, linewidth=1.5, **style)
    for ax, kind, better in ((ax_del, "removed", "lower"), (ax_ins, "inserted", "higher")):
        ax.set_xlabel(f"fraction of pixels {kind}", fontsize=LABEL_PT)
        ax.set_ylabel("target probability", fontsize=LABEL_PT)
        title = "deletion" if kind == "removed" else "insertion"
        ax.set_title(f"{title} ({better} AUC is better)", fontsize=TITLE_PT)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=SMALL_PT)
        if curves:
            # Below the axes: with a dozen methods a legend inside would hide the curves.
            ax.legend(
                fontsize=SMALL_PT, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False
            )
    # No tight_layout: the legends hang below the axes and the saved area grows to hold them.
    fig.subplots_adjust(left=0.07, right=0.99, top=0.92, bottom=0.13, wspace=0.22)
    return save_figure(fig, path, dpi=dpi)


def metric_bars(
    table: Mapping[str, Mapping[str, tuple[float | None, float | None, float | None]]],
    metrics: Sequence[str],
    path: str | os.PathLike[str],
    *,
    titles: Mapping[str, str] | None = None,
    lower_is_better: set[str] | frozenset[str] = frozenset(),
    dpi: float = 100,
    max_cols: int = 4,
) -> Path:
    """One horizontal-bar panel per metric, one bar per method, with 95% confidence intervals.

    Methods are rows (their names written once per row of panels, horizontally, so that twenty
    long names stay readable); panels wrap after ``max_cols`` metrics.

    Args:
        table: ``table[method][metric] = (value, ci_low, ci_high)``. A ``None`` (or NaN) CI bound
            draws no error bar; a ``None`` (or NaN) value, or a metric missing for a method, draws
            no bar but an "n/a" label.
        metrics: Metrics to draw, in order (one panel each).
        path: Output PNG.
        titles: Metric -> display title (default: the metric key).
        lower_is_better: Metrics whose panel title notes "(lower is better)".
        dpi: Output resolution.
        max_cols: Most panels per figure row.

    Returns:
        The PNG path.

    Raises:
        ValueError: If ``metrics`` is empty.
    """
    if not metrics:
        raise ValueError("metrics is empty; name at least one metric to draw")
    methods = list(table)
    ncols = max(1, min(len(metrics), max_cols))
    nrows = math.ceil(len(metrics) / ncols)
    # The method names take about 0.6 em per character left of the first panel of each row.
    label_w = 0.3 + 0.6 * SMALL_PT / 72 * max((len(m) for m in methods), default=0)
    fig = new_figure(label_w + ncols * 2.6, nrows * (0.28 * max(len(methods), 4) + 1.1))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).flatten()
    for ax, metric in zip(axes, metrics):
        _bar_panel(ax, [table[m].get(metric, (None, None, None)) for m in methods])
        title = (titles or {}).get(metric, metric)
        if metric in lower_is_better:
            title = f"{title}\n(lower is better)"
        ax.set_title(title, fontsize=TITLE_PT)
    axes[0].set_yticks(range(len(methods)))
    axes[0].set_yticklabels(methods, fontsize=SMALL_PT)
    axes[0].set_ylim(len(methods) - 0.5, -0.5)  # first method on top (shared by every panel)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def _bar_panel(ax: Axes, values: list[tuple[float | None, float | None, float | None]]) -> None:
    """Horizontal bars ``(value, low, high)`` at rows ``0..M-1``; "n/a" where there is no value."""

    def finite(v: float | None) -> bool:
        return v is not None and math.isfinite(float(v))

    for y, (value, low, high) in enumerate(values):
        if not finite(value):
            ax.text(0.0, y, " n/a", ha="left", va="center", fontsize=SMALL_PT, color="0.4")
            continue
        value = float(value)  # type: ignore[arg-type]
        xerr = None
        if finite(low) and finite(high):
            # A percentile CI need not contain the point estimate; clamp the arms at zero.
            xerr = [[max(value - float(low), 0.0)], [max(float(high) - value, 0.0)]]  # type: ignore[arg-type]
        ax.barh(y, value, color=f"C{y % 10}", height=0.7, xerr=xerr, capsize=3, ecolor="0.2")
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.tick_params(axis="x", labelsize=SMALL_PT)
    ax.grid(axis="x", alpha=0.3)


def _fit_through_origin(ax: Axes, x: Tensor, y: Tensor) -> None:
    """Draws the least-squares line through the origin, ``Z = sum(x y) / sum(x^2)``, over the
    range of ``x`` (float64 ``(K,)``); warns and draws nothing when ``sum(x^2) == 0``."""
    sxx = float((x * x).sum())
    if sxx > 0:
        slope = float((x * y).sum()) / sxx
        lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
        ax.plot(
            [lo, hi],
            [slope * lo, slope * hi],
            color="C3",
            linewidth=1.5,
            label=f"least squares through origin: slope = {slope:.4g}",
        )
    else:
        log.warning("scatter_ratio_plot: sum(x^2) == 0, no line fitted")


def scatter_ratio_plot(
    x: Tensor,
    y: Tensor,
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    fit_line: bool = True,
    dpi: float = 100,
) -> Path:
    """Scatter of ``y`` against ``x`` with the least-squares line through the origin.

    Reproduces SCA-CAM's figure 10 (FC weight vs mean gradient per channel): the slope
    ``Z = sum(x * y) / sum(x * x)`` minimises ``sum((y - Z x)^2)`` and is shown in the legend.

    Args:
        x: Abscissae ``(K,)``.
        y: Ordinates ``(K,)``.
        path: Output PNG.
        xlabel: X-axis label.
        ylabel: Y-axis label.
        title: Axes title.
        fit_line: Draw the fitted line (skipped, with a warning, when ``sum(x^2) == 0``).
        dpi: Output resolution.

    Returns:
        The PNG path.

    Raises:
        ValueError: If ``x`` and ``y`` differ in length.
    """
    x, y = as_cpu(x).flatten().double(), as_cpu(y).flatten().double()
    if x.numel() != y.numel():
        raise ValueError(f"x and y must have the same length; got {x.numel()} and {y.numel()}")
    keep = x.isfinite() & y.isfinite()
    dropped = int((~keep).sum())
    if dropped:
        log.warning("scatter_ratio_plot: dropped %d of %d non-finite points", dropped, x.numel())
    x, y = x[keep], y[keep]

    fig = new_figure(5.0, 4.5)
    ax = fig.subplots()
    ax.scatter(x.numpy(), y.numpy(), s=8, alpha=0.6, linewidths=0, label=f"channels (K={len(x)})")
    if fit_line:
        _fit_through_origin(ax, x, y)
    ax.axhline(0.0, color="0.6", linewidth=0.6)
    ax.axvline(0.0, color="0.6", linewidth=0.6)
    ax.set_xlabel(xlabel, fontsize=LABEL_PT)
    ax.set_ylabel(ylabel, fontsize=LABEL_PT)
    ax.set_title(title, fontsize=TITLE_PT)
    ax.tick_params(labelsize=SMALL_PT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=SMALL_PT, loc="best")
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)
