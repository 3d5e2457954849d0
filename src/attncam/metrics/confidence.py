"""Confidence-based faithfulness: Average Drop, Increase in Confidence, Win %, Percentage-in.

Each is a ``torchmetrics.Metric`` fed with scores only: ``Y`` on the full image and ``O`` on the
explanation ``E = L * I`` (or on a top-p% image), both produced by
``attncam.metrics.perturb.Perturber``. Values are percentages (0-100).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attncam.metrics import functional as MF
from attncam.metrics.protocol import PERCENTAGE_VARIANTS
from attncam.metrics.stats import MetricResult, PerImageMetric, keep_mask


class _ScorePairMetric(PerImageMetric):
    """Shared update for metrics of ``(Y, O)`` pairs."""

    _name = ""
    _needs_positive_base = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_values("values")

    def _per_image(self, base: Tensor, masked: Tensor) -> Tensor:
        raise NotImplementedError

    def update(
        self, base: Tensor, masked: Tensor, keep: Tensor | None = None, *, ids: Tensor | None = None
    ) -> None:
        """Add a batch.

        Args:
            base: ``Y``, scores on the full images, shape ``(B,)``.
            masked: ``O``, scores on the explanations, shape ``(B,)`` (NaN for a skipped map).
            keep: ``(B,)`` bool, False for images the protocol excludes (``BaseScores.keep``).
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        finite = MF.check_scores(base, name="base") & MF.check_scores(
            masked, base.shape[0], "masked"
        )
        if masked.ndim != 1:
            raise ValueError(f"masked must have shape (B,); got {tuple(masked.shape)}")
        checks = [("excluded", keep_mask(keep, base)), ("non_finite", finite)]
        if self._needs_positive_base:
            checks.append(("non_positive_base", torch.nan_to_num(base, nan=1.0) > 0))
        valid = self._filter(torch.ones_like(finite), checks)
        per_image = self._per_image(base[valid].float(), masked[valid].float())
        self._append_valid(ids, valid, values=per_image)

    def _columns(self) -> dict[str, Tensor]:
        return {self._name: self.values()}

    def compute(self) -> MetricResult:
        """Mean over images with N and bootstrap interval."""
        return self._summary(self._name, self.values())


