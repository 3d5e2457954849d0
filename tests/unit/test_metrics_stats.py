"""Bootstrap intervals (coverage, determinism, order invariance), paired comparisons, Holm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attncam.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_NUM_RESAMPLES,
    MetricResult,
    bootstrap_ci,
    holm,
    paired_bootstrap,
    summarize,
)


def test_bootstrap_covers_the_true_mean_about_95_percent() -> None:
    g = torch.Generator().manual_seed(0)
    trials, n, hits = 300, 60, 0
    for t in range(trials):
        x = torch.empty(n).exponential_(1.0, generator=g)  # skewed, true mean 1
        low, high = bootstrap_ci(x, num_resamples=500, seed=t)
        hits += low <= 1.0 <= high
    assert 0.89 <= hits / trials <= 0.98


def test_bootstrap_is_seeded_and_order_invariant() -> None:
    x = torch.rand(50)
    a = bootstrap_ci(x, 200, seed=3)
    assert a == bootstrap_ci(x[torch.randperm(50)], 200, seed=3)
    assert a != bootstrap_ci(x, 200, seed=4)
    assert bootstrap_ci(torch.tensor([2.0]), 10) == (2.0, 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(torch.empty(0))


def test_summarize_reports_n_ci_and_skips() -> None:
    r = summarize("x", torch.tensor([1.0, 2.0, 3.0]), {"empty_mask": 2, "excluded": 0})
    assert r.value == 2.0 and r.n == 3 and r.low < 2.0 < r.high
    assert r.skipped == {"empty_mask": 2}
    empty = summarize("x", torch.empty(0), {"non_finite": 1})
    assert empty.value is None and empty.n == 0


def test_one_source_of_bootstrap_defaults() -> None:
    assert (DEFAULT_NUM_RESAMPLES, DEFAULT_CONFIDENCE) == (1000, 0.95)
    r = MetricResult("x", 1.0, 1, 1.0, 1.0)
    assert (r.num_resamples, r.confidence) == (DEFAULT_NUM_RESAMPLES, DEFAULT_CONFIDENCE)


def _paired_bootstrap_reference(
    a: Tensor, b: Tensor, num_resamples: int, confidence: float, seed: int
) -> dict[str, float]:
    """The paired bootstrap scripts/reproduce.py used before it moved to metrics/stats.py."""
    d = (a.double() - b.double()).flatten()
    n = d.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (num_resamples, n), generator=gen)
    boot = d[idx].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    p = min(1.0, 2 * min(float((boot <= 0).double().mean()), float((boot >= 0).double().mean())))
    return {"diff": float(d.mean()), "low": lo, "high": hi, "p": p, "n": n}


def test_paired_bootstrap_by_hand() -> None:
    # Every difference is 1: every resampled mean is 1, none is on the far side of 0.
    r = paired_bootstrap(torch.tensor([3.0, 2.0, 5.0]), torch.tensor([2.0, 1.0, 4.0]))
    assert r == {"diff": 1.0, "low": 1.0, "high": 1.0, "p": 0.0, "n": 3}
    # No difference: every resampled mean is 0, on both sides at once, p capped at 1.
    same = torch.tensor([0.1, 0.7])
    assert paired_bootstrap(same, same, 10) == {
        "diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0, "n": 2
    }  # fmt: skip
    # d = (1, -1): each resampled mean of 2 is -1, 0 or 1; the interval spans them.
    r = paired_bootstrap(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 400, 0.5)
    assert r["diff"] == 0.0 and r["low"] in (-1.0, 0.0) and r["high"] in (0.0, 1.0)
    assert r["p"] == 1.0
    with pytest.raises(ValueError, match="same size"):
        paired_bootstrap(torch.rand(3), torch.rand(2))


def test_paired_bootstrap_matches_the_reproduction_script() -> None:
    g = torch.Generator().manual_seed(5)
    for n, seed in ((2, 0), (17, 3), (200, 7)):
        a, b = torch.rand(n, generator=g), torch.rand(n, generator=g) * 0.9
        assert paired_bootstrap(a, b, 300, 0.9, seed) == _paired_bootstrap_reference(
            a, b, 300, 0.9, seed
        )


def test_holm_by_hand() -> None:
    # sorted: 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.2]) == [0.2] and holm([]) == []
    assert holm([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])
