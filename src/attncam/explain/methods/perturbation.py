"""Perturbation methods: extra batched forward passes, no gradients (scorecam, ablationcam,
occlusion)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from attncam.explain.hooks import intervene
from attncam.explain.methods.base import CAMMethod, Method, Pass, as_bhw, finish, upsample
from attncam.explain.methods.registry import register_method

log = logging.getLogger(__name__)


@register_method("scorecam")
class ScoreCAM(CAMMethod):
    """Score-CAM, exact (Wang et al., CVPRW 2020, eq. 5-8 and Algorithm 1).

    ``w_k = softmax(f(x * s(Up(A^k))))_c`` with ``s`` the min-max normalisation of the upsampled
    map and the softmax over classes. A channel whose upsampled map is constant has no defined
    mask and is skipped (weight 0), as in the authors' code; the number skipped per image is
    logged and stored in the explanation's extras as ``"<name>.skipped"`` ``(B,)``. The masked
    images of all kept (image, channel) pairs are forwarded in batches of ``batch_size``.
    """

    needs_grad: ClassVar[bool] = False
    defaults = {"layer": None, "batch_size": 64}

    def raw_map(self, p: Pass, layer: str) -> torch.Tensor:
        if p.reshape is not None and p.size is None:
            raise ValueError("scorecam needs maps at the input size; keep upsample=True")
        a = as_bhw(p.act(layer), layer)
        b, k = a.shape[:2]
        size = tuple(p.images.shape[-2:])
        # A map is constant after bilinear upsampling iff it is constant before.
        flat = a.flatten(2)
        keep = flat.amax(2) > flat.amin(2)  # (B, K)
        skipped = (~keep).sum(1)
        p.extras[f"{self.name}.skipped"] = skipped
        p.extras[f"{self.name}.channels"] = k
        log.info("scorecam: skipped %s of %d constant channels per image", skipped.tolist(), k)
        bi, ki = keep.nonzero(as_tuple=True)
        weights = a.new_zeros(b, k)
        step = max(1, int(self.options["batch_size"]))
        with torch.no_grad():
            for s in range(0, bi.numel(), step):
                bs, ks = bi[s : s + step], ki[s : s + step]
                m = upsample(a[bs, ks], size).flatten(1)  # (m, H*W)
                lo = m.amin(1, keepdim=True)
                m = (m - lo) / (m.amax(1, keepdim=True) - lo).clamp_min(1e-12)
                x = p.like_input(p.images[bs] * m.view(-1, 1, *size))
                probs = torch.softmax(p.model(x).float(), 1)
                weights[bs, ks] = probs.gather(1, p.targets[bs, None])[:, 0].to(a.dtype)
        return torch.einsum("bk,bkhw->bhw", weights, a)


@register_method("ablationcam")
class AblationCAM(CAMMethod):
    """Ablation-CAM: ``w_k = (y^c - y^c_{A^k=0}) / y^c`` (Desai & Ramaswamy, WACV 2020, eq. 3).

    For each image the network is run on a batch in which the layer's output is replaced by
    copies of ``A`` with one channel zeroed (``hooks.intervene``), ``batch_size`` channels at a
    time. ``y^c = 0`` gives weight 0.
    """

    needs_grad: ClassVar[bool] = False
    defaults = {"layer": None, "batch_size": 256}

    def raw_map(self, p: Pass, layer: str) -> torch.Tensor:
        if p.reshape is not None:
            raise ValueError(
                "ablationcam cannot ablate through reshape_transform; pick a 4-D layer"
            )
        a = as_bhw(p.act(layer), layer)
        b, k = a.shape[:2]
        y = p.score(p.logits)
        weights = a.new_zeros(b, k)
        step = max(1, int(self.options["batch_size"]))
        with torch.no_grad():
            for i in range(b):
                for s in range(0, k, step):
                    chans = torch.arange(s, min(s + step, k), device=a.device)

                    def ablate(
                        out: torch.Tensor, i: int = i, chans: torch.Tensor = chans
                    ) -> torch.Tensor:
                        rep = a[i : i + 1].expand(chans.numel(), -1, -1, -1).clone()
                        rep[torch.arange(chans.numel(), device=a.device), chans] = 0
                        return rep.to(out.dtype)

                    with intervene(p.model, layer, ablate):
                        out = p.model(p.images[i : i + 1])
                    yk = out[:, p.targets[i]]
                    weights[i, chans] = (y[i] - yk).to(a.dtype)
        return torch.einsum("bk,bkhw->bhw", _div_nonzero(weights, y), a)


def _div_nonzero(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.to(w.dtype)[:, None]
    nz = y != 0
    return torch.where(nz, w / torch.where(nz, y, torch.ones_like(y)), 0.0)


@register_method("occlusion")
class Occlusion(Method):
    """Occlusion sensitivity (Zeiler & Fergus, ECCV 2014, sec. 4.2).

    A ``window`` x ``window`` patch of value ``fill`` slides with ``stride`` over the pixel
    image; each pixel's map value is the mean drop of the target score (``score=prob``: softmax
    probability, as in the paper; ``logit``) over the windows that cover it. All occluded images
    are forwarded in batches of ``batch_size``.
    """

    defaults = {"window": 32, "stride": 16, "fill": 0.5, "score": "prob", "batch_size": 64}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"score": ("prob", "logit")}

    @staticmethod
    def _starts(n: int, window: int, stride: int) -> list[int]:
        starts = list(range(0, n - window + 1, stride))
        if starts[-1] != n - window:
            starts.append(n - window)
        return starts

    def _score(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.options["score"] == "prob":
            logits = torch.softmax(logits.float(), 1)
        return logits.gather(1, t[:, None])[:, 0]

    def compute(self, p: Pass) -> torch.Tensor:
        b, _, h, w = p.images.shape
        win_h, win_w = min(int(self.options["window"]), h), min(int(self.options["window"]), w)
        stride = max(1, int(self.options["stride"]))
        masks = []
        for top in self._starts(h, win_h, stride):
            for left in self._starts(w, win_w, stride):
                m = p.images.new_zeros(h, w)
                m[top : top + win_h, left : left + win_w] = 1
                masks.append(m)
        mask = torch.stack(masks)  # (P, H, W)
        n_pos = mask.shape[0]
        base = self._score(p.logits, p.targets)
        drops = p.images.new_zeros(b, n_pos)
        bi = torch.arange(b, device=p.images.device).repeat_interleave(n_pos)
        pi = torch.arange(n_pos, device=p.images.device).repeat(b)
        fill = float(self.options["fill"])
        step = max(1, int(self.options["batch_size"]))
        with torch.no_grad():
            for s in range(0, bi.numel(), step):
                bs, ps = bi[s : s + step], pi[s : s + step]
                m = mask[ps][:, None]
                x = p.like_input(p.images[bs] * (1 - m) + fill * m)
                drops[bs, ps] = (base[bs] - self._score(p.model(x), p.targets[bs])).to(drops.dtype)
        total = torch.einsum("bp,phw->bhw", drops, mask)
        return finish(total / mask.sum(0).clamp_min(1), None)


__all__ = ["AblationCAM", "Occlusion", "ScoreCAM"]
