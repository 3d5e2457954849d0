"""The explain stage: ``run(cfg)`` explains a model's decisions and scores every map.

Inputs are a checkpoint written by ``train.py`` (``ckpt=PATH``) or a registered backbone with its
pretrained weights (``model=NAME``), and either a data split (``data=...``, ``split=test``) or
image files (``images='photos/*.jpg'``); see :mod:`attncam.stages.inputs`. The work runs in a
Lightning ``Trainer(inference_mode=False)`` (:mod:`attncam.stages.explain_module`), so
``trainer=ddp`` spreads one evaluation over processes and nodes with the metrics synced. Outputs
go to the run's own folder (:mod:`attncam.stages.outputs`); ``COMPLETE`` is written last, so a
folder without it is an interrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from attncam.data.files import IMAGE_SUFFIXES, ImageFilesDataset
from attncam.explain import result_name
from attncam.io import write_json_atomic, write_text_atomic
from attncam.stages import design
from attncam.stages.common import build_loggers, task_wrapper
from attncam.stages.explain_module import ExplainModule, WithIds, target_choice
from attncam.stages.grid_pass import grid_pointing
from attncam.stages.inputs import (
    DataInfo,
    ExplainInputError,
    ModelInfo,
    applicable_specs,
    drop_localisation,
    load_data,
    load_model,
    method_specs,
    selected_ids,
)
from attncam.stages.outputs import (
    build_manifest,
    fmt,
    log_wandb,
    write_comparison,
    write_figures,
    write_maps,
    write_per_image,
    write_predictions,
    write_tables,
)
from attncam.stages.progress import ExplainingBar, estimate_run
from attncam.stages.sanity import sanity_check
from attncam.viz import sanity_figure

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "DataInfo",
    "ExplainInputError",
    "ExplainModule",
    "ImageFilesDataset",
    "ModelInfo",
    "applicable_specs",
    "load_data",
    "load_model",
    "method_specs",
    "run",
    "sanity_check",
    "write_figures",
    "write_tables",
]

#: Trainer settings that only mean something in training; the explain Trainer drops them.
_TRAINING_ONLY = (
    "max_epochs",
    "fast_dev_run",
    "limit_train_batches",
    "limit_val_batches",
    "log_every_n_steps",
    "sync_batchnorm",  # attncam's DistributedBatchNorm; explaining is eval
)


def _layer(cfg: DictConfig) -> Any:
    """``cfg.layer`` as a plain value: None, a dotted name, or a list of names (fused)."""
    layer = cfg.get("layer")
    if isinstance(layer, DictConfig | list) or OmegaConf.is_list(layer):
        return list(OmegaConf.to_object(layer))  # type: ignore[arg-type]
    return layer


def _loader(cfg: DictConfig, data: DataInfo, ids: list[int]) -> DataLoader:
    """Batches ``[images, labels, masks, image ids]`` of the explained images."""
    dataset = WithIds(data.dataset, ids)
    return DataLoader(
        dataset,
        batch_size=int(cfg.get("batch_size", 16)),
        shuffle=False,
        num_workers=int(cfg.get("num_workers", 0)),
        collate_fn=dataset.collate_fn,
    )


def _trainer(cfg: DictConfig, out: Path, loggers: list[Any], bar: ExplainingBar) -> L.Trainer:
    """A test-only Trainer with gradients enabled (``inference_mode=False``), a bar in images."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    for k in _TRAINING_ONLY:
        kwargs.pop(k, None)
    return L.Trainer(
        **kwargs,  # type: ignore[arg-type]
        default_root_dir=str(out),
        inference_mode=False,
        logger=loggers or False,
        callbacks=[bar],
        enable_checkpointing=False,
    )


