"""Bootstrap intervals: coverage of the true mean, determinism, order invariance."""

from __future__ import annotations

import pytest
import torch

from attncam.metrics import bootstrap_ci, summarize


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
