"""Image decoding and the train / eval transforms shared by every dataset.

Images leave this module as float tensors `(3, H, W)` in [0, 1], *not* normalised: the model
normalises internally with its own mean and std. Masks travel with their image through the eval
transform (same resize and centre crop, nearest-neighbour), so a ground-truth region stays aligned
with the pixels it annotates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from os import PathLike

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_DECODE_ERRORS",
    "EvalTransform",
    "JointTransform",
    "TrainTransform",
    "boxes_to_mask",
    "load_image",
    "mask_to_box",
    "pil_to_rgb",
]

# Reasons PIL gives for a file it cannot read: unknown format, truncated data, bad header.
IMAGE_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)

# A transform applied to an image and, when given, its aligned mask:
# `(image (3, H, W), mask (H, W) bool | None) -> (image (3, S, S) float, mask (S, S) | None)`.
JointTransform = Callable[
    [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]
]


def _high_bit_depth_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8.

    Args:
        array: `(H, W)` array of mode `I;16*` (0..65535), `I` (32-bit) or `F` (float) data.

    Returns:
        `(H, W)` uint8 array. 16-bit data are divided by 257 (65535 -> 255, exact for 8-bit data
        stored as 16-bit); `I` data whose maximum fits in 8 bits are kept as they are; float data
        in [0, 1] are multiplied by 255, other float data are clipped to [0, 255].
    """
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        peak = float(finite.max()) if finite.size else 0.0
        scaled = array * 255.0 if peak <= 1.0 else array
        return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    wide = array.astype(np.int64)
    if array.dtype.itemsize >= 2 and wide.max(initial=0) > 255:
        wide = (wide.clip(0, 65535) + 128) // 257
    return wide.clip(0, 255).astype(np.uint8)