def _write_outputs(
    cfg: DictConfig, out: Path, model: ModelInfo, data: DataInfo, module: ExplainModule,
    run: dict[str, Any],
) -> list[Path]:  # fmt: skip
    """Tables, optional sanity check, figures, maps, predictions and per-image values."""
    results, metrics_cfg = run["results"], run["metrics_cfg"]
    extra = {
        "model": model.hparams.get("backbone"),
        "attention": model.hparams.get("attention"),
        "data": data.source,
        "images": run["n_images"],
        "confidence": metrics_cfg.get("confidence", 0.95),
        "skipped_methods": run["skipped_methods"],
        "skipped_files": data.skipped,
        "skipped_constant_channels": module.skipped_channels,
    }
    extra["explained_class"] = module.target.text
    extra["precision"] = module.precision()
    extra["baselines"] = run["plan"]["baselines"]
    extra["calibration"] = run["plan"]["calibration"]
    extra["identical_by_construction"] = module.explainer.equivalent_groups
    extra["controls"] = [result_name(k, o) for k, o in run["plan"]["controls"]]
    files = write_tables(out, results, module.protocol.to_dict(), extra)
    files.append(write_json_atomic(out / "image_ids.json", run["plan"]["ids"]))
    sanity_cfg = metrics_cfg.get("sanity") or {}
    if sanity_cfg.get("enabled"):
        common = {k: metrics_cfg[k] for k in ("num_resamples", "confidence") if k in metrics_cfg}
        sanity, cascade = sanity_check(
            model.net, run["specs"], run["layer"], data.dataset,
            getattr(data.dataset, "collate_fn", None), sanity_cfg, common,
            [(r["id"], r["target"]) for r in module.records],
        )  # fmt: skip
        files.append(write_json_atomic(out / "sanity.json", sanity))
        files.append(sanity_figure(sanity, cascade, out / "figures" / "sanity.png"))
        log.info("sanity check (cascading randomisation) written to %s", out / "sanity.json")
    class_names = data.class_names or model.class_names
    files += write_figures(out, module, results, class_names, int(cfg.get("top", 5)))
    files += write_maps(out, module, data.paths)
    files += write_predictions(out, module, data.paths, class_names)
    if run.get("per_image") is not None:
        ids = [r["id"] for r in module.records]
        files += write_per_image(out, run["per_image"], ids)
    if run.get("compare") is not None:
        files += write_comparison(out, run["per_image"], run["compare"])
    return files


def _keep_partial(out: Path, module: ExplainModule, trainer: L.Trainer) -> None:
    """After a SIGTERM: the per-image results of the finished batches, marked incomplete."""
    if trainer.world_size > 1:  # a collective now could hang: the other ranks may be gone
        return
    done = [r["id"] for r in module.records]
    write_per_image(out, module.per_image(), done, name="per_image.partial.json")
    write_text_atomic(
        out / "INCOMPLETE",
        f"stopped by SIGTERM after {len(done)} images; per_image.partial.json holds their "
        "per-image results (no table, no COMPLETE)\n",
    )
    log.warning("kept the per-image results of %d finished images in %s", len(done), out)


def _add_grid_pointing(
    results: dict[str, Any], net: nn.Module, specs: list[Any], layer: Any, data: DataInfo,
    metrics_cfg: Mapping[str, Any], plan: Mapping[str, Any], cfg: DictConfig,
) -> None:  # fmt: skip
    """The grid pointing game's column (``metrics.grid_pointing.enabled``), in place."""
    seed = int(cfg.get("seed", 0))
    grid = grid_pointing(
        net, specs, layer, data.datamodule, metrics_cfg, plan, seed, cfg.get("target")
    )
    for name, row in (grid or {}).items():
        results.setdefault(name, {}).update(row)


