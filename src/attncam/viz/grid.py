"""The explanation grid: one row per image, the original then one overlay per method.

With more methods than ``max_columns`` the grid is split into several files of at most
``max_columns`` method columns each (``grid.png``, ``grid_2.png``, ...), every file repeating the
image column and its row titles, so that each PNG is readable at its natural size (about 1,700 px
wide at the defaults) instead of one strip thousands of pixels wide.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from attncam.viz.common import (
    LABEL_PT,
    SMALL_PT,
    TITLE_PT,
    as_cpu,
    draw_outline,
    hide_ticks,
    new_figure,
    save_figure,
    wrap_name,
)
from attncam.viz.overlay import overlay

__all__ = ["explanation_grid", "grid_paths", "split_columns", "validate_grid_inputs"]

log = logging.getLogger(__name__)

#: Method columns per grid file unless told otherwise.
MAX_COLUMNS = 6


@dataclasses.dataclass(frozen=True)
class _Style:
    """How a grid file is drawn: blend weight, colormap, cell side (inches), header line."""

    alpha: float
    cmap: str
    cell_size: float
    header: str | None = None


def split_columns(names: Sequence[str], max_columns: int) -> list[list[str]]:
    """Splits method names, in order, into the fewest groups of at most ``max_columns``.

    The groups are as even as possible (sizes differ by at most one, the larger first): 8
    methods at ``max_columns=6`` give 4 + 4, not 6 + 2, so that a pair of method families of
    four stays together.

    Args:
        names: Method names in column order.
        max_columns: Most names per group (at least 1).

    Returns:
        The groups; ``[[]]`` for no names (a grid of the images alone).

    Raises:
        ValueError: If ``max_columns < 1``.
    """
    if max_columns < 1:
        raise ValueError(f"max_columns must be at least 1; got {max_columns}")
    names = list(names)
    if not names:
        return [[]]
    parts = math.ceil(len(names) / max_columns)
    size, extra = divmod(len(names), parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        out.append(names[start:stop])
        start = stop
    return out


def grid_paths(path: str | os.PathLike[str], parts: int) -> list[Path]:
    """File names of a grid split into ``parts``: ``grid.png``, ``grid_2.png``, ...

    Args:
        path: The first file (the name the caller asked for).
        parts: Number of files (at least 1).

    Returns:
        ``parts`` paths beside ``path``.
    """
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(2, parts + 1)]


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
    max_columns: int = MAX_COLUMNS,
) -> list[Path]:
    """One row per image: the original, then each method's heat-map overlay, and a colour bar.

    Methods beyond ``max_columns`` go to further files (:func:`split_columns`,
    :func:`grid_paths`): ``path`` holds the first group, ``<stem>_2<suffix>`` the second, and
    so on; each file repeats the image column and the row titles and names its part in a header.
    Files ``<stem>_<k><suffix>`` left over from an earlier, wider grid are deleted (logged).

    Args:
        images: Images ``(N, 3, H, W)`` in ``[0, 1]`` (already de-normalised).
        maps: Method name -> saliency maps ``(N, h, w)`` in ``[0, 1]``; resized to ``(H, W)``.
            Column order follows the mapping's order; names become the column titles, broken
            onto several lines when longer than a cell is wide.
        path: Output PNG of the first (or only) part.
        row_titles: One label per image, drawn left of its row (may contain newlines, e.g. a
            top-5 list and the explained class).
        masks: Ground-truth masks ``(N, H, W)`` bool; their outline is drawn on the original and
            on every overlay. Rows whose mask is all False get no outline.
        alpha: Heat-map weight in the blend.
        cmap: Matplotlib colormap name.
        dpi: Output resolution.
        cell_size: Side of one cell in inches.
        max_rows: Draw only the first ``max_rows`` images.
        max_columns: Most method columns per file.

    Returns:
        The PNG paths, ``path`` first.

    Raises:
        ValueError: On inconsistent shapes or counts, or ``max_columns < 1``.
    """
    images, cpu_maps, masks = validate_grid_inputs(images, maps, masks)
    n = images.shape[0]
    if row_titles is not None and len(row_titles) != n:
        raise ValueError(f"row_titles has {len(row_titles)} entries for {n} images")
    rows = n if max_rows is None else max(1, min(n, max_rows))
    groups = split_columns(list(cpu_maps), max_columns)
    paths = grid_paths(path, len(groups))
    style = _Style(alpha=alpha, cmap=cmap, cell_size=cell_size)
    figures = _grid_figures(images[:rows], cpu_maps, groups, row_titles, masks, style)
    for fig, out in zip(figures, paths, strict=True):
        save_figure(fig, out, dpi=dpi)
    _remove_stale(path, len(groups))
    return paths


def _grid_figures(
    images: Tensor,
    maps: Mapping[str, Tensor],
    groups: Sequence[Sequence[str]],
    row_titles: Sequence[str] | None,
    masks: Tensor | None,
    style: _Style,
) -> Iterator[Figure]:
    """One figure per group of methods, on the first ``R = len(images)`` rows; each names its
    part in a header when there are several."""
    rows = images.shape[0]
    first = 1
    for k, group in enumerate(groups):
        header = None
        if len(groups) > 1:
            last = first + len(group) - 1
            header = f"part {k + 1} of {len(groups)}: methods {first}-{last} of {len(maps)}"
        yield _grid_figure(
            images,
            {name: maps[name][:rows] for name in group},
            None if row_titles is None else row_titles[:rows],
            None if masks is None else masks[:rows],
            dataclasses.replace(style, header=header),
        )
        first += len(group)


def _remove_stale(path: str | os.PathLike[str], parts: int) -> None:
    """Deletes ``<stem>_<k><suffix>`` for ``k > parts`` left by an earlier, wider grid."""
    k = parts + 1
    while (stale := grid_paths(path, k)[-1]).is_file():
        stale.unlink()
        log.info("explanation_grid: removed %s, left over from an earlier, wider grid", stale)
        k += 1


def validate_grid_inputs(
    images: Tensor, maps: Mapping[str, Tensor], masks: Tensor | None
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Checked CPU copies: images ``(N, 3, H, W)``, maps ``{name: (N, h, w)}``, masks ``(N, H, W)``.

    A grey ``(N, 1, H, W)`` batch is repeated to three channels; maps ``(N, 1, h, w)`` lose
    their channel axis.

    Raises:
        ValueError: On inconsistent shapes or counts.
    """
    images = as_cpu(images)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 3, H, W); got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n = images.shape[0]
    if n == 0:
        raise ValueError("images is empty; nothing to draw")
    cpu_maps: dict[str, Tensor] = {}
    for name, m in maps.items():
        m = as_cpu(m)
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


