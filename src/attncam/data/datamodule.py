"""LightningDataModules built from plain values (Hydra instantiates them from `conf/data/*.yaml`).

Every data module gives:

- `num_classes: int`, `class_names: list[str]`, `image_size: int`;
- `train_dataloader()`, `val_dataloader()`, `test_dataloader()`: batches `(images, labels)`,
  images `(B, 3, S, S)` float in [0, 1] (not normalised: the model normalises), labels `(B,)` long;
- `explain_dataloader(split="test")`: batches `(images, labels, masks)`, masks `(B, S, S)` bool
  ground truth (object mask, or the union of the boxes; all False means "no annotation");
- `explain_dataset(split)`: the dataset behind it.

Nothing touches the disk at construction, so every config can be instantiated anywhere; the data
are located (and, where asked, generated or downloaded) by `prepare_data`, `setup` or the first
access to `class_names`.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from attncam.data import folders
from attncam.data.folders import ImageFileDataset, Sample, SkipReport, VerifyMode
from attncam.data.synthetic import (
    GRID_CELLS,
    SPLITS,
    GridDataset,
    SyntheticConfig,
    SyntheticDataset,
    SyntheticSplit,
    compose_grids,
    load_or_generate,
)
from attncam.data.transforms import EvalTransform, JointTransform, TrainTransform

__all__ = [
    "AttnCamDataModule",
    "CUB200DataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "ImagenetteDataModule",
    "SyntheticDataModule",
]

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


class AttnCamDataModule(L.LightningDataModule, ABC):
    """Shared loaders and options of every attncam data module.

    Args:
        image_size: side `S` of the square images in every batch.
        batch_size: batch size of the train/val/test loaders.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster GPU copies; None pins when CUDA is available.
        seed: seed of data splits, generation and the train shuffling order.
        augment: random resized crop + horizontal flip on the train split.
        train_scale: area range of the train random resized crop.
        hflip: random horizontal flip on the train split.
        crop_pct: eval/explain resize-then-centre-crop ratio (shorter side resized to
            `S / crop_pct`).
        explain_batch_size: batch size of `explain_dataloader` (None: `batch_size`).
    """

    def __init__(
        self,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        augment: bool = True,
        train_scale: Sequence[float] = (0.5, 1.0),
        hflip: bool = True,
        crop_pct: float = 0.875,
        explain_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.train_scale = tuple(float(v) for v in train_scale)
        self.hflip = bool(hflip)
        self.crop_pct = float(crop_pct)
        self.explain_batch_size = int(explain_batch_size or batch_size)
        # Validate the transforms' options now: a bad value fails at instantiation.
        self._eval_transform = EvalTransform(self.image_size, self.crop_pct)
        self._train_transform = TrainTransform(self.image_size, self.train_scale, hflip=self.hflip)
        self._datasets: dict[tuple[str, bool, bool], Dataset] = {}

    # -- what a subclass provides ------------------------------------------------------------

    @abstractmethod
    def _load_class_names(self) -> list[str]:
        """Class names, in label order (may locate the data on disk)."""

    @abstractmethod
    def _build_dataset(self, split: Split, transform: JointTransform, return_mask: bool) -> Dataset:
        """The dataset of one split with the given transform."""

    # -- shared API ----------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Names of the classes, in label order."""
        if not hasattr(self, "_class_names"):
            self._class_names = list(self._load_class_names())
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def train_transform(self) -> JointTransform:
        """The train split's transform (augmentation when `augment`, else the eval transform)."""
        return self._train_transform if self.augment else self._eval_transform

    def eval_transform(self) -> JointTransform:
        """The val/test/explain transform (resize + centre crop, masks alike)."""
        return self._eval_transform

    def _dataset(self, split: Split, train: bool, return_mask: bool) -> Dataset:
        """Build (once) and return a split's dataset."""
        _check_split(split)
        key = (split, train, return_mask)
        if key not in self._datasets:
            transform = self.train_transform() if train else self.eval_transform()
            self._datasets[key] = self._build_dataset(split, transform, return_mask)
        return self._datasets[key]

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a Lightning stage needs (fit, validate, test, predict or None)."""
        if stage in (None, "fit"):
            self._dataset("train", True, False)
        if stage in (None, "fit", "validate"):
            self._dataset("val", False, False)
        if stage in (None, "test", "predict"):
            self._dataset("test", False, False)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """DataLoader with this module's worker/pinning options."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=generator,
            collate_fn=getattr(dataset, "collate_fn", None),
            # A last batch of one image would break BatchNorm in training.
            drop_last=shuffle and len(dataset) > batch_size,  # type: ignore[arg-type]
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented train batches `(images (B, 3, S, S), labels (B,))`."""
        return self._loader(self._dataset("train", True, False), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Val batches `(images (B, 3, S, S), labels (B,))` in a fixed order."""
        return self._loader(self._dataset("val", False, False), self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches `(images (B, 3, S, S), labels (B,))` in a fixed order."""
        return self._loader(self._dataset("test", False, False), self.batch_size, shuffle=False)

    def explain_dataset(self, split: Split = "test") -> Dataset:
        """The dataset of `explain_dataloader`: items `(image (3, S, S), label, mask (S, S))`."""
        return self._dataset(split, False, True)

    def explain_dataloader(
        self, split: Split = "test", batch_size: int | None = None
    ) -> DataLoader:
        """Explanation batches `(images (B, 3, S, S), labels (B,), masks (B, S, S) bool)`.

        Args:
            split: 'train', 'val' or 'test' (the train split is not augmented here).
            batch_size: None uses `explain_batch_size`.
        """
        return self._loader(
            self.explain_dataset(split), batch_size or self.explain_batch_size, shuffle=False
        )


# ----------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------


class SyntheticDataModule(AttnCamDataModule):
    """The built-in synthetic shapes-on-photos data (see `attncam.data.synthetic`), in memory.

    The three splits are generated once (about 25 s of single-core CPU time for the defaults) and
    cached in `cache_dir`; augmentation runs batched on the in-memory uint8 tensors.

    Args:
        image_size: side `S` of the generated images.
        num_classes: 2..10 shape/texture classes (default 8).
        num_train: train images.
        num_val: val images.
        num_test: test images.
        cache_dir: cache root; None uses `$ATTNCAM_CACHE` or `~/.cache/attncam`.
        object_area: range of the object's area as a fraction of the image.
        num_clutter: distractors per image.
        hue_jitter: per-image hue jitter in units of the spacing between class hues
            (`num_classes / 2` makes the hue independent of the class; see `SyntheticConfig`).
        noise_std: standard deviation of the pixel noise (images in [0, 1]).
        batch_size, num_workers, pin_memory, seed, augment, hflip, explain_batch_size: see
            `AttnCamDataModule`; `seed` also seeds the generation.
        train_scale: area range of the train random resized crop (mild, so the object stays).
    """

    def __init__(
        self,
        image_size: int = 128,
        num_classes: int = 8,
        num_train: int = 2000,
        num_val: int = 400,
        num_test: int = 400,
        cache_dir: str | os.PathLike | None = None,
        object_area: Sequence[float] = (0.06, 0.22),
        num_clutter: int = 8,
        hue_jitter: float = 0.3,
        noise_std: float = 0.02,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        augment: bool = True,
        train_scale: Sequence[float] = (0.7, 1.0),
        hflip: bool = True,
        explain_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            augment=augment,
            train_scale=train_scale,
            hflip=hflip,
            crop_pct=1.0,
            explain_batch_size=explain_batch_size,
        )
        self.config = SyntheticConfig(
            image_size=image_size,
            num_classes=num_classes,
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            seed=seed,
            object_area=tuple(object_area),  # type: ignore[arg-type]
            num_clutter=num_clutter,
            hue_jitter=float(hue_jitter),
            noise_std=float(noise_std),
        )
        self.cache_dir = cache_dir
        self._splits: dict[str, SyntheticSplit] = {}

    def _load_class_names(self) -> list[str]:
        from attncam.data.synthetic import class_names

        return class_names(self.config.num_classes)

    def prepare_data(self) -> None:
        """Generate and cache every split that is not cached yet (rank 0 only under DDP)."""
        for split in SPLITS:
            self.split_data(split)  # type: ignore[arg-type]

    def split_data(self, split: Split) -> SyntheticSplit:
        """The raw tensors of one split (loaded from the cache or generated)."""
        _check_split(split)
        if split not in self._splits:
            self._splits[split] = load_or_generate(self.config, split, self.cache_dir)
        return self._splits[split]

    def grid_dataset(
        self, split: Split = "test", num_grids: int | None = None, seed: int | None = None
    ) -> GridDataset:
        """Grid-class pairs for the grid pointing game (Böhle et al. 2021), from one split.

        Args:
            split: the split whose images are composed into 2 x 2 grids.
            num_grids: number of grids (None: a quarter of the split, each image about once).
            seed: seed of the grids (None: the data module's seed).

        Returns:
            A `GridDataset`: items `(image, target, mask, cell)`, 4 per grid.
        """
        data = self.split_data(split)
        count = max(1, len(data) // GRID_CELLS) if num_grids is None else int(num_grids)
        grids = compose_grids(data, count, self.seed if seed is None else int(seed))
        return GridDataset(grids)

    def grid_dataloader(
        self,
        split: Split = "test",
        num_grids: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> DataLoader:
        """The grid-class pairs of `grid_dataset(split, num_grids, seed)`, in order.

        Args:
            split: the split whose images are composed into grids.
            num_grids: number of grids (None: a quarter of the split).
            batch_size: None uses `explain_batch_size`.
            seed: seed of the grids (None: the data module's seed).

        Returns:
            Batches `(images (B, 3, S, S), targets (B,), masks (B, S, S) bool, cells (B,))`.
        """
        dataset = self.grid_dataset(split, num_grids, seed)
        return self._loader(dataset, batch_size or self.explain_batch_size, shuffle=False)

    def _build_dataset(self, split: Split, transform: JointTransform, return_mask: bool) -> Dataset:
        data = self.split_data(split)
        if len(data) == 0:
            raise ValueError(
                f"synthetic {split} split is empty (data.num_{split}=0); set it to at least 1"
            )
        return SyntheticDataset(data, transform=transform, return_mask=return_mask)


# ----------------------------------------------------------------------------------------------
# Datasets on disk
# ----------------------------------------------------------------------------------------------


class _FileDataModule(AttnCamDataModule):
    """Shared part of the on-disk data modules: index once, then build `ImageFileDataset`s.

    Args:
        root: dataset root directory.
        verify: check of every file when a dataset is built: 'none', 'header' (cheap: catches
            non-images) or 'full' (decode everything: also catches truncated files); files that
            fail later are skipped when loaded.
        **kwargs: see `AttnCamDataModule`.
    """

    dataset_name = "dataset"

    def __init__(
        self, root: str | os.PathLike, verify: VerifyMode = "header", **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        folders.check_verify(verify)
        self.root = Path(root).expanduser()
        self.verify: VerifyMode = verify
        self._index: tuple[dict[str, list[Sample]], list[str], SkipReport] | None = None

    @abstractmethod
    def _scan(self) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
        """Samples per split, class names, files skipped while scanning."""

    def index(self) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
        """Scan the data once: samples per split, class names, skipped files."""
        if self._index is None:
            self._index = self._scan()
        return self._index

    def _load_class_names(self) -> list[str]:
        return self.index()[1]

    def _build_dataset(self, split: Split, transform: JointTransform, return_mask: bool) -> Dataset:
        samples, names, skipped = self.index()
        # Scan-time skips belong to the split whose folder held them; report them with train.
        return ImageFileDataset(
            samples[split],
            names,
            transform=transform,
            return_mask=return_mask,
            verify=self.verify,
            name=f"{self.dataset_name} {split} (data.root={self.root})",
            skipped=skipped if split == "train" and not return_mask else None,
        )


class ImageFolderDataModule(_FileDataModule):
    """Any class-per-folder image tree.

    Layouts: `root/train/<class>/*` with `root/val` (or `validation`, `valid`) and optionally
    `root/test` (missing val: held out from train; missing test: the val split), or a plain
    `root/<class>/*` split at random per class with `val_fraction` and `test_fraction`.
    No annotations: explanation masks are all False.

    Args:
        root: the tree's root.
        val_fraction: val share when there is no val folder.
        test_fraction: test share when the tree is not split into folders.
        verify: see `_FileDataModule`.
        **kwargs: see `AttnCamDataModule` (image_size, batch_size, num_workers, ...).
    """

    dataset_name = "imagefolder"

    def __init__(
        self,
        root: str | os.PathLike = "data/imagefolder",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        verify: VerifyMode = "header",
        **kwargs: object,
    ) -> None:
        super().__init__(root, verify, **kwargs)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)

    def _scan(self) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
        return folders.imagefolder_splits(
            self.root, self.val_fraction, self.test_fraction, self.seed
        )


class ImagenetteDataModule(_FileDataModule):
    """Imagenette (10 easy ImageNet classes) in torchvision's layout.

    `root/imagenette2[-320|-160]/{train,val}/<wnid>/*.JPEG`; the test split is the val split.
    With `download=True` torchvision fetches the archive when it is missing; offline, a missing
    dataset fails within seconds naming the expected path and the URL. No boxes: explanation masks
    are all False.

    Args:
        root: directory holding (or to receive) `imagenette2*`.
        size: 'full', '320px' or '160px'.
        download: download when missing.
        verify: see `_FileDataModule`.
        **kwargs: see `AttnCamDataModule`.
    """

    dataset_name = "imagenette"

    def __init__(
        self,
        root: str | os.PathLike = "data/imagenette",
        size: str = "160px",
        download: bool = False,
        verify: VerifyMode = "none",
        **kwargs: object,
    ) -> None:
        super().__init__(root, verify, **kwargs)
        folders.imagenette_dir(self.root, size)  # validates `size`
        self.size = size
        self.download = bool(download)
        self.wnids: list[str] = []

    def prepare_data(self) -> None:
        """Download the archive if asked and missing (rank 0 only under DDP)."""
        folders.ensure_imagenette(self.root, self.size, self.download)

    def _scan(self) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
        splits, self.wnids, names, skipped = folders.imagenette_samples(
            self.root, self.size, self.download
        )
        return splits, names, skipped


class ImageNetDataModule(_FileDataModule):
    """ImageNet ILSVRC-2012 with validation boxes.

    `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG` (or a flat `root/val/*.JPEG` labelled
    by `LOC_val_solution.csv`); the test split is val. Val boxes come from `val_boxes` or are
    searched (ILSVRC XML directory `val_annotations/`, `ILSVRC2012_bbox_val_v3/val/`, ... or
    `LOC_val_solution.csv`); without them the masks are all False.

    Args:
        root: ImageNet root.
        val_boxes: XML directory or CSV with the val boxes; None searches under `root`.
        verify: see `_FileDataModule` (default 'none': 1.3 M files).
        **kwargs: see `AttnCamDataModule`.
    """

    dataset_name = "imagenet"

    def __init__(
        self,
        root: str | os.PathLike = "data/imagenet",
        val_boxes: str | os.PathLike | None = None,
        verify: VerifyMode = "none",
        **kwargs: object,
    ) -> None:
        super().__init__(root, verify, **kwargs)
        self.val_boxes = val_boxes
        self.wnids: list[str] = []

    def _scan(self) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
        splits, self.wnids, names, skipped = folders.imagenet_samples(self.root, self.val_boxes)
        return splits, names, skipped


class CUB200DataModule(_FileDataModule):
    """Caltech-UCSD Birds-200-2011 with bird boxes (or segmentations).

    Official train split minus a stratified `val_fraction` for validation; official test split.

    Args:
        root: directory holding `CUB_200_2011/` (or that directory).
        val_fraction: share of the official train split held out for validation (0: val = test).
        masks: 'boxes' or 'segmentations' (the separately published masks).
        verify: see `_FileDataModule`.
        **kwargs: see `AttnCamDataModule`.
    """

    dataset_name = "cub200"

    def __init__(
        self,
        root: str | os.PathLike = "data/cub200",
        val_fraction: float = 0.1,
        masks: Literal["boxes", "segmentations"] = "boxes",
        verify: VerifyMode = "header",
        **kwargs: object,
    ) -> None:
        super().__init__(root, verify, **kwargs)
        if masks not in ("boxes", "segmentations"):
            raise ValueError(f"unknown CUB mask source {masks!r}; choose one of: boxes, segmentations")  # fmt: skip
        self.val_fraction = float(val_fraction)
        self.masks: Literal["boxes", "segmentations"] = masks

    def _scan(self) -> tuple[dict[str, list[Sample]], list[str], SkipReport]:
        splits, names = folders.cub200_samples(self.root, self.val_fraction, self.seed, self.masks)
        return splits, names, SkipReport()
