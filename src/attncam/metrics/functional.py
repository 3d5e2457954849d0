"""Pure tensor maths behind every metric: no model, no state, tensors stay on their device.

Shapes use named axes: ``B`` images, ``C`` classes, ``H x W`` input resolution, ``P`` levels.
Maps are ``(B, H, W)`` floats in [0, 1]; masks are ``(B, H, W)`` bools. Percentages are 0-100
(docs/METHODS.md, "Metrics").

One exception to "tensors stay on their device": ``map_peaks`` labels the rare maximum plateaus
that are not filled rectangles with ``scipy.ndimage.label`` on CPU.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

log = logging.getLogger(__name__)

SCORE_CHOICES: tuple[str, ...] = ("softmax", "logit")


# --------------------------------------------------------------------------- input checks


def check_maps(
    maps: Tensor,
    batch_size: int | None = None,
    size: tuple[int, int] | None = None,
    name: str = "maps",
    atol: float = 1e-4,
) -> Tensor:
    """Validate saliency maps and say which images have finite maps.

    Args:
        maps: Saliency maps, shape ``(B, H, W)``, floating, values in [0, 1].
        batch_size: Expected ``B`` (e.g. the number of images), or ``None``.
        size: Expected ``(H, W)`` (the input resolution), or ``None``.
        name: Name used in error messages.
        atol: Tolerance on the [0, 1] range check.

    Returns:
        ``(B,)`` bool: True where the map is finite everywhere. Non-finite maps are not an error:
        callers skip and count them (reason ``non_finite``).

    Raises:
        TypeError: If ``maps`` is not a floating tensor.
        ValueError: On a wrong rank, batch size, resolution, or values outside [0, 1].
    """
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor (B, H, W); got {type(maps).__name__}"
            + (f" of dtype {maps.dtype}" if isinstance(maps, Tensor) else "")
        )
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W); got {tuple(maps.shape)}")
    if batch_size is not None and maps.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {maps.shape[0]} but there are {batch_size} images")
    if size is not None and tuple(maps.shape[1:]) != tuple(size):
        raise ValueError(
            f"{name} have resolution {tuple(maps.shape[1:])}; expected the input resolution "
            f"{tuple(size)} (upsample the maps first)"
        )
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    if maps.numel() and bool(finite.any()):
        ok = maps[finite]
        lo, hi = float(ok.min()), float(ok.max())
        if lo < -atol or hi > 1 + atol:
            raise ValueError(f"{name} must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g}")
    return finite


def check_masks(masks: Tensor, maps: Tensor, name: str = "masks") -> Tensor:
    """Validate ground-truth masks against maps and say which images are annotated.

    Args:
        masks: Ground truth, shape ``(B, H, W)``, bool (an all-False mask means "no annotation").
        maps: The maps they are compared with, shape ``(B, H, W)``.
        name: Name used in error messages.

    Returns:
        ``(B,)`` bool: True where the mask has at least one pixel.

    Raises:
        TypeError: If ``masks`` is not a bool tensor.
        ValueError: If its shape differs from the maps'.
    """
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (B, H, W); got "
            + (str(masks.dtype) if isinstance(masks, Tensor) else type(masks).__name__)
        )
    if masks.shape != maps.shape:
        raise ValueError(f"{name} have shape {tuple(masks.shape)}; maps have {tuple(maps.shape)}")
    return masks.flatten(1).any(dim=1)


def check_scores(scores: Tensor, batch_size: int | None = None, name: str = "scores") -> Tensor:
    """Validate per-image scores and say which are finite.

    Args:
        scores: Shape ``(B,)`` or ``(B, P)``, floating.
        batch_size: Expected ``B`` or ``None``.
        name: Name used in error messages.

    Returns:
        ``(B,)`` bool: True where every score of the image is finite.

    Raises:
        ValueError: On a wrong rank or batch size.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {type(scores).__name__}")
    if scores.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (B,) or (B, P); got {tuple(scores.shape)}")
    if batch_size is not None and scores.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {scores.shape[0]}; expected {batch_size}")
    return torch.isfinite(scores.reshape(scores.shape[0], -1)).all(dim=1)


# --------------------------------------------------------------------------- scores


