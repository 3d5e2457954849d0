"""The one CAM abstraction: option handling, the shared pass, and map post-processing.

A method is a small class registered under its config-file name. Class-activation methods
(:class:`CAMMethod`) only implement ``weights(A, g, p, layer)``, returning channel weights
``(B, K)`` or pixel weights ``(B, K, h, w)``; the base class multiplies them with the activations,
sums over channels, applies ReLU, upsamples bilinearly to the input size and min-max normalises
each image (docs/METHODS.md, "Notation"). Every method declares the layers it needs with
gradients (``grad_sites``) and without (``record_sites``), so the
:class:`~attncam.explain.explainer.Explainer` serves all of them from one shared forward pass and
one ``torch.autograd.grad`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attncam.explain import model_api
from attncam.explain.hooks import LeafInplaceError, capture
from attncam.explain.model_api import classifier_weight
from attncam.explain.naming import result_name

log = logging.getLogger(__name__)

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- map utilities


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map to [0, 1]; a constant (or non-finite) map becomes zeros.

    Args:
        maps: ``(B, H, W)``.

    Returns:
        ``(B, H, W)`` in [0, 1], never NaN.
    """
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    # Guard: a constant map has span 0 -> all zeros rather than 0/0.
    ok = span > 0
    out = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), 0.0)
    return out.clamp_(0.0, 1.0).view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of ``(B, h, w)`` maps to ``(B, *size)``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def finish(raw: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """ReLU, upsample to ``size`` (``None``: keep the layer's size) and normalise ``(B, h, w)``."""
    out = torch.relu(raw)
    if size is not None:
        out = upsample(out, size)
    return normalize_maps(out)


def fuse(maps: list[torch.Tensor]) -> torch.Tensor:
    """Fuse normalised per-layer maps ``(B, H, W)``: their mean, normalised again."""
    if len(maps) == 1:
        return maps[0]
    return normalize_maps(torch.stack(maps).mean(0))


def as_bhw(a: torch.Tensor, layer: str) -> torch.Tensor:
    """Check a captured activation is ``(B, K, h, w)``."""
    if a.ndim != 4:
        raise ValueError(
            f"layer {layer!r} gives a tensor of shape {tuple(a.shape)}, not (B, K, h, w); "
            "pass reshape_transform (e.g. tokens (B, N, K) -> (B, K, h, w))"
        )
    return a


# --------------------------------------------------------------------------- model metadata


def default_layers(model: nn.Module, layer: str | list[str] | None) -> list[str]:
    """The CAM layers: ``layer`` as given, else the model's ``cam_layer``."""
    if layer is None:
        default = model_api.cam_layer(model)
        if default is None:
            raise ValueError(
                f"{type(model).__name__} has no cam_layer attribute; pass layer='dotted.name' "
                "(e.g. 'layer4' for a torchvision ResNet)"
            )
        return [default]
    layers = [layer] if isinstance(layer, str) else list(layer)
    if not layers or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"layer must be a dotted name or a non-empty list of them, got {layer!r}")
    return layers


# --------------------------------------------------------------------------- the shared pass


