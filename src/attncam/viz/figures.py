"""Figures: explanation grids, insertion/deletion curves, metric bars and the SCA-CAM ratio plot.

Every function draws on a private :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot,
no global state, safe in worker threads), accepts tensors on any device, and writes its PNG
atomically through :mod:`attncam.io` (a temporary file in the destination folder, then
``os.replace``; the file gets the user's umask permissions).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from attncam.io import write_bytes_with
from attncam.viz.overlay import overlay

__all__ = ["curves_plot", "explanation_grid", "metric_bars", "save_figure", "scatter_ratio_plot"]

log = logging.getLogger(__name__)

_OUTLINE_COLOUR = "lime"
_TITLE_SIZE = 8
_LABEL_SIZE = 7


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float = 100) -> Path:
    """Writes ``fig`` as a PNG atomically (:func:`attncam.io.write_bytes_with`).

    A failure while drawing or saving leaves neither a partial ``path`` nor a temporary file.

    Args:
        fig: Figure to save (its canvas is set to Agg if it has none).
        path: Destination; parent folders are created.
        dpi: Resolution in dots per inch.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return write_bytes_with(
        path,
        lambda handle: fig.savefig(
            handle, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05
        ),
    )


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _cpu(x: Tensor) -> Tensor:
    return x.detach().to("cpu", torch.float32)


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw_outline(ax: Axes, mask: Tensor) -> None:
    """Draws the 0.5 contour of ``mask`` ``(H, W)``; the mask is zero-padded so that a region
    touching the image edge is still closed, and the axes keep the image extent."""
    h, w = mask.shape
    padded = torch.zeros(h + 2, w + 2)
    padded[1:-1, 1:-1] = mask.to(torch.float32)
    xs = torch.arange(-1, w + 1, dtype=torch.float32).numpy()
    ys = torch.arange(-1, h + 1, dtype=torch.float32).numpy()
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    contour = ax.contour(
        xs, ys, padded.numpy(), levels=[0.5], colors=_OUTLINE_COLOUR, linewidths=1.4
    )
    # A thin dark halo keeps the line visible on green or bright backgrounds.
    contour.set_path_effects([patheffects.withStroke(linewidth=2.8, foreground="black")])
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def explanation_grid(
    images: Tensor,
    maps: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    row_titles: Sequence[str] | None = None,
    masks: Tensor | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: float = 100,
    cell_size: float = 2.0,
    max_rows: int | None = None,
) -> Path:
    """One row per image: the original, then each method's heat-map overlay.

    Args:
        images: Images ``(N, 3, H, W)`` in ``[0, 1]`` (already de-normalised).
        maps: Method name -> saliency maps ``(N, h, w)`` in ``[0, 1]``; resized to ``(H, W)``.
            Column order follows the mapping's order; names become the column titles.
        path: Output PNG.
        row_titles: One label per image, drawn left of its row (may contain newlines, e.g. a
            top-5 list).
        masks: Ground-truth masks ``(N, H, W)`` bool; their outline is drawn on the original and
            on every overlay. Rows whose mask is all False get no outline.
        alpha: Heat-map weight in the blend.
        cmap: Matplotlib colormap name.
        dpi: Output resolution.
        cell_size: Side of one cell in inches.
        max_rows: Draw only the first ``max_rows`` images.

    Returns:
        The PNG path.

    Raises:
        ValueError: On inconsistent shapes or counts.
    """
    images, cpu_maps, masks = _grid_inputs(images, maps, masks)
    n = images.shape[0]
    if row_titles is not None and len(row_titles) != n:
        raise ValueError(f"row_titles has {len(row_titles)} entries for {n} images")
    rows = n if max_rows is None else max(1, min(n, max_rows))
    cols = 1 + len(cpu_maps)

    fig = _new_figure(cols * cell_size, rows * cell_size)
    axes = fig.subplots(rows, cols, squeeze=False)
    titles = ["image", *cpu_maps]
    for r in range(rows):
        image = images[r]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        panels = [image.clamp(0, 1)] + [
            overlay(image, m[r], alpha=alpha, cmap=cmap) for m in cpu_maps.values()
        ]
        mask = masks[r] if masks is not None and bool(masks[r].any()) else None
        _draw_grid_row(axes[r], panels, mask, titles if r == 0 else None)
        if row_titles is not None:
            axes[r, 0].set_ylabel(
                row_titles[r],
                fontsize=_LABEL_SIZE,
                rotation=0,
                ha="right",
                va="center",
                labelpad=4,
                multialignment="left",
            )
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=1.0, wspace=0.04, hspace=0.04)
    if rows > 0:
        # Leave room for the column titles above the first row.
        fig.subplots_adjust(top=1.0 - 0.22 / (rows * cell_size))
    return save_figure(fig, path, dpi=dpi)


