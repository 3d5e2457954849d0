"""One figure per input image and method: the image with the map overlaid and a colour bar.

The grid (:func:`attncam.viz.explanation_grid`) compares methods side by side at a small size;
these files show a single explanation large enough to read, with its scale and a title naming the
method and the class it explains, e.g. ``figures/per_image/17_gradcampp__torchcam020.png``.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import Tensor

from attncam.viz.common import (
    LABEL_PT,
    SMALL_PT,
    TITLE_PT,
    draw_outline,
    file_slug,
    hide_ticks,
    new_figure,
    save_figure,
    wrap_name,
)
from attncam.viz.grid import validate_grid_inputs
from attncam.viz.overlay import overlay

__all__ = ["per_image_overlays", "per_image_path"]


def per_image_path(out_dir: str | os.PathLike[str], image_id: int, method: str) -> Path:
    """``<out_dir>/<image_id>_<method slug>.png`` (:func:`attncam.viz.common.file_slug`)."""
    return Path(out_dir) / f"{int(image_id)}_{file_slug(method)}.png"


def per_image_overlays(
    images: Tensor,
    maps: Mapping[str, Tensor],
    out_dir: str | os.PathLike[str],
    ids: Sequence[int],
    titles: Sequence[str] | None = None,
    masks: Tensor | None = None,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    size: float = 4.0,
    dpi: float = 100,
) -> list[Path]:
    """Writes one PNG per image and method: the overlay, a colour bar ``0..1`` and a title.

    The title is the method name over the image's line of ``titles`` (e.g. the explained class
    and its probability); the ground-truth outline is drawn where ``masks`` has one. At the
    defaults a file is about 520 x 470 px.

    Args:
        images: Images ``(B, 3, H, W)`` in ``[0, 1]`` (already de-normalised).
        maps: Method name -> saliency maps ``(B, h, w)`` in ``[0, 1]``; resized to ``(H, W)``.
        out_dir: Folder of the files (created).
        ids: Image id of each of the ``B`` images, the first part of its file names.
        titles: One line per image under the method name, e.g. ``"explains: tiger cat (281),
            p = 0.38; true: tabby"``; long lines are wrapped.
        masks: Ground-truth masks ``(B, H, W)`` bool; rows that are all False get no outline.
        alpha: Heat-map weight in the blend.
        cmap: Matplotlib colormap name.
        size: Side of the image panel in inches.
        dpi: Output resolution.

    Returns:
        The paths :func:`per_image_path` ``(out_dir, id, method)``, image by image, methods in
        the mapping's order.

    Raises:
        ValueError: On inconsistent shapes or counts, or repeated ids.
    """
    images, cpu_maps, masks = validate_grid_inputs(images, maps, masks)
    n = images.shape[0]
    _check_counts(n, ids, titles)
    paths = []
    for i in range(n):
        heads = {name: _title(name, None if titles is None else titles[i], size) for name in maps}
        lines = max((h.count("\n") + 1 for h in heads.values()), default=1)
        mask = masks[i] if masks is not None and bool(masks[i].any()) else None
        fig, panel = _overlay_figure(images[i], mask, cmap, size, lines)
        for name, m in cpu_maps.items():
            panel.set_data(
                overlay(images[i], m[i], alpha=alpha, cmap=cmap).permute(1, 2, 0).numpy()
            )
            panel.axes.set_title(heads[name], fontsize=TITLE_PT, loc="left", pad=6)
            path = per_image_path(out_dir, ids[i], name)
            # Laid out to fit (see _overlay_figure): no second, cropping pass per file.
            paths.append(save_figure(fig, path, dpi=dpi, tight=False))
    return paths


def _check_counts(n: int, ids: Sequence[int], titles: Sequence[str] | None) -> None:
    """One distinct id, and one title if any, per image.

    Raises:
        ValueError: Naming the count or the repeated ids.
    """
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries for {n} images")
    if len(set(ids)) != n:
        raise ValueError(f"ids must be distinct (they name the files); got {list(ids)}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images")


def _overlay_figure(
    image: Tensor, mask: Tensor | None, cmap: str, size: float, title_lines: int
) -> tuple[Figure, AxesImage]:
    """The figure of one image: an image panel (data set per method), its outline, a colour bar.

    Laid out in inches so that nothing needs cropping: a 0.05 margin, the ``size`` square panel,
    a band of ``title_lines`` title lines above it, and 1.15 right of it for the colour bar, its
    ticks and its label.

    Returns:
        ``(figure, the AxesImage whose data each method replaces)``.
    """
    band = 0.2 + title_lines * 1.25 * TITLE_PT / 72
    w, h = 0.05 + size + 1.15, 0.05 + size + band
    fig = new_figure(w, h)
    ax = fig.add_axes((0.05 / w, 0.05 / h, size / w, size / h))
    panel = ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="bilinear")
    hide_ticks(ax)
    if mask is not None:
        draw_outline(ax, mask)
    cax = fig.add_axes(((0.25 + size) / w, (0.05 + 0.1 * size) / h, 0.2 / w, 0.8 * size / h))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
    bar.set_ticks(np.linspace(0.0, 1.0, 6).tolist())
    bar.ax.tick_params(labelsize=SMALL_PT)
    bar.set_label("saliency (map, normalised)", fontsize=LABEL_PT)
    return fig, panel


def _title(method: str, line: str | None, size: float) -> str:
    """The method name over ``line``, both wrapped to the figure's width."""
    width = max(20, int((size + 1.1) * 72 / (0.6 * TITLE_PT)))
    parts = [wrap_name(method, width)] + ([] if not line else textwrap.wrap(line, width))
    return "\n".join(parts)
