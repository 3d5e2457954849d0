"""What the explanation engine may read from a model: one ``Protocol`` and its accessors.

The engine explains any ``nn.Module`` that maps images ``(B, 3, H, W)`` to logits ``(B, N)``. A
model may also describe itself with the attributes of :class:`ExplainableModel` (an
:class:`~attncam.models.net.AttentionNet` has them all); each one is optional, and without it the
engine asks the caller (``layer=...``, ``classifier=...``) or refuses the method with a message
that says what is missing. Attention maps are read from identity modules that declare
``is_attention_tap = True`` and a ``kind`` (:class:`AttentionTapLike`); the class itself does not
matter.

The functions below are the only place in :mod:`attncam.explain` that reads these attributes;
methods and the :class:`~attncam.explain.explainer.Explainer` call them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

TAP_KINDS = ("channel", "spatial")


@runtime_checkable
class AttentionTapLike(Protocol):
    """An identity module whose output is an attention map.

    Attributes:
        is_attention_tap: ``True`` (the marker the engine looks for).
        kind: ``"channel"`` for maps ``(B, C, 1, 1)`` or ``"spatial"`` for ``(B, 1, h, w)``.
    """

    is_attention_tap: bool
    kind: str


@runtime_checkable
class ExplainableModel(Protocol):
    """Everything the engine may read from a model besides calling it. Every member is optional.

    Attributes:
        cam_layer: dotted name of the default CAM layer (the last stage's output).
        head_input_layer: dotted name of the module whose output the head pools (CAM).
        classifier_name: dotted name of the final ``nn.Linear`` (or 1x1 conv), ``W_fc (N, K)``.
        gap_fc: whether the head is global average pooling then one linear layer (CAM, SCA-CAM
            eq. 21 need it); absent means "unknown".
        attention_names: dotted names of the attention modules, in forward order.
        stage_attention_names: the last attention module of each stage, in order.
        attention_kind: the attention in the model (``none``, ``cbam``, ...), for messages.
        backbone_name: the model's name, for messages.
        input_mean: per-channel mean the model subtracts from its pixel input (RGB).
        input_std: per-channel std the model divides its pixel input by.
        num_classes: number of logits ``N``.
        class_names: the classes' names, when known.
    """

    cam_layer: str
    head_input_layer: str
    classifier_name: str
    gap_fc: bool
    attention_names: list[str]
    stage_attention_names: list[str]
    attention_kind: str
    backbone_name: str
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    num_classes: int
    class_names: list[str] | None


# --------------------------------------------------------------------------- model attributes


def cam_layer(model: nn.Module) -> str | None:
    """The model's default CAM layer, or None when it names none."""
    return getattr(model, "cam_layer", None)


def head_input_layer(model: nn.Module) -> str | None:
    """The layer whose output the head pools, or None when the model does not say."""
    return getattr(model, "head_input_layer", None)


def classifier_name(model: nn.Module) -> str | None:
    """Dotted name of the final linear layer, or None when the model does not say."""
    return getattr(model, "classifier_name", None)


def gap_fc(model: nn.Module) -> bool | None:
    """True/False when the model says whether its head is GAP -> FC; None when it does not."""
    value = getattr(model, "gap_fc", None)
    return None if value is None else bool(value)


def attention_names(model: nn.Module) -> list[str] | None:
    """The model's own list of attention modules, or None when it keeps none."""
    names = getattr(model, "attention_names", None)
    return None if names is None else list(names)


def stage_attention_names(model: nn.Module) -> list[str] | None:
    """The last attention module of each stage, or None (or empty) when the model keeps none."""
    names = getattr(model, "stage_attention_names", None)
    return None if names is None else list(names)


def model_name(model: nn.Module) -> str:
    """The model's ``backbone_name``, else its class name."""
    return str(getattr(model, "backbone_name", type(model).__name__))


def describe(model: nn.Module) -> str:
    """``'resnet50' (attention='cbam')`` for messages; the attention part only when known."""
    kind = getattr(model, "attention_kind", None)
    name = model_name(model)
    return f"{name!r} (attention={kind!r})" if kind is not None else repr(name)


def input_mean(model: nn.Module) -> tuple[float, ...] | None:
    """Per-channel mean the model subtracts from its pixel input, or None when unknown."""
    value = getattr(model, "input_mean", None)
    return None if value is None else tuple(value)


def input_std(model: nn.Module) -> tuple[float, ...] | None:
    """Per-channel std the model divides its pixel input by, or None when unknown."""
    value = getattr(model, "input_std", None)
    return None if value is None else tuple(value)


def num_classes(model: nn.Module) -> int | None:
    """Number of logits when the model says, else None."""
    value = getattr(model, "num_classes", None)
    return None if value is None else int(value)


def class_names(model: nn.Module) -> list[str] | None:
    """The classes' names when the model knows them, else None."""
    names = getattr(model, "class_names", None)
    return None if names is None else list(names)


def classifier_weight(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """The final linear layer's weight ``W_fc`` as ``(N, K)`` (a 1x1 conv's is flattened).

    Args:
        model: the network.
        name: dotted name of the layer; None uses :func:`classifier_name`.

    Raises:
        ValueError: the model names no classifier and none is given, or the layer has no weight.
    """
    name = name or classifier_name(model)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} has no classifier_name; pass the option "
            "classifier='dotted.name' of its final nn.Linear"
        )
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"classifier {name!r} ({type(module).__name__}) has no weight")
    return weight.detach().flatten(1)


