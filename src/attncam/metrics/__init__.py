"""attncam.metrics: faithfulness and localisation metrics of saliency maps (docs/METHODS.md).

Every metric is a ``torchmetrics.Metric`` fed with scores and maps only, keeping per-image values
and their image ids so that ``compute()`` returns the mean with its N and a bootstrap 95% interval
(``MetricResult``), also after a DDP sync, and ``per_image()`` returns the values by image id.
Every extra model call lives in ``perturb.Perturber``; ``MetricSuite`` decides which ones a set of
metrics needs and feeds every metric of every method.

Units: Average Drop, Increase in Confidence, Win %, Percentage-in, pointing game, energy pointing
game and box accuracy in percent (0-100); deletion/insertion AUC, ROAD scores and mask IoU in
[0, 1]; correlations in [-1, 1].

Typical use::

    suite = MetricSuite.from_config(cfg, names=["gradcam", "gradcampp"])
    suite.bind(model)
    base = suite.base_scores(images, labels)                       # 1 forward / image
    suite.update(images, maps_by_method, masks, base, ids)         # the perturbations needed
    suite.results()["gradcam"]["average_drop"]                     # MetricResult.to_dict()

or, driving single metrics by hand::

    engine = Perturber(model, EvalProtocol())
    base = engine.base_scores(images, labels)
    table = engine.confidence_table(images, maps_by_method, base=base)  # M * (1 + P)
    drop = AverageDrop()
    drop.update(base.scores, table.masked["gradcam"], base.keep, ids=ids)
    drop.compute().to_dict(), drop.per_image()
"""

from __future__ import annotations

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
from attncam.metrics.suite import METRIC_KEYS, MetricSuite, build_metrics

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
    "MetricSuite",
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
