"""The explain stage's inputs: the model (checkpoint or pretrained), the images, the methods.

Every problem with them is an :class:`ExplainInputError` that says what to pass instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from attncam.data.files import ImageFilesDataset, image_paths
from attncam.explain import Explainer, available_methods, get_method, methods_from_config, model_api
from attncam.io import sha256_file
from attncam.models.checkpoint import load_classifier
from attncam.models.net import AttentionNet

log = logging.getLogger(__name__)


class ExplainInputError(ValueError):
    """The explain stage's inputs are missing or inconsistent."""


@dataclass
class ModelInfo:
    """The network to explain and where it came from."""

    net: nn.Module
    source: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] | None = None
    class_names: list[str] | None = None


def load_model(cfg: DictConfig) -> ModelInfo:
    """The network from ``ckpt=PATH`` or ``model=NAME`` (pretrained), in eval mode."""
    ckpt, name = cfg.get("ckpt"), cfg.get("model")
    if ckpt and name:
        raise ExplainInputError(
            f"give ckpt=PATH or model=NAME, not both (got ckpt={ckpt!r}, model={name.backbone!r})"
        )
    if ckpt:
        path = Path(str(ckpt))
        module = load_classifier(str(path), trust_checkpoint=bool(cfg.get("trust_checkpoint")))
        train_cfg = None
        cfg_file = path.resolve().parent.parent / "config.json"
        if cfg_file.is_file():
            train_cfg = json.loads(cfg_file.read_text())
        return ModelInfo(
            net=module.net.eval(),
            source="checkpoint",
            checkpoint=str(path),
            checkpoint_sha256=sha256_file(path),
            hparams=dict(module.hparams),
            train_config=train_cfg,
        )
    if name:
        if not isinstance(name, Mapping) or "backbone" not in name:
            raise ExplainInputError(
                f"model must name a backbone config such as model=efficientnet_lite0, got {name!r}"
            )
        weights = name.get("weights")
        net = AttentionNet(
            str(name.backbone),
            1000,
            attention="none",
            pretrained=bool(name.get("pretrained", True)) and weights is None,
            weights=weights,
        ).eval()
        return ModelInfo(
            net=net,
            source="pretrained",
            hparams={"backbone": str(name.backbone), "attention": "none", "num_classes": 1000},
            class_names=model_api.class_names(net),
        )
    raise ExplainInputError(
        "nothing to explain: pass ckpt=PATH (a checkpoint written by train.py) or model=NAME "
        "(a backbone with pretrained weights, e.g. model=efficientnet_lite0)"
    )


@dataclass
class DataInfo:
    """What is explained."""

    dataset: Dataset
    class_names: list[str] | None
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    paths: list[str] | None = None
    datamodule: Any = None  # the data module of a data split (its validation split calibrates)


def load_data(cfg: DictConfig, model: ModelInfo) -> DataInfo:
    """The images to explain: ``images=...`` files, ``data=...`` split, or the training data."""
    if cfg.get("images"):
        paths = image_paths(
            OmegaConf.to_object(cfg.images) if not isinstance(cfg.images, str) else cfg.images
        )  # type: ignore[arg-type]
        image_size = int(cfg.get("image_size") or 224)
        if not paths:
            raise ExplainInputError(f"images={cfg.images!r} holds no files")
        ds = ImageFilesDataset(paths, image_size)
        if len(ds) == 0:
            raise ExplainInputError(
                f"images={cfg.images!r}: none of the {len(paths)} file(s) is a readable image"
            )
        return DataInfo(
            dataset=ds,
            class_names=model.class_names,
            source=f"images={cfg.images}",
            skipped=ds.skipped,
            paths=[str(p) for p in ds.paths],
        )
    data_cfg = cfg.get("data")
    if data_cfg is None and model.train_config is not None:
        data_cfg = OmegaConf.create(model.train_config["data"])
        log.info("explaining the data the checkpoint was trained on: %s", data_cfg._target_)
    if data_cfg is None:
        raise ExplainInputError(
            "no images: pass data=NAME (e.g. data=synthetic) with split=test, or images=GLOB"
        )
    dm = instantiate(data_cfg)
    dm.prepare_data()
    dm.setup("test")
    split = cfg.get("split", "test")
    ds = dm.explain_dataset(split)
    if len(ds) == 0:
        raise ExplainInputError(f"the {split} split of {data_cfg._target_} is empty")
    names = list(dm.class_names)
    n_model = model_api.num_classes(model.net) or len(names)
    if len(names) != n_model:
        raise ExplainInputError(
            f"the data has {len(names)} classes but the model predicts {n_model}: explain a "
            "checkpoint with the data it was trained on"
        )
    skipped = [(p, "unreadable") for p in getattr(ds, "skipped_paths", [])]
    return DataInfo(
        dataset=ds, class_names=names, source=f"{data_cfg._target_}:{split}", skipped=skipped,
        datamodule=dm,
    )  # fmt: skip


def method_specs(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """``[(key, options)]`` from the ``method`` group (one file, a list of files, or a group).

    Each ``conf/method/<key>.yaml`` adds ``{key, options}`` under its own name in ``method``, so
    ``method=[gradcam,xgradcam]`` and the groups ``paper`` and ``all`` compose.
    """
    group = cfg.get("method")
    if not group:
        raise ExplainInputError(f"no method given; choose from: {', '.join(available_methods())}")
    try:
        specs = methods_from_config(OmegaConf.to_container(group, resolve=True))  # type: ignore[arg-type]
    except ValueError as err:
        raise ExplainInputError(str(err)) from None
    for key, _ in specs:
        get_method(key)  # unknown keys fail here, listing the valid ones
    return specs


def applicable_specs(
    net: nn.Module, specs: list[tuple[str, dict[str, Any]]], layer: Any, strict: bool
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, str]]]:
    """Keep the methods the model supports; the rest are an error (strict) or skipped, reported."""
    kept, skipped = [], []
    for key, opts in specs:
        try:
            Explainer(net, [(key, opts)], layer=layer)
        except (ValueError, TypeError) as err:
            if strict:
                raise
            skipped.append({"method": key, "options": json.dumps(opts), "reason": str(err)})
            continue
        kept.append((key, opts))
    for s in skipped:
        log.warning("method %s skipped: %s", s["method"], s["reason"])
    if not kept:
        reasons = "; ".join(f"{s['method']}: {s['reason']}" for s in skipped)
        raise ExplainInputError(f"no requested method applies to this model ({reasons})")
    return kept, skipped
