"""Procedurally generated classification data with ground-truth object masks.

Each image holds exactly one class object: a shape (disc, square, triangle, ...) filled with a
class-specific texture (stripes, checker, dots, ...) in a class-specific hue, pasted at a random
position, scale, rotation and aspect on a random crop of one of the real photographs bundled
inside the scikit-image, scikit-learn and matplotlib wheels (nothing is downloaded). Clutter drawn
from a label-independent distribution (soft blobs, lines, rectangular patches in random colours)
covers the background so that the class is only readable from the object, and localisation is
meaningful. The object's area is drawn uniformly in `object_area` (default 6-22 % of the image,
mean about 14 %).

Every image carries its object mask `(H, W)` bool (pixels the object covers at least half) and the
mask's tight box `(x0, y0, x1, y1)` (`x1`, `y1` exclusive).

Generation is vectorised over chunks of images with torch and deterministic from a seed (the
random parameters are drawn for the whole split up front, so chunking never changes the result).
Each split is generated once and cached as one `.pt` file whose name carries the parameters and a
hash of everything that affects the pixels; the file is written atomically (temporary file in the
same directory, then `os.replace`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from attncam.data.transforms import (
    EvalTransform,
    JointTransform,
    TrainTransform,
    load_image,
    mask_to_box,
)
from attncam.io import atomic_torch_save

__all__ = [
    "GENERATOR_VERSION",
    "GRID_CELLS",
    "SHAPES",
    "SPLITS",
    "TEXTURES",
    "GridDataset",
    "GridSplit",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticSplit",
    "background_photos",
    "cache_path",
    "class_names",
    "compose_grids",
    "default_cache_dir",
    "generate_split",
    "grid_cell_bounds",
    "load_or_generate",
    "photo_paths",
]

log = logging.getLogger(__name__)

# Bump when the generator changes in a way that changes pixels: it is part of the cache hash.
GENERATOR_VERSION = 2

SPLITS: tuple[str, ...] = ("train", "val", "test")

SHAPES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
)
TEXTURES: tuple[str, ...] = (
    "stripes",
    "checker",
    "dots",
    "concentric",
    "grid",
    "spokes",
    "gradient",
    "waves",
    "spiral",
    "speckle",
)
MIN_CLASSES = 2
MAX_CLASSES = len(SHAPES)

# Photographs shipped inside installed wheels: (package, file name). Missing ones are skipped.
_SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "coins.png",
    "moon.png",
)
_SKLEARN_PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")
_MATPLOTLIB_PHOTOS: tuple[str, ...] = ("grace_hopper.jpg",)

# Photos are stored with this shorter side; crops are resampled from it with roi_align.
_PHOTO_SHORT_SIDE = 256
# Chunk of images generated at once: bounds peak memory (about 60 MB at 128 px).
_CHUNK = 128
# Texture periods per unit object radius.
_TEXTURE_FREQ = 2.0


def class_names(num_classes: int) -> list[str]:
    """Names of the synthetic classes, `"<shape>_<texture>"`.

    Args:
        num_classes: number of classes, in `[2, 10]`.

    Returns:
        `num_classes` names, e.g. `["disc_stripes", "square_checker", ...]`.
    """
    _check_num_classes(num_classes)
    return [f"{SHAPES[i]}_{TEXTURES[i]}" for i in range(num_classes)]


def _check_num_classes(num_classes: int) -> None:
    """Raise a clear error for an unsupported number of classes."""
    if not MIN_CLASSES <= int(num_classes) <= MAX_CLASSES:
        raise ValueError(
            f"num_classes={num_classes} is not supported by the synthetic data; choose a value in "
            f"[{MIN_CLASSES}, {MAX_CLASSES}] (shapes: {', '.join(SHAPES)})"
        )


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the generated pixels of a split.

    Args:
        image_size: side `S` of the square images.
        num_classes: number of classes (2..10); class i is shape `SHAPES[i]` with texture
            `TEXTURES[i]` and hue `i / num_classes`.
        num_train: images in the train split.
        num_val: images in the val split.
        num_test: images in the test split.
        seed: base seed; each split derives its own from it and its name.
        object_area: range of the object's area as a fraction of the image, drawn uniformly.
        num_clutter: distractor items per image.
        hue_jitter: per-image hue jitter as a fraction of the spacing between class hues: the
            hue is `(label + U(-hue_jitter, hue_jitter)) / num_classes` on the colour circle.
            Below 0.5 the class hues do not overlap (the default 0.3 leaves the hue a cue to
            the class); `num_classes / 2` (or a multiple of it) makes the hue uniform on the
            circle and independent of the class, leaving only shape and texture.
        noise_std: standard deviation of the pixel noise added last (in [0, 1] units).
    """

    image_size: int = 128
    num_classes: int = 8
    num_train: int = 2000
    num_val: int = 400
    num_test: int = 400
    seed: int = 0
    object_area: tuple[float, float] = (0.06, 0.22)
    num_clutter: int = 8
    hue_jitter: float = 0.3
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        _check_num_classes(self.num_classes)
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 for synthetic data, got {self.image_size}")
        for name in ("num_train", "num_val", "num_test", "num_clutter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hue_jitter < 0 or self.noise_std < 0:
            raise ValueError(
                f"hue_jitter and noise_std must be >= 0, got {self.hue_jitter}, {self.noise_std}"
            )
        lo, hi = self.object_area
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(f"object_area must satisfy 0 < min <= max <= 0.5, got {(lo, hi)}")
        object.__setattr__(self, "object_area", (float(lo), float(hi)))

    def count(self, split: str) -> int:
        """Number of images in `split` ('train', 'val' or 'test')."""
        _check_split(split)
        return int(getattr(self, f"num_{split}"))

    def split_seed(self, split: str) -> int:
        """Seed of one split: independent of the other splits' sizes."""
        _check_split(split)
        digest = hashlib.sha256(f"{self.seed}:{split}".encode()).digest()
        return int.from_bytes(digest[:7], "little")


def _check_split(split: str) -> None:
    """Raise a clear error for an unknown split name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


@dataclass
class SyntheticSplit:
    """One generated split, stored compactly.

    Attributes:
        images: `(N, 3, S, S)` uint8.
        labels: `(N,)` int64 in `[0, num_classes)`.
        masks: `(N, S, S)` bool object masks.
        boxes: `(N, 4)` int64 tight boxes of the masks `(x0, y0, x1, y1)`, `x1`/`y1` exclusive.
        class_names: names of the classes.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def validate(self, num_classes: int, source: str) -> None:
        """Check shapes, dtypes and label range; raise ValueError naming `source` otherwise."""
        n = len(self)
        ok = (
            self.images.dtype == torch.uint8
            and self.images.dim() == 4
            and self.images.shape[0] == n
            and self.images.shape[1] == 3
            and self.masks.dtype == torch.bool
            and tuple(self.masks.shape) == (n, *self.images.shape[2:])
            and tuple(self.boxes.shape) == (n, 4)
        )
        if not ok:
            raise ValueError(
                f"{source}: inconsistent synthetic split (images {tuple(self.images.shape)} "
                f"{self.images.dtype}, masks {tuple(self.masks.shape)} {self.masks.dtype}, "
                f"boxes {tuple(self.boxes.shape)}, labels {tuple(self.labels.shape)})"
            )
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= num_classes):
            raise ValueError(
                f"{source}: labels out of range [{int(self.labels.min())}, "
                f"{int(self.labels.max())}]; valid labels are 0..{num_classes - 1}"
            )


