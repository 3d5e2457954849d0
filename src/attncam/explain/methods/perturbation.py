"""Perturbation methods: extra batched forward passes, no gradients (scorecam, sscam, iscam,
ablationcam, occlusion)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

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


def unit_masks(a: torch.Tensor, bi: torch.Tensor, ki: torch.Tensor, size: tuple) -> torch.Tensor:
    """Score-CAM's masks ``s(Up(A^k))`` ``(m, H, W)`` in [0, 1] for (image, channel) pairs.

    ``Up`` is bilinear upsampling to ``size`` and ``s`` the min-max normalisation of each map
    (Wang et al. 2020, eq. 5); the maps must not be constant.
    """
    m = upsample(a[bi, ki], size).flatten(1)
    lo = m.amin(1, keepdim=True)
    m = (m - lo) / (m.amax(1, keepdim=True) - lo).clamp_min(1e-12)
    return m.view(-1, *size)


#: ``path(h, i, gen)``: the ``i``-th of ``n`` masks derived from unit masks ``h`` ``(m, H, W)``.
MaskPath = Callable[[torch.Tensor, int, "torch.Generator | None"], torch.Tensor]


class _ScoreCAMFamily(CAMMethod):
    """Score-CAM averaged over ``n`` masks per channel: SS-CAM (noisy) and IS-CAM (integrated).

    ``variant="scorecam"`` (default) builds on this package's Score-CAM: masks from
    ``h_k = s(Up(A^k))``, each scored by the target class's softmax probability of the masked
    image, ``w_k = (1/n) sum_i softmax(f(x * path_i(h_k)))_c``; constant channels are skipped
    (weight 0, counted in the extras as ``"<name>.skipped"``). ``variant="torchcam"`` is
    torchcam 0.5's ``SSCAM``/``ISCAM``: maps normalised *before* upsampling, ``(A - min) /
    (max - min + 1e-8)``, each masked image scored by its target logit minus the clean image's,
    and ``w = softmax_k((1/n) sum_i score_i)`` (a softmax over channels, not classes); constant
    channels give an all-zero mask and are scored too; like torchcam it upsamples all ``K`` maps
    at once, ``(B, K, H, W)``, and draws SS-CAM's noise for that whole tensor per sample (the
    same draws as torchcam from the same global seed). Weights are kept in the extras as
    ``"<name>.weights"`` ``(B, K)``.
    """

    needs_grad: ClassVar[bool] = False
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"variant": ("scorecam", "torchcam")}

    def path(self, h: torch.Tensor, i: int, gen: torch.Generator | None) -> torch.Tensor:
        """The ``i``-th mask (0-based) from unit masks ``h`` ``(m, H, W)``."""
        raise NotImplementedError

    def input_scale(self, i: int) -> float:
        """Factor on the masked image of sample ``i`` (torchcam's IS-CAM scales the product)."""
        return 1.0

    def _generator(self) -> torch.Generator | None:
        seed = self.options["seed"]
        return None if seed is None else torch.Generator().manual_seed(int(seed))

    def _check_n(self) -> int:
        n = int(self.options["n"])
        if n < 1:
            raise ValueError(f"{self.key} needs n >= 1, got n={n}")
        return n

    def raw_map(self, p: Pass, layer: str) -> torch.Tensor:
        if p.reshape is not None and p.size is None:
            raise ValueError(f"{self.key} needs maps at the input size; keep upsample=True")
        a = as_bhw(p.act(layer), layer)
        with torch.no_grad():
            if self.options["variant"] == "torchcam":
                w = self._torchcam_weights(p, a)
            else:
                w = self._scorecam_weights(p, a)
        p.extras[f"{self.name}.weights"] = w
        return torch.einsum("bk,bkhw->bhw", w.to(a.dtype), a)

    def _scorecam_weights(self, p: Pass, a: torch.Tensor) -> torch.Tensor:
        """``(B, K)``: mean target-class probability of the ``n`` masked images per channel."""
        n, (b, k) = self._check_n(), a.shape[:2]
        size = tuple(p.images.shape[-2:])
        flat = a.flatten(2)
        keep = flat.amax(2) > flat.amin(2)  # (B, K)
        p.extras[f"{self.name}.skipped"] = (~keep).sum(1)
        p.extras[f"{self.name}.channels"] = k
        bi, ki = keep.nonzero(as_tuple=True)
        weights = a.new_zeros(b, k, dtype=torch.float32)
        gen, step = self._generator(), max(1, int(self.options["batch_size"]))
        for s in range(0, bi.numel(), step):
            bs, ks = bi[s : s + step], ki[s : s + step]
            h = unit_masks(a, bs, ks, size)
            total = torch.zeros(bs.numel(), device=a.device)
            for i in range(n):
                mask = self.path(h, i, gen).to(p.images.dtype)
                x = p.like_input(p.images[bs] * mask[:, None])
                probs = torch.softmax(p.model(x).float(), 1)
                total += probs.gather(1, p.targets[bs, None])[:, 0]
            weights[bs, ks] = total / n
        return weights

    def _torchcam_weights(self, p: Pass, a: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` as torchcam 0.5 computes them (see the class docstring)."""
        n, (b, k) = self._check_n(), a.shape[:2]
        an = a - a.amin((2, 3), keepdim=True)
        an = an / (an.amax((2, 3), keepdim=True) + 1e-8)
        up = F.interpolate(an, p.images.shape[-2:], mode="bilinear", align_corners=False)
        base = p.score(p.logits)
        bi = torch.arange(b, device=a.device).repeat_interleave(k)
        total = torch.zeros(b * k, device=a.device)
        gen, step = self._generator(), max(1, int(self.options["batch_size"]))
        for i in range(n):
            masks = self.path(up, i, gen).flatten(0, 1)  # (B*K, H, W), torchcam's draw order
            for s in range(0, b * k, step):
                x = masks[s : s + step, None] * p.images[bi[s : s + step]] * self.input_scale(i)
                logits = p.model(p.like_input(x))
                t = p.targets[bi[s : s + step], None]
                total[s : s + step] += logits.gather(1, t)[:, 0].float() - base[bi[s : s + step]]
        return torch.softmax((total / n).view(b, k), 1)


@register_method("sscam")
class SSCAM(_ScoreCAMFamily):
    """SS-CAM, Smoothed Score-CAM (Wang, Naidu et al. 2020, arXiv:2006.14255, sec. 3).

    Score-CAM with each channel's score averaged over ``n`` noisy masks ``h_k + delta_i``,
    ``delta_i ~ N(0, sigma^2)`` drawn per pixel (and per channel and image), shared by the three
    colour channels; the masks are not clipped. Defaults ``n = 35``, ``sigma = 2.0`` (in mask
    units, masks in [0, 1]) are torchcam's. With ``sigma = 0`` it equals ``scorecam``. Scoring
    and the ``torchcam`` variant: see :class:`_ScoreCAMFamily`.

    Options:
        n: noisy masks per channel (``n * K`` forwards per image).
        sigma: noise std in mask units.
        variant: ``scorecam`` or ``torchcam``.
        batch_size: masked images per forward.
        seed: seed of a private generator for the noise; None draws from torch's global RNG.
    """

    defaults = {
        "layer": None,
        "n": 35,
        "sigma": 2.0,
        "variant": "scorecam",
        "batch_size": 64,
        "seed": None,
    }

    def path(self, h: torch.Tensor, i: int, gen: torch.Generator | None) -> torch.Tensor:
        """``h + N(0, sigma^2)`` of ``h``'s shape."""
        sigma = float(self.options["sigma"])
        if sigma < 0:
            raise ValueError(f"sscam needs sigma >= 0, got {sigma}")
        noise = torch.normal(0.0, sigma, size=tuple(h.shape), generator=gen)
        return h + noise.to(h.device, h.dtype)


@register_method("iscam")
class ISCAM(_ScoreCAMFamily):
    """IS-CAM, Integrated Score-CAM (Naidu et al. 2020, arXiv:2010.03023, sec. 3).

    Score-CAM with each channel's score averaged over ``n`` growing masks, the cumulative path
    ``M_i = M_(i-1) + (i/n) h_k``, ``M_0 = 0``, i.e. ``M_i = c_i h_k`` with
    ``c_i = sum_(j=1..i) j/n = i (i + 1) / (2 n)`` for ``i = 1..n`` (``1/n, 3/n, 6/n, ...,
    (n + 1)/2``), the schedule of torchcam's code (its docstring writes the sum from
    ``j = 0`` to ``i - 1``, one step earlier). ``variant="scorecam"`` multiplies the image by the
    mask ``c_i h_k``; ``torchcam`` multiplies ``h_k * x`` by ``c_i``, the same product. With
    ``n = 1`` it equals ``scorecam``. Scoring: see :class:`_ScoreCAMFamily`.

    Options:
        n: integration steps (``n * K`` forwards per image); torchcam's default, 10.
        variant: ``scorecam`` or ``torchcam``.
        batch_size: masked images per forward.
    """

    defaults = {"layer": None, "n": 10, "variant": "scorecam", "batch_size": 64}

    def _generator(self) -> torch.Generator | None:
        return None

    @staticmethod
    def coefficient(i: int, n: int) -> float:
        """``c_(i+1) = (i + 1)(i + 2) / (2 n)`` for the 0-based step ``i``."""
        return (i + 1) * (i + 2) / (2 * n)

    def path(self, h: torch.Tensor, i: int, gen: torch.Generator | None) -> torch.Tensor:
        if self.options["variant"] == "torchcam":
            return h  # torchcam scales the masked image instead (input_scale)
        return h * self.coefficient(i, int(self.options["n"]))

    def input_scale(self, i: int) -> float:
        return self.coefficient(i, int(self.options["n"]))


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


__all__ = ["ISCAM", "SSCAM", "AblationCAM", "Occlusion", "ScoreCAM", "unit_masks"]
