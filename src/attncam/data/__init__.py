"""Data: the built-in synthetic set, real datasets on disk, transforms and LightningDataModules.

Batches are `(images (B, 3, S, S) float in [0, 1], labels (B,) long)`; explanation batches add
`masks (B, S, S) bool`. Images are not normalised: the model normalises internally.
"""

from attncam.data.datamodule import (
    AttnCamDataModule,
    CUB200DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    ImagenetteDataModule,
    SyntheticDataModule,
)
from attncam.data.synthetic import SyntheticConfig, SyntheticDataset
from attncam.data.transforms import EvalTransform, TrainTransform, load_image

__all__ = [
    "AttnCamDataModule",
    "CUB200DataModule",
    "EvalTransform",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "ImagenetteDataModule",
    "SyntheticConfig",
    "SyntheticDataModule",
    "SyntheticDataset",
    "TrainTransform",
    "load_image",
]