# --------------------------------------------------------------------------- attention taps


def is_attention_tap(module: nn.Module) -> bool:
    """Whether ``module`` declares itself an attention tap (``is_attention_tap = True``)."""
    return getattr(module, "is_attention_tap", False) is True


def tap_kind(module: nn.Module) -> str | None:
    """``"channel"`` or ``"spatial"`` for an attention tap, None for any other module."""
    return getattr(module, "kind", None) if is_attention_tap(module) else None


def attention_taps(model: nn.Module, kind: str | None = None) -> dict[str, nn.Module]:
    """The model's attention taps by dotted name, in forward order; ``kind`` filters them.

    Raises:
        ValueError: ``kind`` is not ``channel``, ``spatial`` or None.
    """
    if kind is not None and kind not in TAP_KINDS:
        raise ValueError(f"unknown tap kind {kind!r}; choose one of: {', '.join(TAP_KINDS)}")
    return {
        n: m
        for n, m in model.named_modules()
        if is_attention_tap(m) and (kind is None or tap_kind(m) == kind)
    }


def attention_modules(model: nn.Module) -> list[str]:
    """Dotted names of the model's attention modules, in forward order.

    The model's ``attention_names`` when it has them; otherwise every module with an attention
    tap among its direct children, except the gates inside a CBAM (``channel_gate``,
    ``spatial_gate``).
    """
    names = attention_names(model)
    if names is None:
        names = [
            n
            for n, m in model.named_modules()
            if n
            and any(is_attention_tap(c) for c in m.children())
            and not n.endswith(("channel_gate", "spatial_gate"))
        ]
    return names


def spatial_tap(model: nn.Module, module_name: str) -> str | None:
    """Dotted name of the spatial attention tap inside attention module ``module_name``."""
    for n, m in model.get_submodule(module_name).named_modules():
        if tap_kind(m) == "spatial":
            return f"{module_name}.{n}"
    return None


# --------------------------------------------------------------------------- layer names


def unknown_layer_error(model: nn.Module, name: str) -> ValueError:
    """The error for a layer name ``model`` does not have, listing the layers that exist.

    The message lists the children of the deepest part of the dotted name that exists, so a
    typo anywhere in the path is explained.

    Args:
        model: the network.
        name: the dotted name that did not resolve (without a ``":input"`` suffix).

    Returns:
        A ``ValueError`` to raise.
    """
    parts = name.split(".")
    parent = ""
    for i in range(len(parts) - 1, 0, -1):
        try:
            model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        parent = ".".join(parts[:i])
        break
    prefix = f"{parent}." if parent else ""
    children = [f"{prefix}{n}" for n, _ in model.get_submodule(parent).named_children()]
    total = sum(1 for n, _ in model.named_modules() if n)
    where = f"under {parent!r}" if parent else "at the top level"
    shown = ", ".join(children[:30]) + (", ..." if len(children) > 30 else "")
    return ValueError(
        f"unknown layer {name!r} in {type(model).__name__}; layers {where}: {shown} "
        f"({total} layers in all: [n for n, _ in model.named_modules()] lists them)"
    )


__all__ = [
    "TAP_KINDS",
    "AttentionTapLike",
    "ExplainableModel",
    "attention_modules",
    "attention_names",
    "attention_taps",
    "cam_layer",
    "class_names",
    "classifier_name",
    "classifier_weight",
    "describe",
    "gap_fc",
    "head_input_layer",
    "input_mean",
    "input_std",
    "is_attention_tap",
    "model_name",
    "num_classes",
    "spatial_tap",
    "stage_attention_names",
    "tap_kind",
    "unknown_layer_error",
]
