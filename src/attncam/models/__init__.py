"""Attention modules, the backbone registry and the networks built from them.

The Lightning pieces (``ClassifierModule``, ``FreezePretrained``) and the checkpoint functions are
importable from here too; they are loaded on first use, so ``import attncam.models`` does not
import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from attncam.models.attention import ATTENTION_KINDS, BAM, CBAM, SE, AttentionTap, make_attention
from attncam.models.backbones import (
    PretrainedWeightsUnavailable,
    available_backbones,
    register_backbone,
)
from attncam.models.net import PLACEMENTS, AttentionNet

if TYPE_CHECKING:
    from attncam.models.checkpoint import (
        ARCHITECTURE_HPARAMS,
        CheckpointError,
        check_hparams,
        load_classifier,
        read_checkpoint,
    )
    from attncam.models.finetuning import FreezePretrained
    from attncam.models.lit_module import ClassifierModule

_LAZY = {
    "ARCHITECTURE_HPARAMS": "attncam.models.checkpoint",
    "CheckpointError": "attncam.models.checkpoint",
    "check_hparams": "attncam.models.checkpoint",
    "load_classifier": "attncam.models.checkpoint",
    "read_checkpoint": "attncam.models.checkpoint",
    "FreezePretrained": "attncam.models.finetuning",
    "ClassifierModule": "attncam.models.lit_module",
}


def __getattr__(name: str) -> Any:
    """Load the Lightning-dependent names on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ARCHITECTURE_HPARAMS",
    "ATTENTION_KINDS",
    "BAM",
    "CBAM",
    "PLACEMENTS",
    "SE",
    "AttentionNet",
    "AttentionTap",
    "CheckpointError",
    "ClassifierModule",
    "FreezePretrained",
    "PretrainedWeightsUnavailable",
    "available_backbones",
    "check_hparams",
    "load_classifier",
    "make_attention",
    "read_checkpoint",
    "register_backbone",
]
