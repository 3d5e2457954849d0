"""Agreement with the peer libraries (test-only dependencies), and how their Grad-CAM++ differs.

The peers' backward passes are made cheaper by freezing the parameters and letting the input
require grad instead (their maths is unchanged; only the parameter gradients are skipped). Maps are
compared after normalisation: torchcam returns maps at the layer's size with its own
``+1e-8`` in the normaliser, so its output is upsampled and normalised again here (both are affine
in the raw map, and bilinear upsampling is linear).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from attncam.explain import Explainer, capture, normalize_maps
from attncam.explain.methods.base import upsample

pgc = pytest.importorskip("pytorch_grad_cam")
tcm = pytest.importorskip("torchcam.methods")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

warnings.filterwarnings("ignore", module="torchcam")

MODELS = {"resnet18": "layer4", "vgg16": "features.29"}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    return _frozen(getattr(torchvision.models, request.param)(weights=None)), MODELS[request.param]


def _frozen(net: nn.Module) -> nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def _pgc(cls: type, net: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with cls(net, [net.get_submodule(layer)]) as cam:
        maps = cam(x.clone().requires_grad_(), [ClassifierOutputTarget(int(i)) for i in t])
    return torch.from_numpy(maps)


def _torchcam(
    cls: type, net: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    with cls(net, layer) as cam:
        low = cam(t.tolist(), net(x.clone().requires_grad_()))[0]
    return normalize_maps(upsample(low, tuple(x.shape[-2:])))


def test_agreement_with_peers(model: tuple[nn.Module, str]) -> None:
    net, layer = model
    x = torch.rand(2, 3, 48, 48)  # 2 x 2 (ResNet) and 3 x 3 (VGG) at the CAM layer
    keys = ["gradcam", "xgradcam", "layercam", "hirescam"]
    res = Explainer(net, keys, layer=layer).explain(x)
    t = res.targets
    for key, cls in [
        ("gradcam", pgc.GradCAM),
        ("xgradcam", pgc.XGradCAM),
        ("layercam", pgc.LayerCAM),
        ("hirescam", pgc.HiResCAM),
    ]:
        torch.testing.assert_close(res.maps[key], _pgc(cls, net, layer, x, t), atol=1e-4, rtol=0)
    for key, cls in [
        ("gradcam", tcm.GradCAM),
        ("xgradcam", tcm.XGradCAM),
        ("layercam", tcm.LayerCAM),
    ]:
        torch.testing.assert_close(
            res.maps[key], _torchcam(cls, net, layer, x, t), atol=1e-4, rtol=0
        )


def test_torchcam_gradcampp_is_sum_relu_g_cubed(model: tuple[nn.Module, str]) -> None:
    net, layer = model
    x = torch.rand(2, 3, 64, 64)
    t = net(x).argmax(1)
    with tcm.GradCAMpp(net, layer) as cam:
        weights = cam._get_weights(t.tolist(), net(x.clone().requires_grad_()))[0]
        g = cam.hook_g[0]
    # Its alpha division acts on a boolean-mask copy: the weights are sum g^2 ReLU(g).
    torch.testing.assert_close(weights, torch.relu(g).pow(3).sum((2, 3)), rtol=1e-6, atol=0)
    ours = Explainer(net, [("gradcampp", {"variant": "torchcam020"}), "gradcampp"], layer=layer)
    out = ours(x)
    ref = _torchcam(tcm.GradCAMpp, net, layer, x, t)
    torch.testing.assert_close(out["gradcampp[torchcam020]"], ref, atol=1e-5, rtol=0)
    assert (out["gradcampp"] - ref).abs().max() > 1e-3


def test_torchcam_smoothgradcampp_reproduced_exactly() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()  # torchcam needs trainable params here
    x = torch.rand(2, 3, 64, 64)
    t = net(x).argmax(1)
    torch.manual_seed(7)
    with tcm.SmoothGradCAMpp(net, "layer4") as cam:
        net(x)
        low = cam(t.tolist())[0]
    ref = normalize_maps(upsample(low, (64, 64)))
    torch.manual_seed(7)  # same noise draws: n=4, N(0, 0.3) on the (here unnormalised) input
    out = Explainer(net, [("smoothgradcampp", {"variant": "torchcam020"})], "layer4")(x, t)
    torch.testing.assert_close(out["smoothgradcampp[torchcam020]"], ref, atol=1e-5, rtol=0)


def test_pytorch_grad_cam_gradcampp_eps_dominates() -> None:
    torch.manual_seed(0)
    net = _frozen(torchvision.models.resnet18(weights=None))
    x = torch.rand(2, 3, 128, 128)
    res = Explainer(net, ["gradcampp", ("gradcampp", {"eps": 1e-6})], "layer4").explain(x)
    ref = _pgc(pgc.GradCAMPlusPlus, net, "layer4", x, res.targets)
    # Reproduced exactly once its 1e-6 is added to alpha's denominator ...
    torch.testing.assert_close(res.maps["gradcampp[eps=1e-06]"], ref, atol=1e-5, rtol=0)
    # ... and different from the formula otherwise,
    assert (res.maps["gradcampp"] - ref).abs().max() > 1e-2
    # because with gradients ~1e-3 the constant outweighs the denominator on many pixels.
    with torch.enable_grad(), capture(net, ["layer4"], grad=["layer4"]) as store:
        y = net(x)
    a = store["layer4"]
    (g,) = torch.autograd.grad(y.gather(1, res.targets[:, None]).sum(), a)
    den = 2 * g**2 + a.detach().sum((2, 3), keepdim=True) * g**3
    assert g.abs().median() < 3e-3
    assert (den[g > 0] < 1e-6).float().mean() > 0.1
