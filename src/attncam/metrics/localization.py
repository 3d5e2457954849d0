"""Localisation metrics: pointing game, energy-based pointing game, mask IoU, box accuracy, and
the grid pointing game.

Fed with maps and ground-truth masks (or grid cells) only. Images whose mask is all False (no
annotation) are skipped and counted (``empty_mask``); non-finite maps are skipped and counted
(``non_finite``); all-zero maps (what the Explainer returns when a CAM vanishes) are skipped and
counted (``zero_map``) by every metric here alike: such a map points nowhere, has no energy and no
thresholded region. Images the caller leaves out (``keep`` False) are counted as ``excluded``:
``localisation_keep`` builds the default keep-mask of these metrics (correctly classified images
only, docs/METHODS.md, "Metrics") and ``in_top_k`` the grid pointing game's (the target among the
model's top 4).
Connected components are labelled with ``scipy.ndimage.label`` on CPU, the places the metrics
leave the device: for box accuracy (the binary maps go to NumPy and one box per image comes back)
and, in the pointing game, for the rare maximum plateaus that are not filled rectangles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from attncam.metrics import functional as MF
from attncam.metrics.stats import MetricResult, PerImageMetric, keep_mask

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def largest_component_boxes(binary: Tensor) -> tuple[Tensor, Tensor]:
    """Box ``(x0, y0, x1, y1)`` of the largest 8-connected component of each binary map.

    Uses ``scipy.ndimage.label`` on CPU (stated exception to "tensors stay on device").

    Args:
        binary: ``(B, H, W)`` bool.

    Returns:
        ``(boxes (B, 4) float on binary's device, found (B,) bool)``; ``found`` is False for an
        empty map (its box is all zeros).
    """
    arr = binary.detach().cpu().numpy()
    boxes = np.zeros((arr.shape[0], 4), dtype=np.float32)
    found = np.zeros(arr.shape[0], dtype=bool)
    for i, m in enumerate(arr):
        labels, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        ys, xs = np.nonzero(labels == int(sizes.argmax()) + 1)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        found[i] = True
    return (
        torch.from_numpy(boxes).to(binary.device),
        torch.from_numpy(found).to(binary.device),
    )


class _MaskMetric(PerImageMetric):
    """Shared update for metrics of ``(map, mask)`` pairs."""

    _name = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_values("values")

    def _per_image(self, maps: Tensor, masks: Tensor) -> Tensor:
        raise NotImplementedError

    def update(
        self, maps: Tensor, masks: Tensor, keep: Tensor | None = None, *, ids: Tensor | None = None
    ) -> None:
        """Add a batch.

        Args:
            maps: ``(B, H, W)`` saliency maps in [0, 1] at input resolution.
            masks: ``(B, H, W)`` bool ground truth (all False = no annotation, skipped).
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.

        Skipped and counted, each image under its first reason: ``excluded``, ``non_finite``,
        ``empty_mask``, ``zero_map`` (an all-zero map).
        """
        finite = MF.check_maps(maps)
        annotated = MF.check_masks(masks, maps)
        checks = [
            ("excluded", keep_mask(keep, maps)),
            ("non_finite", finite),
            ("empty_mask", annotated),
            ("zero_map", MF.nonzero_maps(maps)),
        ]
        valid = self._filter(torch.ones_like(finite), checks)
        per_image = self._per_image(maps[valid].float(), masks[valid]).float()
        self._append_valid(ids, valid, values=per_image)

    def _columns(self) -> dict[str, Tensor]:
        return {self._name: self.values()}

    def compute(self) -> MetricResult:
        """Mean over annotated images with N, bootstrap interval and skip counts."""
        return self._summary(self._name, self.values())


class PointingGame(_MaskMetric):
    """Pointing game (Zhang et al. 2016): hit rate (%) of the map's maximum within the mask.

    A hit is the map's point within ``tolerance`` pixels (Euclidean) of a mask pixel; 15 px as
    in Zhang et al. The point is ``functional.map_peaks(maps, rule)``: by default
    (``"cell_centre"``) the maximum plateau mapped back to the centre of its CAM cell, so that
    bilinear upsampling does not turn a border cell's maximum into a border pixel;
    ``"argmax"`` is the first arg-max in row-major order (attncam's earlier rule). An all-zero
    map has no maximum to point with: it is skipped and counted (``zero_map``), as in the energy
    pointing game. Higher is better.

    Args:
        tolerance: Tolerance in pixels.
        rule: Peak rule, one of ``functional.PEAK_RULES``.
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.

    Raises:
        ValueError: On a negative tolerance or an unknown rule.
    """

    higher_is_better = True
    _name = "pointing_game"

    def __init__(self, tolerance: float = 15.0, rule: str = "cell_centre", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels; got {tolerance}")
        if rule not in MF.PEAK_RULES:
            raise ValueError(
                f"unknown peak rule '{rule}'; choose one of: {', '.join(MF.PEAK_RULES)}"
            )
        self.tolerance = float(tolerance)
        self.rule = rule

    def _per_image(self, maps: Tensor, masks: Tensor) -> Tensor:
        return MF.pointing_game_hits(maps, masks, self.tolerance, self.rule)


class EnergyPointingGame(_MaskMetric):
    """Energy-based pointing game (Wang et al. 2020, Score-CAM sec. 4.3): ``100 sum(L m) / sum(L)``.

    All-zero maps (no energy) are skipped and counted (``zero_map``), as in every localisation
    metric. Higher is better.

    Args:
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True
    _name = "energy_pointing_game"

    def _per_image(self, maps: Tensor, masks: Tensor) -> Tensor:
        return MF.energy_in_mask(maps, masks)


class MaskIoU(_MaskMetric):
    """IoU between the thresholded map ``L >= threshold`` and the ground-truth mask, in [0, 1].

    All-zero maps are skipped and counted (``zero_map``). Higher is better.

    Args:
        threshold: Map threshold in [0, 1].
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True
    _name = "mask_iou"

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
        self.threshold = float(threshold)

    def _per_image(self, maps: Tensor, masks: Tensor) -> Tensor:
        return MF.mask_iou(maps >= self.threshold, masks)


class BoxAccuracy(PerImageMetric):
    """Box accuracy (%) (Zhou et al. 2016, CAM, sec. 3): IoU >= ``iou_threshold`` between the box
    of the largest connected component of ``L >= threshold`` and a ground-truth box.

    Ground truth is either masks (their bounding box) or boxes ``(x0, y0, x1, y1)`` with
    exclusive ``x1, y1``: a ``(B, 4)`` tensor or a list of ``(K_i, 4)`` tensors (a hit on any box
    counts, as on ImageNet). Empty masks / no boxes are skipped and counted (``empty_mask``), and
    so are all-zero maps (``zero_map``).
    Connected components use scipy on CPU. Higher is better.

    Args:
        threshold: Map threshold in [0, 1] (CAM paper: 0.2 of the max; maps here have max 1).
        iou_threshold: IoU needed for a hit.
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True

    def __init__(self, threshold: float = 0.2, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, v in (("threshold", threshold), ("iou_threshold", iou_threshold)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {v}")
        self.threshold, self.iou_threshold = float(threshold), float(iou_threshold)
        self._add_values("values")

    def update(
        self,
        maps: Tensor,
        gt: Tensor | list[Tensor],
        keep: Tensor | None = None,
        *,
        ids: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            maps: ``(B, H, W)`` saliency maps.
            gt: ``(B, H, W)`` bool masks, ``(B, 4)`` boxes, or a list of ``B`` ``(K_i, 4)`` boxes.
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        finite = MF.check_maps(maps)
        b = maps.shape[0]
        if isinstance(gt, Tensor) and gt.dtype == torch.bool:
            annotated = MF.check_masks(gt, maps, "gt")
            boxes = [
                MF.masks_to_boxes(gt[i : i + 1]) if annotated[i] else gt.new_zeros(0, 4).float()
                for i in range(b)
            ]
        elif isinstance(gt, Tensor):
            if gt.shape != (b, 4):
                raise ValueError(f"gt boxes must have shape ({b}, 4); got {tuple(gt.shape)}")
            boxes = [gt[i : i + 1].float() for i in range(b)]
        else:
            if len(gt) != b or any(g.ndim != 2 or g.shape[1] != 4 for g in gt):
                raise ValueError(f"gt must be a list of {b} (K_i, 4) box tensors")
            boxes = [g.float() for g in gt]
        annotated = torch.tensor([g.shape[0] > 0 for g in boxes], device=maps.device)
        checks = [
            ("excluded", keep_mask(keep, maps)),
            ("non_finite", finite),
            ("empty_mask", annotated),
            ("zero_map", MF.nonzero_maps(maps)),
        ]
        valid = self._filter(torch.ones_like(finite), checks)
        idx = valid.nonzero().flatten()
        if idx.numel() == 0:
            self._append_valid(ids, valid, values=maps.new_zeros(0))
            return
        pred, found = largest_component_boxes(maps[idx] >= self.threshold)
        hits = []
        for j, i in enumerate(idx.tolist()):
            g = boxes[i].to(maps.device)
            iou = MF.box_iou(pred[j : j + 1].expand(g.shape[0], 4), g)
            hits.append(bool(found[j]) and bool((iou >= self.iou_threshold).any()))
        per_image = 100.0 * torch.tensor(hits, dtype=torch.float32, device=maps.device)
        self._append_valid(ids, valid, values=per_image)

    def _columns(self) -> dict[str, Tensor]:
        return {"box_accuracy": self.values()}

    def compute(self) -> MetricResult:
        """Box accuracy (%) with N, bootstrap interval and skip counts."""
        return self._summary("box_accuracy", self.values())


class GridPointingGame(PerImageMetric):
    """Grid pointing game (Böhle et al., CVPR 2021): share (%) of positive map mass in the cell.

    Each input is a 2 x 2 grid of images of four different classes (the data:
    ``attncam.data.synthetic.compose_grids``), explained once per class in it; the value of one
    grid-class pair is ``100 * sum(relu(L) in the target's cell) / sum(relu(L))``
    (``functional.grid_energy``; cells as ``functional.grid_cell_masks``). Only pairs whose class
    the model ranks in its top 4 for that grid are scored: the caller passes
    ``keep = in_top_k(logits, targets, 4)`` (the others are counted as ``excluded``). A map that
    is uniform, or centred and symmetric (the centre prior), scores exactly 25 %.
    All-zero maps are skipped and counted (``zero_map``), non-finite ones too (``non_finite``).
    Higher is better.

    Args:
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True
    _name = "grid_pointing_game"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_values("values")

    def update(
        self, maps: Tensor, cells: Tensor, keep: Tensor | None = None, *, ids: Tensor | None = None
    ) -> None:
        """Add a batch of grid-class pairs.

        Args:
            maps: ``(B, H, W)`` saliency maps in [0, 1] of grid images, one per target class.
            cells: ``(B,)`` integer cell of each target in its grid, ``0..3`` row-major.
            keep: ``(B,)`` bool, False for excluded pairs (target not in the model's top 4).
            ids: ``(B,)`` pair ids; default the metric's running counter.

        Raises:
            ValueError: On cells of the wrong shape, type or range.

        Skipped and counted, each pair under its first reason: ``excluded``, ``non_finite``,
        ``zero_map``.
        """
        finite = MF.check_maps(maps)
        b = maps.shape[0]
        if not isinstance(cells, Tensor) or cells.shape != (b,) or cells.is_floating_point():
            got = (cells.dtype, tuple(cells.shape)) if isinstance(cells, Tensor) else type(cells)
            raise ValueError(f"cells must be a ({b},) integer tensor; got {got}")
        if b and (int(cells.min()) < 0 or int(cells.max()) > 3):
            raise ValueError(
                f"cells must lie in 0..3 (2 x 2 grid, row-major); got {cells.tolist()}"
            )
        checks = [
            ("excluded", keep_mask(keep, maps)),
            ("non_finite", finite),
            ("zero_map", MF.nonzero_maps(maps)),
        ]
        valid = self._filter(torch.ones_like(finite), checks)
        cells = cells.to(device=maps.device, dtype=torch.long)
        per_image = MF.grid_energy(maps[valid].float(), cells[valid]).float()
        self._append_valid(ids, valid, values=per_image)

    def _columns(self) -> dict[str, Tensor]:
        return {self._name: self.values()}

    def compute(self) -> MetricResult:
        """Mean share (%) over the kept pairs with N, bootstrap interval and skip counts."""
        return self._summary(self._name, self.values())


def in_top_k(logits: Tensor, targets: Tensor, k: int = 4) -> Tensor:
    """Whether each target is among the model's ``k`` highest-scoring classes.

    The grid pointing game scores a grid-class pair only when the model ranks the class in its
    top 4 for that grid (Böhle et al. 2021). Ties with the ``k``-th score count as inside.

    Args:
        logits: ``(B, C)`` model outputs.
        targets: ``(B,)`` long classes.
        k: How many top classes, ``1 <= k``; ``k >= C`` keeps every target.

    Returns:
        ``(B,)`` bool.

    Raises:
        ValueError: On ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    k = min(int(k), logits.shape[1])
    kth = logits.topk(k, dim=1).values[:, -1]
    return logits.gather(1, targets[:, None].to(logits.device).long()).squeeze(1) >= kth


def localisation_keep(
    keep: Tensor, predicted: Tensor, labels: Tensor | None, only_correct: bool = True
) -> Tensor:
    """The keep-mask of the localisation metrics: by default, correctly classified images only.

    A misclassified image's map explains another class than the object its mask outlines, so
    by default the localisation metrics leave it out and count it (``excluded``), each reporting
    its N (docs/METHODS.md, "Metrics"). ``only_correct=False`` keeps every image the protocol
    keeps; without labels (``None``, or any label ``< 0``: unlabelled image files) correctness is
    unknown and nothing more is left out.

    Args:
        keep: ``(B,)`` bool, the protocol's keep-mask (``BaseScores.keep``).
        predicted: ``(B,)`` top-1 classes (``BaseScores.predicted``).
        labels: ``(B,)`` ground-truth classes, or None.
        only_correct: Leave misclassified images out.

    Returns:
        ``(B,)`` bool.
    """
    if not only_correct or labels is None or bool((labels < 0).any()):
        return keep
    return keep & (predicted == labels.to(predicted.device))
