"""The perturbation engine: every extra model call a metric needs, batched.

``Perturber`` builds all perturbed images of a batch (explanations ``E = L * I``, Percentage-in
keeps, deletion/insertion steps, ROAD imputations, occlusions), runs them through the model in
chunks of ``chunk_size`` under ``torch.inference_mode()`` and returns target scores. The metrics
themselves (``confidence``, ``curves``, ``localization``) only see those scores and the maps.

Forward passes per image (``M`` methods, ``P`` Percentage-in levels, ``S`` curve steps):
    - ``base_scores``: 1 per distinct precision among float32 (the predicted class) and those of
      the two metric families (``Y``, shared by every method and metric): 1 in float32, 2 with
      ``precision=bf16`` or with ``auto`` on a CPU with bf16 units;
    - ``confidence_table``: ``M * (1 + P)`` (``O`` and Percentage-in), so the paper's table with
      5 methods and 5 levels costs ``1 + 5 * 6``;
    - ``deletion_insertion``: ``1`` (the insertion baseline: blurred copy, mean colour or noise)
      ``+ M * 2 * (S - 1)`` plus one forward per call for the all-deleted image, which is the
      same constant image for every input.

Every score is the protocol's ``score`` of the target class: the softmax probability, the logit,
or with ``score="calibrated"`` the probability of ``softmax(z / T)`` (temperature scaling, Guo et
al. 2017; ``T`` fitted by ``attncam.metrics.calibration``), for ``Y``, ``O``, Percentage-in,
deletion/insertion, ROAD and occlusion alike.

The model maps pixel-space images ``(B, 3, H, W)`` in [0, 1] to logits ``(B, C)`` and normalises
internally. With ``mask_space="normalized"`` masking acts on ``(I - mean) / std`` (as torchcam
does); the engine maps the result back to pixel space before calling the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attncam.inference import autocast, inference_copy, resolve_precision
from attncam.metrics import functional as MF
from attncam.metrics.protocol import (
    MASK_SPACES,
    PERCENTAGE_VARIANTS,
    TARGETS,
    EvalProtocol,
    check_choice,
)
from attncam.runtime import IMAGENET_MEAN, IMAGENET_STD, eval_mode

log = logging.getLogger(__name__)

#: Old name of ``EvalProtocol`` (it shadowed ``typing.Protocol``), kept so existing imports work.
Protocol = EvalProtocol


@dataclass
class BaseScores:
    """Scores on the unperturbed images.

    Attributes:
        scores: ``Y``, shape ``(B,)``.
        targets: Target classes, shape ``(B,)`` long.
        keep: ``(B,)`` bool; False where the protocol excludes the image (``only_correct``).
        predicted: Top-1 classes, shape ``(B,)``, of the float32 logits.
        logits: Model outputs, shape ``(B, C)``, in float32.
        score_logits: The outputs ``scores`` come from, in the precision of the metrics'
            forwards (``Perturber.precision``; the same as ``logits`` in float32). Scores of
            other targets are ``Perturber.scores(score_logits, targets)``.
        curve_logits: The outputs the deletion/insertion curves' ``Y`` comes from, in
            ``Perturber.curve_precision`` (``score_logits`` when the two precisions agree).
    """

    scores: Tensor
    targets: Tensor
    keep: Tensor
    predicted: Tensor
    logits: Tensor
    score_logits: Tensor | None = None
    curve_logits: Tensor | None = None

    def __post_init__(self) -> None:
        if self.score_logits is None:
            self.score_logits = self.logits
        if self.curve_logits is None:
            self.curve_logits = self.score_logits


@dataclass
class ConfidenceTable:
    """Scores for Average Drop, Increase in Confidence, Win % and Percentage-in, per method.

    Attributes:
        base: Scores on the full images.
        masked: ``O`` per method, ``(B,)`` each (NaN where the method's map was not finite).
        percentage_in: Per method, ``(B, P)`` scores on the top-p% images.
        percentages: The levels ``p``.
        kept_fraction: Per method, ``(B, P)``: the fraction of pixels ``B_p`` actually keeps
            (``L >=`` the threshold, ties included), in [0, 1]; NaN where the map was not finite.
    """

    base: BaseScores
    masked: dict[str, Tensor]
    percentage_in: dict[str, Tensor]
    percentages: tuple[float, ...]
    kept_fraction: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Curves:
    """Deletion and insertion curves (Petsiuk et al. 2018).

    Attributes:
        fractions: Fraction of pixels perturbed at each point, ``(S+1,)``.
        deletion: Scores, ``(B, S+1)`` (NaN rows where the map was not finite).
        insertion: Scores, ``(B, S+1)``.
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor

    @property
    def insertion_start(self) -> Tensor:
        """``(B,)`` score of each image's insertion baseline (the insertion curve at 0)."""
        return self.insertion[:, 0]


@dataclass
class RoadScores:
    """ROAD scores (Rong et al. 2022) after removing p% of pixels.

    Attributes:
        percentages: Removal levels, ``(P,)``.
        morf: Most-relevant-first removal scores, ``(B, P)``.
        lerf: Least-relevant-first removal scores, ``(B, P)``.
    """

    percentages: tuple[float, ...]
    morf: Tensor
    lerf: Tensor


@dataclass
class _Jobs:
    """A stream of perturbed images: sample index, target and a builder per chunk."""

    targets: Tensor
    build: Callable[[int, int], Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


#: Images per forward of the perturbation engine. Measured on the demo model (EfficientNet-Lite0 +
#: CBAM, 128 px, 2 cores, bf16): 32 images per forward took 1.0-1.4 ms per image, 64 took 1.8-2.3
#: (the activations of 32 images stay in cache; benchmarks/speed.md).
DEFAULT_CHUNK_SIZE = 32


def _device_of(model: Any) -> torch.device:
    """The device of a module's first parameter (CPU for parameterless modules and callables)."""
    if isinstance(model, nn.Module):
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


class Perturber:
    """Batched engine for every extra model call of the metrics.

    Args:
        model: Maps pixel-space ``(B, 3, H, W)`` images in [0, 1] to logits ``(B, C)``.
        protocol: Evaluation protocol.
        chunk_size: Images per forward pass.
        mean: Per-channel normalisation mean for ``mask_space="normalized"``; default the model's
            ``input_mean`` attribute if present, else ImageNet's.
        std: Per-channel normalisation std (same defaults, ``input_std``).
        optimize: Run an inference copy of the model (an ``nn.Module``,
            ``attncam.inference.inference_copy``): conv + BatchNorm folded module by module and
            channels-last weights, about 2x faster on CPU; logits agree to about 1e-6. The copy is
            rebuilt when a parameter or buffer changes in place (e.g. an optimiser step); when
            folding would change the outputs the copy stays unfolded (logged). Hooks registered
            on the original do not fire on the copy.

    Attributes:
        images_forwarded: Number of images passed through the model so far.
        precision: ``bf16`` or ``float32``: the protocol's ``precision`` resolved for the model's
            device and the ``scores`` family (``attncam.inference.resolve_precision``): ``Y`` and
            every forward of Average Drop, Increase in Confidence, Percentage-in, ROAD and
            occlusion run in it. ``precision_reason`` says why.
        curve_precision: The same for the deletion/insertion curves (``curves`` family; their
            ``Y`` included); ``curve_precision_reason`` says why. With ``precision=auto`` on a
            CPU with bf16 units the curves run in bf16 and the rest in float32.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor], Tensor],
        protocol: EvalProtocol | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optimize: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        self.model = model
        self.protocol = protocol or EvalProtocol()
        self.chunk_size = int(chunk_size)
        #: Called before every forward pass (the explain stage raises there after a SIGTERM).
        self.before_forward: Callable[[], None] | None = None
        self.mean = tuple(mean or getattr(model, "input_mean", IMAGENET_MEAN))
        self.std = tuple(std or getattr(model, "input_std", IMAGENET_STD))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0; got {self.mean}, {self.std}")
        if self.protocol.needs_temperature:
            raise ValueError(
                "score='calibrated' needs a temperature: fit one on held-out data with "
                "attncam.metrics.calibration.calibrate(logits, labels) and pass "
                "protocol.with_temperature(T)"
            )
        self.optimize = bool(optimize) and isinstance(model, nn.Module)
        self.images_forwarded = 0
        device = _device_of(model)
        self.precision, self.precision_reason = resolve_precision(
            self.protocol.precision, device, "scores"
        )
        self.curve_precision, self.curve_precision_reason = resolve_precision(
            self.protocol.precision, device, "curves"
        )
        self._fast: nn.Module | None = None
        self._fast_key: tuple[tuple[int, int], ...] = ()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _calling(self) -> Iterator[None]:
        if isinstance(self.model, nn.Module):
            with eval_mode(self.model), torch.inference_mode():
                yield
        else:
            with torch.inference_mode():
                yield

    def _state_key(self) -> tuple[tuple[int, int], ...]:
        assert isinstance(self.model, nn.Module)
        tensors = [*self.model.parameters(), *self.model.buffers()]
        # torch's in-place version counter has no public accessor.
        return tuple((id(t), t._version) for t in tensors)  # noqa: SLF001

    def _inference_model(self, example: Tensor) -> nn.Module | Callable[[Tensor], Tensor]:
        """The model to call: the original, or its (cached, fresh) optimised inference copy."""
        if not self.optimize:
            return self.model
        key = self._state_key()
        if self._fast is None or key != self._fast_key:
            assert isinstance(self.model, nn.Module)
            fast, report = inference_copy(self.model, example)
            if report.folded:
                log.debug("perturbation engine: %d conv-BN pairs folded", len(report.folded))
            else:
                log.info("perturbation engine: no conv-BN folding (%s)", report.reason)
            self._fast, self._fast_key = fast, key
        return self._fast

    def _forward(self, x: Tensor, precision: str | None = None) -> Tensor:
        if self.before_forward is not None:
            self.before_forward()  # e.g. stop within one chunk of a SIGTERM
        self.images_forwarded += x.shape[0]
        model = self._inference_model(x[:2])
        if model is not self.model:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(precision or self.precision, x.device):
            return model(x).float()

    def scores(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The protocol's score of each target class.

        Args:
            logits: ``(B, C)`` model outputs.
            targets: ``(B,)`` long target classes.

        Returns:
            ``(B,)`` float32: ``softmax`` probabilities, ``logit`` values, or ``calibrated``
            probabilities of ``softmax(logits / T)`` (Guo et al. 2017, sec. 4.2).
        """
        p = self.protocol
        if p.score == "calibrated":
            assert p.temperature is not None  # checked in __init__
            return MF.select_scores(logits.float() / p.temperature, targets, "softmax")
        return MF.select_scores(logits, targets, p.score)

    def _run(self, jobs: _Jobs, precision: str | None = None) -> Tensor:
        """Score a stream of perturbed images in chunks (in ``precision``, default the
        ``scores`` family's); returns ``(J,)`` scores."""
        n = int(jobs.targets.shape[0])
        out: list[Tensor] = []
        with self._calling():
            for start in range(0, n, self.chunk_size):
                stop = min(n, start + self.chunk_size)
                logits = self._forward(jobs.build(start, stop), precision)
                out.append(self.scores(logits, jobs.targets[start:stop]))
        if not out:
            return torch.empty(0, device=jobs.targets.device)
        return torch.cat(out).clone()

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return mean, std

    def to_mask_space(self, images: Tensor) -> Tensor:
        """Pixel images to the space masks act in: identity or ``(I - mean) / std``."""
        if self.protocol.mask_space == "pixel":
            return images
        mean, std = self._stats(images)
        return (images - mean) / std

    def from_mask_space(self, x: Tensor) -> Tensor:
        """Inverse of ``to_mask_space``: back to the pixel images the model takes."""
        if self.protocol.mask_space == "pixel":
            return x
        mean, std = self._stats(x)
        return x * std + mean

    def apply_weights(self, images: Tensor, weights: Tensor) -> Tensor:
        """``E = w * I`` in the mask space, returned in pixel space.

        Args:
            images: ``(N, 3, H, W)`` pixel images.
            weights: ``(N, H, W)`` per-pixel weights (a map ``L``, a mask ``B_p``, ...).

        Returns:
            ``(N, 3, H, W)`` pixel images for the model.
        """
        if self.protocol.mask_space == "pixel":
            return images * weights[:, None]
        mean, _ = self._stats(images)
        # denorm(w * norm(I)) = w * (I - mean) + mean
        return weights[:, None] * (images - mean) + mean

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, 3, H, W); got {shape}")

    def _check_maps(self, images: Tensor, maps: Tensor, name: str = "maps") -> Tensor:
        return MF.check_maps(maps, images.shape[0], tuple(images.shape[-2:]), name)

    @staticmethod
    def _as_methods(maps: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(maps, Tensor):
            return {"map": maps}
        if not maps:
            raise ValueError("maps is an empty mapping; pass at least one method's maps")
        return dict(maps)

    # ------------------------------------------------------------------ Y

    def base_scores(
        self, images: Tensor, labels: Tensor | None = None, targets: Tensor | None = None
    ) -> BaseScores:
        """``Y``: one forward pass on the full images.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            labels: Ground-truth classes ``(B,)``; needed for ``target="label"`` and
                ``only_correct``.
            targets: Explicit target classes ``(B,)``; override the protocol's ``target``.

        Returns:
            ``BaseScores``.
        """
        self._check_images(images)
        b = images.shape[0]
        p = self.protocol
        for name, t in (("labels", labels), ("targets", targets)):
            if t is not None and tuple(t.shape) != (b,):
                raise ValueError(f"{name} must have shape ({b},); got {tuple(t.shape)}")
        if labels is None and (p.target == "label" or p.only_correct) and targets is None:
            raise ValueError(
                f"target='{p.target}', only_correct={p.only_correct} need labels; got labels=None"
            )
        by_precision = self._base_logits(images)
        logits = by_precision["float32"]
        predicted = logits.argmax(dim=1)
        if targets is None:
            targets = labels if p.target == "label" else predicted
        targets = targets.to(device=logits.device, dtype=torch.long)
        keep = torch.ones(b, dtype=torch.bool, device=logits.device)
        if p.only_correct:
            if labels is None:
                raise ValueError("only_correct=True needs labels; got labels=None")
            keep = predicted == labels.to(predicted.device)
        score_logits = by_precision[self.precision]
        scores = self.scores(score_logits, targets)
        curve_logits = by_precision[self.curve_precision]
        return BaseScores(scores, targets, keep, predicted, logits, score_logits, curve_logits)

    def _base_logits(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of the full images in float32 and in each precision the metrics' forwards use.

        The predicted class comes from float32 (what the model predicts, and the class the
        float32 maps explain); each ``Y`` comes from the precision of the perturbed forwards it
        is compared with, so that ``Y - O`` and a curve's end points compare like with like.
        One forward per distinct precision.
        """
        chunks = range(0, images.shape[0], self.chunk_size)
        wanted = dict.fromkeys((self.precision, self.curve_precision, "float32"))
        with self._calling():
            return {
                p: torch.cat(
                    [self._forward(images[s : s + self.chunk_size], p) for s in chunks]
                ).clone()
                for p in wanted
            }

    def _base(self, images: Tensor, base: BaseScores | None, labels: Tensor | None) -> BaseScores:
        if base is None:
            return self.base_scores(images, labels)
        if base.scores.shape[0] != images.shape[0]:
            raise ValueError(
                f"base scores are for {base.scores.shape[0]} images; got {images.shape[0]} images"
            )
        return base

    # ------------------------------------------------------------------ O and Percentage-in

    def confidence_table(
        self,
        images: Tensor,
        maps: Tensor | Mapping[str, Tensor],
        labels: Tensor | None = None,
        base: BaseScores | None = None,
        percentages: tuple[float, ...] | None = None,
        variant: str | None = None,
    ) -> ConfidenceTable:
        """``O`` for ``E = L * I`` and the Percentage-in scores for every method, in one stream.

        Cost per image: ``M * (1 + P)`` forward passes, plus 1 for ``Y`` when ``base`` is None
        (Chattopadhay et al. 2018, sec. 5.1; An & Joe 2022, Percentage-in).

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            maps: ``(B, H, W)`` maps, or a mapping method -> maps.
            labels: ``(B,)`` ground-truth classes (see ``base_scores``).
            base: Precomputed ``Y`` (skips its forward pass).
            percentages: Levels ``p``; default the protocol's; ``()`` for ``O`` alone.
            variant: ``binary``, ``soft`` or ``gain``; default the protocol's.

        Returns:
            ``ConfidenceTable``, with the fraction of pixels each ``B_p`` keeps; scores (and kept
            fractions) are NaN where a map was not finite (no forward spent).
        """
        self._check_images(images)
        methods = self._as_methods(maps)
        base = self._base(images, base, labels)
        pcts = self.protocol.percentages if percentages is None else tuple(percentages)
        variant = variant or self.protocol.percentage_variant
        check_choice("percentage_variant", variant, PERCENTAGE_VARIANTS)
        per = 1 + len(pcts)

        # Pairs (method, image) with finite maps; each expands into `per` jobs: E, then each B_p.
        b = images.shape[0]
        kept = {n: images.new_full((b, len(pcts)), float("nan")) for n in methods}
        maps_l, img_l, thr_l, key_l = [], [], [], []
        for name, m in methods.items():
            ii = self._check_maps(images, m, f"maps['{name}']").nonzero().flatten()
            if ii.numel() == 0:
                continue
            maps_l.append(m[ii])
            img_l.append(ii)
            thr = [MF.top_percent_threshold(m[ii], p) for p in pcts]
            for j, t in enumerate(thr):  # the share of pixels B_p keeps (ties included)
                kept[name][ii, j] = (m[ii] >= t[:, None, None]).to(kept[name].dtype).mean((1, 2))
            # level 0 is E = L * I itself: threshold -inf keeps every pixel.
            thr_l.append(
                torch.stack([torch.full_like(ii, 0, dtype=m.dtype) - float("inf"), *thr], 1)
            )
            key_l += [(name, i) for i in ii.tolist()]
        masked = {n: images.new_full((b,), float("nan")) for n in methods}
        pin = {n: images.new_full((b, len(pcts)), float("nan")) for n in methods}
        if not key_l:
            return ConfidenceTable(base, masked, pin, pcts, kept)
        pair_maps = torch.cat(maps_l)  # (Q, H, W)
        pair_img = torch.cat(img_l)  # (Q,)
        pair_thr = torch.cat(thr_l)  # (Q, per)
        job_pair = torch.arange(len(key_l), device=images.device).repeat_interleave(per)
        job_level = torch.arange(per, device=images.device).repeat(len(key_l))

        def build(start: int, stop: int) -> Tensor:
            pair, level = job_pair[start:stop], job_level[start:stop]
            L = pair_maps[pair]
            keep = (L >= pair_thr[pair, level][:, None, None]).to(L.dtype)
            # level 0: E = L * I; binary/gain: B_p * I; soft: B_p * L * I
            wts = torch.where((level == 0)[:, None, None] | (variant == "soft"), keep * L, keep)
            return self.apply_weights(images[pair_img[pair]], wts)

        scores = self._run(_Jobs(base.targets[pair_img[job_pair]], build)).view(-1, per)
        for row, (name, i) in enumerate(key_l):
            masked[name][i] = scores[row, 0]
            pin[name][i] = scores[row, 1:]
        return ConfidenceTable(base, masked, pin, pcts, kept)

    def masked_scores(
        self,
        images: Tensor,
        maps: Tensor,
        labels: Tensor | None = None,
        base: BaseScores | None = None,
    ) -> Tensor:
        """``O``: scores on ``E = L * I`` (one forward pass per image), shape ``(B,)``."""
        return self.confidence_table(images, maps, labels, base, percentages=()).masked["map"]

    def percentage_in_scores(
        self,
        images: Tensor,
        maps: Tensor,
        labels: Tensor | None = None,
        base: BaseScores | None = None,
        percentages: tuple[float, ...] | None = None,
        variant: str | None = None,
    ) -> Tensor:
        """Scores on the top-p% images (An & Joe 2022), shape ``(B, P)``.

        This convenience also scores ``E = L * I``; use ``confidence_table`` to get both at once.
        """
        table = self.confidence_table(images, maps, labels, base, percentages, variant)
        return table.percentage_in["map"]

    # ------------------------------------------------------------------ deletion / insertion

    def _constant_baseline_scores(self, images: Tensor, targets: Tensor) -> Tensor:
        """Score of the all-deleted image (a constant image) for each target: one forward."""
        zero = self.from_mask_space(torch.zeros_like(images[:1]))
        with self._calling():
            logits = self._forward(zero, self.curve_precision).clone()
        return self.scores(logits.expand(targets.shape[0], -1), targets)

    def insertion_start_images(self, images: Tensor) -> Tensor:
        """The images insertion starts from (protocol ``insertion_baseline``), in pixel space.

        ``blur``: ``gaussian_blur(I, blur_kernel, blur_sigma)`` (Petsiuk et al. 2018, sec. 4.1),
        or the deletion baseline (0 in the mask space) when ``blur_kernel=0``; ``mean``: every
        pixel the image's per-channel mean colour (pixel space); ``noise``: one ``U[0, 1]``
        pixel-space image ``(1, 3, H, W)`` drawn on the CPU from a generator seeded with
        ``protocol.seed`` (the same image for every input, batch and device), broadcast.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].

        Returns:
            ``(B, 3, H, W)`` (an expanded view for ``mean`` and ``noise``).
        """
        p = self.protocol
        if p.insertion_baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        if p.insertion_baseline == "noise":
            gen = torch.Generator().manual_seed(p.seed)
            noise = torch.rand((1, *images.shape[1:]), generator=gen, dtype=torch.float32)
            return noise.to(device=images.device, dtype=images.dtype).expand_as(images)
        if p.blur_kernel > 0:
            return MF.gaussian_blur(images, p.blur_kernel, p.blur_sigma)
        return self.from_mask_space(torch.zeros_like(images))

    def deletion_insertion(
        self,
        images: Tensor,
        maps: Tensor | Mapping[str, Tensor],
        labels: Tensor | None = None,
        base: BaseScores | None = None,
        steps: int | None = None,
    ) -> dict[str, Curves]:
        """Deletion and insertion curves (Petsiuk et al. 2018, sec. 4.1) for every method.

        Deletion sets pixels to 0 in the mask space, most salient first; insertion copies pixels of
        ``I`` into the protocol's ``insertion_baseline`` (``insertion_start_images``: a
        Gaussian-blurred copy by default, kernel 0 inserting into the deletion baseline; or the
        mean colour, or seeded noise). The first deletion and last insertion points are ``Y``;
        the first insertion point is the baseline's score (``Curves.insertion_start``). The
        all-deleted image is the same constant image for every input (one forward per call); the
        insertion baseline does not depend on the map (one forward per image, shared by all
        methods; none when it is the deletion baseline).

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            maps: ``(B, H, W)`` maps or a mapping method -> maps.
            labels: ``(B,)`` ground-truth classes.
            base: Precomputed ``Y``.
            steps: Steps; default the protocol's.

        Returns:
            Method -> ``Curves`` (the key ``"map"`` when ``maps`` is a tensor).
        """
        self._check_images(images)
        methods = self._as_methods(maps)
        base = self._base(images, base, labels)
        p = self.protocol
        b, _, h, w = images.shape
        counts = MF.perturbation_counts(h * w, steps or p.steps)
        fractions = torch.tensor(counts, dtype=torch.float32, device=images.device) / (h * w)
        s = len(counts) - 1
        interior = counts[1:-1]
        y = base.scores if self.curve_precision == self.precision else self._curve_y(base)
        y = y.to(torch.float32)
        deleted = self._constant_baseline_scores(images, base.targets)
        start = self.insertion_start_images(images)

        finites = {n: self._check_maps(images, m, f"maps['{n}']") for n, m in methods.items()}
        any_finite = torch.stack(list(finites.values())).any(dim=0)
        if p.insertion_baseline == "blur" and p.blur_kernel == 0:  # the deletion baseline
            start_ins = deleted.clone()
        else:
            start_ins = self._scores_of_images(start, base.targets, any_finite)

        key_l, ranks, img_of = self._ranked_pairs(methods, finites)
        curves = {
            n: Curves(
                fractions,
                images.new_full((b, s + 1), float("nan")),
                images.new_full((b, s + 1), float("nan")),
            )
            for n in methods
        }
        for name, i in key_l:
            c = curves[name]
            c.deletion[i, 0], c.deletion[i, s] = y[i], deleted[i]
            c.insertion[i, 0], c.insertion[i, s] = start_ins[i], y[i]
        if key_l and interior:
            n_int = len(interior)
            sc = self._interior_scores(images, start, base.targets, ranks, img_of, interior)
            for row, (name, i) in enumerate(key_l):
                c = curves[name]
                c.deletion[i, 1:s] = sc[row, :n_int]
                c.insertion[i, 1:s] = sc[row, n_int:]
        return curves

    def _scores_of_images(self, images: Tensor, targets: Tensor, which: Tensor) -> Tensor:
        """Scores of ``images[which]`` (``(B,)``, NaN elsewhere): one forward per chosen image."""
        idx = which.nonzero().flatten()
        out = images.new_full((images.shape[0],), float("nan"))
        out[idx] = self._run(
            _Jobs(targets[idx], lambda a, z: images[idx[a:z]]), self.curve_precision
        )
        return out

    def _curve_y(self, base: BaseScores) -> Tensor:
        """``Y`` of the curves in their own precision (``base.curve_logits``)."""
        assert base.curve_logits is not None  # set in __post_init__
        return self.scores(base.curve_logits, base.targets)

    @staticmethod
    def _ranked_pairs(
        methods: Mapping[str, Tensor], finites: Mapping[str, Tensor]
    ) -> tuple[list[tuple[str, int]], Tensor | None, Tensor | None]:
        """``(method, image)`` pairs with a finite map, their pixel ranks ``(Q, H*W)`` and images
        ``(Q,)`` (None when there is no pair)."""
        ranks_l, img_l, key_l = [], [], []
        for name, m in methods.items():
            ii = finites[name].nonzero().flatten()
            if ii.numel():
                ranks_l.append(MF.saliency_ranks(m[ii]))
                img_l.append(ii)
                key_l += [(name, i) for i in ii.tolist()]
        if not key_l:
            return key_l, None, None
        return key_l, torch.cat(ranks_l), torch.cat(img_l)

    def _interior_scores(
        self,
        images: Tensor,
        start: Tensor,
        targets: Tensor,
        ranks: Tensor | None,
        img_of: Tensor | None,
        interior: list[int],
    ) -> Tensor:
        """Interior deletion then insertion points of every pair, in one stream of jobs.

        Args:
            images: ``(B, 3, H, W)`` pixel images.
            start: ``(B, 3, H, W)`` insertion start images (pixel space).
            targets: ``(B,)`` target classes.
            ranks: ``(Q, H*W)`` saliency ranks of each pair's map (0 = most salient).
            img_of: ``(Q,)`` image of each pair.
            interior: Pixels perturbed at each interior point.

        Returns:
            ``(Q, 2 * len(interior))``: deletion points, then insertion points.
        """
        assert ranks is not None and img_of is not None
        _, _, h, w = images.shape
        n_int = len(interior)
        per = 2 * n_int
        cnt = torch.tensor(interior, device=images.device, dtype=torch.long)
        job_pair = torch.arange(ranks.shape[0], device=images.device).repeat_interleave(per)
        job_cnt = cnt.repeat(2 * ranks.shape[0])
        job_ins = (torch.arange(per, device=images.device) >= n_int).repeat(ranks.shape[0])
        flat_images = images.flatten(2)
        flat_start = start.flatten(2)
        zero_flat = self.from_mask_space(torch.zeros_like(images[:1])).flatten(2)

        def build(start: int, stop: int) -> Tensor:
            pair = job_pair[start:stop]
            im = img_of[pair]
            top = ranks[pair] < job_cnt[start:stop, None]  # (n, H*W): already perturbed
            ins = job_ins[start:stop, None]
            src = flat_images[im]
            # deletion keeps the image where not yet removed; insertion where already inserted
            take_image = torch.where(ins, top, ~top)[:, None]
            other = torch.where(ins[:, :, None], flat_start[im], zero_flat.expand_as(src))
            return torch.where(take_image, src, other).view(-1, 3, h, w)

        return self._run(_Jobs(targets[img_of[job_pair]], build), self.curve_precision).view(
            -1, per
        )

    # ------------------------------------------------------------------ ROAD

    def road(
        self,
        images: Tensor,
        maps: Tensor,
        labels: Tensor | None = None,
        base: BaseScores | None = None,
        percentages: tuple[float, ...] | None = None,
        tol: float = 1e-5,
        max_iter: int = 2000,
    ) -> RoadScores:
        """ROAD (Rong et al. 2022): scores after removing the most/least relevant p% of pixels.

        Removed pixels are replaced by noisy linear imputation (``functional.noisy_linear_impute``,
        a batched conjugate-gradient solve of the sparse neighbour system) in the mask space, with
        noise ``protocol.road_noise`` drawn from a generator seeded with ``protocol.seed``.
        Cost: ``2 * P`` forward passes per image.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            maps: ``(B, H, W)``.
            labels: ``(B,)`` ground-truth classes.
            base: Precomputed ``Y`` (used for the targets).
            percentages: Removal levels; default the protocol's ``road_percentages``.
            tol: Imputation solver tolerance.
            max_iter: Imputation solver iteration cap.

        Returns:
            ``RoadScores`` with ``(B, P)`` MoRF and LeRF scores (NaN rows for non-finite maps).
        """
        self._check_images(images)
        base = self._base(images, base, labels)
        finite = self._check_maps(images, maps)
        pcts = self.protocol.road_percentages if percentages is None else tuple(percentages)
        b, _, h, w = images.shape
        hw = h * w
        morf = images.new_full((b, len(pcts)), float("nan"))
        lerf = morf.clone()
        ii = finite.nonzero().flatten()
        if ii.numel() == 0:
            return RoadScores(pcts, morf, lerf)
        gen = torch.Generator(device=images.device)
        gen.manual_seed(self.protocol.seed)
        ranks = MF.saliency_ranks(maps[ii])  # (Q, H*W)
        x = self.to_mask_space(images[ii])
        # Jobs ordered (image, order, percentage); imputed chunk-wise to bound memory.
        q, n_p = ii.numel(), len(pcts)
        ks = torch.tensor([round(p * hw / 100) for p in pcts], device=images.device)
        job_img = torch.arange(q, device=images.device).repeat_interleave(2 * n_p)
        job_lerf = torch.arange(2, device=images.device).repeat_interleave(n_p).repeat(q) == 1
        job_k = ks.repeat(2 * q)

        def build(start: int, stop: int) -> Tensor:
            im = job_img[start:stop]
            r = ranks[im]
            k = job_k[start:stop, None]
            lerf_job = job_lerf[start:stop, None]
            remove = torch.where(lerf_job, r >= hw - k, r < k).view(-1, h, w)
            imputed = MF.noisy_linear_impute(
                x[im], remove, self.protocol.road_noise, gen, tol, max_iter
            )
            return self.from_mask_space(imputed)

        sc = self._run(_Jobs(base.targets[ii][job_img], build)).view(q, 2, n_p)
        morf[ii], lerf[ii] = sc[:, 0], sc[:, 1]
        return RoadScores(pcts, morf, lerf)

    # ------------------------------------------------------------------ occlusion

    def occlusion_sensitivity(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        base: BaseScores | None = None,
        window: int = 32,
        stride: int = 16,
    ) -> Tensor:
        """Occlusion sensitivity (Zeiler & Fergus 2014), for faithfulness (Grad-CAM sec. 5.3).

        A ``window x window`` patch is set to 0 in the mask space at every ``stride``; the value is
        the drop ``Y - O`` of the target score. Cost: ``gh * gw`` forward passes per image.

        Args:
            images: ``(B, 3, H, W)``.
            labels: ``(B,)`` ground-truth classes.
            base: Precomputed ``Y``.
            window: Patch size in pixels.
            stride: Patch stride in pixels.

        Returns:
            ``(B, gh, gw)`` score drops, ``gh = (H - window) // stride + 1`` (same for ``gw``);
            compare with ``avg_pool2d(map, window, stride)``.
        """
        self._check_images(images)
        base = self._base(images, base, labels)
        b, _, h, w = images.shape
        if not 0 < window <= min(h, w) or stride < 1:
            raise ValueError(
                f"need 0 < window <= {min(h, w)} and stride >= 1; got {window}, {stride}"
            )
        ys = list(range(0, h - window + 1, stride))
        xs = list(range(0, w - window + 1, stride))
        g = len(ys) * len(xs)
        patches = torch.ones(g, h, w, device=images.device, dtype=images.dtype)
        for j, (y0, x0) in enumerate((y, x) for y in ys for x in xs):
            patches[j, y0 : y0 + window, x0 : x0 + window] = 0
        job_img = torch.arange(b, device=images.device).repeat_interleave(g)
        job_patch = torch.arange(g, device=images.device).repeat(b)

        def build(start: int, stop: int) -> Tensor:
            return self.apply_weights(images[job_img[start:stop]], patches[job_patch[start:stop]])

        sc = self._run(_Jobs(base.targets[job_img], build)).view(b, len(ys), len(xs))
        return base.scores.to(sc.dtype)[:, None, None] - sc


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASK_SPACES",
    "PERCENTAGE_VARIANTS",
    "TARGETS",
    "BaseScores",
    "ConfidenceTable",
    "Curves",
    "EvalProtocol",
    "Perturber",
    "Protocol",
    "RoadScores",
    "eval_mode",
]