# ----------------------------------------------------------------------------------------------
# Background photographs
# ----------------------------------------------------------------------------------------------


def photo_paths() -> list[tuple[str, Path]]:
    """(name, path) of every bundled photograph present in the installed wheels."""
    found: list[tuple[str, Path]] = []
    try:
        import skimage.data

        root = Path(skimage.data.__file__).parent
        found += [(f"skimage/{n}", root / n) for n in _SKIMAGE_PHOTOS if (root / n).is_file()]
    except ImportError:
        log.debug("scikit-image not installed: no skimage photos")
    try:
        import sklearn.datasets

        root = Path(sklearn.datasets.__file__).parent / "images"
        found += [(f"sklearn/{n}", root / n) for n in _SKLEARN_PHOTOS if (root / n).is_file()]
    except ImportError:
        log.debug("scikit-learn not installed: no sklearn photos")
    try:
        import matplotlib

        root = Path(matplotlib.get_data_path()) / "sample_data"
        found += [(f"matplotlib/{n}", root / n) for n in _MATPLOTLIB_PHOTOS if (root / n).is_file()]
    except ImportError:
        log.debug("matplotlib not installed: no matplotlib photos")
    return found


@functools.lru_cache(maxsize=1)
def background_photos() -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """The bundled photographs, decoded once per process.

    Returns:
        Names (e.g. `"skimage/astronaut.png"`) and float images `(3, H, W)` in [0, 1] with the
        shorter side resized to 256 px.

    Raises:
        RuntimeError: when none of the photographs is installed.
    """
    names: list[str] = []
    photos: list[torch.Tensor] = []
    for name, path in photo_paths():
        image = load_image(path).float().div_(255.0)
        h, w = image.shape[-2:]
        scale = _PHOTO_SHORT_SIDE / min(h, w)
        size = (max(_PHOTO_SHORT_SIDE, round(h * scale)), max(_PHOTO_SHORT_SIDE, round(w * scale)))
        image = F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0].clamp_(0.0, 1.0)
        names.append(name)
        photos.append(image.contiguous())
    if not photos:
        raise RuntimeError(
            "no background photographs found: the synthetic data needs scikit-image, scikit-learn "
            "or matplotlib installed (their wheels bundle sample photos such as "
            "skimage/data/astronaut.png, sklearn/datasets/images/china.jpg)"
        )
    log.debug("synthetic backgrounds: %d photos (%s)", len(names), ", ".join(names))
    return tuple(names), tuple(photos)