def select_scores(logits: Tensor, targets: Tensor, score: str = "softmax") -> Tensor:
    """Score of the target class.

    Args:
        logits: Model outputs, shape ``(B, C)``.
        targets: Target classes, shape ``(B,)`` long.
        score: ``"softmax"`` (probability) or ``"logit"`` (pre-softmax score ``y^c``).

    Returns:
        ``(B,)`` scores.
    """
    if score == "softmax":
        # log-softmax then exp: exact and stable where softmax would underflow to 0.
        return logits.float().log_softmax(dim=1).gather(1, targets[:, None]).squeeze(1).exp()
    if score == "logit":
        return logits.float().gather(1, targets[:, None]).squeeze(1)
    raise ValueError(f"unknown score '{score}'; choose one of: {', '.join(SCORE_CHOICES)}")


def average_drop(base: Tensor, masked: Tensor) -> Tensor:
    """Per-image Average Drop (Chattopadhay et al. 2018, sec. 5.1), in percent.

    ``100 * max(0, Y - O) / Y``; the metric is the mean over images.

    Args:
        base: ``Y``, scores on the full image, shape ``(B,)``, positive.
        masked: ``O``, scores on the explanation ``E``, shape ``(B,)``.

    Returns:
        ``(B,)`` drops in percent.
    """
    return 100.0 * (base - masked).clamp_min(0) / base


def increase_in_confidence(base: Tensor, masked: Tensor) -> Tensor:
    """Per-image Increase in Confidence (Chattopadhay et al. 2018, sec. 5.1), in percent.

    ``100 * 1[O > Y]``; An & Joe 2022 call its mean "Percent increase".

    Args:
        base: ``Y``, shape ``(B,)`` (or ``(B, P)``, broadcast against ``masked``).
        masked: ``O``, shape ``(B,)`` or ``(B, P)``.

    Returns:
        0 or 100 per image (and level).
    """
    if masked.ndim == 2 and base.ndim == 1:
        base = base[:, None]
    return 100.0 * (masked > base).to(masked.dtype)


def confidence_gain(base: Tensor, masked: Tensor) -> Tensor:
    """Per-image confidence gain ``100 * max(0, O - Y) / Y`` (Percentage-in ``gain`` variant).

    Args:
        base: ``Y``, shape ``(B,)``, positive.
        masked: ``O``, shape ``(B,)`` or ``(B, P)``.

    Returns:
        Gains in percent, shaped like ``masked``.
    """
    if masked.ndim == 2 and base.ndim == 1:
        base = base[:, None]
    return 100.0 * (masked - base).clamp_min(0) / base


def win(base: Tensor, masked_a: Tensor, masked_b: Tensor) -> Tensor:
    """Per-image Win % of method a over method b (Score-CAM-style comparison; docs/METHODS.md).

    Method a wins an image when its drop ``Y - O_a`` is smaller than b's; a tie counts half.

    Args:
        base: ``Y``, shape ``(B,)``.
        masked_a: ``O`` of method a, shape ``(B,)``.
        masked_b: ``O`` of method b, shape ``(B,)``.

    Returns:
        ``(B,)``: 100 (a wins), 50 (tie) or 0.
    """
    drop_a, drop_b = base - masked_a, base - masked_b
    return 100.0 * (drop_a < drop_b).to(base.dtype) + 50.0 * (drop_a == drop_b).to(base.dtype)


# --------------------------------------------------------------------------- pixel orderings


def top_percent_threshold(maps: Tensor, percent: float) -> Tensor:
    """The ``(100 - p)``th nearest-rank percentile of each map (An & Joe 2022, Percentage-in).

    The threshold is the ``ceil(p/100 * H*W)``-th largest value, so a map with distinct values has
    exactly ``ceil(p/100 * H*W)`` pixels at or above it.

    Args:
        maps: ``(B, H, W)``.
        percent: ``p`` in (0, 100].

    Returns:
        ``(B,)`` thresholds.
    """
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"percent must be in (0, 100]; got {percent}")
    flat = maps.flatten(1)
    hw = flat.shape[1]
    k = max(1, math.ceil(percent * hw / 100.0 - 1e-9))
    return flat.kthvalue(hw - k + 1, dim=1).values


