"""Image files given on the command line (``images=GLOB``): paths, decoding, a dataset.

A folder is read recursively; an image in a subfolder whose name is a class name gets that
class as its label (:func:`subfolder_labels`), as torchvision's ``ImageFolder`` does. Unreadable
files are skipped, counted and listed; nothing is skipped silently.
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
    """Image files, resized and centre-cropped; unreadable files are skipped.

    Items are ``(image (3, S, S), label, mask (S, S) all False)``; the label is -1 (unlabelled)
    unless ``labels`` gives one.

    Args:
        paths: the files.
        image_size: the side ``S``.
        crop_pct: the centre crop's share of the resized side.
        labels: a class index (or -1) per path; None: all -1.
    """

    def __init__(
        self,
        paths: list[Path],
        image_size: int,
        crop_pct: float = 0.875,
        labels: list[int] | None = None,
    ) -> None:
        from attncam.data.transforms import EvalTransform, load_image

        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} paths; give one per path")
        self.transform = EvalTransform(image_size, crop_pct)
        self.paths: list[Path] = []
        self.images: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for i, p in enumerate(paths):
            try:
                img, _ = self.transform(load_image(p))
            except Exception as err:  # not an image, truncated, unsupported format
                self.skipped.append((str(p), f"{type(err).__name__}: {err}"[:200]))
                continue
            self.paths.append(p)
            self.images.append(img)
            self.labels.append(-1 if labels is None else int(labels[i]))
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
        return img, self.labels[i], torch.zeros(img.shape[-2:], dtype=torch.bool)


def _folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively, sorted), except hidden files and folders."""
    return sorted(
        q
        for q in folder.rglob("*")
        if q.is_file() and not any(part.startswith(".") for part in q.relative_to(folder).parts)
    )


def _class_key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def subfolder_labels(
    spec: str | list[str], paths: list[Path], class_names: list[str] | None
) -> tuple[list[int], list[str]]:
    """A label per path: the class its subfolder names, or -1.

    A file found under a folder given in ``spec``, in a subfolder whose name is a class name
    (case, ``_`` and ``-`` ignored; for names such as ImageNet's ``"tabby, tabby cat"``, any
    comma-separated part), gets that class's index. Files given directly or by a glob, files
    at a folder's top level and subfolders that name no class get -1.

    Args:
        spec: what ``images=`` named (files, folders or globs).
        paths: the files :func:`image_paths` found for it.
        class_names: the model's class names; None: every label is -1.

    Returns:
        ``(labels, subfolders that name no class)``.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    folders = [Path(os.path.expanduser(str(s))) for s in specs]
    folders = [f.resolve() for f in folders if f.is_dir()]
    index: dict[str, int] = {}
    for i, name in enumerate(class_names or []):
        for key in [name, *name.split(",")]:
            index.setdefault(_class_key(key), i)
    labels, unknown = [], set()
    for p in paths:
        parent = p.resolve().parent
        inside = any(parent != f and f in parent.parents for f in folders)
        label = index.get(_class_key(parent.name), -1) if inside and class_names else -1
        if inside and label < 0:
            unknown.add(parent.name)
        labels.append(label)
    return labels, sorted(unknown)


def image_paths(spec: str | list[str]) -> list[Path]:
    """The files ``images=`` names: files, folders (read recursively) and globs, in order.

    Raises:
        ImageFilesError: a name that matches no file or folder.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for s in specs:
        p = Path(os.path.expanduser(str(s)))
        if p.is_dir():
            paths.extend(_folder_files(p))
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
