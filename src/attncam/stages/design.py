"""The evaluation's design: which images, which baselines and controls, which tensors compared.

A table that compares methods is only evidence when they are compared on the same images, the
same tensor and beside baselines that know nothing of the model. This module decides those
things for the explain stage and records them for the manifest.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from attncam.data.sampling import dataset_labels, stratified_subset
from attncam.explain import Explainer
from attncam.explain.hooks import capture
from attncam.metrics.baselines import BASELINES, ORACLE
from attncam.metrics.calibration import calibrate, collect_logits
from attncam.runtime import eval_mode
from attncam.stages.cli import check_limit

log = logging.getLogger(__name__)

#: CAM grids smaller than this (per side) are flagged: the papers compare at 7 x 7 (224 px).
MIN_GRID = 7

Spec = tuple[str, dict[str, Any]]


def explained_ids(dataset: Dataset, limit: int | None, seed: int) -> list[int]:
    """All indices, or for ``limit=N`` a seeded class-stratified subset (sorted)."""
    n = len(dataset)  # type: ignore[arg-type]
    if not limit or limit >= n:
        return list(range(n))
    labels = dataset_labels(dataset)
    if labels is None or labels.numel() != n:
        labels_seq: Sequence[int] = [0] * n  # no labels: a seeded random subset
        log.info("limit=%d: the data has no labels, taking a seeded random subset", limit)
    else:
        labels_seq = labels.tolist()
    return stratified_subset(labels_seq, int(limit), seed)


def _gates_the_cam_layer(explainer: Explainer, site: str, image_size: tuple[int, int]) -> bool:
    """Whether the attention module at ``site`` takes the CAM layer's output as its input."""
    module = site.removesuffix(":input")
    cam = explainer.layers[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *image_size, generator=gen)
    net = explainer.model
    with eval_mode(net), torch.no_grad(), capture(net, [cam, f"{module}:input"]) as acts:
        net(x.to(next(net.parameters()).device))
    a, b = acts[cam], acts[f"{module}:input"]
    return a.shape == b.shape and bool(torch.equal(a, b))


def control_specs(
    explainer: Explainer, specs: list[Spec], image_size: tuple[int, int]
) -> list[Spec]:
    """Grad-CAM on the attention's input for each attention-guided method not on the CAM layer.

    With ``placement=last`` the attention-guided tensor is the CAM layer's output gated by CBAM,
    so it differs from Grad-CAM's only by the attention and the Grad-CAM row is the control. With
    ``placement=blocks`` on a residual backbone the last CBAM sits on the residual branch, before
    the identity add, while Grad-CAM explains the block output: a difference would measure the
    choice of tensor, not attention. Then the control row ``gradcam[layer=<CBAM>:input]`` is added:
    Grad-CAM on the features entering that CBAM (``F``), which differ from the tensor the default
    variant explains (its output ``F''``) only by the gating, and are the tensor the
    ``spatial_product`` variant weights. (Grad-CAM on ``F''`` itself would be no control: it is
    the ``cbam_output`` variant, map for map.)
    """
    have = {(k, str(o.get("layer"))) for k, o in specs}
    controls: list[Spec] = []
    for key, layers in explainer.target_layers().items():
        site = layers[0] if key.startswith("attention_guided") and layers else None
        if site is None or site in explainer.layers:
            continue
        if not site.endswith(":input") and site.split(".")[-1].startswith("attention"):
            site = f"{site}:input"
        if ("gradcam", site) in have or _gates_the_cam_layer(explainer, site, image_size):
            continue
        controls.append(("gradcam", {"layer": site}))
        have.add(("gradcam", site))
        log.info(
            "%s explains the attention at %s, which does not gate the CAM layer %s: adding "
            "Grad-CAM on the attention's input as a control row", key, site, explainer.layers[0],
        )  # fmt: skip
    return controls


def layer_report(explainer: Explainer, image_size: tuple[int, int]) -> dict[str, Any]:
    """Per method its target layers and their spatial sizes; warns on grids under 7 x 7."""
    sizes = explainer.layer_sizes(image_size)
    report: dict[str, Any] = {}
    for name, layers in explainer.target_layers().items():
        report[name] = {"layers": layers, "sizes": [list(sizes[s]) for s in layers]}
    small = sorted({s for s, (h, w) in sizes.items() if min(h, w) < MIN_GRID})
    if small:
        log.warning(
            "CAM grid smaller than %dx%d at %dx%d px: %s; the papers compare at 7x7 (224 px). "
            "Coarse grids make localisation scores depend on the grid, not the method",
            MIN_GRID, MIN_GRID, *image_size, ", ".join(f"{s} {sizes[s]}" for s in small),
        )  # fmt: skip
    return {
        "per_method": report,
        "sites": {s: list(v) for s, v in sizes.items()},
        "small_grids": small,
        "image_size": list(image_size),
    }


