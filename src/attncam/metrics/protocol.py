"""The evaluation protocol: every choice that changes a metric's number, written beside results.

A metric value means little without the protocol that produced it (mask space, score, target,
curve steps, Percentage-in variant, ...); ``EvalProtocol.to_dict()`` is stored next to every
table. The definitions are in docs/METHODS.md ("Metrics").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attncam.inference import PRECISIONS
from attncam.metrics import functional as MF

MASK_SPACES: tuple[str, ...] = ("pixel", "normalized")
TARGETS: tuple[str, ...] = ("predicted", "label")
PERCENTAGE_VARIANTS: tuple[str, ...] = ("binary", "soft", "gain")
#: Scores: the functional ones plus ``calibrated`` (``softmax(z / T)``, Guo et al. 2017).
SCORES: tuple[str, ...] = (*MF.SCORE_CHOICES, "calibrated")
#: What insertion starts from (Petsiuk et al. 2018 use the blur).
INSERTION_BASELINES: tuple[str, ...] = ("blur", "mean", "noise")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise when ``value`` is not one of ``choices``.

    Args:
        name: What is being chosen, for the message (e.g. ``"mask_space"``).
        value: The given value.
        choices: The valid values.

    Raises:
        ValueError: Naming the bad value and the valid choices.
    """
    if value not in choices:
        raise ValueError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class EvalProtocol:
    """Evaluation protocol, written next to every result (docs/METHODS.md, "Metrics").

    Attributes:
        mask_space: ``pixel`` (``E = L * I`` on [0, 1] images) or ``normalized``
            (``E = L * (I - mean) / std``, as torchcam).
        score: ``softmax`` (target probability), ``logit``, or ``calibrated``: the probability
            of ``softmax(z / temperature)`` (temperature scaling, Guo et al. 2017, sec. 4.2).
        target: ``predicted`` (top-1 on the full image) or ``label`` (ground truth).
        steps: Deletion/insertion steps (Petsiuk et al. 2018).
        blur_kernel: Insertion blur kernel size (odd); ``0`` inserts into the deletion baseline.
            Used only with ``insertion_baseline="blur"``.
        blur_sigma: Insertion blur standard deviation in pixels.
        only_correct: Keep only images whose top-1 prediction equals the label.
        percentages: Percentage-in levels ``p`` (An & Joe 2022).
        percentage_variant: ``binary`` (``B_p * I``), ``soft`` (``B_p * L * I``) or ``gain``
            (``B_p * I`` scored by ``max(0, O - Y) / Y``).
        road_percentages: ROAD removal percentages (Rong et al. 2022).
        road_noise: ROAD imputation noise standard deviation (in the mask space's units).
        seed: Seed of every random draw (ROAD noise, insertion noise, bootstrap).
        temperature: ``T > 0`` of ``score="calibrated"``; ``None`` (the default) means "not
            fitted yet": the explain stage fits it on the validation split
            (``attncam.metrics.calibration.calibrate``) and scores with
            ``with_temperature(T)``. Must be ``None`` with any other score.
        insertion_baseline: The image insertion starts from: ``blur`` (a Gaussian-blurred copy,
            Petsiuk et al. 2018), ``mean`` (every pixel the image's per-channel mean colour in
            pixel space) or ``noise`` (one ``U[0, 1]`` pixel-space noise image drawn from a
            generator seeded with ``seed``, the same for every image).
        precision: Precision of the metrics' model forwards (the maps are always computed in
            float32): ``auto`` (the default: on CPUs with bf16 matrix units the deletion and
            insertion curves run under bfloat16 autocast, about 1.7x faster, and every other
            forward in float32; float32 elsewhere), ``float32`` (every forward: publication
            runs) or ``bf16`` (every forward). ``auto`` keeps Average Drop, Increase in
            Confidence and Percentage-in in float32 because their bf16 agreement with float32
            does not hold (Increase in Confidence is a sign test of tiny score differences on
            saturated models), while the curves' does: ``benchmarks/bf16_agreement.md``.
    """

    mask_space: str = "pixel"
    score: str = "softmax"
    target: str = "predicted"
    steps: int = 20
    blur_kernel: int = 11
    blur_sigma: float = 5.0
    only_correct: bool = False
    percentages: tuple[float, ...] = (5, 10, 20, 25, 50)
    percentage_variant: str = "binary"
    road_percentages: tuple[float, ...] = (10, 30, 50, 70, 90)
    road_noise: float = 0.01
    seed: int = 0
    temperature: float | None = None
    insertion_baseline: str = "blur"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_choice("mask_space", self.mask_space, MASK_SPACES)
        check_choice("score", self.score, SCORES)
        check_choice("target", self.target, TARGETS)
        check_choice("percentage_variant", self.percentage_variant, PERCENTAGE_VARIANTS)
        check_choice("insertion_baseline", self.insertion_baseline, INSERTION_BASELINES)
        check_choice("precision", self.precision, PRECISIONS)
        self._check_temperature()
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if self.blur_kernel != 0 and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0):
            raise ValueError(f"blur_kernel must be 0 (no blur) or odd >= 1; got {self.blur_kernel}")
        if self.blur_kernel != 0 and self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0; got {self.blur_sigma}")
        # Accept lists from YAML; store tuples so the protocol stays hashable.
        object.__setattr__(self, "percentages", tuple(float(p) for p in self.percentages))
        object.__setattr__(self, "road_percentages", tuple(float(p) for p in self.road_percentages))
        bad = [p for p in self.percentages if not 0 < p <= 100]
        if bad:
            raise ValueError(f"percentages must lie in (0, 100]; got {bad}")
        bad = [p for p in self.road_percentages if not 0 < p < 100]
        if bad:
            raise ValueError(f"road_percentages must lie in (0, 100); got {bad}")
        if self.road_noise < 0:
            raise ValueError(f"road_noise must be >= 0; got {self.road_noise}")

    def _check_temperature(self) -> None:
        t = self.temperature
        if t is None:
            return
        if self.score != "calibrated":
            raise ValueError(
                f"temperature={t} is used only with score='calibrated'; got score='{self.score}' "
                "(set temperature to null or score to calibrated)"
            )
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < float(t) < math.inf:
            raise ValueError(f"temperature must be a finite number > 0; got {t!r}")
        object.__setattr__(self, "temperature", float(t))

    @property
    def needs_temperature(self) -> bool:
        """True when ``score="calibrated"`` and no temperature is set yet (fit one first)."""
        return self.score == "calibrated" and self.temperature is None

    def with_temperature(self, temperature: float) -> EvalProtocol:
        """This protocol with ``score="calibrated"`` and the given (fitted) temperature.

        Args:
            temperature: ``T > 0``, e.g. ``calibration.calibrate(val_logits, val_labels)
                .temperature``.

        Returns:
            A new protocol (the dataclass is frozen).
        """
        return dataclasses.replace(self, score="calibrated", temperature=temperature)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists for tuples), to write beside every result."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalProtocol:
        """Build from a mapping (e.g. a Hydra ``DictConfig``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown protocol keys {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**{k: (tuple(v) if isinstance(v, list | tuple) else v) for k, v in d.items()})


__all__ = [
    "INSERTION_BASELINES",
    "MASK_SPACES",
    "PERCENTAGE_VARIANTS",
    "SCORES",
    "TARGETS",
    "EvalProtocol",
    "check_choice",
]
