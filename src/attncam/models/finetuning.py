"""``FreezePretrained``: train the new parameters alone for some epochs, then everything."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from attncam.models.net import AttentionNet

log = logging.getLogger(__name__)


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


__all__ = ["FreezePretrained"]
