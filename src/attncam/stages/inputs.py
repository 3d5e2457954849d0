"""The explain stage's inputs: the model (checkpoint or pretrained), the images, the methods.

Every problem with them is an :class:`ExplainInputError` that says what to pass instead. A
checkpoint describes its own training run (``attncam.models.checkpoint.checkpoint_metadata``):
its class names, image size and data config are the defaults here, and a setting that
contradicts them is explained with a warning. ``model=NAME`` explains a backbone with its
published (or ``model.weights=PATH``) weights; one with random weights only with
``allow_random_weights=true``. The manifest's ``source`` says which: ``checkpoint``,
``pretrained`` or ``random``.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from attncam.data.files import ImageFilesDataset, image_paths, subfolder_labels
from attncam.explain import Explainer, available_methods, get_method, methods_from_config, model_api
from attncam.io import sha256_file
from attncam.models.checkpoint import load_classifier
from attncam.models.net import AttentionNet
from attncam.stages.cli import ConfigError, JobSkipped, check_limit, check_model_weights

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "LOCALISATION_METRICS",
    "DataInfo",
    "ExplainInputError",
    "ModelInfo",
    "NoApplicableMethodError",
    "applicable_specs",
    "check_limit",
    "check_layer",
    "drop_localisation",
    "format_layers",
    "image_size_for",
    "layer_table",
    "list_layers",
    "load_data",
    "load_model",
    "method_specs",
    "selected_ids",
]

#: The metrics that score a map against a ground-truth mask or box (``conf/metrics`` keys).
LOCALISATION_METRICS = ("pointing_game", "energy_pointing_game", "mask_iou", "box_accuracy")

#: Side of ``images=...`` when neither ``image_size`` nor the checkpoint gives one.
DEFAULT_IMAGE_SIZE = 224

log = logging.getLogger(__name__)


class ExplainInputError(ValueError):
    """The explain stage's inputs are missing or inconsistent."""


class NoApplicableMethodError(ExplainInputError, JobSkipped):
    """None of the requested methods applies to the model: an error, or a skipped sweep job."""


@dataclass
class ModelInfo:
    """The network to explain and where it came from.

    Attributes:
        net: the network, in eval mode.
        source: ``checkpoint``, ``pretrained`` (published weights, or ``model.weights=PATH``)
            or ``random`` (``allow_random_weights=true``).
        checkpoint: the checkpoint path (``ckpt=``).
        checkpoint_sha256: its SHA-256.
        hparams: the network's hyperparameters (backbone, attention, classes, ...).
        train_config: the training run's config (stored in the checkpoint, or ``config.json``
            of its run folder).
        class_names: the class names (the checkpoint's data, or the pretrained weights' head).
        image_size: the side of the images the checkpoint was trained on.
        data_config: the training run's ``data`` config.
        looked: where the training config was looked for (for error messages).
    """

    net: nn.Module
    source: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] | None = None
    class_names: list[str] | None = None
    image_size: int | None = None
    data_config: dict[str, Any] | None = None
    looked: list[str] = field(default_factory=list)


def _checkpoint_model(cfg: DictConfig, path: Path) -> ModelInfo:
    """The network of ``ckpt=PATH`` with what its checkpoint and run folder say about it."""
    module = load_classifier(str(path), trust_checkpoint=bool(cfg.get("trust_checkpoint")))
    meta = dict(module.run_metadata)
    cfg_file = path.resolve().parent.parent / "config.json"
    looked = [f"{path} (its stored training config)", str(cfg_file)]
    train_cfg = meta.get("config")
    if train_cfg is None and cfg_file.is_file():
        train_cfg = json.loads(cfg_file.read_text())
    data_cfg = meta.get("data") or (train_cfg or {}).get("data")
    names = meta.get("class_names") or (model_api.class_names(module.net) or None)
    size = meta.get("image_size") or ((data_cfg or {}).get("image_size"))
    return ModelInfo(
        net=module.net.eval(),
        source="checkpoint",
        checkpoint=str(path),
        checkpoint_sha256=sha256_file(path),
        hparams=dict(module.hparams),
        train_config=train_cfg,
        class_names=list(names) if names else None,
        image_size=int(size) if size else None,
        data_config=dict(data_cfg) if data_cfg else None,
        looked=looked,
    )