class AverageDrop(_ScorePairMetric):
    """Average Drop (Chattopadhay et al. 2018, sec. 5.1): ``100/N sum max(0, Y - O) / Y``.

    Lower is better. Images with ``Y <= 0`` (possible with ``score=logit``) are skipped and counted
    (``non_positive_base``).

    Args:
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = False
    _name = "average_drop"
    _needs_positive_base = True

    def _per_image(self, base: Tensor, masked: Tensor) -> Tensor:
        return MF.average_drop(base, masked)


class IncreaseInConfidence(_ScorePairMetric):
    """Increase in Confidence (Chattopadhay et al. 2018; An & Joe's "Percent increase").

    ``100/N sum 1[O > Y]``; higher is better.

    Args:
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True
    _name = "increase_in_confidence"

    def _per_image(self, base: Tensor, masked: Tensor) -> Tensor:
        return MF.increase_in_confidence(base, masked)


class WinPercentage(PerImageMetric):
    """Win % of method a over method b: share of images where a's drop ``Y - O`` is smaller.

    A tie counts half. Higher is better for method a.

    Args:
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_values("values")

    def update(
        self,
        base: Tensor,
        masked_a: Tensor,
        masked_b: Tensor,
        keep: Tensor | None = None,
        *,
        ids: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            base: ``Y``, shape ``(B,)``.
            masked_a: ``O`` of method a, shape ``(B,)``.
            masked_b: ``O`` of method b, shape ``(B,)``.
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        b = base.shape[0]
        finite = (
            MF.check_scores(base, name="base")
            & MF.check_scores(masked_a, b, "masked_a")
            & MF.check_scores(masked_b, b, "masked_b")
        )
        checks = [("excluded", keep_mask(keep, base)), ("non_finite", finite)]
        valid = self._filter(torch.ones_like(finite), checks)
        per_image = MF.win(base[valid].float(), masked_a[valid].float(), masked_b[valid].float())
        self._append_valid(ids, valid, values=per_image)

    def _columns(self) -> dict[str, Tensor]:
        return {"win": self.values()}

    def compute(self) -> MetricResult:
        """Win % of a over b with N and bootstrap interval."""
        return self._summary("win", self.values())


class PercentageIn(PerImageMetric):
    """Percentage-in @ p (An & Joe 2022, third table): Increase in Confidence on top-p% images.

    The scores come from ``Perturber.confidence_table`` (``B_p = 1[L >= (100-p)th percentile]``).
    Variants ``binary`` (``E = B_p * I``) and ``soft`` (``E = B_p * L * I``) report
    ``100/N sum 1[O > Y]``; ``gain`` (``E = B_p * I``) reports ``100/N sum max(0, O - Y) / Y``.

    When the updates pass ``kept`` (``ConfidenceTable.kept_fraction``), the metric also reports
    ``kept_fraction@p``: the mean share of pixels ``B_p`` actually kept, in percent, over the same
    images as ``percentage_in@p`` (ties at the threshold are kept, so a map with large flat
    regions keeps more than ``p`` %; docs/METHODS.md, Percentage-in). Either every update passes
    ``kept`` or none does.

    Args:
        percentages: Levels ``p``, matching the columns of the scores.
        variant: ``binary``, ``soft`` or ``gain`` (recorded; ``gain`` changes the statistic).
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True

    def __init__(
        self,
        percentages: tuple[float, ...] = (5, 10, 20, 25, 50),
        variant: str = "binary",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if variant not in PERCENTAGE_VARIANTS:
            raise ValueError(
                f"unknown variant '{variant}'; choose one of: {', '.join(PERCENTAGE_VARIANTS)}"
            )
        if not percentages:
            raise ValueError(
                "percentages is empty; give at least one level, e.g. (5, 10, 20, 25, 50)"
            )
        self.percentages = tuple(float(p) for p in percentages)
        self.variant = variant
        self._add_values("values")
        self._add_values("kept")
        self._with_kept: bool | None = None  # set by the first update

    def reset(self) -> None:
        """Clear every state; the next update decides again whether ``kept`` is reported."""
        super().reset()
        self._with_kept = None

    def _check_kept(self, kept: Tensor | None, scores: Tensor) -> Tensor:
        """``(B,)`` True where ``kept`` is finite (all True without ``kept``); checks its use."""
        if self._with_kept is None:
            self._with_kept = kept is not None
        elif self._with_kept != (kept is not None):
            raise ValueError(
                "kept was passed to some updates of PercentageIn but not to others; pass "
                "ConfidenceTable.kept_fraction to every update or to none"
            )
        if kept is None:
            return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        if kept.shape != scores.shape:
            raise ValueError(
                f"kept must have the shape of scores {tuple(scores.shape)}; got {tuple(kept.shape)}"
            )
        return MF.check_scores(kept, scores.shape[0], "kept")

    def update(
        self,
        base: Tensor,
        scores: Tensor,
        keep: Tensor | None = None,
        *,
        ids: Tensor | None = None,
        kept: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            base: ``Y``, shape ``(B,)``.
            scores: ``O`` on the top-p% images, shape ``(B, P)``.
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
            kept: ``(B, P)`` fraction of pixels each ``B_p`` keeps, in [0, 1]
                (``ConfidenceTable.kept_fraction[method]``); reported as ``kept_fraction@p``.
        """
        finite = MF.check_scores(base, name="base") & MF.check_scores(
            scores, base.shape[0], "scores"
        )
        if scores.ndim != 2 or scores.shape[1] != len(self.percentages):
            raise ValueError(
                f"scores must have shape (B, {len(self.percentages)}) for "
                f"percentages {self.percentages}; got {tuple(scores.shape)}"
            )
        finite = finite & self._check_kept(kept, scores)
        checks = [("excluded", keep_mask(keep, base)), ("non_finite", finite)]
        if self.variant == "gain":
            checks.append(("non_positive_base", torch.nan_to_num(base, nan=1.0) > 0))
        valid = self._filter(torch.ones_like(finite), checks)
        y, o = base[valid].float(), scores[valid].float()
        if self.variant == "gain":
            per_image = MF.confidence_gain(y, o)
        else:
            per_image = MF.increase_in_confidence(y, o)
        if kept is None:
            self._append_valid(ids, valid, values=per_image)
        else:
            self._append_valid(ids, valid, values=per_image, kept=100.0 * kept[valid].float())

    def _columns(self) -> dict[str, Tensor]:
        n_p = len(self.percentages)
        values = self.values().reshape(-1, n_p)
        out = {f"percentage_in@{p:g}": values[:, j] for j, p in enumerate(self.percentages)}
        if self._with_kept:
            kept = self.values("kept").reshape(-1, n_p)
            out.update({f"kept_fraction@{p:g}": kept[:, j] for j, p in enumerate(self.percentages)})
        return out

    def compute(self) -> dict[str, MetricResult]:
        """``{"percentage_in@5": MetricResult, ...}``, one entry per level, then (when the
        updates passed ``kept``) ``{"kept_fraction@5": MetricResult, ...}`` in percent."""
        return self._summaries()
