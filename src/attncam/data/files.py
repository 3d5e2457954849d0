"""Image files given on the command line (``images=GLOB``): paths, decoding, a dataset.

Unreadable files are skipped, counted and listed; nothing is skipped silently.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class ImageFilesError(ValueError):
    """``images=...`` names nothing that can be explained."""


class ImageFilesDataset(Dataset):
    """Image files without labels, resized and centre-cropped; unreadable files are skipped.

    Items are ``(image (3, S, S), -1, mask (S, S) all False)``.
    """

    def __init__(self, paths: list[Path], image_size: int, crop_pct: float = 0.875) -> None:
        from attncam.data.transforms import EvalTransform, load_image

        self.transform = EvalTransform(image_size, crop_pct)
        self.paths: list[Path] = []
        self.images: list[torch.Tensor] = []
        self.skipped: list[tuple[str, str]] = []
        for p in paths:
            try:
                img, _ = self.transform(load_image(p))
            except Exception as err:  # not an image, truncated, unsupported format
                self.skipped.append((str(p), f"{type(err).__name__}: {err}"[:200]))
                continue
            self.paths.append(p)
            self.images.append(img)
        if self.skipped:
            log.warning(
                "skipped %d file(s) that are not readable images: %s",
                len(self.skipped),
                ", ".join(s for s, _ in self.skipped[:5]),
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        img = self.images[i]
        return img, -1, torch.zeros(img.shape[-2:], dtype=torch.bool)


def image_paths(spec: str | list[str]) -> list[Path]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for s in specs:
        p = Path(os.path.expanduser(str(s)))
        if p.is_dir():
            paths.extend(
                sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
            )
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                raise ImageFilesError(
                    f"images={s!r} matches no file or folder (give files, a folder or a glob such "
                    "as 'photos/*.jpg')"
                )
            paths.extend(m for m in matches if m.is_file())
    return paths
