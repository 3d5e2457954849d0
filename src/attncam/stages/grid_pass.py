"""The grid pointing game (Böhle et al. 2021): a second pass over 2 x 2 grids of four classes.

Each grid is explained once per class in it, for that class; the score is the share of the
map's positive mass inside the class's cell, over grid-class pairs the model ranks in its top 4.
A centre prior scores 25% by construction, so unlike the pointing game on centred objects the
score cannot be won by a centre bias. The game defines its targets (each class of a grid in turn),
so ``target=`` does not apply to this pass (said in one INFO line). Enabled with ``metrics.grid_pointing.enabled=true`` on data
that can compose grids (``data=synthetic``, ``data=synthetic_hard``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from attncam.explain import Explainer
from attncam.metrics.baselines import baseline_maps
from attncam.metrics.suite import MetricSuite

log = logging.getLogger(__name__)


def _suite_config(metrics_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics config of the grid pass: the label is the target, every pair is kept."""
    protocol = {**(metrics_cfg.get("protocol") or {}), "target": "label", "only_correct": False}
    return {
        **metrics_cfg, "protocol": protocol, "enabled": ["grid_pointing_game"], "win": False,
        "localisation_only_correct": False,
    }  # fmt: skip


def grid_pointing(
    net: nn.Module,
    specs: Sequence[tuple[str, dict[str, Any]]],
    layer: Any,
    datamodule: Any,
    metrics_cfg: Mapping[str, Any],
    plan: Mapping[str, Any],
    seed: int = 0,
    target: Any = None,
) -> dict[str, dict[str, dict[str, Any]]] | None:
    """``{method or baseline: {"grid_pointing_game": result}}``, or None when not enabled.

    ``target`` is the run's ``target=``, only to say that it does not apply here.

    Raises:
        ValueError: Enabled on data that cannot compose grids.
    """
    settings = dict(metrics_cfg.get("grid_pointing") or {})
    if not settings.get("enabled"):
        return None
    if datamodule is None or not hasattr(datamodule, "grid_dataset"):
        raise ValueError(
            "metrics.grid_pointing.enabled=true needs data that composes 2 x 2 grids of four "
            "classes (data=synthetic or data=synthetic_hard); set it to false for this data"
        )
    if target not in (None, "", "null"):
        log.info(
            "grid pointing game: each grid is explained for each of its four classes, as the "
            "game defines; target=%s applies to the main pass only", target,
        )  # fmt: skip
    dataset = datamodule.grid_dataset(settings.get("split", "test"), settings.get("num_grids"))
    explainer = Explainer(net, list(specs), layer=layer)
    baselines = [b for b in plan["baselines"]]
    suite = MetricSuite.from_config(_suite_config(metrics_cfg), explainer.names, baselines)
    suite.bind(net)
    loader = DataLoader(dataset, batch_size=int(settings.get("batch_size") or 16), shuffle=False)
    start = 0
    for images, targets, masks, cells in loader:
        ids = torch.arange(start, start + images.shape[0])
        start += images.shape[0]
        base = suite.base_scores(images, targets)
        maps = dict(explainer.explain(images, base.targets).maps)
        maps.update(baseline_maps(baselines, masks, ids, plan["grid"], seed))
        suite.update(images, maps, masks, base, ids, cells=cells)
    log.info("grid pointing game: %d grid-class pairs (%d grids)", start, start // 4)
    return suite.results()
