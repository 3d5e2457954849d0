"""Golden values on tiny hand-built nets, computed by hand (docs/METHODS.md, "Explanation methods").

Net ``linear``: the CAM layer is an identity on the input, so ``A`` is the input ``(1, 2, 2, 2)``,
and the head is ``flatten -> Linear(8, 2)`` without bias, so ``g = dy^0/dA`` is row 0 of the
weight. Every expected map below is derived by hand in the comments.

    A0 = [[1, 2], [0, 3]]    G0 = [[1, -1], [2, 0]]      sum A0 = 6
    A1 = [[2, 3], [1, 1]]    G1 = [[0.5, 1], [-1, 0.5]]  sum A1 = 7
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from attncam.explain import Explainer, capture, count_hooks, normalize_maps
from attncam.explain.methods.guided import guided_relus

A = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]], [[2.0, 3.0], [1.0, 1.0]]]])
G = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[0.5, 1.0], [-1.0, 0.5]]])


def linear_net() -> nn.Module:
    net = nn.Sequential(
        OrderedDict(feat=nn.Identity(), flat=nn.Flatten(), fc=nn.Linear(8, 2, bias=False))
    )
    with torch.no_grad():
        net.fc.weight[0] = G.flatten()
        net.fc.weight[1] = -G.flatten()
    return net


def norm(x: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(x)
    return (t - t.min()) / (t.max() - t.min())


def explain(methods: list, net: nn.Module | None = None, x: torch.Tensor = A) -> dict:
    ex = Explainer(net or linear_net(), methods, layer="feat", upsample=False)
    return ex(x, torch.tensor([0]))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradcam_golden() -> None:
    # w = mean G = (0.5, 0.25); 0.5 A0 + 0.25 A1 = [[1, 1.75], [0.25, 1.75]]
    close(explain(["gradcam"])["gradcam"][0], norm([[1, 1.75], [0.25, 1.75]]))


def test_gradcampp_golden() -> None:
    # alpha = g^2 / (2 g^2 + S g^3) = 1 / (2 + S g) where g > 0 (S = sum A).
    # ch0: g=1 -> 1/8, g=2 -> 1/14: w0 = 1/8*1 + 1/14*2. ch1 (S=7): g=.5 -> 1/5.5 (twice),
    # g=1 -> 1/9: w1 = 2 * 0.5/5.5 + 1/9.
    w0, w1 = 1 / 8 + 2 / 14, 2 * 0.5 / 5.5 + 1 / 9
    expected = (w0 * A[0, 0] + w1 * A[0, 1]).tolist()
    close(explain(["gradcampp"])["gradcampp"][0], norm(expected))


def test_gradcampp_torchcam020_golden() -> None:
    # w = sum ReLU(g)^3: w0 = 1 + 8 = 9, w1 = 0.125 + 1 + 0.125 = 1.25
    out = explain([("gradcampp", {"variant": "torchcam020"})])["gradcampp[torchcam020]"]
    close(out[0], norm((9 * A[0, 0] + 1.25 * A[0, 1]).tolist()))


def test_gradcampp_eps_golden() -> None:
    # pytorch-grad-cam's denominator + 1e-6: alpha = g^2 / (2 g^2 + S g^3 + 1e-6).
    # ch0: g=1 -> 1/(8 + e); g=2 -> 4/(8 + 48 + e), times ReLU(g) = 2.
    # ch1: g=.5 -> .25/(.5 + 7*.125 + e), times .5, twice; g=1 -> 1/(2 + 7 + e).
    w0 = 1 / (8 + 1e-6) + 2 * 4 / (56 + 1e-6)
    w1 = 2 * 0.5 * 0.25 / (1.375 + 1e-6) + 1 / (9 + 1e-6)
    out = explain([("gradcampp", {"eps": 1e-6})])["gradcampp[eps=1e-06]"]
    close(out[0], norm((w0 * A[0, 0] + w1 * A[0, 1]).tolist()))


def test_xgradcam_golden() -> None:
    # w0 = sum(A0 G0)/6 = (1 - 2)/6 = -1/6; w1 = (1 + 3 - 1 + 0.5)/7 = 0.5
    # -A0/6 + A1/2 = [[5/6, 7/6], [0.5, 0]]
    close(explain(["xgradcam"])["xgradcam"][0], norm([[5 / 6, 7 / 6], [0.5, 0]]))


def test_layercam_golden() -> None:
    # ReLU(G0) A0 = [[1, 0], [0, 0]]; ReLU(G1) A1 = [[1, 3], [0, 0.5]]
    close(explain(["layercam"])["layercam"][0], norm([[2, 3], [0, 0.5]]))


def test_hirescam_golden() -> None:
    # G0 A0 = [[1, -2], [0, 0]]; G1 A1 = [[1, 3], [-1, 0.5]]; sum, ReLU = [[2, 1], [0, 0.5]]
    close(explain(["hirescam"])["hirescam"][0], norm([[2, 1], [0, 0.5]]))


def test_scacam_golden() -> None:
    # alpha = mean G = (0.5, 0.25): 0.5 G0 A0 + 0.25 G1 A1 = [[0.75, -0.25], [-0.25, 0.125]]
    close(explain(["scacam"])["scacam"][0], norm([[0.75, 0], [0, 0.125]]))


def test_featuremap_golden() -> None:
    # A0 + A1 = [[3, 5], [1, 4]]
    close(explain(["featuremap"])["featuremap"][0], norm([[3, 5], [1, 4]]))


def test_counterfactual_golden() -> None:
    # g -> -g. LayerCAM: ReLU(-G0) = [[0, 1], [0, 0]] so ReLU(-G0) A0 = [[0, 2], [0, 0]];
    # ReLU(-G1) = [[0, 0], [1, 0]] so ReLU(-G1) A1 = [[0, 0], [1, 0]].
    out = explain([("layercam", {"counterfactual": True})])["layercam[counterfactual]"]
    close(out[0], norm([[0, 2], [1, 0]]))
    # Grad-CAM: every location of 0.5 A0 + 0.25 A1 is positive, so -that is all zeros.
    out = Explainer(linear_net(), ["gradcam"], layer="feat", counterfactual=True)(A, [0])
    assert torch.equal(out["gradcam[counterfactual]"], torch.zeros(1, 2, 2))


def test_smoothgradcampp_zero_noise_is_gradcampp() -> None:
    out = explain(["gradcampp", ("smoothgradcampp", {"sigma": 0.0, "n": 3})])
    close(out["smoothgradcampp[n=3,sigma=0.0]"], out["gradcampp"])


def test_every_cam_method_on_constant_activations_gives_zeros() -> None:
    # Channel-weight methods on constant channels give a constant map (pixel-weight methods
    # do not: their weights vary over pixels).
    const = torch.full((1, 2, 2, 2), 3.0)
    methods = ["featuremap", "gradcam", "gradcampp", "xgradcam", "eigencam", "scorecam"]
    methods += ["ablationcam", ("smoothgradcampp", {"sigma": 0.0, "n": 1})]
    out = explain(methods, x=const)
    for name, m in out.items():
        assert torch.equal(m, torch.zeros(1, 2, 2)), name


def test_normalize_maps_constant_and_nan() -> None:
    maps = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).view(3, 3)])
    maps[1, 0, 0] = float("nan")
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(3, 3))
    assert torch.isfinite(out).all() and out.min() == 0 and out.max() == 1


# --------------------------------------------------------------------------- GAP -> FC


def gap_net() -> nn.Module:
    """conv3x3 -> ReLU -> GAP -> Linear: CAM applies, gradients are W_fc / Z everywhere."""
    torch.manual_seed(3)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 6, 3, padding=1),
            relu=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 4),
        )
    )


def test_cam_equals_gradcam_on_gap_fc() -> None:
    # SCA-CAM eq. 6: Grad-CAM's weights are W_fc[c] / Z, so the normalised maps coincide.
    x = torch.rand(3, 3, 8, 8)
    out = Explainer(gap_net(), ["cam", "gradcam"], layer="relu", classifier="fc")(x)
    close(out["cam[classifier=fc]"], out["gradcam"])
    assert out["gradcam"].amax((1, 2)).min() == 1


def test_scacam_fc_equals_grad_on_gap_fc() -> None:
    # W_fc[c, k] = Z * mean g^k: channel_weight=fc and =grad differ by the factor Z only.
    x = torch.rand(2, 3, 8, 8)
    ex = Explainer(
        gap_net(), ["scacam", ("scacam", {"channel_weight": "fc", "classifier": "fc"})], "relu"
    )
    out = ex(x)
    close(out["scacam"], out["scacam[channel_weight=fc,classifier=fc]"])


def test_gradcampp_closed_form_against_exp_derivatives() -> None:
    # Chattopadhay et al. eq. 19 with Y = exp(y) and y linear in A: the higher derivatives of Y
    # are exp(y) g^2 and exp(y) g^3, so alpha = g^2 / (2 g^2 + sum_ab A_ab g^3); computed here
    # with autograd's first derivative on the GAP net.
    net = gap_net().eval()
    x = torch.rand(2, 3, 8, 8)
    a = net.relu(net.conv(x)).detach().requires_grad_()
    y = net.fc(net.flat(net.pool(a)))
    t = y.argmax(1)
    (g,) = torch.autograd.grad(y.gather(1, t[:, None]).sum(), a)
    s = a.detach().sum((2, 3), keepdim=True)
    den = 2 * g**2 + s * g**3
    alpha = torch.where((g > 0) & (den != 0), g**2 / den, torch.zeros_like(g))
    w = (alpha * g.clamp(min=0)).sum((2, 3))
    raw = (w[..., None, None] * a.detach()).sum(1).clamp(min=0)
    out = Explainer(net, ["gradcampp"], layer="relu", upsample=False)(x)
    close(out["gradcampp"], normalize_maps(raw))


def test_guided_gradcam_paper_factor_is_the_cam_itself() -> None:
    # Selvaraju et al. sec. 3: guided backprop times ReLU(sum_k w_k A^k), not min-max shifted.
    # On the GAP net at its 8 x 8 conv output (no upsampling) w_k = W_fc[c, k] / 64.
    net = gap_net().eval()
    x = torch.rand(2, 3, 8, 8)
    methods = ["gradcam", "guided_gradcam", ("guided_gradcam", {"variant": "minmax"})]
    res = Explainer(net, methods, layer="relu").explain(x)
    a = net.relu(net.conv(x)).detach()
    w = net.fc.weight.detach()[res.targets] / 64
    raw = torch.relu(torch.einsum("bk,bkhw->bhw", w, a))
    gx = res.extras["guided_backprop.gradient"]
    close(res.extras["guided_gradcam.gradient"], gx * raw[:, None])
    close(res.maps["guided_gradcam"], normalize_maps(gx.abs().amax(1) * raw))
    # The minmax variant multiplies by the normalised map instead (its minimum subtracted).
    close(res.extras["guided_gradcam[minmax].gradient"], gx * res.maps["gradcam"][:, None])
    with pytest.raises(ValueError, match="variant=minmax"):
        Explainer(net, [("guided_gradcam", {"cam": "occlusion"})], layer="relu")
    two = Explainer(net, [("guided_gradcam", {"cam_options": {"layer": ["conv", "relu"]}})], "relu")
    assert torch.isfinite(two(x)["guided_gradcam[cam_options={'layer': ['conv', 'relu']}]"]).all()


# --------------------------------------------------------------------------- guided backprop


def relu_net(inplace: bool) -> nn.Module:
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 2, 1, bias=False),
            relu=nn.ReLU(inplace=inplace),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 2, bias=False),
        )
    )
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net.fc.weight[0] = torch.tensor([-1.0, 1.0, 1.0, 1.0])
        net.fc.weight[1] = 0
    return net


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_golden(inplace: bool) -> None:
    # x = [1, -2]; h0 = x = [1, -2], h1 = -x = [-1, 2]; active: h0 at px0, h1 at px1.
    # dy/dr = [[-1, 1], [1, 1]]. Plain backprop: dx = (-1)(1) + (1)(-1) = [-1, -1] (constant).
    # Guided: clamp(dy/dr, 0) * active = [[0, 0], [0, 1]] -> dx = [0, -1]; map |dx| = [0, 1].
    x = torch.tensor([[[[1.0, -2.0]]]])
    ex = Explainer(relu_net(inplace), ["guided_backprop"], layer="relu")
    res = ex.explain(x, torch.tensor([0]))
    close(res.extras["guided_backprop.gradient"], torch.tensor([[[[0.0, -1.0]]]]))
    close(res.maps["guided_backprop"], torch.tensor([[[0.0, 1.0]]]))


def test_guided_relus_leaves_relu_alone_outside_context() -> None:
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    with guided_relus():
        (g,) = torch.autograd.grad((torch.relu(x) * torch.tensor([1.0, -3.0])).sum(), x)
    assert g.tolist() == [0.0, 0.0]
    (g,) = torch.autograd.grad((torch.relu(x) * torch.tensor([1.0, -3.0])).sum(), x)
    assert g.tolist() == [0.0, -3.0]


# --------------------------------------------------------------------------- capture


def test_capture_records_and_removes_hooks_on_error() -> None:
    net = linear_net()
    with capture(net, ["feat", "fc", "fc:input"]) as store:
        y = net(A)
    assert torch.equal(store["feat"], A) and torch.equal(store["fc"], y)
    assert store["fc:input"].shape == (1, 8)
    assert count_hooks(net) == 0
    with pytest.raises(RuntimeError), capture(net, ["feat"]):
        net(torch.zeros(1, 3))
    assert count_hooks(net) == 0
    with pytest.raises(ValueError, match="unknown layer 'nope'"), capture(net, ["nope"]):
        pass
    assert count_hooks(net) == 0