def pil_to_rgb(
    image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Handles grayscale (`L`, `1`), 16-bit and 32-bit grayscale (`I;16`, `I;16B`, `I`, `F`, scaled to
    8 bits rather than clipped), palette (`P`, with or without transparency), images with alpha
    (`LA`, `RGBA`, `PA`: composited onto `background`), `CMYK`, `YCbCr`, `LAB` and `HSV`.

    Args:
        image: a decoded PIL image of any mode.
        background: RGB colour placed under transparent pixels.

    Returns:
        The image in mode `RGB`.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        gray = _high_bit_depth_to_uint8(np.asarray(image))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        base = Image.new("RGB", image.size, background)
        base.paste(image, mask=image.getchannel("A"))
        return base
    return image.convert("RGB")


def load_image(path: str | PathLike[str]) -> torch.Tensor:
    """Decode an image file to an RGB uint8 tensor, honouring the EXIF orientation.

    Args:
        path: image file.

    Returns:
        `(3, H, W)` uint8 tensor.

    Raises:
        OSError, SyntaxError, ValueError: when the file is not a readable image (unknown format,
            truncated data). Callers that tolerate bad files catch `IMAGE_DECODE_ERRORS`.
    """
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        rgb = pil_to_rgb(image)
    array = np.array(rgb, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def boxes_to_mask(
    boxes: Sequence[Sequence[float]] | torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Rasterise boxes into one mask (their union).

    Args:
        boxes: `(N, 4)` boxes `(x0, y0, x1, y1)` in pixel coordinates of an image of the given size,
            `x1`/`y1` exclusive. Coordinates are rounded and clipped to the image. `N` may be 0.
        height: image height `H`.
        width: image width `W`.

    Returns:
        `(H, W)` bool mask, all False when there are no boxes ("no annotation").
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).tolist():
        x0, y0, x1, y1 = (round(v) for v in box)
        x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
        y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return mask


def mask_to_box(mask: torch.Tensor) -> torch.Tensor:
    """Tight bounding box of a mask.

    Args:
        mask: `(H, W)` or `(B, H, W)` bool mask.

    Returns:
        `(4,)` or `(B, 4)` int64 boxes `(x0, y0, x1, y1)`, `x1`/`y1` exclusive, so that
        `mask[y0:y1, x0:x1]` holds every True pixel. An empty mask gives `(0, 0, 0, 0)`.
    """
    squeeze = mask.dim() == 2
    masks = mask.unsqueeze(0) if squeeze else mask
    _, height, width = masks.shape
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    y_idx = torch.arange(height, device=mask.device)
    x_idx = torch.arange(width, device=mask.device)
    big = max(height, width) + 1
    y0 = torch.where(rows, y_idx, big).amin(dim=1)
    y1 = torch.where(rows, y_idx + 1, 0).amax(dim=1)
    x0 = torch.where(cols, x_idx, big).amin(dim=1)
    x1 = torch.where(cols, x_idx + 1, 0).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).long()
    boxes[~rows.any(dim=1)] = 0
    return boxes[0] if squeeze else boxes


def _to_float(image: torch.Tensor) -> torch.Tensor:
    """`(3, H, W)` uint8 or float -> float32 in [0, 1]."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float().clamp(0.0, 1.0)


def _check_mask(mask: torch.Tensor, height: int, width: int) -> None:
    """Raise when a mask is not `(H, W)` for an image of that size."""
    if tuple(mask.shape) != (height, width):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the image size {(height, width)}"
        )


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a float `(C, H, W)` image to `size = (h, w)`."""
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out.squeeze(0).clamp_(0.0, 1.0)


class EvalTransform:
    """Deterministic resize (shorter side) + centre crop, applied identically to image and mask.

    The shorter side is resized to `round(image_size / crop_pct)`, then the centre
    `image_size x image_size` square is kept (`crop_pct=0.875` is the usual ImageNet 256 -> 224).

    Args:
        image_size: output side `S`.
        crop_pct: fraction of the resized shorter side kept by the centre crop, in (0, 1].
    """

    def __init__(self, image_size: int, crop_pct: float = 1.0) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.image_size = int(image_size)
        self.crop_pct = float(crop_pct)

    def _geometry(self, height: int, width: int) -> tuple[tuple[int, int], int, int]:
        """Resized size `(h, w)` and the crop's top-left corner."""
        short = max(self.image_size, round(self.image_size / self.crop_pct))
        scale = short / min(height, width)
        new_h = max(self.image_size, round(height * scale))
        new_w = max(self.image_size, round(width * scale))
        top = (new_h - self.image_size) // 2
        left = (new_w - self.image_size) // 2
        return (new_h, new_w), top, left

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transform an image and (optionally) its mask.

        Args:
            image: `(3, H, W)` uint8 or float image.
            mask: optional `(H, W)` bool mask aligned with `image`.

        Returns:
            `(3, S, S)` float image in [0, 1] and the `(S, S)` bool mask (or None).
        """
        height, width = image.shape[-2:]
        size, top, left = self._geometry(height, width)
        s = self.image_size
        out = _resize(_to_float(image), size)[:, top : top + s, left : left + s].contiguous()
        if mask is None:
            return out, None
        _check_mask(mask, height, width)
        resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")
        out_mask = resized[0, 0, top : top + s, left : left + s] > 0.5
        return out, out_mask.contiguous()


class TrainTransform:
    """Light training augmentation on tensors: random resized crop and horizontal flip.

    Args:
        image_size: output side `S`.
        scale: range of the crop's area as a fraction of the image's area (mild by default).
        ratio: range of the crop's aspect ratio (width / height).
        hflip: flip horizontally with probability 0.5.
        generator: optional torch generator for reproducible augmentation (None: global RNG, which
            the DataLoader seeds per worker).
    """

    def __init__(
        self,
        image_size: int,
        scale: Sequence[float] = (0.6, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        lo, hi = (float(v) for v in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        r_lo, r_hi = (float(v) for v in ratio)
        if not 0.0 < r_lo <= r_hi:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.image_size = int(image_size)
        self.scale = (lo, hi)
        self.ratio = (r_lo, r_hi)
        self.hflip = bool(hflip)
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        """One uniform draw in [low, high)."""
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Random crop `(top, left, h, w)`, as torchvision's RandomResizedCrop draws it."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=self.generator))
                left = int(torch.randint(0, width - w + 1, (), generator=self.generator))
                return top, left, h, w
        # Fallback: the largest centred crop with an aspect ratio inside `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def batch(
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch at once (one `grid_sample`): each image gets its own crop and flip.

        Crops are drawn as in `__call__` (up to 10 tries per image, then the whole image).

        Args:
            images: `(B, 3, H, W)` uint8 or float images of one size.
            masks: optional `(B, H, W)` bool masks.

        Returns:
            `(B, 3, S, S)` float images in [0, 1] and `(B, S, S)` bool masks (or None).
        """
        b, _, height, width = images.shape
        tries = 10
        area = (
            height
            * width
            * (
                self.scale[0]
                + (self.scale[1] - self.scale[0]) * torch.rand(b, tries, generator=self.generator)
            )
        )
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(
            log_lo + (log_hi - log_lo) * torch.rand(b, tries, generator=self.generator)
        )
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), -1)
        pick = first.clamp(min=0)[:, None]
        w = torch.where(first >= 0, w.gather(1, pick)[:, 0], float(width))
        h = torch.where(first >= 0, h.gather(1, pick)[:, 0], float(height))
        u = torch.rand(b, 2, generator=self.generator)
        left = torch.floor(u[:, 0] * (width - w + 1)).clamp(max=width - w)
        top = torch.floor(u[:, 1] * (height - h + 1)).clamp(max=height - h)
        flip = (
            torch.rand(b, generator=self.generator) < 0.5
            if self.hflip
            else torch.zeros(b, dtype=torch.bool)
        )
        # Affine map from output to input coordinates (align_corners=False: -1/1 are the outer
        # pixel edges); a flip negates the x scale.
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        size = torch.Size((b, 1, self.image_size, self.image_size))
        grid = F.affine_grid(theta, list(size), align_corners=False)
        # Bilinear sampling: exact for the mild crops (upsampling) this is meant for; strong
        # downscaling should use the per-image `__call__`, which antialiases.
        out = F.grid_sample(
            _to_float(images), grid, mode="bilinear", padding_mode="border", align_corners=False
        ).clamp_(0.0, 1.0)
        if masks is None:
            return out, None
        if tuple(masks.shape) != (b, height, width):
            raise ValueError(
                f"masks shape {tuple(masks.shape)} does not match the images {(b, height, width)}"
            )
        out_masks = F.grid_sample(
            masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )[:, 0]
        return out, out_masks > 0.5

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment one image and (optionally) its mask with the same crop and flip.

        Args:
            image: `(3, H, W)` uint8 or float image.
            mask: optional `(H, W)` bool mask aligned with `image`.

        Returns:
            `(3, S, S)` float image in [0, 1] and the `(S, S)` bool mask (or None).
        """
        height, width = image.shape[-2:]
        top, left, h, w = self._crop_box(height, width)
        size = (self.image_size, self.image_size)
        out = _resize(_to_float(image[:, top : top + h, left : left + w]), size)
        flip = self.hflip and float(torch.rand((), generator=self.generator)) < 0.5
        if flip:
            out = out.flip(-1)
        if mask is None:
            return out.contiguous(), None
        _check_mask(mask, height, width)
        crop = mask[top : top + h, left : left + w][None, None].float()
        out_mask = F.interpolate(crop, size=size, mode="nearest-exact")[0, 0] > 0.5
        if flip:
            out_mask = out_mask.flip(-1)
        return out.contiguous(), out_mask.contiguous()
