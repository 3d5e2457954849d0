"""``ClassifierModule``: Lightning fine-tuning of an :class:`AttentionNet` from plain values.

The module builds its own network from the hyperparameters it saves, so
``ClassifierModule.load_from_checkpoint(path, pretrained=False)`` rebuilds the exact model with no
Hydra and no download. :meth:`ClassifierModule.from_config` builds it from the ``model`` and
``optim`` config groups; the class signature is the only place its defaults are written.

The fine-tuning callback lives in :mod:`attncam.models.finetuning` and checkpoint reading in
:mod:`attncam.models.checkpoint`; both are re-exported here under their old names.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from attncam import __version__

# Moved to their own modules; re-exported under their old names.
from attncam.models.checkpoint import (
    ARCHITECTURE_HPARAMS,
    METADATA_KEY,
    CheckpointError,
    check_hparams,
    checkpoint_metadata,
    load_classifier,
    read_checkpoint,
)
from attncam.models.finetuning import FreezePretrained
from attncam.models.net import AttentionNet

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine")

#: ``ClassifierModule`` arguments read from the ``optim`` config group; every other argument
#: (except ``num_classes`` and ``max_epochs``, which come from the data and the trainer) is read
#: from the ``model`` group (``conf/model/*.yaml`` plus ``conf/attention/*.yaml``).
OPTIM_ARGS = (
    "optimizer",
    "lr",
    "lr_pretrained",
    "momentum",
    "weight_decay",
    "scheduler",
    "step_size",
    "gamma",
    "warmup_epochs",
    "label_smoothing",
)


class ClassifierModule(L.LightningModule):
    """Fine-tune a backbone with attention; log top-1 accuracy and top-5 error.

    Args:
        backbone: registry key of the backbone.
        num_classes: number of classes.
        attention: attention kind (``none, se, cbam, cbam_channel, cbam_spatial, bam``).
        placement: ``blocks`` or ``last``.
        reduction: channel MLP reduction ratio.
        kernel_size: CBAM spatial conv size.
        pretrained: load ImageNet weights when building (set False when restoring a checkpoint).
        weights: a local state-dict file for the backbone, or a torchvision weights name.
        weights_format: ``None`` (attncam's keys) or ``cbam_official`` (the CBAM authors' released
            ImageNet checkpoints, ``models.official``).
        optimizer: ``sgd``, ``adam`` (``torch.optim.Adam``, weight decay as an L2 term in the
            gradient) or ``adamw`` (decoupled weight decay).
        lr: learning rate of new parameters (attention and a new head).
        lr_pretrained: learning rate of pretrained parameters (``None``: same as ``lr``).
        momentum: SGD momentum.
        weight_decay: weight decay for all parameters.
        scheduler: ``none``, ``step`` or ``cosine`` (per epoch; cosine with linear warm-up).
        step_size: epochs between decays for ``step``.
        gamma: decay factor for ``step``.
        warmup_epochs: linear warm-up epochs for ``cosine``.
        max_epochs: schedule length for ``cosine``.
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep the network and inputs in channels-last memory format.
        log_images: number of sample training images logged once.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        attention: str = "cbam",
        placement: str = "blocks",
        reduction: int = 16,
        kernel_size: int = 7,
        pretrained: bool = False,
        weights: str | None = None,
        weights_format: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        lr_pretrained: float | None = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        step_size: int = 30,
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        max_epochs: int = 10,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        log_images: int = 8,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of: none, step, cosine")
        self.save_hyperparameters()
        self.net = AttentionNet(
            backbone,
            num_classes,
            attention=attention,
            placement=placement,
            reduction=reduction,
            kernel_size=kernel_size,
            pretrained=pretrained,
            weights=weights,
            weights_format=weights_format,
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        top5 = min(5, num_classes)
        metrics = {
            "acc": torchmetrics.Accuracy("multiclass", num_classes=num_classes),
            "top5": torchmetrics.Accuracy("multiclass", num_classes=num_classes, top_k=top5),
        }
        self.val_metrics = nn.ModuleDict({k: v.clone() for k, v in metrics.items()})
        self.test_metrics = nn.ModuleDict({k: v.clone() for k, v in metrics.items()})
        self.train_acc = metrics["acc"].clone()
        self._images_logged = False
        #: What the run adds to every checkpoint's metadata (the train stage sets ``data`` and
        #: ``config``); ``load_classifier`` fills it from the checkpoint.
        self.run_metadata: dict[str, Any] = {}

    #: ``model`` config keys the train stage reads itself (not module arguments).
    STAGE_MODEL_KEYS: ClassVar[tuple[str, ...]] = ("compile",)

    @classmethod
    def from_config(
        cls,
        model_cfg: Mapping[str, Any],
        optim_cfg: Mapping[str, Any],
        num_classes: int,
        max_epochs: int,
    ) -> ClassifierModule:
        """Build the module from the ``model`` and ``optim`` config groups.

        Only the keys present in the configs are passed on: every other argument takes its
        default from the class signature, the one place defaults are written.

        Args:
            model_cfg: the ``model`` group (backbone, attention settings, pretrained, ...); the
                train stage's own keys (:attr:`STAGE_MODEL_KEYS`) are skipped.
            optim_cfg: the ``optim`` group (keys of :data:`OPTIM_ARGS`).
            num_classes: number of classes of the data.
            max_epochs: schedule length (the trainer's ``max_epochs``).

        Raises:
            ValueError: a key that is not an argument of the group (naming the valid keys), or
                a ``model`` group without ``backbone``.
        """
        own = set(inspect.signature(cls.__init__).parameters) - {"self"}
        model_args = sorted(own - set(OPTIM_ARGS) - {"num_classes", "max_epochs"})
        if "backbone" not in model_cfg:
            raise ValueError("the model config has no 'backbone'; choose one with model=NAME")
        kwargs = _config_args(model_cfg, model_args, "model", skip=cls.STAGE_MODEL_KEYS)
        kwargs.update(_config_args(optim_cfg, OPTIM_ARGS, "optim"))
        return cls(num_classes=int(num_classes), max_epochs=int(max_epochs), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of pixel images ``x`` ``(B, 3, H, W)`` in [0, 1]."""
        return self.net(x)

    # ------------------------------------------------------------------ steps

    def _check_labels(self, y: torch.Tensor) -> None:
        n = self.hparams.num_classes
        if y.is_cuda:
            # No host sync per step on GPUs: the device asserts and the error names the range.
            torch._assert_async(  # noqa: SLF001 (torch has no public device-side assert)
                ((y >= 0) & (y < n)).all(), f"labels out of range 0..{n - 1}"
            )
            return
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
            bad = y[(y < 0) | (y >= n)][:5].tolist()
            raise ValueError(
                f"labels {bad} are out of range for num_classes={n} (valid: 0..{n - 1})"
            )

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """Cross-entropy step; logs loss, accuracy and learning rates."""
        x, y = batch[0], batch[1]
        self._check_labels(y)
        logits = self(self._inputs(x))
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc.update(logits, y)  # the epoch value is logged; no per-step compute
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        if not self._images_logged and self.hparams.log_images > 0:
            self._log_images(x[: self.hparams.log_images], y[: self.hparams.log_images])
            self._images_logged = True
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> None:
        x, y = batch[0], batch[1]
        self._check_labels(y)
        logits = self(self._inputs(x))
        loss = F.cross_entropy(logits, y)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics["acc"](logits, y)
        metrics["top5"](logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", metrics["acc"], prog_bar=True)
        self.log(f"{stage}/top5_acc", metrics["top5"])

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Validation: loss, top-1 accuracy, top-5 accuracy (error logged at epoch end)."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Test: as validation."""
        self._eval_step(batch, "test")

    def _log_top5_error(self, stage: str) -> None:
        metric = (self.val_metrics if stage == "val" else self.test_metrics)["top5"]
        if metric.update_count:  # type: ignore[attr-defined]
            self.log(f"{stage}/top5_err", 1.0 - metric.compute(), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        """Top-5 error = 1 - top-5 accuracy."""
        self._log_top5_error("val")

    def on_test_epoch_end(self) -> None:
        """Top-5 error = 1 - top-5 accuracy."""
        self._log_top5_error("test")

    def _log_images(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Send sample training images ``x`` ``(B, 3, H, W)`` to every logger that draws images.

        Each logger with a ``log_image`` method (W&B's, not the CSV logger) gets them, captioned
        with the class names when the data module has them.
        """
        names = list(getattr(self._datamodule(), "class_names", None) or [])
        captions = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in y]
        images = [img.detach().float().cpu() for img in x]
        for logger in self.loggers:
            if not callable(getattr(logger, "log_image", None)):
                continue
            try:
                logger.log_image(key="train/samples", images=images, caption=captions)
            except Exception as err:  # a logger failing to draw must not stop training
                log.warning("could not log sample images to %s: %s", type(logger).__name__, err)

    def _datamodule(self) -> Any:
        """The trainer's data module, or None outside a ``Trainer``."""
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        """Two parameter groups (new / pretrained) with their own learning rates, and a schedule."""
        hp = self.hparams
        new, old = self.net.parameter_groups()
        lr_old = hp.lr if hp.lr_pretrained is None else hp.lr_pretrained
        groups = [{"params": new, "lr": hp.lr, "name": "new"}]
        if old:
            groups.append({"params": old, "lr": lr_old, "name": "pretrained"})
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        if hp.scheduler == "step":
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, hp.step_size, gamma=hp.gamma)
        else:
            warm, total = hp.warmup_epochs, max(hp.max_epochs, 1)

            def factor(epoch: int) -> float:
                if epoch < warm:
                    return (epoch + 1) / (warm + 1)
                t = (epoch - warm) / max(total - warm, 1)
                return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the attncam version and the run's metadata next to the hyperparameters.

        The metadata (:func:`~attncam.models.checkpoint.checkpoint_metadata`) holds the class
        names and image size of the trainer's data module, the network's input mean/std, and
        what :attr:`run_metadata` holds (the train stage's ``data`` and ``config``), all plain
        values, so weights-only loading reads them.
        """
        checkpoint["attncam_version"] = __version__
        meta = dict(self.run_metadata)
        dm = self._datamodule()
        names = getattr(dm, "class_names", None) if dm is not None else None
        if names:
            meta["class_names"] = [str(n) for n in names]
        if getattr(dm, "image_size", None):
            meta["image_size"] = int(dm.image_size)
        for key, attr in (("mean", "input_mean"), ("std", "input_std")):
            value = getattr(self.net, attr, None)
            if value is not None:
                meta[key] = [float(v) for v in value]
        meta["weights_id"] = getattr(
            self.net, "weights_id", None
        )  # the weights training began from
        checkpoint[METADATA_KEY] = meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the run's metadata (unless set); warn when another attncam version wrote it."""
        if not self.run_metadata:
            self.run_metadata = checkpoint_metadata(checkpoint)
        saved = checkpoint.get("attncam_version")
        if saved is not None and saved != __version__:
            log.warning(
                "checkpoint written by attncam %s, loading with %s: if the network does not "
                "match, retrain or install that version",
                saved,
                __version__,
            )


def _config_args(
    cfg: Mapping[str, Any], valid: Sequence[str], group: str, skip: Sequence[str] = ()
) -> dict[str, Any]:
    """The keys of ``cfg`` that are in ``valid``; any other key (not in ``skip``) is an error."""
    unknown = sorted(str(k) for k in cfg if k not in valid and k not in skip)
    if unknown:
        raise ValueError(
            f"unknown {group} key(s) {', '.join(map(repr, unknown))} for ClassifierModule; "
            f"valid keys: {', '.join(valid)}"
        )
    return {str(k): cfg[k] for k in cfg if k in valid}


__all__ = [
    "ARCHITECTURE_HPARAMS",
    "OPTIMIZERS",
    "OPTIM_ARGS",
    "SCHEDULERS",
    "CheckpointError",
    "ClassifierModule",
    "FreezePretrained",
    "check_hparams",
    "load_classifier",
    "read_checkpoint",
]