# ----------------------------------------------------------------------------------------------
# Shapes: signed distances in object units (the shape fits in the unit disc; negative inside)
# ----------------------------------------------------------------------------------------------


def _radial_polygon(u: torch.Tensor, v: torch.Tensor, n: int, inner: float) -> torch.Tensor:
    """Signed distance to a star polygon with `n` outer vertices at radius 1 and inner radius.

    `inner = cos(pi / n)` gives the regular n-gon. The plane is folded into the sector
    `[0, pi / n]`, where the boundary is the segment from `(1, 0)` to `inner * (cos a, sin a)`.
    """
    a = math.pi / n
    rho = torch.hypot(u, v)
    phi = torch.remainder(torch.atan2(v, u), 2 * a)
    phi = torch.where(phi > a, 2 * a - phi, phi)
    px, py = rho * torch.cos(phi), rho * torch.sin(phi)
    ex, ey = inner * math.cos(a) - 1.0, inner * math.sin(a)
    t = (((px - 1.0) * ex + py * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    dist = torch.hypot(px - 1.0 - t * ex, py - t * ey)
    inside = (ex * py - ey * (px - 1.0)) > 0
    return torch.where(inside, -dist, dist)


def _box(u: torch.Tensor, v: torch.Tensor, half_u: float, half_v: float) -> torch.Tensor:
    """Signed distance to an axis-aligned rectangle centred at the origin."""
    qu, qv = u.abs() - half_u, v.abs() - half_v
    outside = torch.hypot(qu.clamp(min=0), qv.clamp(min=0))
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _sdf_disc(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.hypot(u, v) - 1.0


def _sdf_square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _radial_polygon(u, v, 4, math.cos(math.pi / 4))


def _sdf_triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _radial_polygon(u, v, 3, 0.5)


def _sdf_star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _radial_polygon(u, v, 5, 0.42)


def _sdf_cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_box(u, v, 0.32, 0.94), _box(u, v, 0.94, 0.32))


def _sdf_ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(u, v) - 0.68).abs() - 0.32


def _sdf_hexagon(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _radial_polygon(u, v, 6, math.cos(math.pi / 6))


def _sdf_crescent(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.hypot(u, v) - 1.0, 0.8 - torch.hypot(u - 0.5, v))


def _sdf_arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shaft = _box(u + 0.42, v, 0.53, 0.2)
    norm = math.hypot(0.65, 0.95)
    upper = ((u - 1.0) * 0.65 + v * 0.95) / norm
    lower = ((u - 1.0) * 0.65 - v * 0.95) / norm
    head = torch.maximum(torch.maximum(upper, lower), 0.05 - u)
    return torch.minimum(shaft, head)


def _sdf_heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    diamond = ((u.abs() + (v + 0.15).abs()) - 0.75) / math.sqrt(2.0)
    lobe_l = torch.hypot(u + 0.375, v - 0.225) - 0.53
    lobe_r = torch.hypot(u - 0.375, v - 0.225) - 0.53
    return torch.minimum(diamond, torch.minimum(lobe_l, lobe_r))


_SDF: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "disc": _sdf_disc,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
    "star": _sdf_star,
    "cross": _sdf_cross,
    "ring": _sdf_ring,
    "hexagon": _sdf_hexagon,
    "crescent": _sdf_crescent,
    "arrow": _sdf_arrow,
    "heart": _sdf_heart,
}


@functools.cache
def _unit_area(shape: str) -> float:
    """Area of a shape in object units (the disc's is pi), measured on a fine grid."""
    n = 801
    axis = torch.linspace(-1.05, 1.05, n, dtype=torch.float64)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    inside = (_SDF[shape](u, v) < 0).double().mean().item()
    return inside * 2.1 * 2.1


# ----------------------------------------------------------------------------------------------
# Textures: a value in [0, 1] blending the class colour with its dark shade
# ----------------------------------------------------------------------------------------------


def _dist_to_int(x: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest integer, in [0, 0.5]."""
    return (torch.remainder(x + 0.5, 1.0) - 0.5).abs()


def _texture(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Texture pattern in object coordinates (it rotates and scales with the object).

    Returns a signed pattern value; positive means the class colour, negative its shade.
    """
    f = _TEXTURE_FREQ
    tau = 2 * math.pi
    if name == "stripes":
        return torch.sin(tau * f * u)
    if name == "checker":
        return torch.sin(tau * f * u) * torch.sin(tau * f * v) * 2.0
    if name == "dots":
        return (torch.hypot(_dist_to_int(f * u), _dist_to_int(f * v)) - 0.3) * 8.0
    if name == "concentric":
        return torch.sin(tau * f * torch.hypot(u, v))
    if name == "grid":
        return (torch.minimum(_dist_to_int(f * u), _dist_to_int(f * v)) - 0.12) * 8.0
    if name == "spokes":
        return torch.sin(7.0 * torch.atan2(v, u))
    if name == "gradient":
        return u * 1.5
    if name == "waves":
        return torch.sin(tau * f * (u + 0.15 * torch.sin(tau * 1.2 * v)))
    if name == "spiral":
        return torch.sin(tau * f * torch.hypot(u, v) + 3.0 * torch.atan2(v, u))
    if name == "speckle":
        cu, cv = torch.floor(2 * f * u), torch.floor(2 * f * v)
        noise = torch.remainder(torch.sin(cu * 12.9898 + cv * 78.233) * 43758.5453, 1.0)
        return (noise - 0.5) * 6.0
    raise ValueError(f"unknown texture {name!r}; choose one of: {', '.join(TEXTURES)}")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] -> RGB `(..., 3)` in [0, 1]."""
    k = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype)
    kk = torch.remainder(k + h.unsqueeze(-1) * 6.0, 6.0)
    ramp = torch.minimum(kk, 4.0 - kk).clamp(0.0, 1.0)
    return v.unsqueeze(-1) * (1.0 - s.unsqueeze(-1) * ramp)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass
class _Params:
    """Random parameters of a whole split, drawn up front (leading axis: image)."""

    labels: torch.Tensor  # (N,)
    photo: torch.Tensor  # (N,) photo index
    crop: torch.Tensor  # (N, 3) side fraction, x fraction, y fraction
    flip: torch.Tensor  # (N,) bool
    tone: torch.Tensor  # (N, 2) brightness, contrast
    centre: torch.Tensor  # (N, 2) position fractions of the free range
    area: torch.Tensor  # (N,) area fraction
    angle: torch.Tensor  # (N,)
    aspect: torch.Tensor  # (N,)
    colour: torch.Tensor  # (N, 3) hue, saturation, value
    clutter_kind: torch.Tensor  # (N, K) 0 blob, 1 line, 2 patch
    clutter: torch.Tensor  # (N, K, 8) uniform draws
    clutter_colour: torch.Tensor  # (N, K, 3) hue, saturation, value
    noise_seed: torch.Tensor  # (N,)


def _draw_params(config: SyntheticConfig, n: int, num_photos: int, seed: int) -> _Params:
    """Draw every random parameter of a split from one generator, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    c = config.num_classes
    labels = torch.arange(n) % c
    labels = labels[torch.randperm(n, generator=g)]

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    photo = torch.randint(0, num_photos, (n,), generator=g)
    crop = torch.stack([uniform(n, lo=0.35, hi=1.0), uniform(n), uniform(n)], dim=1)
    flip = torch.rand(n, generator=g) < 0.5
    tone = torch.stack([uniform(n, lo=-0.1, hi=0.1), uniform(n, lo=0.75, hi=1.15)], dim=1)
    centre = uniform(n, 2)
    area = uniform(n, lo=config.object_area[0], hi=config.object_area[1])
    angle = uniform(n, hi=2 * math.pi)
    aspect = uniform(n, lo=-0.15, hi=0.15).exp()
    jitter = uniform(n, lo=-config.hue_jitter, hi=config.hue_jitter)
    hue = torch.remainder((labels.double() + jitter) / c, 1.0)
    colour = torch.stack([hue, uniform(n, lo=0.65, hi=1.0), uniform(n, lo=0.75, hi=1.0)], dim=1)
    k = config.num_clutter
    clutter_kind = torch.randint(0, 3, (n, k), generator=g)
    clutter = uniform(n, k, 8)
    clutter_colour = torch.stack(
        [uniform(n, k), uniform(n, k, lo=0.0, hi=1.0), uniform(n, k, lo=0.2, hi=1.0)], dim=2
    )
    noise_seed = torch.randint(0, 2**62, (n,), generator=g)
    return _Params(
        labels, photo, crop, flip, tone, centre, area, angle, aspect, colour, clutter_kind,
        clutter, clutter_colour, noise_seed,
    )  # fmt: skip


def _backgrounds(
    photos: Sequence[torch.Tensor], p: _Params, idx: torch.Tensor, size: int
) -> torch.Tensor:
    """Random square crops of the photos, resampled (antialiased) to `(B, 3, S, S)` float."""
    out = torch.empty(len(idx), 3, size, size)
    for row, i in enumerate(idx.tolist()):
        photo = photos[int(p.photo[i])]
        h, w = photo.shape[-2:]
        frac, fx, fy = p.crop[i].tolist()
        side = max(8, round(frac * min(h, w)))
        x0, y0 = round(fx * (w - side)), round(fy * (h - side))
        crop = photo[None, :, y0 : y0 + side, x0 : x0 + side]
        out[row] = F.interpolate(
            crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    flip = p.flip[idx]
    out[flip] = out[flip].flip(-1)
    tone = p.tone[idx].float()
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * tone[:, 1, None, None, None] + mean + tone[:, 0, None, None, None]
    return out.clamp_(0.0, 1.0)


def _paint(canvas: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> None:
    """In place: `canvas = canvas * (1 - alpha) + colour * alpha`.

    Args:
        canvas: `(B, 3, S, S)`.
        alpha: `(B, S, S)` in [0, 1].
        colour: `(B, 3)` or `(B, 3, S, S)`.
    """
    if colour.dim() == 2:
        colour = colour[:, :, None, None]
    a = alpha.unsqueeze(1)
    canvas.mul_(1.0 - a).add_(colour * a)


# Largest extent of each clutter kind around its centre, as a fraction of S (blob: where
# exp(-q) < 1 %; line: half length + width; patch: half diagonal).
_CLUTTER_REACH = (0.26, 0.32, 0.15)


def _clutter(canvas: torch.Tensor, p: _Params, idx: torch.Tensor, size: int) -> None:
    """Paint the label-independent distractors onto `canvas` `(B, 3, S, S)` in place.

    Each item is evaluated only in a window around its centre (its reach), on a padded canvas so
    that windows never need clipping.
    """
    px = size / 128.0
    margin = math.ceil(max(_CLUTTER_REACH) * size) + 2
    padded = F.pad(canvas, (margin, margin, margin, margin))
    for item in range(p.clutter_kind.shape[1]):
        kinds = p.clutter_kind[idx, item]
        for kind in range(3):
            rows = (kinds == kind).nonzero().flatten()
            if rows.numel() == 0:
                continue
            r = p.clutter[idx[rows], item].float()  # (b, 8) uniform draws
            half = math.ceil(_CLUTTER_REACH[kind] * size) + 1
            cx, cy = r[:, 0] * size, r[:, 1] * size
            # Window of 2 * half pixels starting at the integer pixel below centre - half.
            x0 = torch.floor(cx).long() - half
            y0 = torch.floor(cy).long() - half
            offs = torch.arange(2 * half)
            xs = (x0[:, None] + offs)[:, None, :]  # (b, 1, W) pixel indices
            ys = (y0[:, None] + offs)[:, :, None]  # (b, W, 1)
            du = xs.float() + 0.5 - cx[:, None, None]
            dv = ys.float() + 0.5 - cy[:, None, None]
            theta = (r[:, 2] * math.pi)[:, None, None]
            cos, sin = torch.cos(theta), torch.sin(theta)
            u = du * cos + dv * sin
            v = -du * sin + dv * cos
            opacity = (0.55 + 0.45 * r[:, 5])[:, None, None]
            if kind == 0:  # soft elliptical blob
                rx = ((0.03 + 0.09 * r[:, 3]) * size)[:, None, None]
                ry = ((0.03 + 0.09 * r[:, 4]) * size)[:, None, None]
                alpha = opacity * torch.exp(-((u / rx) ** 2 + (v / ry) ** 2))
            elif kind == 1:  # thick line segment
                half_len = ((0.08 + 0.2 * r[:, 3]) * size)[:, None, None]
                half_w = ((0.5 + 1.5 * r[:, 4]) * px)[:, None, None]
                dist = torch.hypot((u.abs() - half_len).clamp(min=0), v.abs())
                alpha = opacity * (half_w + 0.5 - dist).clamp(0.0, 1.0)
            else:  # rectangular patch
                hu = ((0.02 + 0.08 * r[:, 3]) * size)[:, None, None]
                hv = ((0.02 + 0.08 * r[:, 4]) * size)[:, None, None]
                inside = torch.minimum(hu - u.abs(), hv - v.abs())
                alpha = opacity * (inside + 0.5).clamp(0.0, 1.0)
            hsv = p.clutter_colour[idx[rows], item].float()
            rgb = _hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2])  # (b, 3)
            # Advanced indexing: (b, W, W, 3) window of the padded canvas.
            ri, yi, xi = rows[:, None, None], ys + margin, xs + margin
            window = padded[ri, :, yi, xi]
            a = alpha.unsqueeze(-1)
            padded[ri, :, yi, xi] = window * (1.0 - a) + rgb[:, None, None, :] * a
    canvas.copy_(padded[:, :, margin : margin + size, margin : margin + size])


def _objects(
    canvas: torch.Tensor, p: _Params, idx: torch.Tensor, config: SyntheticConfig
) -> torch.Tensor:
    """Paint each image's class object onto `canvas` `(B, 3, S, S)`; return its coverage.

    Returns:
        `(B, S, S)` float coverage in [0, 1] (anti-aliased: 0.5 at the boundary).
    """
    size = config.image_size
    labels = p.labels[idx]
    coverage = torch.zeros(len(idx), size, size)
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = axis[None, :, None], axis[None, None, :]
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().flatten()
        sel = idx[rows]
        shape, texture = SHAPES[cls], TEXTURES[cls]
        aspect = p.aspect[sel]
        # Radius such that the shape's area is `area * S^2` (aspect keeps the area).
        radius = (p.area[sel] * size * size / _unit_area(shape)).sqrt()
        extent = radius * torch.maximum(aspect, 1.0 / aspect)
        extent = extent.clamp(max=0.5 * size - 1.0)
        radius = extent / torch.maximum(aspect, 1.0 / aspect)
        free = size - 2.0 * extent
        cx = (extent + p.centre[sel, 0] * free).float()[:, None, None]
        cy = (extent + p.centre[sel, 1] * free).float()[:, None, None]
        rad = radius.float()[:, None, None]
        theta = p.angle[sel].float()[:, None, None]
        cos, sin = torch.cos(theta), torch.sin(theta)
        dx, dy = (xs - cx) / rad, (ys - cy) / rad
        a = aspect.float()[:, None, None]
        u = (dx * cos + dy * sin) / a
        v = (-dx * sin + dy * cos) * a
        # Signed distance in object units -> pixels (approximate under the mild aspect).
        alpha = (0.5 - _SDF[shape](u, v) * rad).clamp(0.0, 1.0)
        blend = (0.5 + 0.5 * _texture(texture, u, v)).clamp(0.0, 1.0)
        hsv = p.colour[sel].float()
        light = _hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2])
        dark = _hsv_to_rgb(hsv[:, 0], hsv[:, 1] * 0.6, hsv[:, 2] * 0.3)
        fill = dark[:, :, None, None] + (light - dark)[:, :, None, None] * blend[:, None]
        sub = canvas[rows]
        _paint(sub, alpha, fill)
        canvas[rows] = sub
        coverage[rows] = alpha
    return coverage