def top_percent_mask(maps: Tensor, percent: float) -> Tensor:
    """``B_p = 1[L >= (100 - p)th percentile of L]``, per image (An & Joe 2022, third table).

    Ties at the threshold are all kept (a constant map keeps every pixel); see
    ``top_percent_threshold``.

    Args:
        maps: ``(B, H, W)``.
        percent: ``p`` in (0, 100].

    Returns:
        ``(B, H, W)`` bool.
    """
    return maps >= top_percent_threshold(maps, percent)[:, None, None]


def saliency_ranks(maps: Tensor) -> Tensor:
    """Rank of every pixel by decreasing saliency (0 = most salient), ties by position.

    Args:
        maps: ``(B, H, W)``.

    Returns:
        ``(B, H*W)`` long ranks, a permutation of ``0 .. H*W-1`` per image.
    """
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=maps.device).expand_as(order))
    return ranks


def perturbation_counts(num_pixels: int, steps: int) -> list[int]:
    """Number of pixels perturbed at each point of a deletion/insertion curve.

    Equal steps of ``ceil(H*W / steps)`` pixels, then all pixels (Petsiuk et al. 2018, sec. 4.1;
    the same schedule as torchcam's ``DeletionInsertionMetric``).

    Args:
        num_pixels: ``H*W``.
        steps: Number of steps (the curve has at most ``steps + 1`` points).

    Returns:
        Increasing counts from 0 to ``num_pixels``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    step = -(-num_pixels // steps)
    return [*range(0, num_pixels, step), num_pixels]


def curve_auc(curves: Tensor, fractions: Tensor) -> Tensor:
    """Area under deletion/insertion curves by the trapezoid rule (Petsiuk et al. 2018).

    Args:
        curves: Scores, shape ``(B, S+1)``.
        fractions: Perturbed fraction of pixels at each point, shape ``(S+1,)``, 0 to 1.

    Returns:
        ``(B,)`` AUCs; in [0, 1] for probabilities since the x axis spans [0, 1].
    """
    return torch.trapezoid(curves, fractions.to(curves), dim=1)


def gaussian_kernel1d(kernel_size: int, sigma: float, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian, shape ``(kernel_size,)``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1; got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    x = torch.arange(kernel_size, dtype=torch.float32, device=device) - kernel_size // 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur with reflect padding (the insertion start, Petsiuk et al. 2018).

    Reflect padding keeps borders at their own colour (no dark frame) and makes the blur commute
    with per-channel affine normalisation, so it gives the same image in either mask space.

    Args:
        images: ``(B, 3, H, W)``.
        kernel_size: Odd kernel size.
        sigma: Standard deviation in pixels.

    Returns:
        ``(B, 3, H, W)`` blurred images.
    """
    b, c, h, w = images.shape
    k = gaussian_kernel1d(kernel_size, sigma, images.device).to(images.dtype)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    x = images.reshape(b * c, 1, h, w)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


# --------------------------------------------------------------------------- localisation


def nonzero_maps(maps: Tensor) -> Tensor:
    """Which maps are not all zero (NaN counted as zero): ``(B, H, W)`` in [0, 1] -> ``(B,)`` bool.

    An all-zero map is what the Explainer returns when a CAM vanishes; the localisation metrics
    skip it and count it (reason ``zero_map``).
    """
    return torch.nan_to_num(maps, nan=0.0).flatten(1).sum(1) > 0


#: Rules for the point a map points with (the pointing game): see ``map_peaks``.
PEAK_RULES: tuple[str, ...] = ("cell_centre", "argmax")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _extent(present: Tensor) -> tuple[Tensor, Tensor]:
    """First and last index where ``present`` ``(B, N)`` bool is True, per row (non-empty rows)."""
    n = present.shape[1]
    ar = torch.arange(n, device=present.device)
    return torch.where(present, ar, n).amin(dim=1), torch.where(present, ar, -1).amax(dim=1)


