"""The cascading-randomisation sanity check as a figure (Adebayo et al. 2018, fig. 2).

Layers are re-initialised one after another from the top (output) of the network down; after each
step every method's maps are compared with the trained model's by Spearman rank correlation and
SSIM (docs/METHODS.md, "sanity check"). A method whose curves stay high does not depend on the
learned weights. The x axis lists the layers in the order they were randomised, which the caller
must give: ``sanity.json`` is written with sorted keys, so its key order is alphabetical.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from attncam.viz.common import LABEL_PT, SMALL_PT, TITLE_PT, line_style, new_figure, save_figure

__all__ = ["SANITY_MEASURES", "sanity_figure"]

log = logging.getLogger(__name__)

#: Measure prefix in the result keys -> axis label.
SANITY_MEASURES: dict[str, str] = {
    "spearman": "Spearman rank correlation\nwith the trained model's map",
    "ssim": "SSIM with the\ntrained model's map",
}
#: Most layer names written under the x axis; longer cascades label every k-th layer.
MAX_TICK_LABELS = 40


def _series(
    row: Mapping[str, Mapping[str, Any] | None], measure: str, layers: Sequence[str]
) -> tuple[list[float], list[float], list[float], int]:
    """``(values, lows, highs, missing)`` of one method and measure along ``layers``.

    A layer without a result, or with a ``None`` value, is NaN (a gap in the line) and counted
    in ``missing``; a ``None`` interval bound is NaN (no band at that step).
    """

    def num(x: Any) -> float:
        return math.nan if x is None else float(x)

    values, lows, highs, missing = [], [], [], 0
    for layer in layers:
        r = row.get(f"{measure}@{layer}") or {}
        value = num(r.get("value"))
        missing += int(math.isnan(value))
        values.append(value)
        lows.append(num(r.get("low")))
        highs.append(num(r.get("high")))
    return values, lows, highs, missing


def _unplotted_layers(results: Mapping[str, Mapping[str, Any]], layers: Sequence[str]) -> list[str]:
    """Layers that have results but are not in ``layers`` (they cannot be placed on the axis)."""
    known = set(layers)
    extra = {
        key.split("@", 1)[1]
        for row in results.values()
        for key in row
        if "@" in key and key.split("@", 1)[0] in SANITY_MEASURES
    }
    return sorted(extra - known)


def _layer_axis(ax: Axes, layers: Sequence[str]) -> None:
    """Layer names as x tick labels, in the given order (every k-th when there are many)."""
    step = max(1, math.ceil(len(layers) / MAX_TICK_LABELS))
    ticks = list(range(0, len(layers), step))
    ax.set_xticks([t + 1 for t in ticks])
    ax.set_xticklabels([layers[t] for t in ticks], rotation=90, fontsize=SMALL_PT)
    label = "layer randomised (cumulatively, from the top: cascade order)"
    if step > 1:
        label += f"; every {step}th of {len(layers)} layers named"
    ax.set_xlabel(label, fontsize=LABEL_PT)
    ax.set_xlim(0.5, len(layers) + 0.5)


def _draw_lines(
    axes: Sequence[Axes], results: Mapping[str, Mapping[str, Any]], layers: Sequence[str]
) -> int:
    """One line with its interval band per method on each measure's axes (Spearman, SSIM).

    Returns:
        The number of points drawn (0 when no result matches ``layers``).
    """
    xs = list(range(1, len(layers) + 1))
    drawn = 0
    for k, (method, row) in enumerate(results.items()):
        for ax, measure in zip(axes, SANITY_MEASURES, strict=True):
            values, lows, highs, missing = _series(row, measure, layers)
            drawn += len(layers) - missing
            if missing:
                log.warning("sanity_figure: %s has no %s at %d of %d layers (gaps)",
                            method, measure, missing, len(layers))  # fmt: skip
            style = line_style(k)
            ax.plot(xs, values, marker="o", ms=3, lw=1.5, label=method, **style)
            ax.fill_between(xs, lows, highs, color=style["color"], alpha=0.18, linewidth=0)
    return drawn


def _style_axes(axes: Sequence[Axes], layers: Sequence[str], title: str | None) -> None:
    """Labels, zero lines, the legend right of the upper panel, layer names under the lower."""
    for ax, measure in zip(axes, SANITY_MEASURES, strict=True):
        ax.set_ylabel(SANITY_MEASURES[measure], fontsize=LABEL_PT)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=SMALL_PT)
    axes[0].legend(fontsize=SMALL_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _layer_axis(axes[1], layers)
    axes[0].set_title(
        title
        or "Cascading randomisation (Adebayo et al. 2018): the maps after randomising "
        "every layer up to x,\ncompared with the trained model's maps (mean over images, interval)",
        fontsize=TITLE_PT,
        loc="left",
    )


def sanity_figure(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    layers_in_cascade_order: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: float = 100,
) -> Path:
    """Spearman and SSIM vs cascade step, one line per method, with their intervals.

    Two panels sharing the x axis (Spearman above, SSIM below); step ``k`` on the axis is the
    state after randomising ``layers_in_cascade_order[:k]``, named by its last layer. The band
    around each line is the result's ``[low, high]`` interval (bootstrap over images).

    Args:
        results: The explain stage's ``sanity.json``: ``{method: {"spearman@<layer>": r,
            "ssim@<layer>": r}}``, each ``r`` a result dict with ``"value"``, ``"low"``,
            ``"high"`` (``None`` allowed).
        layers_in_cascade_order: The layers in the order they were randomised (top first).
        path: Output PNG.
        title: Figure title (default: a description of the check).
        dpi: Output resolution.

    Returns:
        The PNG path.

    Raises:
        ValueError: If ``results`` or ``layers_in_cascade_order`` is empty, a layer is repeated,
            or no result matches any of the layers.
    """
    layers = list(layers_in_cascade_order)
    if not results or not layers:
        raise ValueError("sanity_figure needs results and layers_in_cascade_order; got none")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers_in_cascade_order repeats a layer: {layers}")
    extra = _unplotted_layers(results, layers)
    if extra:
        log.warning("sanity_figure: %d layer(s) not in the cascade order, not drawn: %s",
                    len(extra), extra)  # fmt: skip
    width = min(19.0, max(8.0, 3.0 + 0.22 * len(layers)))
    # Two 2.6-inch panels, plus the layer names written vertically under the lower one.
    names_h = 0.6 * SMALL_PT / 72 * max(len(name) for name in layers)
    fig = new_figure(width, 6.2 + names_h)
    axes = fig.subplots(2, 1, sharex=True)
    if not _draw_lines(axes, results, layers):
        raise ValueError(
            f"no spearman@/ssim@ result matches any of the layers {layers[:5]}...; "
            f"results hold layers {_unplotted_layers(results, [])[:5]}"
        )
    _style_axes(axes, layers, title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)
