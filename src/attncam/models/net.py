"""``AttentionNet``: a registered backbone with attention inserted, taking pixel images in [0, 1].

The network normalises its own input (so explanations and metrics work in pixel space, and each
backbone keeps the mean/std its weights expect), runs ``features`` then ``head``, and returns
logits only. Attention maps are read through the :class:`~attncam.models.attention.AttentionTap`
modules listed by :meth:`AttentionNet.attention_taps`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from attncam.models.attention import ATTENTION_KINDS, AttentionTap, make_attention
from attncam.models.backbones import BackboneParts, get_builder, imagenet_categories
from attncam.models.official import (
    WEIGHTS_FORMATS,
    check_official,
    load_official,
    use_official_modules,
)
from attncam.runtime import eval_mode

PLACEMENTS = ("blocks", "last")
#: ``placement="after:<layer>"``: one module after that layer of ``features`` (e.g. ``blocks.5``).
AFTER = "after:"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel on ``(B, 3, H, W)`` pixel images."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``(B, 3, H, W)``."""
        return (x - self.mean) / self.std


class BasicBlockWithAttention(tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` with attention after ``bn2``, before the identity add."""

    attention: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward; shapes as torchvision's."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        # Out-of-place add: the attention output may be captured by the explain stage.
        return self.relu(out + identity)


class BottleneckWithAttention(tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` with attention after ``bn3``, before the identity add (CBAM)."""

    attention: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward; shapes as torchvision's."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attention(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


_BLOCK_SWAP: dict[type, type] = {
    tv_resnet.BasicBlock: BasicBlockWithAttention,
    tv_resnet.Bottleneck: BottleneckWithAttention,
}


def _insert_after(root: nn.Module, dotted: str, name: str, module: nn.Module) -> str:
    """Insert ``module`` as ``name`` right after child ``dotted`` of an ``nn.Sequential``.

    Returns the dotted name of the inserted module. Other children keep their names (and so
    their state-dict keys).
    """
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not isinstance(parent, nn.Sequential):
        raise TypeError(f"cannot insert after {dotted!r}: its parent is not an nn.Sequential")
    items: list[tuple[str, nn.Module]] = []
    for key, mod in parent.named_children():
        items.append((key, mod))
        if key == child:
            items.append((name, module))
    new_parent = nn.Sequential(OrderedDict(items))
    if parent_name:
        grand_name, _, attr = parent_name.rpartition(".")
        grand = root.get_submodule(grand_name) if grand_name else root
        setattr(grand, attr, new_parent)
    else:
        raise TypeError("cannot replace the root module")
    return f"{parent_name}.{name}" if parent_name else name


def _check_args(
    attention: str, placement: str, num_classes: int, weights_format: str | None
) -> None:
    """Raise a ``ValueError`` naming the valid choices for a bad argument."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(
            f"unknown attention {attention!r}; choose one of: {', '.join(ATTENTION_KINDS)}"
        )
    if placement not in PLACEMENTS and not (placement.startswith(AFTER) and placement[6:]):
        raise ValueError(
            f"unknown placement {placement!r}; choose one of: blocks, last, after:<layer> (a "
            "layer of the backbone's features, e.g. after:blocks.5)"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(
            f"unknown weights_format {weights_format!r}; choose one of: null, cbam_official"
        )


class AttentionNet(nn.Module):
    """A registered backbone with optional attention, for fine-tuning and explanation.

    Args:
        backbone: registry key, e.g. ``"resnet50"`` (see ``available_backbones()``), or any timm
            or torchvision CNN by name, ``"timm:<name>"`` / ``"tv:<name>"``
            (:func:`~attncam.models.backbones.build_by_name`).
        num_classes: outputs of the new classifier; a pretrained head is kept only when it
            already has this many classes.
        attention: one of ``none, se, cbam, cbam_channel, cbam_spatial, bam``.
        placement: ``blocks`` (inside every residual block after the last BN, as in the CBAM
            paper; for BAM and non-residual families, after every stage) or ``last`` (one module
            after the last stage) or ``after:<layer>`` (one module after that layer of
            ``features``, e.g. ``after:blocks.5``: the attention one stage before the last). A
            backbone built by name takes ``blocks`` only when attncam knows its blocks
            (torchvision's ResNets); otherwise ``last``.
        reduction: channel MLP reduction ratio.
        kernel_size: CBAM spatial conv size.
        pretrained: load the backbone's ImageNet weights (torchvision's, or the bundled ones for
            ``efficientnet_lite0``).
        weights: a local state-dict file to load instead, or a torchvision weights name
            (``"IMAGENET1K_V1"``) to pin those weights.
        weights_format: ``None`` (an attncam or torchvision state dict) or ``"cbam_official"``
            (the CBAM authors' ImageNet checkpoints, :mod:`attncam.models.official`; the network
            is then built as theirs, with their BAM gate).

    Attributes:
        cam_layer: dotted name of the default CAM layer (the last stage's output).
        head_input_layer: dotted name of the module whose output feeds the head (for CAM).
        classifier_name: dotted name of the final linear layer.
        stage_names: dotted names of the stages' outputs.
        attention_names: dotted names of the inserted attention modules, in forward order.
        stage_attention_names: the last attention module of each stage, in order.
        class_names: the classes' names when known (ImageNet weights with their own head).
        weights_id: identity of the loaded weights (e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``,
            ``"file:<path> sha256:<hex>"``), None when none were loaded.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        attention: str = "none",
        placement: str = "blocks",
        reduction: int = 16,
        kernel_size: int = 7,
        pretrained: bool = False,
        weights: str | None = None,
        weights_format: str | None = None,
    ) -> None:
        super().__init__()
        _check_args(attention, placement, num_classes, weights_format)
        official = weights_format == "cbam_official"
        if official:
            check_official(backbone, attention, placement, reduction, kernel_size)
            if pretrained and not weights:
                raise ValueError(
                    "weights_format='cbam_official' loads model.weights=PATH (the authors' "
                    "checkpoint); set model.weights or model.pretrained=false"
                )
        build = get_builder(backbone)
        parts: BackboneParts = build(pretrained and not official, None if official else weights)
        self.backbone_name = backbone
        self.attention_kind = attention
        self.placement = placement
        self.weights_format = weights_format
        self.pretrained_loaded = parts.pretrained_loaded
        self.weights_id = parts.weights_id
        self.normalize = Normalize(parts.mean, parts.std)
        self.features = parts.features
        self.head = parts.head
        self.gap_fc = parts.gap_fc
        self.classifier_name = f"head.{parts.classifier}"
        self.stage_names = [f"features.{s}" for s in parts.stages]
        self.cam_layer = self.stage_names[-1]
        self._new_prefixes: list[str] = []
        self._probe_size = parts.probe_size

        self.class_names = parts.class_names
        self._fit_classifier(num_classes)
        self.attention_names: list[str] = []
        self.stage_attention_names: list[str] = []
        if attention != "none":
            self._insert_attention(parts, attention, placement, reduction, kernel_size)
        last = list(self.features.named_children())[-1][0]
        self.head_input_layer = f"features.{last}"
        if official:
            use_official_modules(self)
            if weights:
                self._load_official(weights)

    # ------------------------------------------------------------------ building

    def _load_official(self, weights: str) -> None:
        """Load the CBAM authors' checkpoint: everything is pretrained but a refitted head."""
        loaded, head = load_official(self, weights, self.classifier_name)
        self.pretrained_loaded = True
        self.weights_id = loaded.weights_id
        self._new_prefixes = [] if head else [self.classifier_name]
        if head:
            self.class_names = imagenet_categories()

    def _fit_classifier(self, num_classes: int) -> None:
        old = self.get_submodule(self.classifier_name)
        n_out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
        if self.pretrained_loaded and n_out == num_classes:
            return
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_classes)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, 1)
        parent_name, _, attr = self.classifier_name.rpartition(".")
        setattr(self.get_submodule(parent_name), attr, new)
        self._new_prefixes.append(self.classifier_name)
        self.class_names = None

    @torch.no_grad()
    def _channels_at(self, names: list[str]) -> dict[str, int]:
        """Output channels of modules ``names`` (dotted from the net root), by one dry run."""
        found: dict[str, int] = {}
        handles = [
            self.get_submodule(n).register_forward_hook(
                lambda _m, _i, out, n=n: found.__setitem__(n, out.shape[1])
            )
            for n in names
        ]
        try:
            with eval_mode(self):
                self.features(torch.zeros(1, 3, self._probe_size, self._probe_size))
        finally:
            for h in handles:
                h.remove()
        return found

    def _check_after(self, layer: str) -> str:
        """``layer`` of ``placement="after:<layer>"``, checked to name a layer of ``features``."""
        names = [n for n, _ in self.features.named_modules() if n]
        if layer not in names:
            top = [n for n, _ in self.features.named_children()]
            raise ValueError(
                f"placement 'after:{layer}': {self.backbone_name!r} has no layer {layer!r} in its "
                f"features; its top-level layers are {', '.join(top)} (dotted names below them, "
                "e.g. blocks.5, are valid too)"
            )
        return layer

    def _insert_attention(
        self, parts: BackboneParts, kind: str, placement: str, reduction: int, kernel_size: int
    ) -> None:
        if placement == "blocks" and not parts.blocks_placement:
            raise ValueError(
                f"placement='blocks' needs a backbone whose blocks attncam knows (the registered "
                f"ones and torchvision's ResNets, tv:resnet*); {self.backbone_name!r} is built by "
                "name: use model.placement=last (one attention module after the last spatial "
                "feature map)"
            )
        residual = placement == "blocks" and kind != "bam" and bool(parts.residual_blocks)
        if residual:
            blocks = [f"features.{b}" for s in parts.stages for b in parts.residual_blocks[s]]
            channels = self._channels_at(blocks)
            for stage in parts.stages:
                for b in parts.residual_blocks[stage]:
                    name = f"features.{b}"
                    block = self.get_submodule(name)
                    swap = _BLOCK_SWAP.get(type(block))
                    if swap is None:
                        raise TypeError(f"no attention surgery for block type {type(block)}")
                    block.__class__ = swap
                    block.attention = make_attention(kind, channels[name], reduction, kernel_size)
                    self.attention_names.append(f"{name}.attention")
                self.stage_attention_names.append(self.attention_names[-1])
        else:
            if placement == "last":
                where = parts.stages[-1:]
            elif placement.startswith(AFTER):
                where = [self._check_after(placement[len(AFTER) :])]
            elif kind == "bam":
                # BAM sits at the bottlenecks between stages (Park et al.), not after the last.
                where = parts.stages[:-1] or parts.stages
            else:
                where = parts.stages
            channels = self._channels_at([f"features.{s}" for s in where])
            for s in where:
                label = "attention" if placement == "last" else f"attention_{s.replace('.', '_')}"
                module = make_attention(kind, channels[f"features.{s}"], reduction, kernel_size)
                inserted = _insert_after(self, f"features.{s}", label, module)
                self.attention_names.append(inserted)
                self.stage_attention_names.append(inserted)
        self._new_prefixes.extend(self.attention_names)

    # ------------------------------------------------------------------ use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of pixel images ``x`` ``(B, 3, H, W)`` in [0, 1].

        Raises:
            ValueError: ``x`` is not ``(B, 3, H, W)``. A grayscale batch ``(B, 1, H, W)`` is not
                converted silently (the normalisation would broadcast it to 3 channels, each
                normalised with another channel's mean and std); convert it explicitly with
                ``x.expand(-1, 3, -1, -1)``, and drop an alpha channel with ``x[:, :3]``.
        """
        expected = self.normalize.mean.shape[1]
        if x.ndim != 4 or x.shape[1] != expected:
            got = f"{x.shape[1]} channels" if x.ndim == 4 else f"{x.ndim} dimensions"
            raise ValueError(
                f"{self.backbone_name!r} expects images (B, {expected}, H, W) with {expected} "
                f"(RGB) channels; got shape {tuple(x.shape)} ({got}). Grayscale (B, 1, H, W): "
                "x.expand(-1, 3, -1, -1); RGBA (B, 4, H, W): x[:, :3]; one image (3, H, W): "
                "x[None]"
            )
        return self.head(self.features(self.normalize(x)))

    @property
    def input_mean(self) -> tuple[float, float, float]:
        """Normalisation mean applied inside ``forward``."""
        return tuple(self.normalize.mean.flatten().tolist())  # type: ignore[return-value]

    @property
    def input_std(self) -> tuple[float, float, float]:
        """Normalisation std applied inside ``forward``."""
        return tuple(self.normalize.std.flatten().tolist())  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        clf = self.get_submodule(self.classifier_name)
        return clf.out_features if isinstance(clf, nn.Linear) else clf.out_channels

    def classifier(self) -> nn.Module:
        """The final linear (or 1x1 conv) layer."""
        return self.get_submodule(self.classifier_name)

    def attention_taps(self, kind: str | None = None) -> dict[str, AttentionTap]:
        """Attention taps by dotted name, in forward order; ``kind`` filters channel/spatial."""
        return {
            n: m
            for n, m in self.named_modules()
            if isinstance(m, AttentionTap) and (kind is None or m.kind == kind)
        }

    def compile_attention(self, **options: Any) -> list[str]:
        """Compile every inserted attention module in place (``nn.Module.compile``).

        Under ``torch.compile`` a CBAM runs its straightforward eq. 1 (``forward_reference``) and
        inductor fuses its pooling and gating passes into generated C++ kernels; the backbone
        stays eager. ``model.compile=attention`` of the train stage calls this; it pays only
        when a run is long enough to earn back the compile time (``benchmarks/train.md``).
        Parameter names (and checkpoint keys) do not change.

        Args:
            options: Passed to ``torch.compile`` (e.g. ``backend``, ``mode``).

        Returns:
            The compiled modules' dotted names (empty without attention).
        """
        for name in self.attention_names:
            self.get_submodule(name).compile(**options)
        return list(self.attention_names)

    def is_new_parameter(self, name: str) -> bool:
        """True for parameters trained from scratch (attention, a new head, or no pretraining)."""
        if not self.pretrained_loaded:
            return True
        return any(name == p or name.startswith(p + ".") for p in self._new_prefixes)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(new, pretrained)`` parameters, for separate learning rates."""
        new, old = [], []
        for n, p in self.named_parameters():
            (new if self.is_new_parameter(n) else old).append(p)
        return new, old