def _grid_inputs(
    images: Tensor, maps: Mapping[str, Tensor], masks: Tensor | None
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Checked CPU copies: images ``(N, C, H, W)``, maps ``{name: (N, h, w)}``, masks ``(N, H, W)``.

    Raises:
        ValueError: On inconsistent shapes or counts.
    """
    images = _cpu(images)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 3, H, W); got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("images is empty; nothing to draw")
    cpu_maps: dict[str, Tensor] = {}
    for name, m in maps.items():
        m = _cpu(m)
        if m.dim() == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.dim() != 3 or m.shape[0] != n:
            raise ValueError(f"maps[{name!r}] must have shape (N={n}, h, w); got {tuple(m.shape)}")
        cpu_maps[name] = m
    if masks is not None:
        masks = masks.detach().to("cpu").bool()
        if tuple(masks.shape) != (n, *images.shape[-2:]):
            raise ValueError(
                f"masks must have shape (N, H, W) = {(n, *images.shape[-2:])}; "
                f"got {tuple(masks.shape)}"
            )
    return images, cpu_maps, masks


def _draw_grid_row(
    axes: Sequence[Axes], panels: list[Tensor], mask: Tensor | None, titles: list[str] | None
) -> None:
    """Draw one grid row: ``panels`` ``(3, H, W)``, the mask outline, the column titles."""
    for c, panel in enumerate(panels):
        ax = axes[c]
        ax.imshow(panel.permute(1, 2, 0).numpy(), interpolation="bilinear")
        _hide_ticks(ax)
        if mask is not None:
            _draw_outline(ax, mask)
        if titles is not None:
            ax.set_title(titles[c], fontsize=_TITLE_SIZE, pad=3)


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
    fig = _new_figure(10.0, 4.0)
    ax_del, ax_ins = fig.subplots(1, 2)
    for name, (fractions, deletion, insertion) in curves.items():
        f, d, i = (_cpu(t).flatten() for t in (fractions, deletion, insertion))
        if not f.numel() == d.numel() == i.numel():
            raise ValueError(
                f"curves[{name!r}]: fractions, deletion, insertion must have equal length; "
                f"got {f.numel()}, {d.numel()}, {i.numel()}"
            )
        auc = None if aucs is None else aucs.get(name)
        label_del = name if auc is None else f"{name} (AUC {auc[0]:.3f})"
        label_ins = name if auc is None else f"{name} (AUC {auc[1]:.3f})"
        (line,) = ax_del.plot(f.numpy(), d.numpy(), label=label_del, linewidth=1.5)
        ax_ins.plot(f.numpy(), i.numpy(), label=label_ins, linewidth=1.5, color=line.get_color())
    for ax, kind, better in ((ax_del, "removed", "lower"), (ax_ins, "inserted", "higher")):
        ax.set_xlabel(f"fraction of pixels {kind}", fontsize=9)
        ax.set_ylabel("target probability", fontsize=9)
        title = "deletion" if kind == "removed" else "insertion"
        ax.set_title(f"{title} ({better} AUC is better)", fontsize=10)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if curves:
            ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
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
    """One bar subplot per metric, one bar per method, with 95% confidence intervals.

    Args:
        table: ``table[method][metric] = (value, ci_low, ci_high)``. A ``None`` (or NaN) CI bound
            draws no error bar; a ``None`` (or NaN) value, or a metric missing for a method, draws
            no bar but an "n/a" label.
        metrics: Metrics to draw, in order (one subplot each).
        path: Output PNG.
        titles: Metric -> display title (default: the metric key).
        lower_is_better: Metrics whose subplot title notes "(lower is better)".
        dpi: Output resolution.
        max_cols: Subplots per figure row.

    Returns:
        The PNG path.

    Raises:
        ValueError: If ``metrics`` is empty.
    """
    if not metrics:
        raise ValueError("metrics is empty; name at least one metric to draw")
    methods = list(table)
    ncols = min(len(metrics), max_cols)
    nrows = math.ceil(len(metrics) / ncols)
    cell_w = max(2.8, 0.45 * len(methods) + 1.2)
    fig = _new_figure(ncols * cell_w, nrows * 3.2)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    colours = [f"C{k % 10}" for k in range(len(methods))]

    def finite(v: float | None) -> bool:
        return v is not None and math.isfinite(float(v))

    for ax, metric in zip(axes, metrics):
        xs = list(range(len(methods)))
        values = [table[m].get(metric, (None, None, None)) for m in methods]
        top = max((float(v[0]) for v in values if finite(v[0])), default=0.0)
        top = max(top, max((float(v[2]) for v in values if finite(v[2])), default=0.0))
        for x, (value, low, high), colour in zip(xs, values, colours):
            if not finite(value):
                ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
                continue
            value = float(value)
            yerr = None
            if finite(low) and finite(high):
                # A percentile CI need not contain the point estimate; clamp the arms at zero.
                yerr = [[max(value - float(low), 0.0)], [max(float(high) - value, 0.0)]]
            ax.bar(x, value, color=colour, width=0.7, yerr=yerr, capsize=3, ecolor="0.2")
        title = (titles or {}).get(metric, metric)
        if metric in lower_is_better:
            title = f"{title}\n(lower is better)"
        ax.set_title(title, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels(methods, rotation=45 if len(methods) > 3 else 0, ha="right", fontsize=7)
        if len(methods) <= 3:
            for label in ax.get_xticklabels():
                label.set_ha("center")
        ax.tick_params(axis="y", labelsize=7)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        if top > 0:
            ax.set_ylim(top=top * 1.1)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


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
    x, y = _cpu(x).flatten().double(), _cpu(y).flatten().double()
    if x.numel() != y.numel():
        raise ValueError(f"x and y must have the same length; got {x.numel()} and {y.numel()}")
    keep = x.isfinite() & y.isfinite()
    dropped = int((~keep).sum())
    if dropped:
        log.warning("scatter_ratio_plot: dropped %d of %d non-finite points", dropped, x.numel())
    x, y = x[keep], y[keep]

    fig = _new_figure(5.0, 4.5)
    ax = fig.subplots()
    ax.scatter(x.numpy(), y.numpy(), s=8, alpha=0.6, linewidths=0, label=f"channels (K={len(x)})")
    sxx = float((x * x).sum())
    if fit_line and sxx > 0:
        slope = float((x * y).sum()) / sxx
        lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
        ax.plot(
            [lo, hi],
            [slope * lo, slope * hi],
            color="C3",
            linewidth=1.5,
            label=f"least squares through origin: slope = {slope:.4g}",
        )
    elif fit_line:
        log.warning("scatter_ratio_plot: sum(x^2) == 0, no line fitted")
    ax.axhline(0.0, color="0.6", linewidth=0.6)
    ax.axvline(0.0, color="0.6", linewidth=0.6)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)
