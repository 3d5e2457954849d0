"""Shared drawing helpers: a private Agg figure, atomic PNG saving, readable font sizes.

Every figure of :mod:`attncam.viz` draws on a private :class:`matplotlib.figure.Figure` with the
Agg canvas (no pyplot, no global state, safe in worker threads) and is written atomically through
:mod:`attncam.io` (a temporary file in the destination folder, then ``os.replace``).

Font sizes are chosen for reading a PNG at its natural size (one image pixel per screen pixel) at
the default 100 dpi: the smallest text, :data:`SMALL_PT` = 9 pt, is 12.5 px high.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from attncam.io import write_bytes_with
from attncam.runtime import slug

__all__ = [
    "LABEL_PT",
    "OUTLINE_COLOUR",
    "SMALL_PT",
    "TITLE_PT",
    "as_cpu",
    "draw_outline",
    "file_slug",
    "hide_ticks",
    "line_style",
    "new_figure",
    "save_figure",
    "wrap_name",
]

#: Axes titles and column titles (15.3 px at 100 dpi).
TITLE_PT = 11.0
#: Axis labels, row titles (13.9 px at 100 dpi).
LABEL_PT = 10.0
#: Tick labels, legends, colour-bar ticks: the smallest text drawn (12.5 px at 100 dpi).
SMALL_PT = 9.0
#: Colour of ground-truth mask outlines.
OUTLINE_COLOUR = "lime"


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches with its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(
    fig: Figure, path: str | os.PathLike[str], *, dpi: float = 100, tight: bool = True
) -> Path:
    """Writes ``fig`` as a PNG atomically (:func:`attncam.io.write_bytes_with`).

    With ``tight`` the saved area is the tight bounding box of everything drawn, so text placed
    outside the figure rectangle (row titles, colour bars) is kept; that costs a second drawing
    pass. A failure while drawing or saving leaves neither a partial ``path`` nor a temporary
    file.

    Args:
        fig: Figure to save (its canvas is set to Agg if it has none).
        path: Destination; parent folders are created.
        dpi: Resolution in dots per inch.
        tight: Crop to the drawn content; False saves the figure rectangle as laid out.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    crop = {"bbox_inches": "tight", "pad_inches": 0.05} if tight else {}
    return write_bytes_with(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, **crop))


def as_cpu(x: Tensor) -> Tensor:
    """``x`` detached, on the CPU, as float32 (any shape)."""
    return x.detach().to("cpu", torch.float32)


def hide_ticks(ax: Axes) -> None:
    """Removes the ticks and the frame of an image panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_outline(ax: Axes, mask: Tensor) -> None:
    """Draws the 0.5 contour of a binary ``mask`` ``(H, W)`` on an image panel.

    The mask is zero-padded so that a region touching the image edge is still closed, and the
    axes keep the image extent. A thin dark halo keeps the line visible on bright backgrounds.
    """
    h, w = mask.shape
    padded = torch.zeros(h + 2, w + 2)
    padded[1:-1, 1:-1] = mask.to(torch.float32)
    xs = torch.arange(-1, w + 1, dtype=torch.float32).numpy()
    ys = torch.arange(-1, h + 1, dtype=torch.float32).numpy()
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    contour = ax.contour(
        xs, ys, padded.numpy(), levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.4
    )
    contour.set_path_effects([patheffects.withStroke(linewidth=2.8, foreground="black")])
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def line_style(k: int) -> dict[str, str]:
    """Colour and dash pattern of the ``k``-th line: the ten default colours, then the same
    colours dashed, dotted, dash-dotted, so that up to 40 methods stay distinguishable."""
    return {"color": f"C{k % 10}", "linestyle": ("-", "--", ":", "-.")[(k // 10) % 4]}


def wrap_name(name: str, width: int) -> str:
    """A method name broken onto several lines so that each has at most ``width`` characters.

    Breaks before ``[`` (the options of ``gradcampp[torchcam020]``), after ``,`` and ``_``;
    a name that already holds newlines, or fits, is returned unchanged. A single word longer
    than ``width`` is left whole (never cut mid-word).

    Args:
        name: Method (result) name, e.g. ``attention_guided[spatial_product]``.
        width: Most characters per line (at least 1).

    Returns:
        The name with ``\\n`` inserted.
    """
    if "\n" in name or len(name) <= width:
        return name
    pieces = re.findall(r"\[?[^\[_,]*[_,]?", name)
    lines: list[str] = [""]
    for piece in filter(None, pieces):
        if lines[-1] and len(lines[-1]) + len(piece) > max(width, 1):
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


def file_slug(name: str) -> str:
    """A method name as a file-name part, by the rules of ``maps.npz`` array names.

    ``gradcampp[torchcam020]`` -> ``gradcampp__torchcam020``,
    ``scacam[channel_weight=fc]`` -> ``scacam__channel_weight-fc`` (the same as
    ``attncam.runtime.slug``); any remaining
    character outside ``[A-Za-z0-9_.-]`` (a space, ``/``) becomes ``-``.
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "-", slug(name))
