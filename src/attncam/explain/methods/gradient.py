"""Gradient CAMs: one weight function each, all fed by the shared forward/backward pass.

Notation (docs/METHODS.md, "Notation"): ``A`` ``(B, K, h, w)`` the target layer's output, ``g = d y^c / d A`` the
gradient of the target logit, ``Z = h * w``. Every method here takes ``counterfactual=True``
(Grad-CAM paper, sec. 3 "Counterfactual explanations"): ``g`` is negated, showing what argues
against the class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from attncam.explain import model_api
from attncam.explain.methods.base import (
    CAMMethod,
    Pass,
    as_bhw,
    classifier_weight,
    forward_backward,
    upsample,
)
from attncam.explain.methods.registry import register_method

GRAD_DEFAULTS: dict[str, Any] = {"layer": None, "counterfactual": False}


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (no inf, no NaN)."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), 0.0)


@register_method("gradcam")
class GradCAM(CAMMethod):
    """Grad-CAM: ``w_k = (1/Z) sum_ij g^k_ij`` (Selvaraju et al., ICCV 2017, eq. 1-2)."""

    defaults = dict(GRAD_DEFAULTS)
    uses_gradients = True

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``(B, K)`` mean gradient per channel."""
        assert g is not None
        return g.mean((2, 3))


