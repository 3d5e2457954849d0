"""The guidance experiment's data: the hard synthetic preset, its grids, and cached trunk features.

Every arm shares one frozen ImageNet trunk (EfficientNet-Lite0), so the trunk runs once per image
and the trainable tail of each arm (the attention module, for an earlier placement also the layers
after it, and the classifier) is trained on the cached features of the layer it starts from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attncam.data.synthetic import (
    GridSplit,
    SyntheticConfig,
    SyntheticSplit,
    compose_grids,
    load_or_generate,
)
from attncam.explain.hooks import capture
from attncam.runtime import eval_mode
from attncam.stages.reproduce.settings import ROOT, compose_cfg

log = logging.getLogger(__name__)


@dataclass
class Data:
    """The splits (uint8 images in memory), the grids and the class names."""

    train: SyntheticSplit
    val: SyntheticSplit
    test: SyntheticSplit
    grids: GridSplit
    config: SyntheticConfig

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


def preset(d: DictConfig) -> dict[str, Any]:
    """The synthetic preset named by ``d.preset`` (``conf/data/<preset>.yaml``, composed by Hydra
    as ``train.py data=<preset>`` would) with ``d``'s keys; only ``SyntheticConfig``'s fields."""
    have = sorted(p.stem for p in (ROOT / "conf" / "data").glob("synthetic*.yaml"))
    if d.preset not in have:
        raise ValueError(f"guidance.data.preset {d.preset!r} not found; choose one of: {have}")
    raw = OmegaConf.to_container(compose_cfg("train", [f"data={d.preset}"]).data, resolve=True)
    assert isinstance(raw, dict)
    raw.update({k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k != "preset"})  # type: ignore[union-attr]
    out = {k: v for k, v in raw.items() if k in SyntheticConfig.__dataclass_fields__}
    out["object_area"] = tuple(out["object_area"])
    return out


def load_data(d: DictConfig, cache_dir: str | None) -> Data:
    """Generate (or load from the synthetic cache) the splits and compose the test grids."""
    cfg = SyntheticConfig(**preset(d))
    splits = {s: load_or_generate(cfg, s, cache_dir) for s in ("train", "val", "test")}
    grids = compose_grids(splits["test"], int(d.get("num_grids") or 1), seed=int(cfg.seed))
    return Data(splits["train"], splits["val"], splits["test"], grids, cfg)


def as_float(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, S, S)`` images to float in [0, 1]."""
    return images.float().div_(255.0)


@torch.no_grad()
def trunk_features(
    net: nn.Module, images: Tensor, sites: list[str], batch: int
) -> dict[str, Tensor]:
    """The outputs of ``sites`` (dotted layers) of ``net`` for uint8 ``images``, in float32."""
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    with eval_mode(net):
        for start in range(0, images.shape[0], batch):
            x = as_float(images[start : start + batch])
            with capture(net, sites) as acts:
                net(x)
            for s in sites:
                out[s].append(acts[s].detach().float().contiguous())
    return {s: torch.cat(v) for s, v in out.items()}


def cached_features(
    net: nn.Module, data: Data, sites: list[str], path: Path, batch: int
) -> dict[str, dict[str, Tensor]]:
    """``{split: {site: features}}`` for train / val / test / grids, cached in ``path``.

    The cache is keyed by the sites and the data's settings; a mismatch recomputes it.
    """
    key = {"sites": sites, "data": repr(data.config), "grids": len(data.grids)}
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == repr(key):
            log.info("trunk features from %s", path)
            return cached["features"]
    sources = {"train": data.train.images, "val": data.val.images, "test": data.test.images,
               "grids": data.grids.images}  # fmt: skip
    feats = {name: trunk_features(net, imgs, sites, batch) for name, imgs in sources.items()}
    from attncam.io import atomic_torch_save

    atomic_torch_save({"key": repr(key), "features": feats}, path)
    return feats


__all__ = ["Data", "as_float", "cached_features", "load_data", "preset", "trunk_features"]
