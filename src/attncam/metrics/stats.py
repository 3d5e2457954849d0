"""Reported statistics: the mean with its N and a percentile-bootstrap 95% interval.

Every figure attncam reports comes with its N and a bootstrap confidence interval (SPEC.md,
"Metrics"). The bootstrap here is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) with
a fixed seed. The values are sorted before resampling, so the interval depends only on the multiset
of per-image values: the result after a DDP gather (values in rank order) is the same as the
single-process result (values in data order).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger(__name__)

#: Reasons an image can be left out of a metric; each is counted and reported, never silent.
SKIP_REASONS: tuple[str, ...] = (
    "non_finite",  # NaN/inf map or score
    "empty_mask",  # all-False ground-truth mask: no annotation
    "excluded",  # left out by the protocol, e.g. only_correct and the image is misclassified
    "zero_map",  # all-zero map (a vanished CAM): skipped by every localisation metric alike
    "non_positive_base",  # base score Y <= 0 where the metric divides by Y (Average Drop)
)


@dataclass
class MetricResult:
    """One reported figure (not frozen: torchmetrics rebuilds dataclasses it returns).

    Attributes:
        name: Metric key, e.g. ``"average_drop"`` or ``"percentage_in@5"``.
        value: Mean of the per-image values; ``None`` when no image was valid (never NaN).
        n: Number of images the value is computed over.
        low: Lower end of the bootstrap interval (``None`` when ``n == 0``).
        high: Upper end of the bootstrap interval (``None`` when ``n == 0``).
        confidence: Coverage of the interval, e.g. 0.95.
        num_resamples: Number of bootstrap resamples.
        skipped: Images left out, by reason (see ``SKIP_REASONS``).
    """

    name: str
    value: float | None
    n: int
    low: float | None
    high: float | None
    confidence: float = 0.95
    num_resamples: int = 1000
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view for YAML/JSON/W&B."""
        return asdict(self)


def bootstrap_ci(
    values: Tensor,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_elements: int = 1 << 22,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean.

    Args:
        values: Per-image values, shape ``(N,)``, finite, ``N >= 1``.
        num_resamples: Number of resamples ``R``.
        confidence: Coverage, in (0, 1).
        seed: Seed of the resampling generator (results are reproducible).
        max_elements: Resampled indices held at once (``chunk * N``), bounds memory.

    Returns:
        ``(low, high)``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
        ``R`` resampled means.

    Raises:
        ValueError: On an empty or non-1-D input, non-finite values or bad settings.
    """
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D tensor; got shape {tuple(values.shape)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1; got {num_resamples}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("bootstrap got non-finite values; they must be skipped and counted first")
    # Sorting makes the interval a function of the multiset only (identical after a DDP gather).
    x = values.detach().to(torch.float64).sort().values
    n = x.numel()
    if n == 1:
        v = float(x[0])
        return v, v
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    chunk = max(1, max_elements // n)
    means = []
    for start in range(0, num_resamples, chunk):
        r = min(chunk, num_resamples - start)
        idx = torch.randint(n, (r, n), generator=gen, device=x.device)
        means.append(x[idx].mean(dim=1))
    boot = torch.cat(means)
    alpha = (1.0 - confidence) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64, device=x.device)
    low, high = torch.quantile(boot, q).tolist()
    return float(low), float(high)


def summarize(
    name: str,
    values: Tensor,
    skipped: Mapping[str, int] | None = None,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Mean, N and bootstrap interval of per-image values.

    Args:
        name: Metric key.
        values: Per-image values, shape ``(N,)`` (``N`` may be 0).
        skipped: Counts of left-out images by reason (zero counts are dropped).
        num_resamples: Bootstrap resamples.
        confidence: Interval coverage.
        seed: Bootstrap seed.

    Returns:
        The ``MetricResult``; with ``N == 0`` its value and interval are ``None`` (and a warning is
        logged), never NaN.
    """
    skipped_d = {k: int(v) for k, v in (skipped or {}).items() if int(v) > 0}
    values = values.reshape(-1)
    n = int(values.numel())
    if n == 0:
        log.warning("metric %s has no valid image (skipped: %s)", name, skipped_d or "none")
        return MetricResult(name, None, 0, None, None, confidence, num_resamples, skipped_d)
    low, high = bootstrap_ci(values, num_resamples, confidence, seed)
    value = float(values.detach().to(torch.float64).mean())
    return MetricResult(name, value, n, low, high, confidence, num_resamples, skipped_d)


def keep_mask(keep: Tensor | None, like: Tensor) -> Tensor:
    """``(B,)`` bool keep-mask for a batch shaped like ``like`` (all True when ``keep`` is None).

    Raises:
        ValueError: If ``keep`` is not a ``(B,)`` bool tensor.
    """
    if keep is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    if keep.dtype != torch.bool or keep.shape != like.shape[:1]:
        raise ValueError(
            f"keep must be a bool tensor of shape {tuple(like.shape[:1])}; "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    return keep.to(like.device)


class PerImageMetric(Metric):
    """Base of every attncam metric: per-image values in ``cat`` states, skips counted by reason.

    Per-image values (not running sums) are kept so the bootstrap interval can be computed after
    a DDP sync; ``skipped`` is a ``sum`` state over ``SKIP_REASONS``.

    Args:
        num_resamples: Bootstrap resamples.
        confidence: Interval coverage.
        seed: Bootstrap seed.
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_resamples < 1:
            raise ValueError(f"num_resamples must be >= 1; got {num_resamples}")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1); got {confidence}")
        self.num_resamples = int(num_resamples)
        self.confidence = float(confidence)
        self.seed = int(seed)
        self.add_state(
            "skipped",
            default=torch.zeros(len(SKIP_REASONS), dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def _add_values(self, name: str) -> None:
        self.add_state(name, default=[], dist_reduce_fx="cat")

    def _count_skip(self, reason: str, mask: Tensor) -> None:
        """Count images where ``mask`` is True as skipped for ``reason``."""
        self.skipped[SKIP_REASONS.index(reason)] += mask.sum().to(self.skipped.device)

    def _filter(self, valid: Tensor, checks: list[tuple[str, Tensor]]) -> Tensor:
        """Apply ``(reason, ok)`` checks in order; each image is counted under its first failure."""
        for reason, ok in checks:
            ok = ok.to(valid.device)
            self._count_skip(reason, valid & ~ok)
            valid = valid & ok
        return valid

    def _cat(self, name: str) -> Tensor:
        state = getattr(self, name)
        if isinstance(state, Tensor):
            return state
        if len(state) == 0:
            return torch.empty(0, device=self.skipped.device)
        return dim_zero_cat(state)

    def skipped_counts(self) -> dict[str, int]:
        """Left-out images by reason (all reasons, zeros included)."""
        return dict(zip(SKIP_REASONS, self.skipped.tolist(), strict=True))

    def _summary(self, name: str, values: Tensor) -> MetricResult:
        return summarize(
            name, values, self.skipped_counts(), self.num_resamples, self.confidence, self.seed
        )