def gradcampp_weights(
    a: torch.Tensor,
    g1: torch.Tensor,
    g2: torch.Tensor,
    g3: torch.Tensor,
    eps: float = 0.0,
) -> torch.Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al., WACV 2018, eq. 19 with ``Y = exp(y)``).

    ``alpha^k_ij = g2_ij / (2 g2_ij + sum_ab A^k_ab g3_ij)``, 0 where the denominator is 0;
    ``w_k = sum_ij alpha^k_ij ReLU(g1_ij)``. Only pixels with ``g1 > 0`` contribute, so
    ``alpha`` is evaluated only there.

    Args:
        a: ``(B, K, h, w)`` activations.
        g1: ``(B, K, h, w)`` first derivative (or its average, Smooth Grad-CAM++).
        g2: ``(B, K, h, w)`` its square (or the average of squares).
        g3: ``(B, K, h, w)`` its cube (or the average of cubes).
        eps: added to the denominator; pytorch-grad-cam uses 1e-6 (0 here: the formula).

    Returns:
        ``(B, K)``.
    """
    sum_a = a.sum((2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3 + eps
    alpha = torch.where(g1 > 0, _safe_div(g2, denom), 0.0)
    return (alpha * torch.relu(g1)).sum((2, 3))


@register_method("gradcampp")
class GradCAMPP(CAMMethod):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19; closed form for ``Y = exp(y)``).

    Options:
        variant: ``formula`` (default) or ``torchcam020``, torchcam's behaviour: its alpha
            division is applied to a boolean-mask copy and never takes effect, so its weights are
            ``sum_ij g^2 ReLU(g) = sum_ij ReLU(g)^3``.
        eps: added to alpha's denominator (pytorch-grad-cam: 1e-6); 0 is the formula.
    """

    defaults = {**GRAD_DEFAULTS, "variant": "formula", "eps": 0.0}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"variant": ("formula", "torchcam020")}
    uses_gradients = True

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``(B, K)``."""
        assert g is not None
        if self.options["variant"] == "torchcam020":
            return torch.relu(g).pow(3).sum((2, 3))
        g2 = g * g
        return gradcampp_weights(a, g, g2, g2 * g, float(self.options["eps"]))


@register_method("smoothgradcampp")
class SmoothGradCAMPP(CAMMethod):
    """Smooth Grad-CAM++ (Omeiza et al. 2019, eq. 8-10).

    Grad-CAM++ with ``g``, ``g^2`` and ``g^3`` each averaged over ``n`` noisy copies
    ``x + N(0, sigma^2)`` of the pixel input (the activations ``A`` are the clean image's), all
    copies batched. With ``sigma = 0`` it equals ``gradcampp``.

    Options:
        n: number of noisy samples (default 8; ``torchcam020``: 4).
        sigma: noise std in pixel units, images in [0, 1] (default 0.15; ``torchcam020``: 0.3
            in *normalised* units, i.e. ``0.3 * model.input_std`` per channel in pixels).
        variant: ``formula`` or ``torchcam020`` (torchcam's: ``alpha = mean g^2 / (2 mean g^2 +
            sum_ab A_ab mean g^3_ab + 1e-8)`` with the clean ``A``, weights
            ``sum alpha ReLU(g_last)`` with the last sample's gradient, and the map
            ``sum_k w_k A_last^k`` with the last sample's activations).
        batch_size: images per forward pass.
        seed: seed of a private generator for the noise; None draws from torch's global RNG.
    """

    defaults = {
        **GRAD_DEFAULTS,
        "n": None,
        "sigma": None,
        "variant": "formula",
        "batch_size": 32,
        "seed": None,
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"variant": ("formula", "torchcam020")}
    uses_gradients = True

    def grad_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return []

    def record_sites(self, model: nn.Module, layers: list[str]) -> list[str]:
        return self.layers(layers, model)

    def _n_sigma(self) -> tuple[int, float]:
        torchcam = self.options["variant"] == "torchcam020"
        n = self.options["n"] if self.options["n"] is not None else (4 if torchcam else 8)
        s = self.options["sigma"]
        s = s if s is not None else (0.3 if torchcam else 0.15)
        if int(n) < 1 or float(s) < 0:
            raise ValueError(f"smoothgradcampp needs n >= 1 and sigma >= 0, got n={n}, sigma={s}")
        return int(n), float(s)

    def positive_maps(self, p: Pass, size: tuple[int, int] | None) -> list[torch.Tensor]:
        n, sigma = self._n_sigma()
        layers = self.layers(p.layers, p.model)
        torchcam = self.options["variant"] == "torchcam020"
        scale = torch.full((1, p.images.shape[1], 1, 1), sigma, device=p.images.device)
        if torchcam:
            std = model_api.input_std(p.model)
            if std is not None:
                scale = scale * torch.tensor(std, device=scale.device).view(1, -1, 1, 1)
        gen = None
        if self.options["seed"] is not None:
            gen = torch.Generator(device="cpu").manual_seed(int(self.options["seed"]))
        b = p.images.shape[0]
        sums = {
            layer: [torch.zeros_like(as_bhw(p.act(layer), layer)) for _ in range(3)]
            for layer in layers
        }
        last: dict[str, torch.Tensor] = {}
        last_act: dict[str, torch.Tensor] = {}
        per_chunk = max(1, int(self.options["batch_size"]) // b)
        done = 0
        while done < n:
            m = min(per_chunk, n - done)
            noise = torch.cat([torch.randn(p.images.shape, generator=gen) for _ in range(m)]).to(
                p.images.device
            )
            x = p.like_input(p.images.repeat(m, 1, 1, 1) + noise * scale)
            _, _, noisy, grads = forward_backward(
                p.model, x, layers, [], p.targets.repeat(m), p.reshape, set(p.layers) | set(layers)
            )
            for layer in layers:
                g = grads[layer]
                g = -g if self.options["counterfactual"] else g
                g = g.view(m, b, *g.shape[1:])
                s1, s2, s3 = sums[layer]
                s1 += g.sum(0)
                g2 = g * g
                s2 += g2.sum(0)
                s3 += (g2 * g).sum(0)
                last[layer] = g[-1]
                last_act[layer] = noisy[layer].view(m, b, *g.shape[2:])[-1]
            done += m
        maps = []
        for layer in layers:
            a = p.act(layer)
            m1, m2, m3 = (s / n for s in sums[layer])
            if torchcam:
                den = 2 * m2 + (m3 * a).sum((2, 3), keepdim=True) + 1e-8
                w = (m2 / den * torch.relu(last[layer])).sum((2, 3))
                # torchcam's hook keeps the last noisy forward's activations for the final sum.
                a = last_act[layer]
            else:
                w = gradcampp_weights(a, m1, m2, m3)
            m = torch.relu(torch.einsum("bk,bkhw->bhw", w, a))
            maps.append(upsample(m, size) if size is not None else m)
        return maps


@register_method("xgradcam")
class XGradCAM(CAMMethod):
    """XGrad-CAM: ``w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij`` (Fu et al., BMVC 2020, eq. 11).

    A channel whose activations sum to 0 gets weight 0.
    """

    defaults = dict(GRAD_DEFAULTS)
    uses_gradients = True

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``(B, K)``."""
        assert g is not None
        return _safe_div((a * g).sum((2, 3)), a.sum((2, 3)))


@register_method("layercam")
class LayerCAM(CAMMethod):
    """LayerCAM: pixel weights ``ReLU(g^k_ij)`` (Jiang et al., IEEE TIP 2021, eq. 5-6)."""

    defaults = dict(GRAD_DEFAULTS)
    uses_gradients = True

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``(B, K, h, w)``."""
        assert g is not None
        return torch.relu(g)


@register_method("hirescam")
class HiResCAM(CAMMethod):
    """HiResCAM: pixel weights ``g^k_ij`` (Draelos & Carin 2020, eq. 5)."""

    defaults = dict(GRAD_DEFAULTS)
    uses_gradients = True

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``(B, K, h, w)``."""
        assert g is not None
        return g


@register_method("scacam")
class SCACAM(CAMMethod):
    """SCA-CAM: pixel weights ``alpha_k * g^k_ij`` (Si et al. 2021, sec. 3.3, eq. 21-22).

    Spatial attention is the pixel-level gradient matrix ``g^k`` (eq. 19); channel attention
    ``alpha_k`` is the channel's mean gradient ``(1/Z) sum_ij g^k_ij`` (``channel_weight=grad``,
    eq. 22) or the classifier weight ``W_fc[c, k]`` (``channel_weight=fc``, eq. 21; needs the
    layer that feeds a GAP -> FC head).
    """

    defaults = {**GRAD_DEFAULTS, "channel_weight": "grad", "classifier": None}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"channel_weight": ("grad", "fc")}
    uses_gradients = True

    def check(self, model: nn.Module, layers: list[str]) -> None:
        if self.options["channel_weight"] == "fc" and model_api.gap_fc(model) is False:
            raise ValueError(
                "scacam channel_weight=fc needs a GAP -> FC head (SCA-CAM eq. 21); this model "
                "has gap_fc=False; use channel_weight=grad (eq. 22)"
            )

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``(B, K, h, w)``."""
        assert g is not None
        if self.options["channel_weight"] == "fc":
            w = classifier_weight(p.model, self.options["classifier"])
            if w.shape[1] != a.shape[1]:
                raise ValueError(
                    f"scacam channel_weight=fc: classifier has {w.shape[1]} inputs but layer "
                    f"{layer!r} has {a.shape[1]} channels"
                )
            alpha = w[p.targets].to(g.dtype)
        else:
            alpha = g.mean((2, 3))
        return alpha[..., None, None] * g
