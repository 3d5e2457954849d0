"""Cascading weight-randomisation sanity check (Adebayo et al. 2018) on a toy model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from attncam.metrics import (
    SanityCheck,
    cascading_randomization,
    randomizable_layers,
    run_sanity_check,
)


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def input_gradient(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """|d y^c / d x| summed over channels, min-max normalised: depends on every weight."""
    x = images.clone().requires_grad_(True)
    score = model(x).gather(1, targets[:, None]).sum()
    (g,) = torch.autograd.grad(score, x)
    m = g.abs().sum(1)
    lo = m.flatten(1).min(1).values[:, None, None]
    hi = m.flatten(1).max(1).values[:, None, None]
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def image_only(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """A model-independent 'explanation' (an edge-detector-like baseline): fails the check."""
    return images.mean(1)


def test_layers_top_down_and_model_unchanged() -> None:
    model = _toy()
    assert randomizable_layers(model) == ["6", "2", "0"]
    before = [p.clone() for p in model.parameters()]
    images, targets = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])
    rng = torch.get_rng_state()
    out = list(cascading_randomization(model, input_gradient, images, targets))
    assert [n for n, _ in out] == ["6", "2", "0"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())  # global RNG restored
    with pytest.raises(ValueError, match="unknown layer 'fc'"):
        list(cascading_randomization(model, input_gradient, images, targets, ["fc"]))


def test_model_dependent_maps_decorrelate_and_independent_maps_do_not() -> None:
    model = _toy()
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    dep = run_sanity_check(model, input_gradient, images, targets).compute()
    assert list(dep) == ["spearman@6", "ssim@6", "spearman@2", "ssim@2", "spearman@0", "ssim@0"]
    assert dep["spearman@0"].value < 0.9 and dep["ssim@0"].value < 0.9
    assert dep["spearman@0"].n == 4 and dep["spearman@0"].low <= dep["spearman@0"].high
    indep = run_sanity_check(model, image_only, images, targets).compute()
    assert all(r.value == pytest.approx(1.0, abs=1e-5) for r in indep.values())


def test_constant_maps_count_and_bad_layers() -> None:
    metric = SanityCheck(["a", "b"])
    orig = torch.rand(2, 12, 12)
    metric.update(orig, {"a": orig, "b": torch.zeros(2, 12, 12)})
    r = metric.compute()
    assert r["spearman@a"].value == pytest.approx(1.0) and r["spearman@b"].value == 0.0
    assert metric.constant_map_counts() == {"a": 0, "b": 2}
    with pytest.raises(ValueError, match="expected"):
        metric.update(orig, {"b": orig, "a": orig})