@dataclass
class Pass:
    """What one explanation call knows: inputs, targets, the shared forward and backward.

    Attributes:
        model: the network, in eval mode with parameters frozen for the call.
        images: ``(B, 3, H, W)`` detached input.
        targets: ``(B,)`` class per image.
        logits: ``(B, N)`` of the clean forward.
        acts: site -> detached (reshaped) activation, e.g. ``(B, K, h, w)``.
        grads: site -> ``d sum_b y^c_b / d A`` (same shape as the activation).
        layers: the Explainer's CAM layers.
        reshape: optional transform of captured tensors to ``(B, K, h, w)``.
        size: output map size ``(H, W)``, or None for the layer's own size.
        extras: side results (e.g. skipped Score-CAM channels, guided gradients).
        cache: maps already computed in this call, by method identity (shared factors).
    """

    model: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    layers: list[str]
    reshape: ReshapeTransform | None = None
    size: tuple[int, int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def act(self, site: str) -> torch.Tensor:
        """Activation at ``site``."""
        return self.acts[site]

    def grad(self, site: str) -> torch.Tensor:
        """Gradient at ``site`` (it must have been a gradient site)."""
        return self.grads[site]

    def like_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, 3, H, W)`` in the memory layout of ``images`` (channels-last or not)."""
        if self.images.is_contiguous(memory_format=torch.channels_last):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def score(self, logits: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """Target logits ``(B*repeat,)`` from ``logits`` ``(B*repeat, N)`` (images tiled)."""
        t = self.targets.repeat(repeat) if repeat > 1 else self.targets
        return logits.gather(1, t[:, None])[:, 0]


def _transform(t: torch.Tensor, reshape: ReshapeTransform | None) -> torch.Tensor:
    return reshape(t) if reshape is not None else t


def forward_backward(
    model: nn.Module,
    images: torch.Tensor,
    grad_sites: list[str],
    record_sites: list[str],
    targets: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    reshape: ReshapeTransform | None = None,
    reshape_sites: set[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass and, if any gradient site is asked for, one ``autograd.grad``.

    Parameters must already be frozen (the Explainer does it), so no graph is built below the
    lowest gradient site and nothing is written to any ``.grad``.

    Args:
        model: the network.
        images: ``(B, 3, H, W)``, not requiring grad.
        grad_sites: sites needing ``d score / d A``.
        record_sites: sites recorded without gradient.
        targets: ``(B,)`` classes, or a function of the logits ``(B, N)`` returning them.
        reshape: transform applied to activations and gradients of ``reshape_sites``.
        reshape_sites: sites the transform applies to (the CAM layers, not attention taps).

    Returns:
        ``(logits (B, N), targets (B,), acts, grads)``, all detached.
    """
    sites = list(dict.fromkeys([*grad_sites, *record_sites]))
    reshape_sites = reshape_sites or set()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with capture(model, sites, grad=grad_sites) as store:
            out = model(x)
        missing = [s for s in sites if s not in store]
        if missing:
            raise RuntimeError(f"layers {missing} were not called during the forward pass")
        return out, dict(store)

    if not grad_sites:
        with torch.no_grad():
            logits, store = run(images)
        t = targets(logits) if callable(targets) else targets
        acts = {s: _transform(v, reshape if s in reshape_sites else None) for s, v in store.items()}
        return logits, t, acts, {}

    with torch.enable_grad():
        try:
            logits, store = run(images)
        except LeafInplaceError:
            # A recorded *input* ("name:input") that its caller later changes in place (recorded
            # outputs cannot be reached: the network runs on a copy): root the graph at the input
            # instead; capture() then reports the change if it happens again.
            log.debug("in-place op on a recorded input; retrying with input gradients")
            logits, store = run(images.detach().clone().requires_grad_())
        t = targets(logits) if callable(targets) else targets
        score = logits.gather(1, t[:, None]).sum()
        roots = [store[s] for s in grad_sites]
        not_connected = [s for s, r in zip(grad_sites, roots) if not r.requires_grad]
        if not_connected:
            raise RuntimeError(f"layers {not_connected} carry no gradient to the class score")
        grads_list = torch.autograd.grad(score, roots, allow_unused=True)
    grads: dict[str, torch.Tensor] = {}
    for s, g, r in zip(grad_sites, grads_list, roots):
        if g is None:
            raise RuntimeError(f"the class score does not depend on layer {s!r}")
        grads[s] = _transform(g, reshape if s in reshape_sites else None).detach()
        del r
    acts = {
        s: _transform(v.detach(), reshape if s in reshape_sites else None) for s, v in store.items()
    }
    return logits.detach(), t, acts, grads


# --------------------------------------------------------------------------- methods


