"""``ClassifierModule``: Lightning fine-tuning of an :class:`AttentionNet` from plain values.

The module builds its own network from the hyperparameters it saves, so
``ClassifierModule.load_from_checkpoint(path, pretrained=False)`` rebuilds the exact model with no
Hydra and no download.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from attncam import __version__
from attncam.models.net import AttentionNet

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "step", "cosine")


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
        weights: a local state-dict file for the backbone.
        optimizer: ``sgd`` or ``adamw``.
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
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: sgd, adamw")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of pixel images ``x`` ``(B, 3, H, W)`` in [0, 1]."""
        return self.net(x)

    # ------------------------------------------------------------------ steps

    def _check_labels(self, y: torch.Tensor) -> None:
        n = self.hparams.num_classes
        if y.is_cuda:
            # No host sync per step on GPUs: the device asserts and the error names the range.
            torch._assert_async(((y >= 0) & (y < n)).all(), f"labels out of range 0..{n - 1}")
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
        logger = self.logger
        if logger is None or not hasattr(logger, "log_image"):
            return
        try:
            logger.log_image(  # type: ignore[attr-defined]
                key="train/samples",
                images=[img.detach().float().cpu() for img in x],
                caption=[str(int(c)) for c in y],
            )
        except Exception as err:  # a logger failing to draw must not stop training
            log.warning("could not log sample images: %s", err)

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
        """Record the attncam version next to the hyperparameters."""
        checkpoint["attncam_version"] = __version__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Warn when the checkpoint was written by another attncam version."""
        saved = checkpoint.get("attncam_version")
        if saved is not None and saved != __version__:
            log.warning(
                "checkpoint written by attncam %s, loading with %s: if the network does not "
                "match, retrain or install that version",
                saved,
                __version__,
            )


class FreezePretrained(BaseFinetuning):
    """Train only the new parameters (attention, head) for ``epochs`` epochs, then everything.

    The pretrained parameters stay in their optimiser group throughout; while frozen they get no
    gradient, so SGD and AdamW leave them (and their state) untouched.

    Args:
        epochs: epochs to keep the pretrained parameters frozen (0 disables the callback).
        train_bn: keep BatchNorm of frozen parts in train mode.
    """

    def __init__(self, epochs: int = 1, train_bn: bool = True) -> None:
        super().__init__()
        if epochs < 0:
            raise ValueError(f"freeze epochs must be >= 0, got {epochs}")
        self.epochs = epochs
        self.train_bn = train_bn

    @staticmethod
    def _pretrained(pl_module: L.LightningModule) -> list[nn.Parameter]:
        net: AttentionNet = pl_module.net  # type: ignore[assignment]
        return [p for n, p in net.named_parameters() if not net.is_new_parameter(n)]

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Freeze the pretrained parameters before the first epoch."""
        if self.epochs > 0:
            for p in self._pretrained(pl_module):
                p.requires_grad_(False)

    def finetune_function(
        self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """Unfreeze at epoch ``epochs``."""
        if self.epochs > 0 and epoch == self.epochs:
            for p in self._pretrained(pl_module):
                p.requires_grad_(True)
            log.info("epoch %d: pretrained parameters unfrozen", epoch)


# Hyperparameters that decide the network's shape: a checkpoint resumed or loaded under other
# values cannot hold the right weights. The rest (optimiser, schedule) may change on resume.
ARCHITECTURE_HPARAMS = (
    "backbone",
    "num_classes",
    "attention",
    "placement",
    "reduction",
    "kernel_size",
)


def read_checkpoint(
    path: str, trust_checkpoint: bool = False, map_location: str = "cpu"
) -> dict[str, Any]:
    """Load an attncam training checkpoint as a dict, weights-only unless trusted.

    Args:
        path: a checkpoint written by ``train.py``.
        trust_checkpoint: allow arbitrary pickled objects (only for files you trust: unpickling
            can execute code). By default only tensors and plain values are loaded.
        map_location: device to load onto.

    Returns:
        The checkpoint, with at least ``state_dict`` and ``hyper_parameters``.

    Raises:
        CheckpointError: missing, corrupt, unsafe or not an attncam checkpoint.
    """
    import pathlib
    import pickle
    import zipfile

    p = pathlib.Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(p):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint (not a torch zip "
            "archive: truncated, corrupt or another format)"
        )
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint {str(path)!r} is refused by the weights-only loader ({detail}): it holds "
            "objects that would run code when unpickled. Load it only if you trust its source, "
            "with trust_checkpoint=true"
        ) from None
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint: {type(err).__name__}: "
            f"{err}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not an attncam training checkpoint (expected the keys "
            "'state_dict' and 'hyper_parameters')"
        )
    saved = ckpt.get("attncam_version")
    if saved != __version__:
        log.warning(
            "checkpoint %s was written by attncam %s, loading with %s: if the network does not "
            "match, retrain or install that version",
            path,
            saved or "(unknown version)",
            __version__,
        )
    return ckpt


def check_hparams(saved: Any, expected: Any, path: str) -> None:
    """Raise when a checkpoint's network hyperparameters differ from the ones expected.

    Args:
        saved: the checkpoint's ``hyper_parameters``.
        expected: the hyperparameters of the module it is loaded into.
        path: the checkpoint, for the message.

    Raises:
        CheckpointError: naming every differing key with both values.
    """
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, config {expected.get(k)!r}"
        for k in ARCHITECTURE_HPARAMS
        if k in expected and saved.get(k) != expected.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds another network than the config describes ("
            + "; ".join(diff)
            + "): set the config to the checkpoint's values or start a new run"
        )


def load_classifier(
    path: str, trust_checkpoint: bool = False, map_location: str = "cpu"
) -> ClassifierModule:
    """Rebuild a :class:`ClassifierModule` from a checkpoint, with no Hydra and no download.

    Args:
        path: a checkpoint written by ``train.py``.
        trust_checkpoint: allow arbitrary pickled objects (only for files you trust: unpickling
            can execute code). By default only tensors and plain values are loaded.
        map_location: device to load onto.

    Raises:
        CheckpointError: missing, corrupt, unsafe or not an attncam checkpoint.
    """
    ckpt = read_checkpoint(path, trust_checkpoint, map_location)
    hp = dict(ckpt["hyper_parameters"])
    hp.update(pretrained=False, weights=None)
    saved = ckpt.get("attncam_version")
    try:
        module = ClassifierModule(**hp)
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} (attncam {saved}, model {hp.get('backbone')!r}, attention "
            f"{hp.get('attention')!r}) does not rebuild with attncam {__version__}: "
            f"{str(err)[:400]}"
        ) from None
    module.eval()
    return module


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsafe or of another model."""