def _backbone_model(cfg: DictConfig, name: Any) -> ModelInfo:
    """``model=NAME``: the backbone with its published weights, a local file, or random ones."""
    if not isinstance(name, Mapping) or "backbone" not in name:
        raise ExplainInputError(
            f"model must name a backbone config such as model=efficientnet_lite0, got {name!r}"
        )
    weights = name.get("weights")
    pretrained = bool(name.get("pretrained", True)) and weights is None
    try:
        check_model_weights(cfg)
    except ConfigError as err:
        raise ExplainInputError(str(err)) from None
    attention, placement = str(name.get("attention", "none")), str(name.get("placement", "blocks"))
    net = AttentionNet(
        str(name.backbone), 1000, attention=attention, placement=placement, pretrained=pretrained,
        weights=weights, weights_format=name.get("weights_format"),
    ).eval()  # fmt: skip
    source = "pretrained" if pretrained or weights is not None else "random"
    if source == "random":
        log.warning("explaining model=%s with random weights (allow_random_weights=true)",
                    name.backbone)  # fmt: skip
    hparams = {
        "backbone": str(name.backbone), "attention": attention, "placement": placement,
        "num_classes": 1000, "weights_id": net.weights_id,
    }  # fmt: skip
    if weights is not None:
        hparams["weights"] = str(weights)
    return ModelInfo(
        net=net, source=source, hparams=hparams, class_names=model_api.class_names(net)
    )


def load_model(cfg: DictConfig) -> ModelInfo:
    """The network from ``ckpt=PATH`` or ``model=NAME`` (pretrained), in eval mode.

    Raises:
        ExplainInputError: both or neither given, or ``model=NAME`` without trained weights
            and without ``allow_random_weights=true``.
        attncam.models.checkpoint.CheckpointError: the checkpoint cannot be used.
    """
    ckpt, name = cfg.get("ckpt"), cfg.get("model")
    if ckpt and name:
        raise ExplainInputError(
            f"give ckpt=PATH or model=NAME, not both (got ckpt={ckpt!r}, model={name.backbone!r})"
        )
    if ckpt:
        return _checkpoint_model(cfg, Path(str(ckpt)))
    if name:
        return _backbone_model(cfg, name)
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


def image_size_for(cfg: DictConfig, model: ModelInfo) -> int:
    """The side of ``images=...``: ``image_size``, else the checkpoint's, else 224.

    A size that differs from the one the checkpoint was trained at is used, with a warning.
    """
    asked, trained = cfg.get("image_size"), model.image_size
    if asked is None:
        return int(trained or DEFAULT_IMAGE_SIZE)
    if trained and int(asked) != int(trained):
        log.warning(
            "explaining at image_size=%d a model trained at %d px; pass image_size=%d to match",
            int(asked), int(trained), int(trained),
        )  # fmt: skip
    return int(asked)


def _image_files(cfg: DictConfig, model: ModelInfo) -> DataInfo:
    """``images=...``: files, a folder (recursive) or a glob, at :func:`image_size_for`.

    Images in a subfolder named after one of the model's classes get it as their label
    (:func:`attncam.data.files.subfolder_labels`); the others are unlabelled (-1). How many
    were labelled, and the subfolders that name no class, are logged.
    """
    spec = OmegaConf.to_object(cfg.images) if not isinstance(cfg.images, str) else cfg.images
    paths = image_paths(spec)  # type: ignore[arg-type]
    if not paths:
        raise ExplainInputError(f"images={cfg.images!r} holds no files")
    labels, unknown = subfolder_labels(spec, paths, model.class_names)  # type: ignore[arg-type]
    ds = ImageFilesDataset(paths, image_size_for(cfg, model), labels=labels)
    if len(ds) == 0:
        raise ExplainInputError(
            f"images={cfg.images!r}: none of the {len(paths)} file(s) is a readable image"
        )
    labelled = sum(label >= 0 for label in ds.labels)
    if labelled or unknown:
        log.info(
            "images=%s: %d of %d images labelled by their subfolder's class name; %d unlabelled"
            "%s", cfg.images, labelled, len(ds), len(ds) - labelled,
            f" (subfolders that name no class of the model: {', '.join(unknown[:10])})"
            if unknown else "",
        )  # fmt: skip
    return DataInfo(
        dataset=ds,
        class_names=model.class_names,
        source=f"images={cfg.images}",
        skipped=ds.skipped,
        paths=[str(p) for p in ds.paths],
    )


def _select_path(item: str, paths: list[str]) -> int:
    """The index of the file ``item`` names: its path, or a unique file name or path ending."""
    want = Path(item).expanduser()
    resolved = [Path(p).resolve() for p in paths]
    if want.resolve() in resolved:
        return resolved.index(want.resolve())
    hits = [i for i, p in enumerate(paths) if p == item or p.endswith("/" + item.lstrip("/"))]
    if len(hits) == 1:
        return hits[0]
    found = "matches no explained file" if not hits else f"matches {len(hits)} files"
    raise ExplainInputError(
        f"select={item!r} {found}; give an index (0..{len(paths) - 1}), a path or a unique "
        f"file name such as {Path(paths[0]).name!r}"
    )


