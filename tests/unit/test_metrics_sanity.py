"""Cascading weight-randomisation sanity check (Adebayo et al. 2018) on a toy model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from attncam.metrics import (
    SanityCheck,
    block_layers,
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


def _block_groups_reference(net: nn.Module) -> list[str]:
    """``block_groups`` of scripts/reproduce.py before it moved here as ``block_layers``."""
    groups: list[str] = [net.classifier_name]
    head = net.get_submodule("head")
    for name, m in reversed(list(head.named_modules())):
        full = f"head.{name}"
        if name and full != groups[0] and any(True for _ in m.parameters(recurse=False)):
            groups.append(full)
    for name, child in reversed(list(net.get_submodule("features").named_children())):
        subs = list(child.named_children())
        if isinstance(child, nn.Sequential) and len(subs) > 1:
            for sub, m in reversed(subs):
                if any(True for _ in m.parameters()):
                    groups.append(f"features.{name}.{sub}")
        elif any(True for _ in child.parameters()):
            groups.append(f"features.{name}")
    return groups


def _reset_reference(module: nn.Module, seed: int) -> None:
    """``_reset`` of scripts/reproduce.py (whole blocks, BatchNorm statistics included)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
                m.reset_parameters()
            if isinstance(m, _BatchNorm):
                m.reset_running_stats()


def _two_maps(model: nn.Module, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return {
        "grad": input_gradient(model, images, targets),
        "image": image_only(model, images, targets),
    }


def test_block_randomisation_is_the_reproduction_loop_bit_for_bit() -> None:
    from attncam.models.net import AttentionNet

    torch.manual_seed(0)
    net = AttentionNet("tiny", 4, attention="cbam").eval()
    with torch.no_grad():  # non-default BatchNorm statistics, so resetting them shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.rand(2, 3, 32, 32)
    targets = net(images).argmax(1)
    groups = block_layers(net, net.classifier_name)
    assert groups == _block_groups_reference(net)
    assert groups[0] == "head.fc" and groups[-1] == "features.conv1" and len(groups) >= 5
    # The old loop: one deep copy, whole blocks reset cumulatively, seed + j.
    randomized = copy.deepcopy(net)
    expected = []
    for j, g in enumerate(groups):
        _reset_reference(randomized.get_submodule(g), 7 + j)
        expected.append((g, _two_maps(randomized, images, targets)))
    rng = torch.get_rng_state()
    got = list(cascading_randomization(net, _two_maps, images, targets, groups, 7, recursive=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert [g for g, _ in got] == groups
    for (g, want), (_, have) in zip(expected, got, strict=True):
        for k in want:
            assert torch.equal(want[k], have[k]), (g, k)
    with pytest.raises(ValueError, match="block_layers needs 'features', 'head'"):
        block_layers(_toy(), "6")


def test_layer_randomisation_is_unchanged_bit_for_bit() -> None:
    model = _toy()
    images, targets = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])
    layers = randomizable_layers(model)
    randomized = copy.deepcopy(model)
    expected = []
    for j, name in enumerate(layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3 + j)
            randomized.get_submodule(name).reset_parameters()
        expected.append(input_gradient(randomized, images, targets))
    got = list(cascading_randomization(model, input_gradient, images, targets, seed=3))
    assert all(torch.equal(a, b) for a, (_, b) in zip(expected, got, strict=True))
    blocks = list(
        cascading_randomization(model, input_gradient, images, targets, seed=3, recursive=True)
    )  # leaf layers: recursive re-initialises the same parameters
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, blocks, strict=True))


def test_sanity_check_per_image_by_layer() -> None:
    metric = SanityCheck(["a", "b"])
    orig = torch.rand(3, 12, 12)
    keep = torch.tensor([True, False, True])
    metric.update(orig, {"a": orig, "b": orig.flip(-1)}, keep, ids=torch.tensor([5, 6, 7]))
    per = metric.per_image()
    assert list(per) == ["spearman@a", "ssim@a", "spearman@b", "ssim@b"]
    assert list(per["spearman@a"]) == [5, 7] and per["spearman@a"][5] == pytest.approx(1.0)
