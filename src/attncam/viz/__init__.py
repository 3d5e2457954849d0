"""attncam.viz: draws tensors (overlays and figures); knows nothing of models, data or configs."""

from attncam.viz.common import file_slug, save_figure
from attncam.viz.figures import curves_plot, metric_bars, scatter_ratio_plot
from attncam.viz.grid import explanation_grid, grid_paths, split_columns
from attncam.viz.overlay import colorize, mask_outline, overlay
from attncam.viz.per_image import per_image_overlays, per_image_path
from attncam.viz.sanity import sanity_figure

__all__ = [
    "colorize",
    "curves_plot",
    "explanation_grid",
    "file_slug",
    "grid_paths",
    "mask_outline",
    "metric_bars",
    "overlay",
    "per_image_overlays",
    "per_image_path",
    "sanity_figure",
    "save_figure",
    "scatter_ratio_plot",
    "split_columns",
]