def _component_at(plateau: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column pixel counts of the 8-connected plateau component holding each seed.

    Plateaus that fill their bounding box are connected and counted as they are; the others
    (rare: ties between separate regions, or plateaus of irregular shape) are labelled with
    ``scipy.ndimage.label`` on CPU.

    Args:
        plateau: ``(B, H, W)`` bool, each True at its seed.
        seeds: ``(B,)`` long flat indices ``y * W + x`` of the seeds.

    Returns:
        ``(rows (B, H), cols (B, W))`` float64 pixel counts of the components.
    """
    pf = plateau.float()
    rows, cols = pf.sum(2).double(), pf.sum(1).double()
    y0, y1 = _extent(rows > 0)
    x0, x1 = _extent(cols > 0)
    filled = rows.sum(1) == ((y1 - y0 + 1) * (x1 - x0 + 1)).double()
    w = plateau.shape[2]
    for i in (~filled).nonzero().flatten().tolist():
        labels, _ = ndimage.label(plateau[i].cpu().numpy(), structure=_EIGHT_CONNECTED)
        seed = int(seeds[i])
        comp = torch.from_numpy(labels == labels[seed // w, seed % w]).to(rows)
        rows[i], cols[i] = comp.sum(1), comp.sum(0)
    return rows, cols


def _axis_point(lo: Tensor, hi: Tensor, mean: Tensor, size: int) -> Tensor:
    """One coordinate of the point of a plateau spanning ``[lo, hi]`` on an axis of ``size``.

    The inner edge where the plateau touches one border only, the middle of the axis where it
    spans the axis, its centroid ``mean`` elsewhere (see ``map_peaks``).
    """
    at_lo, at_hi = lo == 0, hi == size - 1
    middle = torch.full_like(mean, (size - 1) / 2)
    point = torch.where(at_lo & at_hi, middle, mean)
    point = torch.where(at_lo & ~at_hi, hi.to(mean.dtype), point)
    return torch.where(at_hi & ~at_lo, lo.to(mean.dtype), point)


def map_peaks(maps: Tensor, rule: str = "cell_centre", rtol: float = 1e-6) -> Tensor:
    """The pixel each map points at: its maximum, with a tie rule that invents no border hits.

    ``rule="argmax"``: the first arg-max in row-major order (the rule of Zhang et al. 2016 on a
    map with one maximum). ``rule="cell_centre"`` (docs/METHODS.md, "Pointing game"): the
    maximum plateau (pixels ``>= max - rtol * |max|``), restricted to its 8-connected component
    that holds the first arg-max, is mapped back to the centre of the CAM cell it comes from.
    Bilinear upsampling with ``align_corners=False`` (every attncam map) turns an interior cell's
    maximum into a peak at the cell's centre, but clamps at the border: every pixel between the
    image border and a border cell's centre takes that cell's value, so a border maximum becomes
    a plateau from the border to the cell's centre and its first arg-max is a border pixel. Per
    axis the point is therefore the plateau's inner edge where it touches one border only, the
    middle of the axis where it spans the axis (e.g. a constant map), and the plateau's centroid
    elsewhere, rounded to the nearest pixel. A map with a one-pixel maximum points at that pixel
    under both rules. The rule assumes bilinear upsampling: for a nearest-neighbour upsampled
    map a border cell's point is its inner edge, half a cell from its centre.

    Args:
        maps: ``(B, H, W)`` finite maps.
        rule: One of ``PEAK_RULES``.
        rtol: Relative tolerance of the maximum plateau.

    Returns:
        ``(B, 2)`` long ``(row, column)`` of the pixel pointed at.

    Raises:
        ValueError: On an unknown rule.
    """
    if rule not in PEAK_RULES:
        raise ValueError(f"unknown peak rule '{rule}'; choose one of: {', '.join(PEAK_RULES)}")
    b, h, w = maps.shape
    flat = maps.flatten(1)
    first = flat.argmax(dim=1)
    if rule == "argmax":
        return torch.stack([first // w, first % w], dim=1)
    top = flat.gather(1, first[:, None])
    plateau = (flat >= top - rtol * top.abs()).view(b, h, w)
    rows, cols = _component_at(plateau, first)  # (B, H), (B, W) pixel counts
    count = rows.sum(1)
    y0, y1 = _extent(rows > 0)
    x0, x1 = _extent(cols > 0)
    my = (rows * torch.arange(h, device=maps.device, dtype=torch.float64)).sum(1) / count
    mx = (cols * torch.arange(w, device=maps.device, dtype=torch.float64)).sum(1) / count
    py, px = _axis_point(y0, y1, my, h), _axis_point(x0, x1, mx, w)
    return torch.stack([py, px], dim=1).add_(0.5).floor_().long()


def pointing_game_hits(
    maps: Tensor, masks: Tensor, tolerance: float = 15.0, rule: str = "cell_centre"
) -> Tensor:
    """Pointing game (Zhang et al. 2016): is the map's point within ``tolerance`` px of the mask?

    The point is ``map_peaks(maps, rule)``; the distance is Euclidean, to the nearest mask
    pixel (an exact distance transform evaluated at one point).

    Args:
        maps: ``(B, H, W)``, finite and not all zero (callers skip those, see
            :func:`nonzero_maps`: an all-zero map has no maximum to point with).
        masks: ``(B, H, W)`` bool, each with at least one pixel.
        tolerance: Tolerance in pixels.
        rule: One of ``PEAK_RULES`` (default ``"cell_centre"``).

    Returns:
        ``(B,)`` 100 for a hit, 0 for a miss.
    """
    _, h, w = maps.shape
    peaks = map_peaks(maps, rule).to(maps.dtype)
    py, px = peaks[:, 0], peaks[:, 1]
    ys = torch.arange(h, device=maps.device, dtype=maps.dtype)
    xs = torch.arange(w, device=maps.device, dtype=maps.dtype)
    d2 = (ys[None, :, None] - py[:, None, None]) ** 2 + (xs[None, None, :] - px[:, None, None]) ** 2
    d2 = d2.masked_fill(~masks, float("inf"))
    return 100.0 * (d2.flatten(1).min(dim=1).values <= tolerance**2).to(maps.dtype)


def energy_in_mask(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM, sec. 4.3), in percent.

    ``100 * sum(L * mask) / sum(L)``.

    Args:
        maps: ``(B, H, W)`` with positive sums.
        masks: ``(B, H, W)`` bool.

    Returns:
        ``(B,)`` percentages.
    """
    return 100.0 * (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)


def grid_cell_masks(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """The four cells of a 2 x 2 grid image, row-major (Böhle et al. 2021, grid pointing game).

    Cell ``k`` covers rows ``[0, H // 2)`` (``k < 2``) or ``[H // 2, H)`` and columns
    ``[0, W // 2)`` (``k`` even) or ``[W // 2, W)``: the layout of
    ``attncam.data.synthetic.compose_grids``.

    Args:
        h: Image height ``H``.
        w: Image width ``W``.
        device: Device of the result.

    Returns:
        ``(4, H, W)`` bool, disjoint, covering the image.
    """
    rows = torch.arange(h, device=device) >= h // 2  # (H,) True in the bottom half
    cols = torch.arange(w, device=device) >= w // 2  # (W,) True in the right half
    cells = [(rows[:, None] == bool(k // 2)) & (cols[None, :] == bool(k % 2)) for k in range(4)]
    return torch.stack(cells)


def grid_energy(maps: Tensor, cells: Tensor) -> Tensor:
    """Share (%) of each map's positive mass inside its target's grid cell (Böhle et al. 2021).

    ``100 * sum(relu(L) * cell) / sum(relu(L))``: the localisation metric of Böhle et al.
    (CVPR 2021, Convolutional Dynamic Alignment Networks) on a 2 x 2 grid of images of four
    classes (cells as ``grid_cell_masks``).

    Args:
        maps: ``(B, H, W)`` with a positive mass.
        cells: ``(B,)`` long target cells in ``0..3``, row-major.

    Returns:
        ``(B,)`` percentages.
    """
    _, h, w = maps.shape
    pos = maps.clamp_min(0)
    inside = grid_cell_masks(h, w, maps.device)[cells]  # (B, H, W)
    return 100.0 * (pos * inside).flatten(1).sum(1) / pos.flatten(1).sum(1)


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """Intersection over union of two bool masks, ``(B, H, W)`` each; ``(B,)`` in [0, 1].

    Two empty masks give IoU 0 (the union is clamped to 1 pixel).
    """
    inter = (pred & gt).flatten(1).sum(1)
    union = (pred | gt).flatten(1).sum(1)
    return inter.double().div(union.clamp_min(1)).to(torch.float32)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes ``(x0, y0, x1, y1)`` of bool masks, pixel edges (x1, y1 exclusive).

    Args:
        masks: ``(B, H, W)`` bool, each non-empty.

    Returns:
        ``(B, 4)`` float boxes.
    """
    _, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired boxes ``(x0, y0, x1, y1)``: ``a`` ``(N, 4)``, ``b`` ``(N, 4)`` -> ``(N,)``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp_min(1e-12)


# --------------------------------------------------------------------------- similarity


def rankdata(x: Tensor) -> Tensor:
    """Ranks along the last axis with ties given their average rank (scipy's ``rankdata``).

    Args:
        x: ``(B, N)``.

    Returns:
        ``(B, N)`` float64 ranks, 1-based.
    """
    b, n = x.shape
    sorted_x, order = x.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1
    group = group + torch.arange(b, device=x.device)[:, None] * n  # disjoint ids per row
    pos = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(b, n)
    total = torch.zeros(b * n, device=x.device, dtype=torch.float64)
    count = torch.zeros(b * n, device=x.device, dtype=torch.float64)
    total.scatter_add_(0, group.flatten(), pos.flatten())
    count.scatter_add_(0, group.flatten(), torch.ones_like(pos).flatten())
    mean_rank = (total / count.clamp_min(1))[group]
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(1, order, mean_rank)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row (Pearson correlation of tie-averaged ranks).

    Used by the sanity check (Adebayo et al. 2018, sec. 3) and occlusion faithfulness
    (Selvaraju et al., sec. 5.3). A constant row has undefined correlation and gives NaN, which
    callers count as skipped.

    Args:
        a: ``(B, N)`` (or ``(B, H, W)``, flattened).
        b: Same shape as ``a``.

    Returns:
        ``(B,)`` correlations in [-1, 1] (float32).
    """
    ra, rb = rankdata(a.flatten(1)), rankdata(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / den
    rho = torch.where(den > 0, rho, torch.full_like(rho, float("nan")))
    return rho.clamp(-1, 1).float()


def ssim(
    a: Tensor, b: Tensor, kernel_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> Tensor:
    """Mean structural similarity per image (Wang et al. 2004, eq. 13) with a Gaussian window.

    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, population covariances; the mean is taken over the
    window positions that lie fully inside the image (as ``skimage.metrics.structural_similarity``
    with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``).

    Args:
        a: ``(B, H, W)``.
        b: ``(B, H, W)``.
        kernel_size: Window size (odd), at most ``min(H, W)``.
        sigma: Window standard deviation.
        data_range: ``L``, the value range (1 for [0, 1] maps).

    Returns:
        ``(B,)`` SSIM values.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim needs two (B, H, W) tensors of one shape; got {a.shape}, {b.shape}")
    if kernel_size > min(a.shape[1:]):
        raise ValueError(f"ssim window {kernel_size} exceeds the map size {tuple(a.shape[1:])}")
    k1 = gaussian_kernel1d(kernel_size, sigma, a.device).double()
    win = (k1[:, None] * k1[None, :])[None, None]
    x, y = a.double()[:, None], b.double()[:, None]

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, win)

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).float()


# --------------------------------------------------------------------------- ROAD imputation

# Rong et al. 2022 (ROAD), noisy linear imputation: each removed pixel is the weighted mean of its
# 8 neighbours, weight 1/6 for the 4 direct and 1/12 for the 4 diagonal neighbours.
_NEIGHBOUR_KERNEL = torch.tensor(
    [[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64
)


def _push_pull_fill(x: Tensor, known: Tensor) -> Tensor:
    """Fill unknown pixels by a pyramid of weighted averages (a smooth initial guess for CG)."""
    if min(x.shape[-2:]) <= 2 or bool(known.all()):
        weight = known.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        mean = (x * known).sum(dim=(-2, -1), keepdim=True) / weight
        return torch.where(known > 0, x, mean.expand_as(x))
    h, w = x.shape[-2:]
    xs = F.avg_pool2d(x * known, 2, ceil_mode=True)
    ks = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = _push_pull_fill(xs / ks.clamp_min(1e-12), (ks > 0).to(x.dtype))
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return torch.where(known > 0, x, up)


def linear_impute(
    images: Tensor, remove: Tensor, tol: float = 1e-5, max_iter: int = 2000
) -> tuple[Tensor, int, float]:
    """Linear imputation of removed pixels (Rong et al. 2022, sec. 4, the ROAD imputer).

    Every removed pixel equals the weighted mean of its in-image neighbours, known or removed:
    ``(sum_n w_n) x_i - sum_{n removed} w_n x_n = sum_{n known} w_n v_n``. This sparse symmetric
    positive-definite system (one per image and channel) is solved matrix-free, batched, by
    Jacobi-preconditioned conjugate gradients with 3x3 convolutions, from a push-pull initial guess.
    Everything stays on the images' device.

    Args:
        images: ``(B, C, H, W)``.
        remove: ``(B, H, W)`` bool, pixels to impute; every image keeps at least one pixel.
        tol: Relative residual ``||r|| / ||b||`` at which a system counts as solved.
        max_iter: Iteration cap.

    Returns:
        ``(imputed (B, C, H, W), iterations, worst relative residual)``.
    """
    b, c, h, w = images.shape
    if remove.shape != (b, h, w):
        raise ValueError(f"remove must have shape {(b, h, w)}; got {tuple(remove.shape)}")
    if bool(remove.flatten(1).all(dim=1).any()):
        raise ValueError("linear imputation needs at least one kept pixel per image")
    dtype = torch.float64 if images.device.type == "cpu" else torch.float32
    x = images.to(dtype).reshape(b * c, 1, h, w)
    u = remove.to(dtype)[:, None].repeat_interleave(c, dim=0)  # (B*C, 1, H, W), 1 = unknown
    kern = _NEIGHBOUR_KERNEL.to(device=images.device, dtype=dtype)[None, None]

    def conv(t: Tensor) -> Tensor:
        return F.conv2d(t, kern, padding=1)

    d = conv(torch.ones(1, 1, h, w, device=images.device, dtype=dtype))  # in-image weight sum
    rhs = u * conv((1 - u) * x)

    def apply_a(z: Tensor) -> Tensor:
        return u * (d * z - conv(u * z))

    z = u * _push_pull_fill(x, 1 - u)
    r = rhs - apply_a(z)
    inv_d = u / d
    p = inv_d * r
    rz = (r * p).sum(dim=(-2, -1), keepdim=True)
    b_norm = rhs.square().sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
    it, rel = 0, float((r.square().sum(dim=(-2, -1), keepdim=True).sqrt() / b_norm).max())
    while rel > tol and it < max_iter:
        ap = apply_a(p)
        alpha = rz / (p * ap).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
        z = z + alpha * p
        r = r - alpha * ap
        s = inv_d * r
        rz_new = (r * s).sum(dim=(-2, -1), keepdim=True)
        p = s + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
        it += 1
        if it % 10 == 0 or it == max_iter:
            rel = float((r.square().sum(dim=(-2, -1), keepdim=True).sqrt() / b_norm).max())
    if rel > tol:
        log.warning(
            "ROAD imputation stopped after %d iterations at relative residual %.2e", it, rel
        )
    out = torch.where(u > 0, z, x).reshape(b, c, h, w).to(images.dtype)
    return out, it, rel


def noisy_linear_impute(
    images: Tensor,
    remove: Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
    tol: float = 1e-5,
    max_iter: int = 2000,
) -> Tensor:
    """Noisy linear imputation (Rong et al. 2022): linear imputation plus ``N(0, noise_std^2)``.

    Args:
        images: ``(B, C, H, W)``.
        remove: ``(B, H, W)`` bool, pixels to impute.
        noise_std: Standard deviation of the noise added to imputed pixels only.
        generator: Random generator for the noise (on the images' device), for reproducibility.
        tol: CG tolerance (see ``linear_impute``).
        max_iter: CG iteration cap.

    Returns:
        ``(B, C, H, W)`` imputed images.
    """
    out, _, _ = linear_impute(images, remove, tol, max_iter)
    if noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = out + noise_std * noise * remove[:, None].to(out.dtype)
    return out