class Method:
    """A registered explanation method.

    Subclasses set ``key`` (the registry key = config file name), ``defaults`` (every option
    with its default), optionally ``choices`` (option -> allowed values), and implement
    :meth:`compute`.
    """

    key: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    uses_gradients: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {self.key!r}; "
                f"valid options: {valid}"
            )
        for name, value in options.items():
            allowed = self.choices.get(name)
            if allowed is not None and value not in allowed:
                raise ValueError(
                    f"invalid {name}={value!r} for method {self.key!r}; choose one of: "
                    f"{', '.join(map(str, allowed))}"
                )
        self.given = dict(options)
        self.options = {**self.defaults, **options}

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(name)

    @property
    def name(self) -> str:
        """Result key: the registry key, with non-default options as a suffix.

        ``gradcampp`` with ``variant="torchcam020"`` is ``gradcampp[torchcam020]`` (a
        ``variant`` shows its value only), ``scacam`` with ``channel_weight="fc"`` is
        ``scacam[channel_weight=fc]``, a true flag shows its name alone
        (``gradcam[counterfactual]``); several are joined by commas in sorted order
        (:func:`attncam.explain.naming.result_name`).
        """
        return result_name(self.key, self.given, self.defaults)

    def layers(self, p_layers: list[str], model: nn.Module) -> list[str]:
        """CAM layers this method uses (its ``layer`` option, else the Explainer's)."""
        own = self.options.get("layer")
        return default_layers(model, own) if own is not None else p_layers

    def grad_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        """Sites that need gradients in the shared pass."""
        return []

    def record_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        """Sites recorded (no gradient) in the shared pass."""
        return []

    def check(self, model: nn.Module, layers: list[str]) -> None:
        """Raise a clear error if ``model`` lacks what the method needs (before any forward)."""

    def compute(self, p: Pass) -> torch.Tensor:
        """The normalised map ``(B, H, W)``."""
        raise NotImplementedError


class CAMMethod(Method):
    """Class activation map ``L = ReLU(sum_k w_k A^k)`` from a weight function.

    ``weights`` returns ``(B, K)`` channel weights or ``(B, K, h, w)`` pixel weights. With several
    layers, each layer's map is normalised at the input size and the maps are averaged
    (then normalised again).
    """

    needs_grad: ClassVar[bool] = True

    def grad_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return self.layers(layers, model) if self.needs_grad else []

    def record_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return [] if self.needs_grad else self.layers(layers, model)

    def gradient(self, p: Pass, layer: str) -> torch.Tensor:
        """``g`` at ``layer``, negated for ``counterfactual=True`` (Grad-CAM paper, sec. 3)."""
        g = p.grad(layer)
        return -g if self.options.get("counterfactual") else g

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """Channel ``(B, K)`` or pixel ``(B, K, h, w)`` weights."""
        raise NotImplementedError

    def raw_map(self, p: Pass, layer: str) -> torch.Tensor:
        """``sum_k w_k A^k`` at the layer's resolution, ``(B, h, w)`` (before ReLU)."""
        a = as_bhw(p.act(layer), layer)
        g = self.gradient(p, layer) if self.needs_grad else None
        w = self.weights(a, g, p, layer)
        if w.ndim == 2:
            return torch.einsum("bk,bkhw->bhw", w.to(a.dtype), a)
        return (w * a).sum(1)

    def positive_maps(self, p: Pass, size: tuple[int, int] | None) -> list[torch.Tensor]:
        """Per layer ``Up(ReLU(sum_k w_k A^k))`` ``(B, H, W)``, not normalised.

        The factor Guided Grad-CAM multiplies by (Selvaraju et al., sec. 3). ``size`` None keeps
        each layer's own size.
        """
        maps = [torch.relu(self.raw_map(p, layer)) for layer in self.layers(p.layers, p.model)]
        return [upsample(m, size) for m in maps] if size is not None else maps

    def compute(self, p: Pass) -> torch.Tensor:
        return fuse([normalize_maps(m) for m in self.positive_maps(p, p.size)])


__all__ = [
    "CAMMethod",
    "Method",
    "Pass",
    "ReshapeTransform",
    "as_bhw",
    "classifier_weight",
    "default_layers",
    "finish",
    "forward_backward",
    "fuse",
    "normalize_maps",
    "upsample",
]
