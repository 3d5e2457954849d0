"""Maps at layers whose output is modified in place later in the forward pass (issue 13, item 1).

The ground truth is the same network with those operations made out of place: every
``ReLU(inplace=True)`` set to ``inplace=False`` and torchvision's ``BasicBlock`` running
``out = out + identity`` instead of ``out += identity``. Same weights, same values, so every map
must agree to float32 round-off. Before the fix the engine explained the *next* operation's output
(vgg11 ``features.18`` conv -> the in-place ReLU ``features.19``; resnet18 ``layer4.1.bn2`` -> the
in-place add and ReLU): Grad-CAM was 0.33 (vgg11) and 0.86 (resnet18) away from the ground truth
on these inputs, and featuremap, Eigen-CAM and Score-CAM as far as 1.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from attncam.explain import Explainer, capture

# (model, layer, input size): the layer is 2 x 2 at that size.
CASES = {"vgg11": ("features.18", 32), "resnet18": ("layer4.1.bn2", 48)}

GRADIENT = [
    "gradcam",
    "gradcampp",
    ("smoothgradcampp", {"n": 2, "seed": 0}),
    "xgradcam",
    "layercam",
    "hirescam",
    "scacam",
    "guided_gradcam",
    ("guided_gradcam", {"variant": "minmax"}),
]
ACTIVATION = ["featuremap", "eigencam"]
PERTURBATION = ["scorecam", "ablationcam"]


def _basic_block_out_of_place(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def out_of_place(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every in-place operation after a CAM layer made out of place."""
    gt = copy.deepcopy(net)
    for m in gt.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if isinstance(m, BasicBlock):
            m.forward = types.MethodType(_basic_block_out_of_place, m)
    return gt


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, str, torch.Tensor, str]:
    torch.manual_seed(0)
    net = getattr(torchvision.models, request.param)(weights=None).eval()
    layer, size = CASES[request.param]
    x = torch.rand(2, 3, size, size)
    return net, out_of_place(net), layer, x, request.param


def _compare(case: tuple, methods: list) -> None:
    net, gt, layer, x, _ = case
    res = Explainer(net, methods, layer=layer).explain(x)
    ref = Explainer(gt, methods, layer=layer).explain(x, res.targets)
    for name, m in res.maps.items():
        torch.testing.assert_close(m, ref.maps[name], atol=1e-5, rtol=0, msg=name)
    # Most maps are real maps, not vanished ones (featuremap sums pre-ReLU values: it may vanish).
    assert sum(bool(m.amax() == 1) for m in res.maps.values()) >= len(res.maps) - 1
    for name, v in res.extras.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(v, ref.extras[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_and_activation_methods_match_out_of_place_ground_truth(case: tuple) -> None:
    extra = [("cam", {"classifier": "fc"})] if case[-1] == "resnet18" else []
    _compare(case, GRADIENT + ACTIVATION + extra)


@pytest.mark.slow
def test_perturbation_methods_match_out_of_place_ground_truth(case: tuple) -> None:
    _compare(case, PERTURBATION)


def test_capture_records_the_layer_output_and_its_true_gradient(case: tuple) -> None:
    net, gt, layer, x, _ = case
    stores = []
    for model in (net, gt):
        with torch.enable_grad(), capture(model, [layer], grad=[layer]) as store:
            y = model(x)
        (g,) = torch.autograd.grad(y[:, 0].sum(), store[layer])
        stores.append((store[layer].detach(), g))
    (a, g), (a_ref, g_ref) = stores
    assert (a < 0).any()  # the in-place ReLU / add would have changed these values
    torch.testing.assert_close(a, a_ref, atol=0, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=1e-5)


class _ModifiesAlias(nn.Module):
    """``tap`` is an identity on ``h``, which the caller changes in place afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.tap = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        z = self.tap(h)
        h.mul_(2)  # an in-place change of the tensor the identity returned
        return self.fc((z + h).mean((2, 3)))


def test_identity_output_kept_private_and_modified_input_is_an_error() -> None:
    torch.manual_seed(0)
    net = _ModifiesAlias().eval()
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad(), capture(net, ["tap", "conv"]) as store:
        net(x)
    # The identity's output is a private copy: the caller's h.mul_(2) does not reach it.
    torch.testing.assert_close(store["tap"], net.conv(x).detach())
    res = Explainer(net, ["gradcam", "featuremap"], layer="tap").explain(x)
    assert all(torch.isfinite(m).all() for m in res.maps.values())
    # A recorded *input* stays the caller's tensor; modified in place later, it is reported.
    with pytest.raises(RuntimeError, match=r"modified in place after it was captured"):
        Explainer(net, ["gradcam"], layer="tap:input")(x)


def test_inplace_module_own_input_is_recorded_before_it_runs() -> None:
    net = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(inplace=True), pool=nn.Flatten())
    )
    x = torch.rand(1, 3, 5, 5)
    with torch.no_grad(), capture(net, ["relu:input", "conv"]) as store:
        net(x)
    expected = net.conv(x)
    assert (expected < 0).any()
    torch.testing.assert_close(store["relu:input"], expected)
    torch.testing.assert_close(store["conv"], expected)
