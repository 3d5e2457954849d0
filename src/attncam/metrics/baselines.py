"""Baseline maps scored beside every method: what a map with no knowledge of the model scores.

A method's localisation or faithfulness score means little without them: on centred data a fixed
point at the image centre wins most pointing games. Three baselines, each a ``(B, H, W)`` map in
[0, 1] treated exactly like a CAM by every metric (docs/METHODS.md, "Baselines"):

- ``baseline_centre``: an isotropic Gaussian centred on the image, sigma a quarter of the side
  (the centre bias of natural-image datasets; Judd et al. 2009).
- ``baseline_random``: uniform noise on the CAM grid, upsampled bilinearly like a CAM; seeded by
  ``(seed, image id)``, so the map of an image does not depend on the batch it is in.
- ``baseline_oracle``: the ground-truth mask average-pooled to the CAM grid, then upsampled like
  a CAM: the best a map of that resolution can localise. Only where masks exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CENTRE, RANDOM, ORACLE = "baseline_centre", "baseline_random", "baseline_oracle"
#: Every baseline, in table order.
BASELINES: tuple[str, ...] = (CENTRE, RANDOM, ORACLE)


def _normalise(maps: Tensor) -> Tensor:
    """Min-max per map to [0, 1]; a constant map becomes zeros (as every CAM is normalised)."""
    flat = maps.flatten(1)
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    ok = span > 0
    out = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), 0.0)
    return out.view_as(maps)


def _like_cam(grid_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) upsampling of ``(B, h, w)`` and normalisation."""
    up = F.interpolate(grid_maps[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return _normalise(up[:, 0])


def centre_prior(batch: int, size: tuple[int, int], sigma: float = 0.25) -> Tensor:
    """``(batch, H, W)`` isotropic Gaussians centred on the image, ``sigma`` times the side."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2) / (sigma * h)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2) / (sigma * w)
    g = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return _normalise(g.expand(batch, h, w).clone())


def random_map(ids: Tensor, grid: tuple[int, int], size: tuple[int, int], seed: int = 0) -> Tensor:
    """``(B, H, W)`` seeded uniform noise on the CAM ``grid``, upsampled like a CAM."""
    maps = []
    for i in ids.tolist():
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        maps.append(torch.rand(grid, generator=gen))
    return _like_cam(torch.stack(maps), size)


def oracle_map(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, H, W)``: the mask pooled to the CAM ``grid``, upsampled like a CAM (zeros: no mask)."""
    pooled = F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
    return _like_cam(pooled, tuple(masks.shape[-2:]))  # type: ignore[arg-type]


def baseline_maps(
    names: Sequence[str],
    masks: Tensor,
    ids: Tensor,
    grid: tuple[int, int],
    seed: int = 0,
) -> dict[str, Tensor]:
    """The maps of the requested baselines for one batch, on the masks' device.

    Args:
        names: Baselines to compute, a subset of ``BASELINES``.
        masks: ``(B, H, W)`` bool ground truth (all False: no annotation).
        ids: ``(B,)`` image ids (seed the random map).
        grid: ``(h, w)`` of the CAM layer the methods explain.
        seed: Seed of the random map.

    Raises:
        ValueError: On an unknown baseline name.
    """
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from: {', '.join(BASELINES)}")
    size = tuple(masks.shape[-2:])
    makers = {
        CENTRE: lambda: centre_prior(masks.shape[0], size),  # type: ignore[arg-type]
        RANDOM: lambda: random_map(ids.cpu(), grid, size, seed),  # type: ignore[arg-type]
        ORACLE: lambda: oracle_map(masks.cpu(), grid),
    }
    return {n: makers[n]().to(masks.device) for n in names}