def generate_split(config: SyntheticConfig, split: str) -> SyntheticSplit:
    """Generate one split in memory (no cache).

    Args:
        config: generation parameters.
        split: 'train', 'val' or 'test'.

    Returns:
        The split: uint8 images `(N, 3, S, S)`, labels `(N,)`, masks `(N, S, S)`, boxes `(N, 4)`.
    """
    threads = torch.get_num_threads()
    # The per-chunk tensors are small: one thread is as fast as two on an idle machine and avoids
    # the large slow-downs of OpenMP threads waiting on busy cores.
    torch.set_num_threads(1)
    try:
        return _generate(config, split)
    finally:
        torch.set_num_threads(threads)


def _generate(config: SyntheticConfig, split: str) -> SyntheticSplit:
    """`generate_split` without the thread setting."""
    n = config.count(split)
    size = config.image_size
    _, photos = background_photos()
    p = _draw_params(config, n, len(photos), config.split_seed(split))
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    for start in range(0, n, _CHUNK):
        idx = torch.arange(start, min(n, start + _CHUNK))
        canvas = _backgrounds(photos, p, idx, size)
        _clutter(canvas, p, idx, size)
        coverage = _objects(canvas, p, idx, config)
        if config.noise_std > 0:
            noise = torch.empty_like(canvas)
            for row, seed in enumerate(p.noise_seed[idx].tolist()):
                g = torch.Generator().manual_seed(int(seed))
                noise[row].normal_(0.0, config.noise_std, generator=g)
            canvas.add_(noise)
        images[idx] = canvas.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        masks[idx] = coverage >= 0.5
    return SyntheticSplit(
        images=images,
        labels=p.labels.clone(),
        masks=masks,
        boxes=mask_to_box(masks),
        class_names=class_names(config.num_classes),
    )


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$ATTNCAM_CACHE` if set, else `~/.cache/attncam`."""
    env = os.environ.get("ATTNCAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attncam"


def _fingerprint(config: SyntheticConfig, split: str) -> str:
    """Short hash of everything that determines the split's pixels."""
    names, _ = background_photos()
    payload = {
        "version": GENERATOR_VERSION,
        "split": split,
        "config": dataclasses.asdict(config),
        "photos": list(names),
        "torch": torch.__version__.split("+")[0].rsplit(".", 1)[0],
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def cache_path(config: SyntheticConfig, split: str, cache_dir: str | os.PathLike | None) -> Path:
    """Path of a split's cache file: readable parameters plus a hash of all of them.

    Example: `<cache_dir>/synthetic/synthetic-v1_train_128px_8cls_n2000_seed0_3fa1b2c4d5.pt`.
    """
    _check_split(split)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = (
        f"synthetic-v{GENERATOR_VERSION}_{split}_{config.image_size}px_{config.num_classes}cls_"
        f"n{config.count(split)}_seed{config.seed}_{_fingerprint(config, split)}.pt"
    )
    return root / "synthetic" / name


def load_or_generate(
    config: SyntheticConfig, split: str, cache_dir: str | os.PathLike | None = None
) -> SyntheticSplit:
    """Load a split from the cache, generating and caching it first if needed.

    An unreadable cache file is reported and regenerated; a readable one with labels out of range
    is an error.

    Args:
        config: generation parameters.
        split: 'train', 'val' or 'test'.
        cache_dir: cache root (None: `$ATTNCAM_CACHE` or `~/.cache/attncam`).

    Returns:
        The split.
    """
    path = cache_path(config, split, cache_dir)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            data = SyntheticSplit(
                images=blob["images"],
                labels=blob["labels"].long(),
                masks=blob["masks"],
                boxes=blob["boxes"].long(),
                class_names=list(blob["class_names"]),
            )
        except (
            OSError,
            RuntimeError,
            KeyError,
            EOFError,
            TypeError,
            pickle.UnpicklingError,
        ) as err:
            log.warning("unreadable synthetic cache file %s (%s): regenerating it", path, err)
        else:
            data.validate(config.num_classes, source=str(path))
            log.debug("synthetic %s split loaded from %s", split, path)
            return data
    start = time.perf_counter()
    data = generate_split(config, split)
    elapsed = time.perf_counter() - start
    atomic_torch_save(
        {
            "images": data.images,
            "labels": data.labels,
            "masks": data.masks,
            "boxes": data.boxes,
            "class_names": data.class_names,
        },
        path,
    )
    log.info(
        "generated synthetic %s split (%d images, %d px) in %.1f s -> %s",
        split, len(data), config.image_size, elapsed, path,
    )  # fmt: skip
    return data


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class PreBatched(list):
    """A batch a dataset already stacked: `[images, labels, ...]` tensors with a leading B axis."""


class SyntheticDataset(Dataset):
    """In-memory view of a synthetic split.

    Items are `(image, label)` or, with `return_mask=True`, `(image, label, mask)`: image
    `(3, S', S')` float in [0, 1], label a Python int, mask `(S', S')` bool.

    Args:
        data: the split's tensors.
        transform: optional joint transform `(image (3, S, S) uint8, mask (S, S) | None) ->
            (image (3, S', S') float, mask | None)`, e.g. `TrainTransform` or `EvalTransform`;
            None converts the image to float only.
        return_mask: return the object mask too (explanation batches).
    """

    def __init__(
        self,
        data: SyntheticSplit,
        transform: JointTransform | None = None,
        return_mask: bool = False,
    ) -> None:
        self.data = data
        self.transform = transform
        self.return_mask = return_mask
        self.class_names = list(data.class_names)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.data)

    @property
    def labels(self) -> torch.Tensor:
        """`(N,)` int64 labels."""
        return self.data.labels

    @property
    def boxes(self) -> torch.Tensor:
        """`(N, 4)` int64 object boxes `(x0, y0, x1, y1)`, `x1`/`y1` exclusive."""
        return self.data.boxes

    def __getitems__(self, indices: list[int]) -> PreBatched | list:
        """A whole batch at once (the DataLoader calls this): augmentation runs batched.

        Returns:
            `PreBatched([images (B, 3, S, S), labels (B,)(, masks (B, S, S))])`, already stacked
            (`collate_fn` passes it through), or a list of items for a transform that only works
            per image.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.data.images[idx]
        masks = self.data.masks[idx] if self.return_mask else None
        size = self.data.images.shape[-1]
        if isinstance(self.transform, TrainTransform):
            images, masks = self.transform.batch(images, masks)
        elif self.transform is None or (
            isinstance(self.transform, EvalTransform) and self.transform.image_size == size
        ):
            images = images.float().div_(255.0)
        else:
            return [self[i] for i in indices]
        labels = self.data.labels[idx].clone()
        return PreBatched([images, labels] if masks is None else [images, labels, masks])

    @staticmethod
    def collate_fn(batch: PreBatched | list) -> list:
        """Pass pre-stacked batches through; collate lists of items as usual."""
        if isinstance(batch, PreBatched):
            return list(batch)
        return default_collate(batch)

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        image = self.data.images[index]
        label = int(self.data.labels[index])
        mask = self.data.masks[index] if self.return_mask else None
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        else:
            image = image.float().div_(255.0)
        if self.return_mask:
            assert mask is not None
            return image, label, mask
        return image, label


# ----------------------------------------------------------------------------------------------
# 2 x 2 grids of four classes (grid pointing game)
# ----------------------------------------------------------------------------------------------

#: Objects per grid image; cells are numbered row-major (0 top-left, 3 bottom-right).
GRID_CELLS = 4


def grid_cell_bounds(size: int) -> list[tuple[int, int, int, int]]:
    """Pixel bounds `(y0, y1, x0, x1)` (exclusive ends) of the four cells of a grid of side `S`.

    The top and left halves have `S // 2` pixels (the layout the grid pointing game scores,
    `attncam.metrics.functional.grid_cell_masks`).
    """
    half = size // 2
    spans = [(0, half), (half, size)]
    return [(*spans[k // 2], *spans[k % 2]) for k in range(GRID_CELLS)]


@dataclass
class GridSplit:
    """2 x 2 grid images of four objects of different classes (Böhle et al., CVPR 2021).

    Attributes:
        images: `(G, 3, S, S)` uint8 grids.
        classes: `(G, 4)` int64 class of each cell, row-major, distinct within a grid.
        sources: `(G, 4)` int64 index of each cell's image in the source split.
        segments: `(G, S, S)` int8 cell (0..3) of the object covering each pixel, -1 elsewhere.
        class_names: names of the classes.
    """

    images: torch.Tensor
    classes: torch.Tensor
    sources: torch.Tensor
    segments: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.classes.shape[0])


def _grid_picks(labels: torch.Tensor, num_grids: int, g: torch.Generator) -> torch.Tensor:
    """`(G, 4)` source indices: four distinct classes per grid, each class's images in turn.

    Each grid draws four distinct classes uniformly; each class hands out its images in a seeded
    random order, starting over when all are used, so the images are used about equally often.
    """
    present = labels.unique()
    if present.numel() < GRID_CELLS:
        raise ValueError(
            f"a 2 x 2 grid needs images of at least {GRID_CELLS} classes; the split has "
            f"{present.numel()} ({present.tolist()})"
        )
    order = torch.rand(num_grids, present.numel(), generator=g).argsort(dim=1)[:, :GRID_CELLS]
    classes = present[order]
    queues: dict[int, torch.Tensor] = {}
    for c in present.tolist():
        members = (labels == c).nonzero().flatten()
        queues[c] = members[torch.randperm(members.numel(), generator=g)]
    used = dict.fromkeys(queues, 0)
    picks = torch.empty(num_grids, GRID_CELLS, dtype=torch.long)
    for i, row in enumerate(classes.tolist()):
        for k, c in enumerate(row):
            queue = queues[c]
            picks[i, k] = queue[used[c] % len(queue)]
            used[c] += 1
    return picks


def _shrink(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area (average-pooling) resize of `(N, C, H, W)` float to a smaller `(N, C, *size)`."""
    return F.interpolate(x, size=size, mode="area")