def baseline_names(metrics_cfg: Mapping[str, Any], has_masks: bool) -> list[str]:
    """The configured baselines (``metrics.baselines``); the oracle only when masks exist."""
    wanted = list(metrics_cfg.get("baselines") or [])
    unknown = [b for b in wanted if b not in BASELINES]
    if unknown:
        raise ValueError(
            f"unknown metrics.baselines {unknown}; choose from: {', '.join(BASELINES)}"
        )
    if ORACLE in wanted and not has_masks:
        log.info("no ground-truth masks: the oracle baseline is left out")
        wanted.remove(ORACLE)
    return wanted


def has_masks(dataset: Dataset, ids: Sequence[int]) -> bool:
    """Whether the first explained image carries a ground-truth mask."""
    if not ids:
        return False
    item = dataset[ids[0]]
    return len(item) > 2 and bool(item[2].any())


def git_state(root: Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether its tracked files differ from it (None outside git)."""
    root = root or Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def plan(
    cfg: DictConfig, dataset: Dataset, net: nn.Module, specs: list[Any], layer: Any,
    metrics_cfg: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Images, control rows, baselines and the CAM grid of the evaluation (``stages.design``)."""
    ids = explained_ids(dataset, check_limit(cfg.get("limit")), int(cfg.get("seed", 0)))
    image_size = tuple(dataset[ids[0]][0].shape[-2:]) if ids else (224, 224)
    explainer = Explainer(net, specs, layer=layer)
    controls = control_specs(explainer, specs, image_size)  # type: ignore[arg-type]
    if controls:
        explainer = Explainer(net, [*specs, *controls], layer=layer)
    layers = layer_report(explainer, image_size)  # type: ignore[arg-type]
    sites = layers["sites"]
    grid = sites.get(explainer.layers[0]) or next(iter(sites.values()))
    baselines = baseline_names(metrics_cfg, has_masks(dataset, ids))
    return {
        "ids": ids, "specs": [*specs, *controls], "controls": controls, "layers": layers,
        "grid": tuple(grid), "baselines": baselines,
    }  # fmt: skip


def compare_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The paired-comparison settings (``compare=<reference method>``), or None."""
    if not cfg.get("compare"):
        return None
    return {
        "reference": str(cfg.compare),
        "primary": list(cfg.get("compare_primary") or []),
        "sesoi": dict(cfg.get("compare_sesoi") or {}),
        "resamples": int(cfg.get("compare_resamples") or 20_000),
        "seed": int(cfg.get("seed", 0)),
    }


def calibration(
    net: nn.Module, datamodule: Any, metrics_cfg: dict[str, Any]
) -> dict[str, Any] | None:
    """Fit the temperature of ``score=calibrated`` on the validation split (Guo et al. 2017).

    Sets ``metrics_cfg["protocol"]["temperature"]`` in place and returns the fit (temperature,
    ECE and NLL before and after, N), or None when the protocol needs no fit (another score, or
    a temperature given by the user).

    Raises:
        ValueError: ``score=calibrated`` without a validation split (image files).
    """
    protocol = metrics_cfg.setdefault("protocol", {})
    if protocol.get("score") != "calibrated" or protocol.get("temperature") is not None:
        return None
    if datamodule is None or not hasattr(datamodule, "val_dataloader"):
        raise ValueError(
            "metrics.protocol.score=calibrated fits the temperature on the validation split: "
            "pass data=NAME (or a checkpoint with its training data), or set "
            "metrics.protocol.temperature=T"
        )
    datamodule.setup("fit")
    logits, labels = collect_logits(net, datamodule.val_dataloader())
    fit = calibrate(logits, labels)
    protocol["temperature"] = fit.temperature
    log.info(
        "score=calibrated: T = %.3f on %d validation images (ECE %.3f -> %.3f, NLL %.3f -> %.3f)",
        fit.temperature, fit.n, fit.ece_before, fit.ece_after, fit.nll_before, fit.nll_after,
    )  # fmt: skip
    if fit.temperature < 1:
        log.warning(
            "T = %.3f < 1: the model is under-confident on the validation split, so calibrated "
            "scores are more saturated than the softmax, not less", fit.temperature,
        )  # fmt: skip
    return fit.to_dict()