@task_wrapper("{out} is incomplete (no COMPLETE file); explain again into a new folder")
def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Explain and score; write tables, figures and a manifest into the run's folder.

    Returns:
        ``{"output_dir", "methods", "results", "n_images", "skipped_files", ...}``.
    """
    if (out / "COMPLETE").exists() or (out / "metrics.json").exists():
        raise FileExistsError(f"{out} already holds an explain run; results are never overwritten")
    L.seed_everything(int(cfg.get("seed", 0)), workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    model = load_model(cfg)
    data = load_data(cfg, model)
    chosen = selected_ids(cfg, data)
    layer = _layer(cfg)
    strict = bool(cfg.get("strict_methods", False))
    specs, skipped_methods = applicable_specs(model.net, method_specs(cfg), layer, strict)
    metrics_cfg = OmegaConf.to_container(cfg.metrics, resolve=True)
    assert isinstance(metrics_cfg, dict)
    plan = design.plan(cfg, data.dataset, model.net, specs, layer, metrics_cfg)
    plan["calibration"] = design.calibration(model.net, data.datamodule, metrics_cfg)
    plan["ids"] = chosen if chosen is not None else plan["ids"]
    drop_localisation(metrics_cfg, data, plan["ids"])
    specs = plan["specs"]
    loader = _loader(cfg, data, plan["ids"])
    module = ExplainModule(
        model.net, specs, layer, metrics_cfg, keep_rows=int(cfg.get("figure_rows", 8)),
        save_maps=bool(cfg.get("save_maps", False)), baselines=plan["baselines"],
        grid=plan["grid"], seed=int(cfg.get("seed", 0)),
        target=target_choice(cfg.get("target"), model.class_names or data.class_names, plan["ids"]),
        maps_dtype=str(cfg.get("save_maps_dtype", "float32")),
    )  # fmt: skip
    loggers = build_loggers(cfg, out)
    bar = ExplainingBar(len(plan["ids"]))
    trainer = _trainer(cfg, out, loggers, bar)
    if trainer.is_global_zero:
        estimate = estimate_run(model.net, specs, metrics_cfg, data.dataset, plan["ids"], layer)
        bar.forwards_per_image = estimate["metric_forwards"]
    start = time.perf_counter()
    try:
        trainer.test(module, dataloaders=loader, verbose=False)
    except SIGTERMException:
        _keep_partial(out, module, trainer)
        raise
    seconds = time.perf_counter() - start
    results = module.results()
    if trainer.is_global_zero:
        _add_grid_pointing(results, model.net, specs, layer, data, metrics_cfg, plan, cfg)
    compare = design.compare_settings(cfg)
    wants = cfg.get("save_per_image") or compare is not None
    per_image = module.per_image() if wants else None
    n_images = len(loader.dataset)  # type: ignore[arg-type]
    if not trainer.is_global_zero:
        return {"output_dir": str(out), "results": results}
    state = {
        "out": out, "results": results, "specs": specs, "layer": layer, "n_images": n_images,
        "seconds": seconds, "skipped_methods": skipped_methods, "metrics_cfg": metrics_cfg,
        "world_size": trainer.world_size, "per_image": per_image, "plan": plan,
        "compare": compare,
    }  # fmt: skip
    state["files"] = _write_outputs(cfg, out, model, data, module, state)
    manifest = build_manifest(cfg, model, data, module, state)
    write_json_atomic(out / "manifest.json", manifest)
    log_wandb(loggers, results, state["files"])
    write_text_atomic(out / "COMPLETE", json.dumps({"files": manifest["files"]}) + "\n")
    log.info("explained %d images with %d methods in %.0f s -> %s", n_images, len(specs),
             seconds, out)  # fmt: skip
    for method, row in results.items():
        log.info("%-28s AD %s  IC %s  PG %s", method, fmt(row.get("average_drop")),
                 fmt(row.get("increase_in_confidence")), fmt(row.get("pointing_game")))  # fmt: skip
    return {
        "output_dir": str(out), "methods": module.explainer.names, "results": results,
        "n_images": n_images, "skipped_files": data.skipped, "skipped_methods": skipped_methods,
        "seconds": seconds, "baselines": plan["baselines"],
        "controls": [result_name(k, o) for k, o in plan["controls"]],
    }  # fmt: skip