def compose_grids(data: SyntheticSplit, num_grids: int, seed: int = 0) -> GridSplit:
    """Compose 2 x 2 grids of four images of different classes, each resized to half the side.

    The grid pointing game (Böhle et al. 2021) explains each grid once per class in it and
    scores the share of the map's mass in that class's cell. The grids are seeded and do not
    depend on anything but `data`, `num_grids` and `seed`.

    Args:
        data: the source split (images of at least 4 classes).
        num_grids: number of grids `G`, >= 1.
        seed: seed of the class and image draws.

    Returns:
        The grids (each cell the source image average-pooled to half the side); an object's
        pixels in its grid are those its pooled mask covers at least half.

    Raises:
        ValueError: On `num_grids < 1` or fewer than 4 classes in `data`.
    """
    if num_grids < 1:
        raise ValueError(f"num_grids must be >= 1; got {num_grids}")
    g = torch.Generator().manual_seed(int(seed))
    picks = _grid_picks(data.labels, int(num_grids), g)
    size = int(data.images.shape[-1])
    images = torch.empty(num_grids, 3, size, size, dtype=torch.uint8)
    segments = torch.full((num_grids, size, size), -1, dtype=torch.int8)
    for k, (y0, y1, x0, x1) in enumerate(grid_cell_bounds(size)):
        src = picks[:, k]
        cell = _shrink(data.images[src].float(), (y1 - y0, x1 - x0))
        images[:, :, y0:y1, x0:x1] = cell.clamp_(0.0, 255.0).round_().to(torch.uint8)
        cover = _shrink(data.masks[src, None].float(), (y1 - y0, x1 - x0))[:, 0] >= 0.5
        segments[:, y0:y1, x0:x1] = torch.where(cover, k, -1).to(torch.int8)
    return GridSplit(
        images=images,
        classes=data.labels[picks].clone(),
        sources=picks,
        segments=segments,
        class_names=list(data.class_names),
    )


class GridDataset(Dataset):
    """Grid-class pairs of a `GridSplit`: each grid once per cell, grid by grid.

    Item `i` is grid `i // 4` with the class of cell `i % 4` as target:
    `(image (3, S, S) float in [0, 1], target class int, mask (S, S) bool, cell int)`; the mask is
    the target object's pixels in the grid. The DataLoader's default collation gives batches
    `(images (B, 3, S, S), targets (B,), masks (B, S, S), cells (B,))`; `i` is the pair's id.

    Args:
        grids: the composed grids.
    """

    def __init__(self, grids: GridSplit) -> None:
        self.grids = grids
        self.class_names = list(grids.class_names)

    def __len__(self) -> int:
        return GRID_CELLS * len(self.grids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"grid pair {index} out of range [0, {len(self)})")
        grid, cell = divmod(int(index), GRID_CELLS)
        image = self.grids.images[grid].float().div_(255.0)
        target = int(self.grids.classes[grid, cell])
        return image, target, self.grids.segments[grid] == cell, cell
