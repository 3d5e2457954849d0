"""Activation-only CAMs: no gradient, one forward pass (featuremap, cam, eigencam)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from attncam.explain import model_api
from attncam.explain.methods.base import CAMMethod, Pass, as_bhw, classifier_weight
from attncam.explain.methods.registry import register_method


@register_method("featuremap")
class FeatureMap(CAMMethod):
    """Feature-map visualisation: ``L = sum_k A^k``, every weight 1 (class-agnostic).

    Si et al. 2021 (SCA-CAM), sec. 2.1, eq. 1 with all class activation weights equal to 1.
    """

    needs_grad: ClassVar[bool] = False
    defaults = {"layer": None}

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """Ones ``(B, K)``."""
        return a.new_ones(a.shape[:2])


@register_method("cam")
class CAM(CAMMethod):
    """Class Activation Mapping: ``w_k = W_fc[c, k]`` (Zhou et al., CVPR 2016, eq. 2).

    Needs a GAP -> FC head. On an ``AttentionNet`` it uses ``model.head_input_layer`` and the
    model's classifier; on any other model pass ``classifier='fc'`` (the final ``nn.Linear``) and
    the layer whose output is pooled (the Explainer's ``layer`` or this method's ``layer``).
    """

    needs_grad: ClassVar[bool] = False
    defaults = {"layer": None, "classifier": None}

    def layers(self, p_layers: list[str], model: nn.Module) -> list[str]:
        own = self.options["layer"]
        if own is not None:
            return [own] if isinstance(own, str) else list(own)
        head_input = model_api.head_input_layer(model)
        return [head_input] if head_input is not None else p_layers

    def check(self, model: nn.Module, layers: list[str]) -> None:
        gap_fc = model_api.gap_fc(model)
        if gap_fc is False:
            name = model_api.model_name(model)
            raise ValueError(
                f"method 'cam' needs a GAP -> FC head, and {name!r} has none (gap_fc=False); "
                "use gradcam (its generalisation) or a model with a GAP -> FC head"
            )
        if gap_fc is None and self.options["classifier"] is None:
            raise ValueError(
                f"method 'cam' needs a GAP -> FC head: {type(model).__name__} does not say whether "
                "it has one; pass ('cam', {'classifier': 'fc'}) naming its final nn.Linear"
            )

    def weights(self, a: torch.Tensor, g: torch.Tensor | None, p: Pass, layer: str) -> torch.Tensor:
        """``W_fc[c]`` ``(B, K)``."""
        w = classifier_weight(p.model, self.options["classifier"])
        if w.shape[1] != a.shape[1]:
            raise ValueError(
                f"method 'cam': classifier has {w.shape[1]} inputs but layer {layer!r} has "
                f"{a.shape[1]} channels; CAM needs the layer that feeds global average pooling"
            )
        return w[p.targets].to(a.dtype)


@register_method("eigencam")
class EigenCAM(CAMMethod):
    """Eigen-CAM: projection of ``A`` on its first principal component.

    Bany Muhammad & Yeasin, IJCNN 2020, eq. 4-5: the pixels ``(h*w, K)`` of each image, centred,
    are projected on the first right singular vector. The sign of a singular vector is arbitrary;
    it is chosen so that the projection correlates positively with ``sum_k A^k``.
    """

    needs_grad: ClassVar[bool] = False
    defaults = {"layer": None}

    def raw_map(self, p: Pass, layer: str) -> torch.Tensor:
        a = as_bhw(p.act(layer), layer)
        b, k, h, w = a.shape
        x = a.flatten(2).transpose(1, 2).float()  # (B, hw, K)
        x = x - x.mean(1, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        proj = x @ vh[:, 0, :, None]  # (B, hw, 1)
        proj = proj[..., 0]
        total = a.sum(1).flatten(1).float()
        corr = (proj * (total - total.mean(1, keepdim=True))).sum(1, keepdim=True)
        sign = torch.where(corr < 0, -1.0, 1.0)
        return (proj * sign).view(b, h, w).to(a.dtype)
