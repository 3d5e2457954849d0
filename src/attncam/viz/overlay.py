"""Heat-map colouring, image blending and mask outlines (pure tensor drawing helpers).

Every function accepts tensors on any device and returns CPU ``float32`` (or ``bool``) tensors;
nothing here knows about models, data or configs.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["colorize", "mask_outline", "overlay"]


def _as_map(map: Tensor, name: str = "map") -> Tensor:
    """Returns ``map`` as a CPU float ``(H, W)`` tensor in ``[0, 1]`` (NaN -> 0).

    Accepts ``(H, W)`` or ``(1, H, W)``.
    """
    map = map.detach().to("cpu", torch.float32)
    if map.dim() == 3 and map.shape[0] == 1:
        map = map[0]
    if map.dim() != 2:
        raise ValueError(f"{name} must have shape (H, W); got {tuple(map.shape)}")
    return map.nan_to_num(0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def colorize(map: Tensor, cmap: str = "jet") -> Tensor:
    """Colours a saliency map with a matplotlib colormap.

    Args:
        map: Saliency map ``(H, W)`` with values in ``[0, 1]`` (clamped; NaN drawn as 0).
        cmap: Name of a colormap registered in ``matplotlib.colormaps``.

    Returns:
        RGB image ``(H, W, 3)``, float32 on CPU, values in ``[0, 1]``.

    Raises:
        ValueError: If ``cmap`` is not a registered colormap or ``map`` is not 2-D.
    """
    if cmap not in matplotlib.colormaps:
        raise ValueError(
            f"unknown colormap {cmap!r}; choose one of matplotlib.colormaps, e.g. "
            "'jet', 'viridis', 'inferno', 'magma', 'turbo'"
        )
    values = _as_map(map).numpy()
    rgba = matplotlib.colormaps[cmap](values)  # (H, W, 4) float64
    return torch.from_numpy(rgba[..., :3]).to(torch.float32)


def overlay(image: Tensor, map: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """Blends a coloured saliency map over an image: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: RGB image ``(3, H, W)`` with values in ``[0, 1]`` (clamped). A grey ``(1, H, W)``
            image is repeated to three channels.
        map: Saliency map ``(h, w)`` in ``[0, 1]``; resized bilinearly to ``(H, W)`` if needed.
        alpha: Weight of the heat map, in ``[0, 1]``.
        cmap: Matplotlib colormap name.

    Returns:
        Blended image ``(3, H, W)``, float32 on CPU, values in ``[0, 1]``.

    Raises:
        ValueError: On a bad image shape or an ``alpha`` outside ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    image = image.detach().to("cpu", torch.float32)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (3, H, W); got {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    heat = _as_map(map)
    size = tuple(image.shape[-2:])
    if tuple(heat.shape) != size:
        heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)
        heat = heat[0, 0].clamp(0.0, 1.0)  # bilinear stays in range; clamp guards rounding
    # The blend runs in NumPy: on images this small torch's intra-op threads only add
    # synchronisation (50x slower than one thread on a loaded 2-core machine).
    pixels = np.clip(np.nan_to_num(image.numpy(), nan=0.0), 0.0, 1.0)
    colour = colorize(heat, cmap).numpy().transpose(2, 0, 1)  # (3, H, W)
    blend = np.float32(1.0 - alpha) * pixels + np.float32(alpha) * colour
    return torch.from_numpy(np.clip(blend, 0.0, 1.0, dtype=np.float32))


def mask_outline(mask: Tensor) -> Tensor:
    """One-pixel inner boundary of a binary mask (4- and 8-connected neighbours).

    A pixel is on the outline if it is in the mask and any of its 3x3 neighbours is not; pixels
    beyond the image edge count as outside, so a mask touching the border is outlined there too.

    Args:
        mask: Binary mask ``(H, W)`` (any dtype; non-zero is inside).

    Returns:
        Boolean outline ``(H, W)`` on CPU: ``mask & ~erode(mask)``.

    Raises:
        ValueError: If ``mask`` is not 2-D.
    """
    mask = mask.detach().to("cpu")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (H, W); got {tuple(mask.shape)}")
    mask = mask.bool()
    outside = (~mask).to(torch.float32)[None, None]
    # Erosion of the mask = complement of a 3x3 dilation (max-pool) of its complement; the
    # constant pad of 1 marks everything beyond the edge as outside.
    outside = F.pad(outside, (1, 1, 1, 1), value=1.0)
    near_outside = F.max_pool2d(outside, kernel_size=3, stride=1)[0, 0] > 0.5
    return mask & near_outside