def selected_ids(cfg: DictConfig, data: DataInfo) -> list[int] | None:
    """The image ids ``select=`` chooses, in the order given; None when ``select`` is unset.

    ``select`` holds indices into the split (or into the readable files of ``images=``, the
    ids ``image_ids.json`` and ``predictions.csv`` use) and/or, with ``images=``, file paths
    or unique file names. It replaces ``limit`` (said in the log when both are set).

    Raises:
        ExplainInputError: an index out of range, a file name with
            a data split, a name that matches no file or several, or a repeated image.
    """
    select = cfg.get("select")
    if select is None:
        return None
    items = list(OmegaConf.to_object(select)) if OmegaConf.is_list(select) else [select]  # type: ignore[arg-type]
    if cfg.get("limit") is not None:
        log.info("select= chooses the images: limit=%s is not used", cfg.limit)
    n, ids = len(data.dataset), []  # type: ignore[arg-type]
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < n:
                raise ExplainInputError(f"select index {item} is out of range; choose 0..{n - 1}")
            ids.append(item)
        elif isinstance(item, str) and data.paths is not None:
            ids.append(_select_path(item, data.paths))
        else:
            raise ExplainInputError(
                f"select item {item!r}: choose an index 0..{n - 1}"
                + (" or a file of images=" if data.paths is not None else " (a data split has "
                   "no file names)")
            )  # fmt: skip
    if not ids or len(set(ids)) != len(ids):
        raise ExplainInputError(f"select={items} must name at least one image, each once")
    log.info("select: explaining %d chosen image(s), ids %s", len(ids), ids[:20])
    return ids


def _data_config(cfg: DictConfig, model: ModelInfo) -> Any:
    """``data=...`` or, with a checkpoint, the data it was trained on; else an error."""
    data_cfg = cfg.get("data")
    if data_cfg is None and model.data_config is not None:
        data_cfg = OmegaConf.create(model.data_config)
        log.info("explaining the data the checkpoint was trained on: %s", data_cfg._target_)
    if data_cfg is None:
        where = f" (looked for the training config in {' and '.join(model.looked)})"
        raise ExplainInputError(
            "no images: pass data=NAME (e.g. data=synthetic) with split=test, or images=GLOB"
            + (where if model.looked else "")
        )
    return data_cfg


def _warn_mismatch(dm: Any, model: ModelInfo) -> None:
    """Warn when a ``data=...`` differs from the checkpoint's data in size or class names."""
    size = getattr(dm, "image_size", None)
    if model.image_size and size and int(size) != int(model.image_size):
        log.warning("the data's image size %d differs from the %d px the model was trained at",
                    int(size), int(model.image_size))  # fmt: skip
    names = list(dm.class_names)
    if model.source == "checkpoint" and model.class_names and names != model.class_names:
        log.warning("the data's class names %s differ from the checkpoint's %s",
                    names[:5], model.class_names[:5])  # fmt: skip


def load_data(cfg: DictConfig, model: ModelInfo) -> DataInfo:
    """The images to explain: ``images=...`` files, ``data=...`` split, or the training data."""
    if cfg.get("images"):
        return _image_files(cfg, model)
    data_cfg = _data_config(cfg, model)
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
    _warn_mismatch(dm, model)
    skipped = [(p, "unreadable") for p in getattr(ds, "skipped_paths", [])]
    return DataInfo(
        dataset=ds, class_names=names, source=f"{data_cfg._target_}:{split}", skipped=skipped,
        datamodule=dm,
    )  # fmt: skip


def _any_mask(data: DataInfo, ids: list[int], probe: int = 8) -> bool:
    """Whether any of the first ``probe`` explained images has a ground-truth mask."""
    if data.paths is not None:  # images=...: files never carry masks
        return False
    for i in ids[:probe]:
        item = data.dataset[i]
        if len(item) > 2 and bool(item[2].any()):
            return True
    return False


