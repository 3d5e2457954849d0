"""Attention modules, the backbone registry and the networks built from them."""

from attncam.models.attention import ATTENTION_KINDS, BAM, CBAM, SE, AttentionTap, make_attention
from attncam.models.backbones import (
    PretrainedWeightsUnavailable,
    available_backbones,
    register_backbone,
)
from attncam.models.net import PLACEMENTS, AttentionNet

__all__ = [
    "ATTENTION_KINDS",
    "BAM",
    "CBAM",
    "PLACEMENTS",
    "SE",
    "AttentionNet",
    "AttentionTap",
    "PretrainedWeightsUnavailable",
    "available_backbones",
    "make_attention",
    "register_backbone",
]
