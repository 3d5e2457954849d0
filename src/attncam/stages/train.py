"""The training stage: ``run(cfg)`` fine-tunes a backbone with attention and returns its metrics."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from attncam.io import write_json_atomic
from attncam.models.checkpoint import check_hparams, read_checkpoint
from attncam.models.lit_module import ClassifierModule
from attncam.runtime import tune_allocator
from attncam.stages.common import (
    build_callbacks_from_config,
    build_loggers,
    task_wrapper,
    trainer_plugins,
)
from attncam.stages.resume import prepare_training

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, num_classes: int) -> ClassifierModule:
    """A :class:`ClassifierModule` from the ``model`` and ``optim`` config groups."""
    return ClassifierModule.from_config(
        cfg.model, cfg.optim, num_classes, cfg.trainer.get("max_epochs") or 1
    )


class EpochSeed(Callback):
    """Seed each training epoch from ``(seed, epoch)`` alone, so a resumed run replays it exactly.

    Lightning restores weights, optimiser, schedule and loop state from a checkpoint, but not the
    random state: without this, epoch ``k`` after a resume would see another shuffling order and
    other augmentations than epoch ``k`` of an uninterrupted run. At the start of every epoch the
    global RNGs (augmentation) are seeded from ``(seed, epoch)``, and the train loader's
    ``RandomSampler`` gets a fresh generator seeded with ``seed + epoch`` (apart from the loader's
    own generator, which the DataLoader also draws from whenever it builds an iterator). That is
    the permutation a ``DistributedSampler`` draws under DDP (Lightning seeds it with the run's seed
    and calls its ``set_epoch``), so one process and several see the same global batches.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reseed the RNGs and the train sampler for ``trainer.current_epoch``."""
        import random

        import numpy as np

        epoch = trainer.current_epoch
        mixed = (self.seed * 1_000_003 + 7919 * (epoch + 1)) % 2**32
        random.seed(mixed)
        np.random.seed(mixed)
        torch.manual_seed(mixed)
        loaders = trainer.train_dataloader
        for loader in loaders.values() if isinstance(loaders, dict) else [loaders]:
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, torch.utils.data.RandomSampler):
                sampler.generator = torch.Generator().manual_seed(self.seed + epoch)


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[Callback]:
    """The ``_target_`` entries of ``cfg.callbacks`` (checkpoints, progress, seeding, freezing)."""
    has_logger = bool(_entries_of(cfg.get("logger")))

    def skip(name: str, conf: Any) -> bool:
        # Freezing for 0 epochs is no freezing: leave the callback (and its checkpoint state) out.
        return str(conf._target_).endswith("FreezePretrained") and int(conf.epochs or 0) <= 0

    return build_callbacks_from_config(cfg.get("callbacks"), ckpt_dir, has_logger, skip)


def _entries_of(group: Any) -> list[str]:
    return [k for k, v in (group or {}).items() if v]


def _metrics_over_processes(trainer: L.Trainer, prefixes: tuple[str, ...]) -> dict[str, float]:
    """``trainer.callback_metrics`` starting with ``prefixes``, each the mean over the processes.

    ``train/loss`` is logged without ``sync_dist`` (no all-reduce per step), so under DDP each
    process holds the loss of its own shard; the mean over processes (equal shards, as
    ``DistributedSampler`` makes them) is the loss one process computes on the global batches.
    A metric that is already synchronised (the same on every process) is kept as it is, bit for
    bit.
    """
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}
    if trainer.world_size > 1 and metrics:
        keys = sorted(metrics)  # the same order on every process
        device = trainer.strategy.root_device
        local = torch.stack([metrics[k].detach().float().reshape(()).to(device) for k in keys])
        gathered = trainer.strategy.all_gather(local).reshape(-1, len(keys)).cpu()  # (P, K)
        same = (gathered == gathered[0]).all(dim=0)
        metrics = dict(zip(keys, torch.where(same, gathered[0], gathered.mean(0)), strict=True))
    return {k: float(v) for k, v in metrics.items()}


def _resume_checkpoint(cfg: DictConfig, module: ClassifierModule) -> tuple[str | None, int | None]:
    """``(checkpoint, its global step)`` to resume from, checked against the built module.

    ``cfg.resume`` is already resolved (:func:`attncam.stages.resume.prepare_training`): an
    absolute path or None. The checkpoint is read weights-only (unless trusted) and its network
    compared with the module's, before any fitting.
    """
    resume = cfg.get("resume")
    if not resume:
        return None, None
    saved = read_checkpoint(str(resume), trust_checkpoint=bool(cfg.get("trust_checkpoint")))
    check_hparams(saved["hyper_parameters"], module.hparams, str(resume))
    return str(resume), int(saved.get("global_step") or 0)


def compile_model(net: Any, mode: Any) -> None:
    """``model.compile``: ``false`` (eager), ``true`` (``torch.compile`` of the whole network) or
    ``attention`` (only its attention modules: ``AttentionNet.compile_attention``). In place, so
    checkpoint keys keep their names (no ``_orig_mod.``).

    Raises:
        ValueError: On any other value, naming the valid ones.
    """
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        mode = mode.lower() == "true"
    if mode is not False and mode is not True and mode != "attention":  # not 0/1: `is`
        raise ValueError(
            f"model.compile={mode!r} is not valid; choose false (eager), true (the whole network) "
            "or attention (only the attention modules)"
        )
    if mode == "attention":
        net.compile_attention()
    elif mode:
        net.compile()


def _data_and_module(cfg: DictConfig) -> tuple[Any, ClassifierModule]:
    """The data module (set up for fitting) and the Lightning module, with its run metadata."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, int(datamodule.num_classes))
    compile_model(module.net, cfg.model.get("compile", False))
    module.run_metadata = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return datamodule, module