def _grid_figure(
    images: Tensor,
    maps: Mapping[str, Tensor],
    row_titles: Sequence[str] | None,
    masks: Tensor | None,
    style: _Style,
) -> Figure:
    """Draws one grid file: ``images`` ``(R, 3, H, W)``, ``maps`` ``{name: (R, h, w)}``."""
    rows, cols, cell = images.shape[0], 1 + len(maps), style.cell_size
    fig = new_figure(cols * cell, rows * cell)
    axes = fig.subplots(rows, cols, squeeze=False)
    # Characters of the title font that fit in one cell (an average glyph is ~0.6 em wide).
    width = max(8, int(cell * 72 / (0.6 * TITLE_PT)))
    titles = ["image", *(wrap_name(name, width) for name in maps)]
    for r in range(rows):
        panels = [images[r].clamp(0, 1)] + [
            overlay(images[r], m[r], alpha=style.alpha, cmap=style.cmap) for m in maps.values()
        ]
        mask = masks[r] if masks is not None and bool(masks[r].any()) else None
        _draw_grid_row(axes[r], panels, mask, titles if r == 0 else None)
        if row_titles is not None:
            axes[r, 0].set_ylabel(
                row_titles[r],
                fontsize=LABEL_PT,
                rotation=0,
                ha="right",
                va="center",
                labelpad=6,
                multialignment="left",
            )
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=1.0, wspace=0.04, hspace=0.04)
    if maps:
        _grid_colorbar(fig, style.cmap, cell, rows)
    if style.header:
        lines = max(t.count("\n") + 1 for t in titles)
        _header(fig, style.header, (8 + 1.25 * TITLE_PT * lines) / 72)
    return fig


def _draw_grid_row(
    axes: Sequence[Axes], panels: list[Tensor], mask: Tensor | None, titles: list[str] | None
) -> None:
    """Draws one grid row: ``panels`` ``(3, H, W)``, the mask outline, the column titles."""
    for c, panel in enumerate(panels):
        ax = axes[c]
        ax.imshow(panel.permute(1, 2, 0).numpy(), interpolation="bilinear")
        hide_ticks(ax)
        if mask is not None:
            draw_outline(ax, mask)
        if titles is not None:
            ax.set_title(titles[c], fontsize=TITLE_PT, pad=4)


def _grid_colorbar(fig: Figure, cmap: str, cell: float, rows: int) -> None:
    """A vertical colour bar ``0..1`` right of the grid, as tall as one to three cells."""
    width_in, height_in = fig.get_size_inches()
    bar_h = min(3, rows) * cell * 0.9
    cax = fig.add_axes(
        (
            1.0 + 0.12 / width_in,
            1.0 - (bar_h + 0.05 * cell) / height_in,
            0.16 / width_in,
            bar_h / height_in,
        )
    )
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
    bar.set_ticks(np.linspace(0.0, 1.0, 6).tolist())
    bar.ax.tick_params(labelsize=SMALL_PT)
    bar.set_label("saliency", fontsize=LABEL_PT)


def _header(fig: Figure, text: str, above: float) -> None:
    """A line of text ``above`` inches over the top of the grid (over the column titles)."""
    fig.text(
        0.0,
        1.0 + above / fig.get_size_inches()[1],
        text,
        fontsize=LABEL_PT,
        ha="left",
        va="bottom",
        color="0.25",
    )
