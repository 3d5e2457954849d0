"""The training stage: ``run(cfg)`` fine-tunes a backbone with attention and returns its metrics."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from attncam.models.lit_module import (
    ClassifierModule,
    FreezePretrained,
    check_hparams,
    read_checkpoint,
)
from attncam.stages.common import build_loggers, output_dir, trainer_plugins, write_json_atomic

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, num_classes: int) -> ClassifierModule:
    """A :class:`ClassifierModule` from the ``model`` and ``optim`` config groups."""
    m, o = cfg.model, cfg.optim
    return ClassifierModule(
        backbone=m.backbone,
        num_classes=num_classes,
        attention=m.get("attention", "none"),
        placement=m.get("placement", "blocks"),
        reduction=m.get("reduction", 16),
        kernel_size=m.get("kernel_size", 7),
        pretrained=m.get("pretrained", False),
        weights=m.get("weights"),
        channels_last=m.get("channels_last", False),
        optimizer=o.optimizer,
        lr=o.lr,
        lr_pretrained=o.get("lr_pretrained"),
        momentum=o.get("momentum", 0.9),
        weight_decay=o.get("weight_decay", 0.0),
        scheduler=o.get("scheduler", "none"),
        step_size=o.get("step_size", 30),
        gamma=o.get("gamma", 0.1),
        warmup_epochs=o.get("warmup_epochs", 0),
        max_epochs=cfg.trainer.get("max_epochs") or 1,
        label_smoothing=o.get("label_smoothing", 0.0),
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
    """Checkpointing (best and last), learning-rate monitor, progress bar, optional freezing."""
    c = cfg.get("callbacks") or {}
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="best",
            monitor=c.get("monitor", "val/acc"),
            mode=c.get("mode", "max"),
            save_last=False,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # last.ckpt after every epoch. Lightning 2.6's `save_last=True` rewrites it only in
        # epochs that also save a new best, so a resume would lose the epochs since the best.
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        TQDMProgressBar(refresh_rate=c.get("progress_refresh", 10)),
        EpochSeed(int(cfg.get("seed", 0))),
    ]
    if cfg.get("logger") and any(cfg.logger.get(k) for k in ("wandb", "csv")):
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    freeze = int(c.get("freeze_epochs", 0) or 0)
    if freeze > 0:
        callbacks.append(FreezePretrained(epochs=freeze))
    return callbacks


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate and test the model described by ``cfg``.

    Returns:
        ``{"output_dir", "best_checkpoint", "last_checkpoint", "val/acc", "test/acc", ...}``;
        the same dictionary is written to ``results.json`` in the run folder.
    """
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    num_classes = int(datamodule.num_classes)
    module = build_module(cfg, num_classes)
    if cfg.model.get("compile", False):
        module.net.compile()  # in place: checkpoint keys keep their names (no _orig_mod.)

    ckpt_dir = out / "checkpoints"
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    plugins = trainer_plugins(trainer_kwargs)  # takes sync_batchnorm out of trainer_kwargs
    trainer = L.Trainer(
        **trainer_kwargs,  # type: ignore[arg-type]
        default_root_dir=str(out),
        logger=build_loggers(cfg, out) or False,
        callbacks=build_callbacks(cfg, ckpt_dir),
        plugins=plugins,
    )
    write_json_atomic(out / "config.json", OmegaConf.to_container(cfg, resolve=True))

    resume = cfg.get("resume")
    trust = bool(cfg.get("trust_checkpoint", False))
    if resume == "last":
        last = ckpt_dir / "last.ckpt"
        resume = str(last) if last.is_file() else None
        if resume is None:
            log.info("resume=last: no %s yet, starting from scratch", last)
    if resume:
        # Fail before fitting, with the reason: unsafe, corrupt, or another network.
        saved = read_checkpoint(str(resume), trust_checkpoint=trust)
        check_hparams(saved["hyper_parameters"], module.hparams, str(resume))
        del saved
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=not trust)
    except SIGTERMException:
        # Lightning stops at a batch boundary on SIGTERM and raises SystemExit(None), which
        # would exit 0: a scheduler must see the job as killed, not finished.
        log.warning(
            "training stopped by SIGTERM in epoch %d; %s holds the last finished epoch: run again "
            "in the same folder with resume=last (or resume=PATH)",
            trainer.current_epoch,
            ckpt_dir / "last.ckpt",
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    fit_seconds = time.perf_counter() - start

    results: dict[str, Any] = {
        "output_dir": str(out),
        "fit_seconds": round(fit_seconds, 2),
        "num_classes": num_classes,
        "class_names": list(getattr(datamodule, "class_names", []) or []),
        "model": cfg.model.backbone,
        "attention": cfg.model.get("attention", "none"),
        "placement": cfg.model.get("placement", "blocks"),
        "epochs": trainer.current_epoch,
    }
    results.update(_metrics_over_processes(trainer, ("val/", "train/")))
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") or ""
    results["best_checkpoint"] = best or None
    last_path = ckpt_dir / "last.ckpt"
    results["last_checkpoint"] = str(last_path) if last_path.is_file() else None

    if cfg.get("test", True) and not trainer_kwargs.get("fast_dev_run"):
        datamodule.setup("test")
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        for k, v in (tested[0] if tested else {}).items():
            results[k] = float(v)
    for k in list(results):
        if isinstance(results[k], float) and math.isnan(results[k]):
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
