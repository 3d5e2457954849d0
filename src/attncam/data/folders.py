"""Real image datasets read from disk in their published layouts.

- any class-per-folder tree (`root/<class>/<image>`, optionally split into `root/train`, `root/val`,
  `root/test`);
- Imagenette (`root/imagenette2[-160|-320]/{train,val}/<wnid>/*.JPEG`, as torchvision writes it);
- ImageNet ILSVRC-2012 (`root/train/<wnid>/*.JPEG`, `root/val/<wnid>/*.JPEG`, with the validation
  boxes from the ILSVRC XML files or Kaggle's `LOC_val_solution.csv`);
- CUB-200-2011 (`CUB_200_2011/images.txt`, `image_class_labels.txt`, `train_test_split.txt`,
  `bounding_boxes.txt`, `classes.txt`, `images/<class>/<file>.jpg`).

Every scanner returns `Sample`s; `ImageFileDataset` decodes them. Files that are not images
(wrong extension, unreadable header, truncated data) are skipped, counted in `dataset.skipped`
and reported with a warning listing the first few paths.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import socket
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from PIL import Image
from torch.utils.data import Dataset

from attncam.data.transforms import (
    IMAGE_DECODE_ERRORS,
    JointTransform,
    boxes_to_mask,
    load_image,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENETTE_SIZES",
    "ImageFileDataset",
    "Sample",
    "VerifyMode",
    "check_labels",
    "check_verify",
    "cub200_samples",
    "find_imagenet_val_boxes",
    "imagefolder_splits",
    "imagenet_samples",
    "imagenette_samples",
    "read_ilsvrc_xml",
    "read_loc_solution_csv",
    "require_dir",
    "scan_class_folders",
    "stratified_split",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
VerifyMode = Literal["none", "header", "full"]
_VERIFY_MODES: tuple[str, ...] = ("none", "header", "full")
# How many skipped paths a warning lists.
_REPORT_FIRST = 5

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """One image on disk and its annotation.

    Attributes:
        path: image file.
        label: class index.
        boxes: ground-truth boxes `(x0, y0, x1, y1)` in pixels of the annotated image, `x1`/`y1`
            exclusive; empty when the image has none.
        box_size: `(width, height)` of the image the boxes were drawn on, when the annotation says
            so; boxes are rescaled when the decoded image has another size.
        mask_path: optional segmentation mask (grayscale, >= 128 is foreground); it takes
            precedence over the boxes.
    """

    path: Path
    label: int
    boxes: tuple[Box, ...] = ()
    box_size: tuple[int, int] | None = None
    mask_path: Path | None = None


@dataclass
class SkipReport:
    """Files left out while building a dataset, with why."""

    paths: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        """Record one skipped file."""
        self.paths.append(str(path))
        self.reasons.append(reason)

    def extend(self, other: SkipReport) -> None:
        """Merge another report into this one."""
        self.paths += other.paths
        self.reasons += other.reasons

    def __len__(self) -> int:
        return len(self.paths)

    def warn(self, where: str) -> None:
        """Log one warning with the count and the first few paths (nothing when empty)."""
        if not self.paths:
            return
        first = "; ".join(
            f"{p} ({r})"
            for p, r in zip(self.paths[:_REPORT_FIRST], self.reasons[:_REPORT_FIRST], strict=True)
        )
        more = f" and {len(self) - _REPORT_FIRST} more" if len(self) > _REPORT_FIRST else ""
        log.warning("%s: skipped %d file(s) that are not readable images: %s%s", where, len(self), first, more)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def require_dir(path: Path, config_key: str, what: str, hint: str = "") -> Path:
    """Return `path` if it is a directory, else raise FileNotFoundError naming the config key.

    Args:
        path: expected directory.
        config_key: the option that sets it (e.g. `data.root`).
        what: what the directory should contain, for the message.
        hint: extra advice appended to the message.
    """
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} not found: expected the directory {path} (set by {config_key}"
            f"{'' if path.exists() else '; the path does not exist'}){'. ' + hint if hint else ''}"
        )
    return path


def check_labels(labels: Iterable[int], num_classes: int, source: str) -> None:
    """Raise ValueError when a label is outside `[0, num_classes)`.

    Args:
        labels: class indices.
        num_classes: number of classes.
        source: where the labels come from, for the message.
    """
    bad = sorted({int(x) for x in labels if not 0 <= int(x) < num_classes})
    if bad:
        shown = ", ".join(str(b) for b in bad[:10])
        raise ValueError(
            f"{source}: label(s) out of range: {shown}; valid labels are 0..{num_classes - 1} "
            f"({num_classes} classes)"
        )


def check_verify(verify: str) -> None:
    """Raise for an unknown verify mode (naming the valid ones: none, header, full)."""
    if verify not in _VERIFY_MODES:
        raise ValueError(f"unknown verify mode {verify!r}; choose one of: {', '.join(_VERIFY_MODES)}")  # fmt: skip


def _probe(path: Path, verify: str) -> str | None:
    """None if `path` passes the check, else the reason it fails."""
    try:
        with Image.open(path) as image:
            if verify == "full":
                image.load()
            else:
                image.verify()
    except IMAGE_DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def verify_samples(samples: Sequence[Sample], verify: str, report: SkipReport) -> list[Sample]:
    """Drop samples whose file fails the check, recording them in `report`.

    Args:
        samples: candidates.
        verify: 'none' (keep all), 'header' (open and verify the header: catches non-images and
            empty files) or 'full' (decode every pixel: also catches truncated files).
        report: where skipped files are recorded.

    Returns:
        The samples that passed, in order.
    """
    check_verify(verify)
    if verify == "none" or not samples:
        return list(samples)
    workers = min(8, os.cpu_count() or 1, len(samples))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda s: _probe(s.path, verify), samples, chunksize=64))
    kept: list[Sample] = []
    for sample, reason in zip(samples, reasons, strict=True):
        if reason is None:
            kept.append(sample)
        else:
            report.add(sample.path, reason)
    return kept


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class ImageFileDataset(Dataset):
    """Images decoded from disk, with optional ground-truth masks.

    Items are `(image, label)` or, with `return_mask=True`, `(image, label, mask)`: image
    `(3, S, S)` float in [0, 1], label an int, mask `(S, S)` bool (union of the boxes, or the
    segmentation; all False when the image has no annotation).

    A file that fails the `verify` check at construction, or fails to decode later, is skipped:
    counted in `skipped`, listed in `skipped_paths` and reported with a warning (a sample that
    fails at load time is replaced by the next readable one, so batches stay full).

    Args:
        samples: the images.
        class_names: names of all classes; labels must lie in `[0, len(class_names))`.
        transform: joint transform `(image uint8 (3, H, W), mask (H, W) | None) ->
            (image float (3, S, S), mask | None)`.
        return_mask: also return the mask.
        verify: 'none', 'header' or 'full' check of every file at construction.
        name: what the dataset is, for messages (e.g. `"imagenet val (data.root=/data/imagenet)"`).
        skipped: files already left out while scanning, included in the count and the warning.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        transform: JointTransform,
        return_mask: bool = False,
        verify: VerifyMode = "header",
        name: str = "dataset",
        skipped: SkipReport | None = None,
    ) -> None:
        self.class_names = list(class_names)
        self.name = name
        check_labels((s.label for s in samples), len(self.class_names), name)
        report = SkipReport()
        if skipped is not None:
            report.extend(skipped)
        self.samples = verify_samples(samples, verify, report)
        report.warn(name)
        self.skipped_paths: list[str] = list(report.paths)
        if not self.samples:
            raise ValueError(
                f"{name}: empty dataset: no readable images"
                + (f" ({len(report)} file(s) skipped)" if len(report) else "")
            )
        self.transform = transform
        self.return_mask = return_mask

    @property
    def skipped(self) -> int:
        """Number of files skipped so far (at construction and while loading, this process)."""
        return len(self.skipped_paths)

    @property
    def labels(self) -> torch.Tensor:
        """`(N,)` int64 labels."""
        return torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def _mask(self, sample: Sample, height: int, width: int) -> torch.Tensor:
        """`(H, W)` bool ground truth of one sample at the decoded image's size."""
        if sample.mask_path is not None:
            seg = load_image(sample.mask_path)[0]
            if tuple(seg.shape) != (height, width):
                seg = torch.nn.functional.interpolate(
                    seg[None, None].float(), size=(height, width), mode="nearest-exact"
                )[0, 0]
            return seg >= 128
        boxes = torch.tensor(sample.boxes, dtype=torch.float64).reshape(-1, 4)
        if sample.box_size is not None and boxes.numel():
            box_w, box_h = sample.box_size
            if (box_w, box_h) != (width, height) and box_w > 0 and box_h > 0:
                scale = torch.tensor([width / box_w, height / box_h] * 2, dtype=torch.float64)
                boxes = boxes * scale
        return boxes_to_mask(boxes, height, width)

    def _load(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode one sample: `(3, H, W)` uint8 image and its `(H, W)` mask (None if unused)."""
        image = load_image(sample.path)
        mask = self._mask(sample, *image.shape[-2:]) if self.return_mask else None
        return image, mask

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        n = len(self.samples)
        for attempt in range(n):
            sample = self.samples[(index + attempt) % n]
            try:
                image, mask = self._load(sample)
            except IMAGE_DECODE_ERRORS as err:
                self.skipped_paths.append(str(sample.path))
                log.warning(
                    "%s: skipping unreadable image %s (%s: %s); %d file(s) skipped so far",
                    self.name, sample.path, type(err).__name__, err, self.skipped,
                )  # fmt: skip
                continue
            out, out_mask = self.transform(image, mask)
            if self.return_mask:
                assert out_mask is not None
                return out, sample.label, out_mask
            return out, sample.label
        raise RuntimeError(f"{self.name}: no image of the {n} could be decoded")


# ----------------------------------------------------------------------------------------------
# Class-per-folder trees
# ----------------------------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def list_classes(root: Path) -> list[str]:
    """Sorted names of the (non-hidden) subdirectories of `root`."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p))


def scan_class_folders(
    root: Path, class_names: Sequence[str] | None = None, source: str = "data.root"
) -> tuple[list[Sample], list[str], SkipReport]:
    """Index a `root/<class>/<file>` tree (files found recursively below each class folder).

    Args:
        root: the tree's root.
        class_names: the class list to map folder names to labels (e.g. the train split's, when
            scanning val); None derives it from the sorted folder names.
        source: config key or description used in messages.

    Returns:
        Samples sorted by path, the class names, and the files skipped for a non-image extension.

    Raises:
        ValueError: when a folder is not one of `class_names` (its label would be out of range),
            or when `root` holds no class folders.
    """
    found = list_classes(root)
    if not found:
        raise ValueError(
            f"no class folders in {root} ({source}): expected the layout {root}/<class>/<image>"
        )
    names = list(found) if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(
            f"{root} ({source}): class folder(s) {', '.join(unknown[:10])} are not among the "
            f"{len(names)} known classes (labels would be out of range); known classes start "
            f"with: {', '.join(names[:10])}"
        )
    samples: list[Sample] = []
    report = SkipReport()
    for name in found:
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(path):
                    samples.append(Sample(path=path, label=index[name]))
                else:
                    report.add(path, "not an image file extension")
    return samples, names, report


def stratified_split(
    samples: Sequence[Sample], fractions: Sequence[float], seed: int
) -> list[list[Sample]]:
    """Split samples per class at random into parts of the given fractions.

    Each class contributes `round(fraction * count)` samples to each part after the first (at
    least one when the class has more samples than parts and the fraction is > 0); the first part
    takes the rest.

    Args:
        samples: samples to split.
        fractions: fractions of the parts after the first (e.g. `(val, test)`), summing below 1.
        seed: random seed.

    Returns:
        `len(fractions) + 1` lists of samples, each sorted by path.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {tuple(fractions)}")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: str(s.path)):
        by_class[sample.label].append(sample)
    rng = random.Random(seed)
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        start = 0
        for k, fraction in enumerate(fractions, start=1):
            take = round(fraction * len(items))
            if fraction > 0 and take == 0 and len(items) > len(fractions):
                take = 1
            parts[k] += items[start : start + take]
            start += take
        parts[0] += items[start:]
    return [sorted(part, key=lambda s: str(s.path)) for part in parts]


def imagefolder_splits(
    root: Path, val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
    """Train/val/test samples of a class-per-folder tree.

    Layout `root/train/<class>/...` (+ `root/val` or `root/validation` or `root/valid`,
    + `root/test`): the split folders are used; a missing val split is carved from train with
    `val_fraction`; a missing test split reuses val. Layout `root/<class>/...`: a stratified random
    split with `val_fraction` and `test_fraction`.

    Returns:
        Samples per split, the class names (the train split's folders) and the skipped files.
    """
    require_dir(root, "data.root", "image folder")
    report = SkipReport()
    train_dir = root / "train"
    if train_dir.is_dir():
        train, names, skipped = scan_class_folders(train_dir, None, "data.root/train")
        report.extend(skipped)
        splits: dict[str, list[Sample]] = {"train": train}
        val_dir = next(
            (root / d for d in ("val", "validation", "valid") if (root / d).is_dir()), None
        )
        if val_dir is not None:
            splits["val"], _, skipped = scan_class_folders(val_dir, names, f"data.root/{val_dir.name}")  # fmt: skip
            report.extend(skipped)
        else:
            log.info("%s has no val folder: holding out %.0f%% of train", root, 100 * val_fraction)
            splits["train"], splits["val"] = stratified_split(train, [val_fraction], seed)
        if (root / "test").is_dir():
            splits["test"], _, skipped = scan_class_folders(root / "test", names, "data.root/test")
            report.extend(skipped)
        else:
            log.info("%s has no test folder: the test split is the val split", root)
            splits["test"] = splits["val"]
        return splits, names, report
    samples, names, report = scan_class_folders(root, None, "data.root")
    train, val, test = stratified_split(samples, [val_fraction, test_fraction], seed)
    return {"train": train, "val": val, "test": test}, names, report


# ----------------------------------------------------------------------------------------------
# Imagenette
# ----------------------------------------------------------------------------------------------

IMAGENETTE_SIZES: dict[str, str] = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}  # fmt: skip


def _imagenette_meta() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, ...]]]:
    """torchvision's archive URLs/MD5s and wnid -> names table for Imagenette."""
    from torchvision.datasets import Imagenette

    # torchvision keeps these tables private; reading them avoids copying its URLs and checksums.
    return dict(Imagenette._ARCHIVES), dict(Imagenette._WNID_TO_CLASS)  # noqa: SLF001


def imagenette_dir(root: Path, size: str) -> Path:
    """`root/imagenette2[-320|-160]` for `size` in 'full', '320px', '160px'."""
    if size not in IMAGENETTE_SIZES:
        raise ValueError(f"unknown Imagenette size {size!r}; choose one of: {', '.join(IMAGENETTE_SIZES)}")  # fmt: skip
    return root / IMAGENETTE_SIZES[size]


def _reachable(url: str, timeout: float) -> str | None:
    """None if a TCP connection to the URL's host opens within `timeout` s, else the error."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def ensure_imagenette(root: Path, size: str, download: bool, timeout: float = 5.0) -> Path:
    """Make sure Imagenette is on disk, downloading it with torchvision if asked and online.

    Fails within about `timeout` seconds when the data are missing and the server cannot be
    reached, with a message naming the expected path, the URL and the option to change.

    Returns:
        The extracted dataset directory (holding `train/` and `val/`).
    """
    base = imagenette_dir(root, size)
    if (base / "train").is_dir() and (base / "val").is_dir():
        return base
    archives, _ = _imagenette_meta()
    url = archives[size][0]
    layout = f"{base}/train/<wnid>/*.JPEG and {base}/val/<wnid>/*.JPEG"
    if not download:
        raise FileNotFoundError(
            f"Imagenette ({size}) not found: expected {layout} (data.root={root}, "
            f"data.size={size}). Set data.download=true to fetch {url}, or download and "
            f"extract it into {root} yourself."
        )
    error = _reachable(url, timeout)
    if error is not None:
        raise RuntimeError(
            f"Imagenette ({size}) is not at {base} and cannot be downloaded: {url} is not "
            f"reachable ({error}). Fetch and extract the archive into {root} on a machine with "
            f"network access so that {layout} exist, then run with data.download=false."
        )
    from torchvision.datasets import Imagenette

    log.info("downloading Imagenette (%s) from %s into %s", size, url, root)
    root.mkdir(parents=True, exist_ok=True)
    Imagenette(str(root), split="train", size=size, download=True)
    return base


def imagenette_samples(
    root: Path, size: str, download: bool
) -> tuple[dict[str, list[Sample]], list[str], list[str], SkipReport]:
    """Train/val samples of Imagenette; the test split is the val split (none is published).

    Returns:
        Samples per split, the wnids (class order), human-readable class names, skipped files.
    """
    base = ensure_imagenette(root, size, download)
    _, wnid_to_class = _imagenette_meta()
    train, wnids, report = scan_class_folders(base / "train", None, "data.root (Imagenette train)")
    val, _, skipped = scan_class_folders(base / "val", wnids, "data.root (Imagenette val)")
    report.extend(skipped)
    names = [wnid_to_class.get(w, (w,))[0] for w in wnids]
    return {"train": train, "val": val, "test": val}, wnids, names, report


# ----------------------------------------------------------------------------------------------
# ImageNet (ILSVRC-2012)
# ----------------------------------------------------------------------------------------------


def read_ilsvrc_xml(path: Path) -> tuple[list[tuple[str, Box]], tuple[int, int] | None]:
    """Read one ILSVRC (Pascal VOC-style) annotation file.

    Args:
        path: e.g. `ILSVRC2012_bbox_val_v3/val/ILSVRC2012_val_00000001.xml`.

    Returns:
        `(wnid, (x0, y0, x1, y1))` per object, with the inclusive `xmax`/`ymax` of the file made
        exclusive, and the annotated image's `(width, height)` when the file gives it.
    """
    tree = ET.parse(path)
    size = tree.find("size")
    image_size: tuple[int, int] | None = None
    if size is not None:
        width, height = size.findtext("width"), size.findtext("height")
        if width and height and int(float(width)) > 0 and int(float(height)) > 0:
            image_size = (int(float(width)), int(float(height)))
    objects: list[tuple[str, Box]] = []
    for obj in tree.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        x0, y0, x1, y1 = (float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(((obj.findtext("name") or "").strip(), (x0, y0, x1 + 1.0, y1 + 1.0)))
    return objects, image_size


def read_loc_solution_csv(path: Path) -> dict[str, list[tuple[str, Box]]]:
    """Read Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`).

    `PredictionString` repeats `wnid xmin ymin xmax ymax` once per object.

    Returns:
        Image id (file stem, e.g. `ILSVRC2012_val_00000001`) -> `(wnid, box)` list, boxes with an
        exclusive `x1`/`y1`.
    """
    out: dict[str, list[tuple[str, Box]]] = {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(
                f"{path}: expected the header 'ImageId,PredictionString', got {header}"
            )
        for row in reader:
            if len(row) < 2:
                continue
            parts = row[1].split()
            if len(parts) % 5:
                raise ValueError(f"{path}: malformed PredictionString for {row[0]}: {row[1]!r}")
            objects = []
            for k in range(0, len(parts), 5):
                x0, y0, x1, y1 = (float(v) for v in parts[k + 1 : k + 5])
                objects.append((parts[k], (x0, y0, x1 + 1.0, y1 + 1.0)))
            out[row[0].strip()] = objects
    return out


def find_imagenet_val_boxes(root: Path, val_boxes: str | Path | None) -> Path | None:
    """Locate the validation box annotations: an XML directory or `LOC_val_solution.csv`.

    Args:
        root: ImageNet root.
        val_boxes: explicit path (directory of XML files or the CSV); None searches, in order,
            `root/val_annotations`, `root/ILSVRC2012_bbox_val_v3/val`, `root/bbox_val`,
            `root/Annotations/CLS-LOC/val`, `root/LOC_val_solution.csv` and
            `root/../LOC_val_solution.csv`.

    Returns:
        The path found, or None (the val masks are then all False).

    Raises:
        FileNotFoundError: when an explicit `val_boxes` does not exist.
    """
    if val_boxes is not None:
        path = Path(val_boxes).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"ImageNet val boxes not found at {path} (data.val_boxes): give a directory of "
                f"ILSVRC XML files or LOC_val_solution.csv, or null to search {root}"
            )
        return path
    candidates = [
        root / "val_annotations",
        root / "ILSVRC2012_bbox_val_v3" / "val",
        root / "bbox_val",
        root / "Annotations" / "CLS-LOC" / "val",
        root / "LOC_val_solution.csv",
        root.parent / "LOC_val_solution.csv",
    ]
    return next((c for c in candidates if c.exists()), None)


def _imagenet_class_names(root: Path, wnids: Sequence[str]) -> list[str]:
    """Human-readable names from `LOC_synset_mapping.txt` (`wnid name, synonym`), else wnids."""
    for path in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt"):
        if path.is_file():
            mapping = {}
            for line in path.read_text().splitlines():
                wnid, _, rest = line.strip().partition(" ")
                if wnid:
                    mapping[wnid] = rest.split(",")[0].strip() or wnid
            return [mapping.get(w, w) for w in wnids]
    return list(wnids)


def imagenet_samples(
    root: Path, val_boxes: str | Path | None = None
) -> tuple[dict[str, list[Sample]], list[str], list[str], SkipReport]:
    """Train/val samples of ILSVRC-2012 with the val boxes; the test split is val.

    Layout: `root/train/<wnid>/*.JPEG`, `root/val/<wnid>/*.JPEG` (the usual reorganised val), or a
    flat `root/val/*.JPEG` labelled by `LOC_val_solution.csv` (the first object's wnid).

    Returns:
        Samples per split, the wnids, class names, skipped files.
    """
    require_dir(root, "data.root", "ImageNet", "Expected root/train/<wnid>/*.JPEG and root/val")
    train_dir = require_dir(root / "train", "data.root", "ImageNet train split")
    val_dir = require_dir(root / "val", "data.root", "ImageNet val split")
    train, wnids, report = scan_class_folders(train_dir, None, "data.root/train")
    index = {w: i for i, w in enumerate(wnids)}
    box_source = find_imagenet_val_boxes(root, val_boxes)
    csv_boxes = (
        read_loc_solution_csv(box_source)
        if box_source is not None and box_source.is_file()
        else None
    )
    if list_classes(val_dir):
        val, _, skipped = scan_class_folders(val_dir, wnids, "data.root/val")
        report.extend(skipped)
    else:
        if csv_boxes is None:
            raise FileNotFoundError(
                f"{val_dir} holds no class folders; a flat val folder needs LOC_val_solution.csv "
                f"for its labels (data.val_boxes, or {root}/LOC_val_solution.csv)"
            )
        val = []
        for path in sorted(val_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or _is_hidden(path):
                report.add(path, "not an image file extension")
                continue
            objects = csv_boxes.get(path.stem)
            if not objects:
                report.add(path, "no label in LOC_val_solution.csv")
                continue
            wnid = objects[0][0]
            if wnid not in index:
                raise ValueError(
                    f"{path}: wnid {wnid!r} from LOC_val_solution.csv is not a train class "
                    f"(labels would be out of range); {len(wnids)} classes in {train_dir}"
                )
            val.append(Sample(path=path, label=index[wnid]))
    if box_source is not None:
        val = _attach_boxes(val, wnids, box_source, csv_boxes)
    else:
        log.info("no ImageNet val boxes found under %s: val masks are empty", root)
    names = _imagenet_class_names(root, wnids)
    return {"train": train, "val": val, "test": val}, wnids, names, report


def _attach_boxes(
    samples: list[Sample],
    wnids: Sequence[str],
    source: Path,
    csv_boxes: dict[str, list[tuple[str, Box]]] | None,
) -> list[Sample]:
    """Give each val sample the boxes of its own class from the XML files or the CSV."""
    out: list[Sample] = []
    missing = other_class = 0
    for sample in samples:
        if csv_boxes is not None:
            objects, size = csv_boxes.get(sample.path.stem, []), None
        else:
            xml = source / f"{sample.path.stem}.xml"
            objects, size = read_ilsvrc_xml(xml) if xml.is_file() else ([], None)
        if not objects:
            missing += 1
        wnid = wnids[sample.label]
        boxes = tuple(box for name, box in objects if name == wnid)
        if objects and not boxes:
            other_class += 1
        out.append(Sample(sample.path, sample.label, boxes, size, sample.mask_path))
    if missing or other_class:
        log.warning(
            "ImageNet val boxes from %s: %d of %d images have no box, %d only boxes of another "
            "class (their masks are empty)", source, missing, len(samples), other_class,
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------

_CUB_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
)


def cub_dir(root: Path) -> Path:
    """The directory holding `images.txt`: `root` itself or `root/CUB_200_2011`."""
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    require_dir(root, "data.root", "CUB-200-2011", "Expected root/CUB_200_2011/images.txt")
    raise FileNotFoundError(
        f"CUB-200-2011 not found: neither {root}/images.txt nor {root}/CUB_200_2011/images.txt "
        f"exists (data.root={root}); extract CUB_200_2011.tgz there"
    )


def _read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """`<id> <v1> ... ` lines -> id -> values; raises ValueError naming the bad line."""
    if not path.is_file():
        raise FileNotFoundError(f"CUB-200-2011 file missing: {path}")
    table: dict[int, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns)
        if len(parts) != columns + 1:
            raise ValueError(f"{path}:{number}: expected {columns + 1} fields, got {line!r}")
        table[int(parts[0])] = parts[1:]
    return table


def cub200_samples(
    root: Path, val_fraction: float, seed: int, masks: Literal["boxes", "segmentations"] = "boxes"
) -> tuple[dict[str, list[Sample]], list[str]]:
    """CUB-200-2011 samples: the official train split minus a stratified val part, official test.

    Args:
        root: directory holding `CUB_200_2011/` (or that directory itself).
        val_fraction: part of the official train split held out for validation (0: val = test).
        seed: seed of the val hold-out.
        masks: 'boxes' (the bird's box) or 'segmentations' (`segmentations/<class>/<file>.png`
            beside `CUB_200_2011/` or inside it, the separately published masks).

    Returns:
        Samples per split and the class names (without the `001.` prefix).
    """
    base = cub_dir(root)
    images = _read_table(base / "images.txt", 1)
    labels = _read_table(base / "image_class_labels.txt", 1)
    is_train = _read_table(base / "train_test_split.txt", 1)
    boxes = _read_table(base / "bounding_boxes.txt", 4)
    classes = _read_table(base / "classes.txt", 1)
    class_ids = sorted(classes)
    names = [classes[i][0].split(".", 1)[-1] for i in class_ids]
    position = {cid: k for k, cid in enumerate(class_ids)}
    seg_root: Path | None = None
    if masks == "segmentations":
        seg_root = next(
            (p for p in (base / "segmentations", base.parent / "segmentations") if p.is_dir()),
            None,
        )
        if seg_root is None:
            raise FileNotFoundError(
                f"CUB segmentations not found in {base}/segmentations or "
                f"{base.parent}/segmentations (data.masks=segmentations); use data.masks=boxes"
            )
    elif masks != "boxes":
        raise ValueError(f"unknown CUB mask source {masks!r}; choose one of: boxes, segmentations")
    train: list[Sample] = []
    test: list[Sample] = []
    for image_id in sorted(images):
        rel = images[image_id][0]
        if image_id not in labels or image_id not in is_train:
            raise ValueError(f"{base}: image id {image_id} ({rel}) has no class label or split")
        class_id = int(labels[image_id][0])
        if class_id not in position:
            raise ValueError(
                f"{base / 'image_class_labels.txt'}: class id {class_id} of image {image_id} is "
                f"out of range; classes.txt defines ids {class_ids[0]}..{class_ids[-1]}"
            )
        box: tuple[Box, ...] = ()
        if image_id in boxes:
            x, y, w, h = (float(v) for v in boxes[image_id])
            box = ((x, y, x + w, y + h),)
        mask_path = None
        if seg_root is not None:
            mask_path = (seg_root / rel).with_suffix(".png")
            if not mask_path.is_file():
                mask_path = None
        sample = Sample(base / "images" / rel, position[class_id], box, None, mask_path)
        (train if is_train[image_id][0] == "1" else test).append(sample)
    if val_fraction > 0:
        train, val = stratified_split(train, [val_fraction], seed)
    else:
        val = test
    return {"train": train, "val": val, "test": test}, names