def _trainer(cfg: DictConfig, out: Path, resume_step: int | None) -> tuple[L.Trainer, dict]:
    """The Trainer of a training run (its loggers continue a resumed run's logs)."""
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    plugins = trainer_plugins(trainer_kwargs)  # takes sync_batchnorm out of trainer_kwargs
    trainer = L.Trainer(
        **trainer_kwargs,  # type: ignore[arg-type]
        default_root_dir=str(out),
        logger=build_loggers(cfg, out, resume_step=resume_step) or False,
        callbacks=build_callbacks(cfg, out / "checkpoints"),
        plugins=plugins,
    )
    return trainer, trainer_kwargs


def _results(
    cfg: DictConfig, out: Path, trainer: L.Trainer, datamodule: Any, module: ClassifierModule
) -> dict[str, Any]:
    """What ``results.json`` records after fitting (before testing)."""
    results: dict[str, Any] = {
        "output_dir": str(out),
        "num_classes": int(datamodule.num_classes),
        "class_names": list(getattr(datamodule, "class_names", []) or []),
        "model": cfg.model.backbone,
        "attention": module.hparams.attention,
        "placement": module.hparams.placement,
        "epochs": trainer.current_epoch,
        "weights_id": module.net.weights_id,  # the pretrained weights training began from
        "precision": str(trainer.precision),
        "allocator": tune_allocator(),
    }
    results.update(_metrics_over_processes(trainer, ("val/", "train/")))
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    results["best_checkpoint"] = best or None
    last_path = out / "checkpoints" / "last.ckpt"
    results["last_checkpoint"] = str(last_path) if last_path.is_file() else None
    return results


@task_wrapper(
    "{out}/checkpoints/last.ckpt holds the last finished epoch: continue with the same command "
    "and resume=last (or resume=last hydra.run.dir={out})",
    prepare=prepare_training,
)
def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Train, validate and test the model described by ``cfg``.

    ``resume=last|PATH`` continues a run in its own folder (:mod:`attncam.stages.resume`); a
    folder that already holds results is refused unless the command resumes it.

    Returns:
        ``{"output_dir", "best_checkpoint", "last_checkpoint", "val/acc", "test/acc", ...}``;
        the same dictionary is written to ``results.json`` in the run folder.
    """
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    datamodule, module = _data_and_module(cfg)
    resume, resume_step = _resume_checkpoint(cfg, module)
    trainer, trainer_kwargs = _trainer(cfg, out, resume_step)
    write_json_atomic(out / "config.json", OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    trust = bool(cfg.get("trust_checkpoint", False))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=not trust)
    fit_seconds = time.perf_counter() - start
    results = {
        "fit_seconds": round(fit_seconds, 2),
        **_results(cfg, out, trainer, datamodule, module),
    }
    if cfg.get("test", True) and not trainer_kwargs.get("fast_dev_run"):
        datamodule.setup("test")
        best = results["best_checkpoint"]
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        results.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    for k, v in results.items():
        if isinstance(v, float) and math.isnan(v):
            raise FloatingPointError(f"{k} is NaN: training diverged; lower optim.lr")
    if trainer.is_global_zero:  # one writer; every process returns the same metrics
        write_json_atomic(out / "results.json", results)
    log.info(
        "val/acc %.4f  test/acc %s  in %.0f s  -> %s",
        results.get("val/acc", float("nan")),
        results.get("test/acc"),
        fit_seconds,
        out,
    )
    return results
