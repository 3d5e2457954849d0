"""The method and metric names the reproduction compares (result names of the explain stage)."""

from __future__ import annotations

#: The baselines of An & Joe's tables, in their order; the first is the reference.
PAPER_BASELINES: tuple[str, ...] = ("gradcam", "gradcampp", "smoothgradcampp", "xgradcam")
#: The attention-guided method (default variant ``cbam_output``).
AG = "attention_guided"
#: The three reconstructed attention-guided variants.
AG_VARIANTS: tuple[str, ...] = (AG, f"{AG}[spatial_product]", f"{AG}[multi_stage]")
#: torchcam 0.2.0's Grad-CAM++ / Smooth Grad-CAM++, candidates for the paper's baseline rows.
TORCHCAM: tuple[str, ...] = ("gradcampp[torchcam020]", "smoothgradcampp[torchcam020]")
#: The methods of section b, in table order.
PAPER_METHODS: tuple[str, ...] = PAPER_BASELINES + AG_VARIANTS + TORCHCAM
#: Grad-CAM++ and Smooth Grad-CAM++ beside their torchcam 0.2.0 versions (section b).
TORCHCAM_COMPARISON: tuple[str, ...] = (
    "gradcampp",
    "gradcampp[torchcam020]",
    "smoothgradcampp",
    "smoothgradcampp[torchcam020]",
)
#: Percentage-in levels of An & Joe's table (% of pixels kept).
PERCENTAGES: tuple[int, ...] = (5, 10, 20, 25, 50)
#: Metrics where a lower value is better (the others: higher is better).
LOWER_BETTER = frozenset({"average_drop", "deletion", "morf"})
#: The columns of the every-method tables (sections c and e).
BEYOND_METRICS: tuple[str, ...] = (
    "average_drop",
    "increase_in_confidence",
    "deletion",
    "insertion",
    "morf",
    "lerf",
    "lerf_minus_morf",
    "pointing_game",
    "energy_pointing_game",
)
#: Per-image metrics the significance tests pair (plus every ``percentage_in@<p>``).
PAIRED_METRICS = frozenset(BEYOND_METRICS)
PAIRED_PREFIXES: tuple[str, ...] = ("percentage_in@",)
#: The methods of the SCA-CAM comparison (section c), in table order.
SCACAM_METHODS: tuple[str, ...] = (
    "featuremap",
    "cam",
    "gradcam",
    "scacam",
    "scacam[channel_weight=fc]",
)
#: Metrics that locate or rank the map's pixels (pointing games, deletion / insertion, ROAD,
#: Percentage-in): on a coarse CAM grid they measure the grid more than the method.
GRID_BOUND_METRICS = frozenset(
    {"pointing_game", "energy_pointing_game", "deletion", "insertion", "morf", "lerf",
     "lerf_minus_morf"}
)  # fmt: skip
GRID_BOUND_PREFIXES: tuple[str, ...] = ("percentage_in@",)


def is_grid_bound(metric: str) -> bool:
    """Whether ``metric`` depends on where in the image the map puts its mass, cell by cell."""
    return metric in GRID_BOUND_METRICS or metric.startswith(GRID_BOUND_PREFIXES)


def is_paired_metric(key: str) -> bool:
    """Whether the significance tests compare ``key`` (a ``metrics.json`` / per-image key)."""
    return key in PAIRED_METRICS or key.startswith(PAIRED_PREFIXES)


__all__ = [
    "AG",
    "AG_VARIANTS",
    "BEYOND_METRICS",
    "GRID_BOUND_METRICS",
    "LOWER_BETTER",
    "PAIRED_METRICS",
    "PAPER_BASELINES",
    "PAPER_METHODS",
    "PERCENTAGES",
    "SCACAM_METHODS",
    "TORCHCAM",
    "TORCHCAM_COMPARISON",
    "is_grid_bound",
    "is_paired_metric",
]
