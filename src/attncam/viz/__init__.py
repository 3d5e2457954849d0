"""attncam.viz: draws tensors (overlays and figures); knows nothing of models, data or configs."""

from attncam.viz.figures import (
    curves_plot,
    explanation_grid,
    metric_bars,
    save_figure,
    scatter_ratio_plot,
)
from attncam.viz.overlay import colorize, mask_outline, overlay

__all__ = [
    "colorize",
    "curves_plot",
    "explanation_grid",
    "mask_outline",
    "metric_bars",
    "overlay",
    "save_figure",
    "scatter_ratio_plot",
]
