"""Guided backpropagation and Guided Grad-CAM.

Guided backprop changes how every ReLU passes gradients back. Instead of hooks on ReLU modules
(which miss functional ``F.relu`` calls, as in torchvision's GoogLeNet, and break on in-place
ReLUs), :func:`guided_relus` is a ``TorchFunctionMode``: while it is active every ReLU-like call
(``F.relu``, ``torch.relu(_)``, ``Tensor.relu(_)``, ``F.relu6``, ``F.hardtanh(min_val=0)``) is
computed out of place by :class:`_GuidedClamp`; leaving the context restores normal behaviour,
and the model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from attncam.explain.methods.base import CAMMethod, Method, Pass, normalize_maps
from attncam.explain.methods.registry import build_method, register_method


class _GuidedClamp(torch.autograd.Function):
    """``clamp(x, lo, hi)`` whose backward passes only positive gradients through the open
    interval (Springenberg et al., ICLR 2015 workshop, eq. for "guided backpropagation")."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(min=lo, max=hi)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        keep = x > ctx.lo
        if ctx.hi is not None:
            keep &= x < ctx.hi
        return grad.clamp(min=0) * keep, None, None


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_}


class _GuidedMode(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RELUS:
            return _GuidedClamp.apply(args[0], 0.0, None)
        if func is F.relu6:
            return _GuidedClamp.apply(args[0], 0.0, 6.0)
        if func is F.hardtanh:
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            if lo == 0:
                return _GuidedClamp.apply(args[0], 0.0, float(hi))
        return func(*args, **kwargs)


@contextmanager
def guided_relus() -> Iterator[None]:
    """Within the context, every ReLU backpropagates guided gradients (see module docstring)."""
    with _GuidedMode():
        yield


def guided_gradient(p: Pass) -> torch.Tensor:
    """Guided-backprop input gradient ``(B, 3, H, W)`` of the target logits (cached per call)."""
    cached = p.extras.get("guided_backprop.gradient")
    if cached is not None:
        return cached
    x = p.images.detach().clone().requires_grad_()
    with torch.enable_grad(), guided_relus():
        logits = p.model(x)
        score = logits.gather(1, p.targets[:, None]).sum()
    (gx,) = torch.autograd.grad(score, x)
    p.extras["guided_backprop.gradient"] = gx
    return gx


def _saliency(gx: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` gradient -> ``(B, H, W)`` map: max over channels of ``|grad|``."""
    return normalize_maps(gx.abs().amax(1))


@register_method("guided_backprop")
class GuidedBackprop(Method):
    """Guided backpropagation (Springenberg et al., ICLR 2015 workshop, sec. 3.4, fig. 1).

    The map is ``max_c |d y^c / d x_c|`` normalised; the full ``(B, 3, H, W)`` gradient is kept
    in the explanation's extras as ``"guided_backprop.gradient"``.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def compute(self, p: Pass) -> torch.Tensor:
        return _saliency(guided_gradient(p))


@register_method("guided_gradcam")
class GuidedGradCAM(Method):
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, sec. 3, "Guided Grad-CAM").

    ``variant=paper`` (default): the guided-backprop input gradient times the class activation
    map itself, ``Up(ReLU(sum_k w_k A^k))`` upsampled bilinearly to the input size, as in the paper
    and captum's ``GuidedGradCam`` (there with ``interpolate_mode="bilinear"``). With several CAM
    layers each layer's map is divided by its maximum (a scale, no shift) and the results averaged.
    ``variant=minmax``: attncam's earlier behaviour, the min-max normalised map (each image's
    minimum subtracted) as the second factor, kept for comparison with earlier results.

    Option ``cam`` names the method giving the second factor (default ``gradcam``, with
    ``cam_options``); ``variant=paper`` needs a class activation method (one with a raw map:
    ``gradcam``, ``gradcampp``, ``layercam``, ...), ``variant=minmax`` takes any method returning a
    map. The ``(B, 3, H, W)`` product is kept in the extras as ``"<name>.gradient"``; the map is
    ``max_c |product|`` normalised.
    """

    defaults = {"cam": "gradcam", "cam_options": None, "variant": "paper"}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"variant": ("paper", "minmax")}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["cam"] in ("guided_backprop", "guided_gradcam"):
            raise ValueError(
                f"guided_gradcam cam={self.options['cam']!r}: choose a class activation method"
            )
        self.inner = build_method(self.options["cam"], self.options["cam_options"] or {})
        if self.options["variant"] == "paper" and not isinstance(self.inner, CAMMethod):
            raise ValueError(
                f"guided_gradcam variant=paper multiplies by the raw class activation map, and "
                f"cam={self.options['cam']!r} has none; choose a class activation method (e.g. "
                "gradcam, gradcampp, layercam) or variant=minmax"
            )
        self.uses_gradients = True

    def check(self, model: nn.Module, layers: list[str]) -> None:
        self.inner.check(model, layers)

    def grad_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return self.inner.grad_sites(model, layers)

    def record_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return self.inner.record_sites(model, layers)

    def _paper_factor(self, p: Pass) -> torch.Tensor:
        """``Up(ReLU(raw map))`` ``(B, H, W)`` at the input size, not normalised."""
        assert isinstance(self.inner, CAMMethod)
        maps = self.inner.positive_maps(p, tuple(p.images.shape[-2:]))
        if len(maps) == 1:
            return maps[0]
        scaled = []
        for m in maps:
            top = m.amax((1, 2), keepdim=True)
            # Guard: an all-zero layer map stays zero rather than 0/0.
            scaled.append(torch.where(top > 0, m / torch.where(top > 0, top, 1.0), 0.0))
        return torch.stack(scaled).mean(0)

    def _minmax_factor(self, p: Pass) -> torch.Tensor:
        """The inner method's normalised map ``(B, H, W)`` at the input size."""
        cam = p.cache.get(self.inner.name)
        if cam is None or cam.shape[-2:] != p.images.shape[-2:]:
            size = p.size
            p.size = tuple(p.images.shape[-2:])
            try:
                cam = self.inner.compute(p)
            finally:
                p.size = size
        return cam

    def compute(self, p: Pass) -> torch.Tensor:
        paper = self.options["variant"] == "paper"
        cam = self._paper_factor(p) if paper else self._minmax_factor(p)
        gx = guided_gradient(p)
        p.extras[f"{self.name}.gradient"] = gx * cam[:, None]
        return normalize_maps(gx.abs().amax(1) * cam)


__all__ = ["GuidedBackprop", "GuidedGradCAM", "guided_gradient", "guided_relus"]