def drop_localisation(metrics_cfg: dict[str, Any], data: DataInfo, ids: list[int]) -> list[str]:
    """Without ground-truth masks, take the localisation metrics out of ``metrics_cfg``.

    Called before the metric suite is built, so a run on ``images=`` (or on a split without
    masks) reports no empty localisation columns and logs one INFO line instead of a warning
    per metric and method.

    Args:
        metrics_cfg: the ``metrics`` config as a dict; ``enabled`` is rewritten in place
            (``None`` means every metric, as in ``attncam.metrics.build_metrics``).
        data: the explained data.
        ids: the explained image ids.

    Returns:
        The dropped metric keys (empty when masks exist or none was enabled).

    Raises:
        ExplainInputError: only localisation metrics were enabled.
    """
    if _any_mask(data, ids):
        return []
    from attncam.metrics import METRIC_KEYS

    enabled = metrics_cfg.get("enabled")
    keys = [k for k in METRIC_KEYS if k != "grid_pointing_game"] if enabled is None else enabled
    dropped = [k for k in keys if k in LOCALISATION_METRICS]
    if not dropped:
        return []
    kept = [k for k in keys if k not in LOCALISATION_METRICS]
    if not kept:
        raise ExplainInputError(
            f"{data.source} has no ground-truth masks, and only localisation metrics are "
            f"enabled ({', '.join(dropped)}); enable a faithfulness metric such as "
            "metrics.enabled=[average_drop,deletion_insertion]"
        )
    metrics_cfg["enabled"] = kept
    log.info("no ground-truth masks in %s: localisation metrics left out (%s)", data.source,
             ", ".join(dropped))  # fmt: skip
    return dropped


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


def _output_size(out: Any) -> str:
    """``C x H x W`` (batch dropped) of a module's output, or of its first tensor; ``-`` if none."""
    if isinstance(out, tuple | list) and out:
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    if not isinstance(out, torch.Tensor):
        return "-"
    return " x ".join(str(d) for d in out.shape[1:]) or "scalar"


def layer_table(net: nn.Module, image_size: int) -> list[tuple[str, str, str]]:
    """Every named module with its output size on one ``(1, 3, S, S)`` input, in module order.

    Args:
        net: the network (its eval mode is kept).
        image_size: the side ``S`` of the run's images.

    Returns:
        ``[(dotted name, output size "C x H x W" or "-" for a module not called, marks)]``;
        marks are ``default CAM layer`` (``model_api.cam_layer``) and ``attention``
        (``model_api.attention_modules``), comma-separated.
    """
    sizes: dict[str, str] = {}
    hooks = []
    for name, module in net.named_modules():
        if name:

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                sizes.setdefault(name, _output_size(out))

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    cam, attention = model_api.cam_layer(net), set(model_api.attention_modules(net))
    rows = []
    for name, _ in net.named_modules():
        if name:
            marks = ["default CAM layer"] * (name == cam) + ["attention"] * (name in attention)
            rows.append((name, sizes.get(name, "-"), ", ".join(marks)))
    return rows


def format_layers(rows: list[tuple[str, str, str]], image_size: int) -> str:
    """The ``list_layers=true`` text: one aligned line per layer, then how to choose one."""
    width = max((len(n) for n, _, _ in rows), default=4)
    lines = [f"{len(rows)} layers; output sizes (C x H x W) at {image_size} px:"]
    lines += [f"  {n:<{width}}  {size:<16} {marks}".rstrip() for n, size, marks in rows]
    lines.append("choose a CAM layer with layer=NAME (or a list, fused); '-': not called")
    return "\n".join(lines) + "\n"


def list_layers(cfg: DictConfig) -> str:
    """``list_layers=true``: the model's layers with their output sizes at the run's image size.

    The size is ``image_size``, else the checkpoint's, else the data config's, else 224.
    """
    model = load_model(cfg)
    size = cfg.get("image_size") or model.image_size
    if size is None and cfg.get("data") is not None:
        size = cfg.data.get("image_size")
    size = int(size) if size else image_size_for(cfg, model)
    return format_layers(layer_table(model.net, size), size)


def check_layer(net: nn.Module, layer: Any) -> None:
    """Refuse a ``layer=`` name the model does not have, suggesting the closest names.

    Args:
        net: the network.
        layer: None, a dotted name (optionally ``NAME:input``) or a list of them.

    Raises:
        ExplainInputError: naming the unknown layer, up to 5 close names (difflib) and
            ``list_layers=true``.
    """
    if layer is None:
        return
    names = [n for n, _ in net.named_modules() if n]
    for item in [layer] if isinstance(layer, str) else list(layer):
        name = str(item).split(":", 1)[0]
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise ExplainInputError(
            f"unknown layer {name!r} in {type(net).__name__} ({len(names)} layers); {hint}"
            "python explain.py <ckpt=... or model=...> list_layers=true lists them all"
        )


def applicable_specs(
    net: nn.Module, specs: list[tuple[str, dict[str, Any]]], layer: Any, strict: bool
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, str]]]:
    """Keep the methods the model supports; the rest are an error (strict) or skipped, reported.

    Raises:
        ExplainInputError: ``layer`` names a layer the model does not have (:func:`check_layer`).
        NoApplicableMethodError: no method applies.
    """
    check_layer(net, layer)
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
        raise NoApplicableMethodError(f"no requested method applies to this model ({reasons})")
    return kept, skipped
