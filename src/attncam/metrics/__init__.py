"""attncam.metrics: faithfulness and localisation metrics of saliency maps (docs/METHODS.md).

Every metric is a ``torchmetrics.Metric`` fed with scores and maps only, keeping per-image values
so that ``compute()`` returns the mean with its N and a bootstrap 95% interval
(``MetricResult``), also after a DDP sync. Every extra model call lives in ``perturb.Perturber``.

Units: Average Drop, Increase in Confidence, Win %, Percentage-in, pointing game, energy pointing
game and box accuracy in percent (0-100); deletion/insertion AUC, ROAD scores and mask IoU in
[0, 1]; correlations in [-1, 1].

Typical use::

    engine = Perturber(model, Protocol(), chunk_size=64)
    base = engine.base_scores(images, labels)                      # 1 forward / image
    table = engine.confidence_table(images, maps_by_method, base=base)  # M * (1 + P)
    for name in maps_by_method:
        drop[name].update(base.scores, table.masked[name], base.keep)
        pin[name].update(base.scores, table.percentage_in[name], base.keep)
    drop["gradcam"].compute().to_dict()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchmetrics import Metric

from attncam.metrics.confidence import (
    AverageDrop,
    IncreaseInConfidence,
    PercentageIn,
    WinPercentage,
)
from attncam.metrics.curves import ROAD, DeletionInsertion, OcclusionFaithfulness
from attncam.metrics.localization import (
    BoxAccuracy,
    EnergyPointingGame,
    MaskIoU,
    PointingGame,
    largest_component_boxes,
)
from attncam.metrics.perturb import (
    BaseScores,
    ConfidenceTable,
    Curves,
    Perturber,
    Protocol,
    RoadScores,
)
from attncam.metrics.protocol import EvalProtocol
from attncam.metrics.sanity import (
    SanityCheck,
    block_layers,
    cascading_randomization,
    randomizable_layers,
    run_sanity_check,
)
from attncam.metrics.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_NUM_RESAMPLES,
    SKIP_REASONS,
    MetricResult,
    PerImageMetric,
    bootstrap_ci,
    holm,
    paired_bootstrap,
    summarize,
)

#: Metric keys accepted in ``conf/metrics/*.yaml`` ``enabled`` lists.
METRIC_KEYS: tuple[str, ...] = (
    "average_drop",
    "increase_in_confidence",
    "percentage_in",
    "deletion_insertion",
    "road",
    "occlusion_faithfulness",
    "pointing_game",
    "energy_pointing_game",
    "mask_iou",
    "box_accuracy",
)


def build_metrics(cfg: Mapping[str, Any]) -> tuple[Protocol, dict[str, Metric]]:
    """Protocol and one fresh metric per enabled key, from a ``conf/metrics`` config.

    Per-method metrics are built once per call: call it (or ``copy.deepcopy`` the result) for
    every explanation method. ``WinPercentage`` and ``SanityCheck`` are built by the caller (they
    need a method pair / the layer list).

    Args:
        cfg: Mapping with ``protocol``, ``enabled``, ``num_resamples``, ``confidence`` and the
            per-metric settings of ``conf/metrics/default.yaml``.

    Returns:
        ``(protocol, {key: metric})``.

    Raises:
        ValueError: On an unknown metric key.
    """
    protocol = Protocol.from_dict(dict(cfg.get("protocol", {})))
    enabled = list(cfg.get("enabled", METRIC_KEYS))
    unknown = [k for k in enabled if k not in METRIC_KEYS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from: {', '.join(METRIC_KEYS)}")
    common = {
        "num_resamples": int(cfg.get("num_resamples", DEFAULT_NUM_RESAMPLES)),
        "confidence": float(cfg.get("confidence", DEFAULT_CONFIDENCE)),
        "seed": protocol.seed,
    }
    occ = dict(cfg.get("occlusion", {}))
    factories: dict[str, Any] = {
        "average_drop": lambda: AverageDrop(**common),
        "increase_in_confidence": lambda: IncreaseInConfidence(**common),
        "percentage_in": lambda: PercentageIn(
            protocol.percentages, protocol.percentage_variant, **common
        ),
        "deletion_insertion": lambda: DeletionInsertion(**common),
        "road": lambda: ROAD(protocol.road_percentages, **common),
        "occlusion_faithfulness": lambda: OcclusionFaithfulness(
            int(occ.get("window", 32)), int(occ.get("stride", 16)), **common
        ),
        "pointing_game": lambda: PointingGame(float(cfg.get("pointing_tolerance", 15)), **common),
        "energy_pointing_game": lambda: EnergyPointingGame(**common),
        "mask_iou": lambda: MaskIoU(float(cfg.get("iou_threshold", 0.5)), **common),
        "box_accuracy": lambda: BoxAccuracy(
            float(cfg.get("box_threshold", 0.2)), float(cfg.get("box_iou", 0.5)), **common
        ),
    }
    return protocol, {k: factories[k]() for k in enabled}


__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_NUM_RESAMPLES",
    "METRIC_KEYS",
    "ROAD",
    "SKIP_REASONS",
    "AverageDrop",
    "BaseScores",
    "BoxAccuracy",
    "ConfidenceTable",
    "Curves",
    "DeletionInsertion",
    "EnergyPointingGame",
    "EvalProtocol",
    "IncreaseInConfidence",
    "MaskIoU",
    "MetricResult",
    "OcclusionFaithfulness",
    "PercentageIn",
    "PerImageMetric",
    "Perturber",
    "PointingGame",
    "Protocol",
    "RoadScores",
    "SanityCheck",
    "WinPercentage",
    "block_layers",
    "bootstrap_ci",
    "build_metrics",
    "cascading_randomization",
    "holm",
    "largest_component_boxes",
    "paired_bootstrap",
    "randomizable_layers",
    "run_sanity_check",
    "summarize",
]
