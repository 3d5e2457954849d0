"""captum's attributions behind the Explainer: golden values on a linear model, completeness,
the channel reductions, seeding, and a clear error without captum."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from attncam.explain import Explainer
from attncam.explain.captum_adapter import reduce_channels
from attncam.models import AttentionNet

pytest.importorskip("captum")

H = W = 4


class Linear(nn.Module):
    """``logits = V @ flatten(x)``: its input gradient for class ``c`` is ``V[c]``."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(3 * H * W, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).flatten(1))


@pytest.fixture
def linear() -> Linear:
    torch.manual_seed(2)
    return Linear().eval()


def _norm(m: torch.Tensor) -> torch.Tensor:
    return (m - m.amin((1, 2), keepdim=True)) / (
        m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True)
    )


def test_reductions_by_hand() -> None:
    a = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.5]], [[1.0, 0.5]]]])  # (1, 3, 1, 2)
    # |sum_c|: |1 - 3 + 1| = 1, |-2 + 0.5 + 0.5| = 1 -> constant -> zeros
    assert torch.equal(reduce_channels(a, "abs_of_sum"), torch.zeros(1, 1, 2))
    # sum_c |.|: 5 and 3 -> [1, 0]; max_c |.|: 3 and 2 -> [1, 0]
    assert torch.equal(reduce_channels(a, "sum_of_abs"), torch.tensor([[[1.0, 0.0]]]))
    assert torch.equal(reduce_channels(a, "max_abs"), torch.tensor([[[1.0, 0.0]]]))
    with pytest.raises(ValueError, match="choose one of: abs_of_sum, sum_of_abs, max_abs"):
        reduce_channels(a, "mean")


def test_input_x_gradient_and_integrated_gradients_on_a_linear_model(linear: Linear) -> None:
    """For ``f = V x``: Input x Gradient is ``x * V_c``, and so is Integrated Gradients from a
    black baseline (the integrand is constant; completeness is exact)."""
    x = torch.rand(2, 3, H, W)
    targets = torch.tensor([0, 2])
    ex = Explainer(linear, ["input_x_gradient", "integrated_gradients"], layer="feat")
    res = ex.explain(x, targets)
    grad = linear.fc.weight[targets].view(2, 3, H, W).detach()
    want = x * grad
    for name in ("input_x_gradient", "integrated_gradients"):
        assert torch.allclose(res.extras[f"{name}.attribution"], want, atol=1e-5), name
        assert torch.allclose(res.maps[name], _norm((x * grad).sum(1).abs()), atol=1e-5), name
    assert res.extras["integrated_gradients.delta"].abs().max() < 1e-4


def test_integrated_gradients_completeness_on_a_network() -> None:
    """Sundararajan et al., Prop. 1: the attributions sum to f_c(x) - f_c(baseline)."""
    torch.manual_seed(0)
    net = AttentionNet("tiny", 4, "cbam").eval()
    x = torch.rand(2, 3, 32, 32)
    opts = {"n_steps": 256, "method": "riemann_trapezoid", "baseline": 0.25}
    res = Explainer(net, [("integrated_gradients", opts)]).explain(x)
    name = next(iter(res.maps))
    total = res.extras[f"{name}.attribution"].sum((1, 2, 3))
    with torch.no_grad():
        gap = net(x) - net(torch.full_like(x, 0.25))
    gap = gap.gather(1, res.targets[:, None])[:, 0]
    assert torch.allclose(total, gap, rtol=0.02, atol=1e-3)


def test_smoothgrad_without_noise_is_the_gradient_magnitude(linear: Linear) -> None:
    x = torch.rand(1, 3, H, W)
    res = Explainer(
        linear, [("smoothgrad", {"n": 3, "sigma": 0.0}), ("smoothgrad", {"abs": False, "sigma": 0.0})],
        layer="feat",
    ).explain(x, torch.tensor([1]))  # fmt: skip
    v = linear.fc.weight[1].view(1, 3, H, W).detach()
    assert torch.allclose(res.extras["smoothgrad[n=3,sigma=0.0].attribution"], v.abs(), atol=1e-6)
    assert torch.allclose(res.maps["smoothgrad[n=3,sigma=0.0]"], _norm(v.abs().sum(1)), atol=1e-5)
    signed = res.extras["smoothgrad[abs=False,sigma=0.0].attribution"]
    assert torch.allclose(signed, v, atol=1e-6)


def test_smoothgrad_seed_reproduces_without_touching_the_global_generator() -> None:
    torch.manual_seed(0)
    net = AttentionNet("tiny", 4, "none").eval()
    x = torch.rand(1, 3, 32, 32)
    ex = Explainer(net, [("smoothgrad", {"n": 4, "seed": 7})])
    state = torch.get_rng_state()
    a, b = ex(x)["smoothgrad[n=4,seed=7]"], ex(x)["smoothgrad[n=4,seed=7]"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    other = Explainer(net, [("smoothgrad", {"n": 4, "seed": 8})])(x)["smoothgrad[n=4,seed=8]"]
    assert not torch.allclose(a, other)


def test_missing_captum_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, linear: Linear) -> None:
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r"pip install 'attncam\[captum\]'"):
        Explainer(linear, ["gradcam", "integrated_gradients"], layer="feat")
    assert Explainer(linear, ["gradcam"], layer="feat").names == ["gradcam"]


def test_options_are_checked(linear: Linear) -> None:
    with pytest.raises(ValueError, match="invalid reduce='mean'.*abs_of_sum"):
        Explainer(linear, [("input_x_gradient", {"reduce": "mean"})], layer="feat")
    with pytest.raises(ValueError, match="invalid method='simpson'.*gausslegendre"):
        Explainer(linear, [("integrated_gradients", {"method": "simpson"})], layer="feat")
