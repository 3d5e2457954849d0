"""Reported statistics: the mean with its N and a percentile-bootstrap 95% interval.

Every figure attncam reports comes with its N and a bootstrap confidence interval
(docs/METHODS.md, "Metrics"). The bootstrap here is the percentile bootstrap (Efron & Tibshirani
1993, ch. 13) with a fixed seed. The values are sorted before resampling, so the interval depends
only on the multiset of per-image values: the result after a DDP gather (values in rank order) is
the same as the single-process result (values in data order).

Paired comparisons of two methods on the same images (``paired_bootstrap``) and the Holm (1979)
step-down correction for many of them (``holm``) live here too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger(__name__)

#: Bootstrap resamples of every reported interval unless a config says otherwise.
DEFAULT_NUM_RESAMPLES: int = 1000
#: Coverage of every reported interval unless a config says otherwise.
DEFAULT_CONFIDENCE: float = 0.95

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
        confidence: Coverage of the interval, e.g. ``DEFAULT_CONFIDENCE``.
        num_resamples: Number of bootstrap resamples.
        skipped: Images left out, by reason (see ``SKIP_REASONS``).
    """

    name: str
    value: float | None
    n: int
    low: float | None
    high: float | None
    confidence: float = DEFAULT_CONFIDENCE
    num_resamples: int = DEFAULT_NUM_RESAMPLES
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view for YAML/JSON/W&B."""
        return asdict(self)


def bootstrap_ci(
    values: Tensor,
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
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
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
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


def paired_bootstrap(
    a: Tensor,
    b: Tensor,
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of ``a - b`` over the same images, its percentile-bootstrap interval and p-value.

    The images are resampled in pairs (Efron & Tibshirani 1993, ch. 13), so what two methods
    share about an image cancels. Unlike ``bootstrap_ci`` the differences are not sorted first:
    pass both methods' values in the same image order (e.g. joined by image id).
    The p-value is two-sided: twice the share of resampled mean differences on the far side of
    0 (capped at 1), i.e. the smallest level at which the interval would exclude 0.

    Args:
        a: Per-image values of method a, shape ``(N,)``.
        b: Per-image values of method b on the same images in the same order, shape ``(N,)``.
        num_resamples: Number of resamples ``R``.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling generator (a CPU generator).

    Returns:
        ``{"diff": mean(a - b), "low", "high", "p", "n": N}``.

    Raises:
        ValueError: On empty inputs or inputs of different sizes.
    """
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(
            f"paired_bootstrap needs two non-empty tensors of the same size; got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    d = (a.double() - b.double()).flatten()
    n = d.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (num_resamples, n), generator=gen)
    boot = d[idx.to(d.device)].mean(1)
    alpha = (1 - confidence) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64, device=boot.device)
    lo, hi = torch.quantile(boot, q).tolist()
    p = min(1.0, 2 * min(float((boot <= 0).double().mean()), float((boot >= 0).double().mean())))
    return {"diff": float(d.mean()), "low": lo, "high": hi, "p": p, "n": n}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the order given.

    The ``i``-th smallest of ``m`` p-values (``i`` from 0) becomes
    ``max_{j <= i} min(1, (m - j) p_(j))``; rejecting where the adjusted value is below
    ``alpha`` controls the family-wise error rate at ``alpha``.

    Args:
        p_values: Unadjusted p-values.

    Returns:
        The adjusted p-values, one per input, in the input order.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    m, running = len(order), 0.0
    adjusted = [0.0] * m
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


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
    a DDP sync; ``skipped`` is a ``sum`` state over ``SKIP_REASONS``. Every valid image's id is
    kept beside its values (a ``cat`` state too), so ``per_image()`` can say which image a value
    belongs to, also after a DDP gather.

    Image ids: ``update(..., ids=...)`` takes ``(B,)`` integer ids (e.g. dataset indices). Without
    them each metric numbers the images it is given ``0, 1, 2, ...`` in update order (skipped
    images included), so metrics fed the same batches agree; under DDP, or when the metric is
    called as a module (``forward`` works on one batch's state), pass ids.

    Subclasses register their per-image states with ``_add_values(name)``, append with
    ``_append_valid`` and report with ``_columns()``: ``{reported key: (N,) values}`` in the
    order of ``compute()``.

    Args:
        num_resamples: Bootstrap resamples.
        confidence: Interval coverage.
        seed: Bootstrap seed.
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        num_resamples: int = DEFAULT_NUM_RESAMPLES,
        confidence: float = DEFAULT_CONFIDENCE,
        seed: int = 0,
        **kwargs: Any,
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
        self._value_names: list[str] = []
        self._images_seen = 0
        self._add_values("ids")

    # ------------------------------------------------------------------ states

    def _add_values(self, name: str) -> None:
        """Register a per-image ``cat`` state, read back with ``values(name)``."""
        self.add_state(f"cat_{name}", default=[], dist_reduce_fx="cat")
        self._value_names.append(name)

    def _append(self, name: str, values: Tensor) -> None:
        getattr(self, f"cat_{name}").append(values)

    def _batch_ids(self, ids: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """``(B,)`` long ids of a batch: the given ones, or the running counter's next ``B``.

        Raises:
            ValueError: If ``ids`` is not a ``(B,)`` integer tensor.
        """
        if ids is None:
            out = torch.arange(self._images_seen, self._images_seen + batch, device=device)
        else:
            if not isinstance(ids, Tensor) or ids.shape != (batch,) or ids.is_floating_point():
                got = (ids.dtype, tuple(ids.shape)) if isinstance(ids, Tensor) else type(ids)
                raise ValueError(f"ids must be a ({batch},) integer tensor; got {got}")
            out = ids.to(device=device, dtype=torch.long)
        self._images_seen += batch
        return out

    def _append_valid(self, ids: Tensor | None, valid: Tensor, **values: Tensor) -> None:
        """Append the valid images' ids and the given (already filtered) per-image values.

        Args:
            ids: ``(B,)`` image ids or None (running counter).
            valid: ``(B,)`` bool, the images that passed every check.
            **values: State name -> values of the valid images, ``(N_valid, ...)``.
        """
        self._append("ids", self._batch_ids(ids, valid.shape[0], valid.device)[valid])
        for name, v in values.items():
            self._append(name, v)

    def reset(self) -> None:
        """Clear every state and restart the image counter."""
        super().reset()
        self._images_seen = 0

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

    # ------------------------------------------------------------------ public views

    def values(self, name: str = "values") -> Tensor:
        """The per-image values of one state, concatenated over updates (local to this process).

        Args:
            name: State name: ``"values"`` for single-valued metrics, ``"ids"`` for the image
                ids, or a metric's own (``"deletion_auc"``, ``"morf"``, ``"spearman"``, ...).

        Returns:
            ``(N, ...)``: one row per valid image, in update order (``(0,)`` before any update).

        Raises:
            ValueError: On an unknown state name, listing the valid ones.
        """
        if name not in self._value_names:
            raise ValueError(
                f"unknown per-image state '{name}' of {type(self).__name__}; choose one of: "
                f"{', '.join(self._value_names)}"
            )
        state = getattr(self, f"cat_{name}")
        if isinstance(state, Tensor):
            return state
        if len(state) == 0:
            dtype = torch.long if name == "ids" else torch.get_default_dtype()
            return torch.empty(0, dtype=dtype, device=self.skipped.device)
        return dim_zero_cat(state)

    def _columns(self) -> dict[str, Tensor]:
        """``{reported key: (N,) per-image values}``, in the order ``compute()`` reports them."""
        raise NotImplementedError

    def per_image(self) -> dict[str, dict[int, float]]:
        """Per-image values by image id, one entry per key ``compute()`` reports.

        Under DDP the states are synced for the call (every process must call it). An id seen
        twice (e.g. a sampler padding the last batch) keeps its last value.

        Returns:
            ``{key: {image id: value}}``, ids in update order.
        """
        with self.sync_context(
            should_sync=self._to_sync, distributed_available=self.distributed_available_fn
        ):
            ids = self.values("ids").tolist()
            columns = self._columns()
        return {key: dict(zip(ids, col.tolist(), strict=True)) for key, col in columns.items()}

    def skipped_counts(self) -> dict[str, int]:
        """Left-out images by reason (all reasons, zeros included)."""
        return dict(zip(SKIP_REASONS, self.skipped.tolist(), strict=True))

    def _summary(self, name: str, values: Tensor) -> MetricResult:
        return summarize(
            name, values, self.skipped_counts(), self.num_resamples, self.confidence, self.seed
        )

    def _summaries(self) -> dict[str, MetricResult]:
        """``{key: MetricResult}`` of every column, in order."""
        return {key: self._summary(key, col) for key, col in self._columns().items()}
