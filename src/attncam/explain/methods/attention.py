"""Methods that read the learned attention maps: ``attention`` and ``attention_guided``.

The maps are read through the identity attention taps of the attention blocks (modules with
``is_attention_tap = True``, see :mod:`attncam.explain.model_api`; ``M_c`` ``(B, C, 1, 1)``,
``M_s`` ``(B, 1, h, w)``) with the same capture as CAM activations.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from attncam.explain import model_api
from attncam.explain.hooks import INPUT_SUFFIX
from attncam.explain.methods.base import Method, Pass, finish, fuse, normalize_maps, upsample
from attncam.explain.methods.gradient import GRAD_DEFAULTS, GradCAM
from attncam.explain.methods.registry import register_method
from attncam.explain.model_api import attention_modules, spatial_tap


def _require_spatial(model: nn.Module, names: list[str], method: str) -> list[str]:
    taps = [t for t in (spatial_tap(model, n) for n in names) if t is not None]
    if not taps:
        raise ValueError(
            f"method {method!r} needs learned spatial attention maps (CBAM: attention=cbam or "
            f"cbam_spatial), and model {model_api.describe(model)} has none"
        )
    return taps


def _require_attention(model: nn.Module, method: str) -> list[str]:
    names = attention_modules(model)
    if not names:
        raise ValueError(
            f"method {method!r} needs attention modules (CBAM: attention=cbam), and model "
            f"{model_api.describe(model)} has none"
        )
    return names


@register_method("attention")
class Attention(Method):
    """The learned spatial attention ``M_s`` of the last CBAM module, alone (class-agnostic).

    Woo et al., ECCV 2018, eq. 3. Option ``module`` picks another attention module by name.
    """

    defaults = {"module": None}

    def _tap(self, model: nn.Module) -> str:
        names = (
            [self.options["module"]]
            if self.options["module"]
            else _require_attention(model, self.key)
        )
        return _require_spatial(model, names, self.key)[-1]

    def check(self, model: nn.Module, layers: list[str]) -> None:
        self._tap(model)

    def record_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return [self._tap(model)]

    def compute(self, p: Pass) -> torch.Tensor:
        return finish(p.act(self._tap(p.model))[:, 0], p.size)


@register_method("attention_guided")
class AttentionGuided(Method):
    """Attention-map-guided Grad-CAM (An & Joe 2022), reconstructed in three variants.

    docs/METHODS.md, "Attention-map-guided Grad-CAM".

    * ``cbam_output`` (default): Grad-CAM with ``A = F''``, the output of the last CBAM module,
      so ``L = ReLU(M_s * sum_k alpha_k M_c,k F_k)``: channel attention re-weights channels and
      spatial attention gates locations.
    * ``spatial_product``: Grad-CAM on the features entering the last CBAM module, times its
      ``M_s``.
    * ``multi_stage``: Grad-CAM at the Explainer's layer times the ``combine`` (``product`` or
      ``mean``) of the upsampled ``M_s`` of the last CBAM of every stage.

    Grad-CAM weights are Selvaraju et al. eq. 1-2 in every variant.
    """

    defaults = {**GRAD_DEFAULTS, "variant": "cbam_output", "combine": "product"}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "variant": ("cbam_output", "spatial_product", "multi_stage"),
        "combine": ("product", "mean"),
    }
    uses_gradients = True

    def _gradcam(self) -> GradCAM:
        return GradCAM(counterfactual=self.options["counterfactual"])

    def _stage_taps(self, model: nn.Module) -> list[str]:
        names = model_api.stage_attention_names(model) or _require_attention(model, self.key)
        return _require_spatial(model, list(names), self.key)

    def check(self, model: nn.Module, layers: list[str]) -> None:
        names = _require_attention(model, self.key)
        variant = self.options["variant"]
        if variant == "spatial_product":
            _require_spatial(model, names[-1:], f"{self.key}[spatial_product]")
        elif variant == "multi_stage":
            self._stage_taps(model)

    def _layer(self, model: nn.Module, layers: list[str]) -> list[str]:
        last = attention_modules(model)[-1] if attention_modules(model) else None
        variant = self.options["variant"]
        if variant == "cbam_output":
            return [last] if last else []
        if variant == "spatial_product":
            return [last + INPUT_SUFFIX] if last else []
        own = self.options["layer"]
        return ([own] if isinstance(own, str) else list(own)) if own is not None else layers

    def grad_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return self._layer(model, layers)

    def record_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        variant = self.options["variant"]
        if variant == "spatial_product":
            return _require_spatial(model, attention_modules(model)[-1:], self.key)
        if variant == "multi_stage":
            return self._stage_taps(model)
        return []

    def compute(self, p: Pass) -> torch.Tensor:
        gc = self._gradcam()
        layers = self._layer(p.model, p.layers)
        variant = self.options["variant"]
        raw = [torch.relu(gc.raw_map(p, layer)) for layer in layers]
        if variant == "cbam_output":
            return fuse([finish(r, p.size) for r in raw])
        if variant == "spatial_product":
            ms = p.act(self.record_sites(p.model, p.layers)[0])[:, 0]
            r = raw[0]
            if ms.shape[-2:] != r.shape[-2:]:
                ms = upsample(ms, tuple(r.shape[-2:]))
            return finish(r * ms, p.size)
        size = p.size or tuple(raw[0].shape[-2:])
        cam = fuse([finish(r, size) for r in raw])
        maps = torch.stack([upsample(p.act(t)[:, 0], size) for t in self._stage_taps(p.model)])
        gate = maps.prod(0) if self.options["combine"] == "product" else maps.mean(0)
        return normalize_maps(cam * gate)


__all__ = ["Attention", "AttentionGuided", "attention_modules", "spatial_tap"]
