"""Agreement with the peer libraries (test-only dependencies), and where their definitions differ.

Every method a peer implements with attncam's definition is compared here:

| method | peer(s) |
|---|---|
| gradcam, xgradcam, layercam | pytorch-grad-cam, torchcam |
| hirescam | pytorch-grad-cam |
| gradcampp | pytorch-grad-cam with its ``eps=1e-6`` (exact); torchcam differs (see below) |
| smoothgradcampp | torchcam, variant ``torchcam020`` (exact) |
| cam | torchcam ``CAM`` |
| scorecam | pytorch-grad-cam ``ScoreCAM`` with the paper's softmax over classes (see the test) |
| ablationcam | pytorch-grad-cam ``AblationCAM`` |
| eigencam | pytorch-grad-cam ``EigenCAM`` up to its arbitrary sign (see the test) |
| guided_backprop | captum ``GuidedBackprop``, pytorch-grad-cam ``GuidedBackpropReLUModel`` |
| guided_gradcam | captum ``GuidedGradCam`` (``interpolate_mode="bilinear"``) |

Where a peer's definition differs, a test says how: torchcam's Grad-CAM++ never applies its alpha
division; pytorch-grad-cam's Grad-CAM++ ``1e-6`` outweighs the denominator; pytorch-grad-cam's
Eigen-CAM keeps the SVD's arbitrary sign; captum's Guided Grad-CAM upsamples with nearest
neighbours by default; attncam's ``guided_gradcam[minmax]`` is not the paper's. Not compared, for
want of a peer with the same definition: featuremap, scacam, attention, attention_guided,
occlusion (captum's ``Occlusion`` attributes per input element, not the windows' mean drop), and
smoothgradcampp's default formula.

The peers' backward passes are made cheaper by freezing the parameters and letting the input
require grad instead (their maths is unchanged; only the parameter gradients are skipped). Maps are
compared after normalisation: torchcam returns maps at the layer's size with its own
``+1e-8`` in the normaliser, so its output is upsampled and normalised again here (both are affine
in the raw map, and bilinear upsampling is linear).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from attncam.explain import Explainer, capture, normalize_maps
from attncam.explain.methods.base import upsample

pgc = pytest.importorskip("pytorch_grad_cam")
tcm = pytest.importorskip("torchcam.methods")
captum_attr = pytest.importorskip("captum.attr")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

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


# --------------------------------------------------------------------------- more methods, resnet18


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _frozen(torchvision.models.resnet18(weights=None))


def _pgc_targets(
    net: nn.Module,
    layer: str,
    x: torch.Tensor,
    targets: list[Callable[[torch.Tensor], torch.Tensor]],
    cls: type,
) -> torch.Tensor:
    with cls(net, [net.get_submodule(layer)]) as cam:
        return torch.from_numpy(cam(x.clone(), targets))


def test_cam_agrees_with_torchcam(resnet: nn.Module) -> None:
    x = torch.rand(2, 3, 64, 64)
    res = Explainer(resnet, [("cam", {"classifier": "fc"})], layer="layer4").explain(x)
    with tcm.CAM(resnet, "layer4", "fc") as cam:
        low = cam(res.targets.tolist(), resnet(x))[0]
    ref = normalize_maps(upsample(low, (64, 64)))
    torch.testing.assert_close(res.maps["cam[classifier=fc]"], ref, atol=1e-5, rtol=0)


def test_ablationcam_agrees_with_pytorch_grad_cam(resnet: nn.Module) -> None:
    # Both zero one channel at a time (pytorch-grad-cam does so when the layer's minimum is 0, as
    # after a ReLU) and weight it by (y - y_ablated) / y on the logit.
    x = torch.rand(1, 3, 64, 64)
    res = Explainer(resnet, ["ablationcam"], layer="layer2").explain(x)
    ref = _pgc(pgc.AblationCAM, resnet, "layer2", x, res.targets)
    torch.testing.assert_close(res.maps["ablationcam"], ref, atol=1e-4, rtol=0)


def _half_pixel_upsampling(size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def test_scorecam_agrees_with_pytorch_grad_cam_given_the_papers_softmax(
    resnet: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Score-CAM (Wang et al. eq. 5-8): ``w_k = softmax over classes (f(x * mask_k))_c``.

    pytorch-grad-cam's ScoreCAM takes a softmax across *channels* of the target score. Given the
    target ``log softmax(f)_c`` that softmax is ``p_k / sum_j p_j``: the paper's weights up to a
    common factor, which normalisation removes. Its masks are upsampled with
    ``UpsamplingBilinear2d`` (``align_corners=True``); the same half-pixel bilinear resize as
    attncam's (and the CAMs') is swapped in here to compare the definition. Constant channels
    (attncam skips them) are all-zero channels after the ReLU here, contributing nothing either way.
    """
    x = torch.rand(1, 3, 64, 64)
    res = Explainer(resnet, ["scorecam"], layer="layer1").explain(x)
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", _half_pixel_upsampling)
    targets = [lambda out, c=int(c): torch.log_softmax(out, -1)[c] for c in res.targets]
    ref = _pgc_targets(resnet, "layer1", x, targets, pgc.ScoreCAM)
    torch.testing.assert_close(res.maps["scorecam"], ref, atol=1e-4, rtol=0)
    # Its default target (the logit, softmax across channels) is another definition.
    logit = [ClassifierOutputTarget(int(c)) for c in res.targets]
    default = _pgc_targets(resnet, "layer1", x, logit, pgc.ScoreCAM)
    assert (res.maps["scorecam"] - default).abs().max() > 1e-3


def test_eigencam_agrees_with_pytorch_grad_cam_up_to_its_arbitrary_sign(
    resnet: nn.Module,
) -> None:
    """Eigen-CAM projects the centred activations on their first principal direction.

    The sign of a singular vector is arbitrary: attncam picks the one whose projection correlates
    positively with ``sum_k A^k``; pytorch-grad-cam keeps whatever its NumPy SVD returns, so its map
    is either attncam's or the ReLU of the *opposite* projection.
    """
    x = torch.rand(4, 3, 96, 96)  # 3 x 3 at layer4
    res = Explainer(resnet, ["eigencam"], layer="layer4").explain(x)
    with torch.no_grad(), capture(resnet, ["layer4"]) as store:
        resnet(x)
    a = store["layer4"]
    proj = torch.from_numpy(get_2d_projection(a.numpy()))  # (B, h, w), the peer's projection
    total = a.sum(1).flatten(1)
    corr = (proj.flatten(1) * (total - total.mean(1, keepdim=True))).sum(1)
    sign = torch.where(corr < 0, -1.0, 1.0)[:, None, None]

    def as_map(raw: torch.Tensor) -> torch.Tensor:
        return normalize_maps(upsample(torch.relu(raw), (96, 96)))

    torch.testing.assert_close(res.maps["eigencam"], as_map(proj * sign), atol=1e-4, rtol=0)
    peer = _pgc(pgc.EigenCAM, resnet, "layer4", x, res.targets)
    torch.testing.assert_close(peer, as_map(proj), atol=1e-4, rtol=0)
    flipped = sign.flatten() < 0
    torch.testing.assert_close(peer[~flipped], res.maps["eigencam"][~flipped], atol=1e-4, rtol=0)


def test_guided_backprop_agrees_with_captum_and_pytorch_grad_cam(resnet: nn.Module) -> None:
    x = torch.rand(2, 3, 64, 64)
    res = Explainer(resnet, ["guided_backprop"], layer="layer4").explain(x)
    t = res.targets
    ref = captum_attr.GuidedBackprop(resnet).attribute(x.clone().requires_grad_(), target=t)
    gx = res.extras["guided_backprop.gradient"]
    torch.testing.assert_close(gx, ref.detach(), atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(
        res.maps["guided_backprop"], normalize_maps(ref.detach().abs().amax(1)), atol=1e-5, rtol=0
    )
    # pytorch-grad-cam swaps the ReLU modules (for plain ones) and explains the first image only.
    first = pgc.GuidedBackpropReLUModel(copy.deepcopy(resnet), "cpu")(x[:1].clone(), int(t[0]))
    torch.testing.assert_close(
        gx[0], torch.from_numpy(first).permute(2, 0, 1), atol=1e-7, rtol=1e-4
    )


def test_guided_gradcam_follows_the_paper_as_captum_does(resnet: nn.Module) -> None:
    """Selvaraju et al. sec. 3: guided backprop times ``Up(ReLU(Grad-CAM))``, the map itself.

    captum's ``GuidedGradCam`` with ``interpolate_mode="bilinear"`` (its default is "nearest",
    a different convention: the paper and attncam upsample bilinearly) gives the same ``(B, 3, H,
    W)`` product to round-off. ``variant="minmax"`` (the min-max normalised map, minimum
    subtracted) is not the paper's and is far from it.
    """
    x = torch.rand(2, 3, 64, 64)
    methods = ["guided_gradcam", ("guided_gradcam", {"variant": "minmax"})]
    res = Explainer(resnet, methods, layer="layer4").explain(x)
    attr = captum_attr.GuidedGradCam(resnet, resnet.layer4)
    ref = attr.attribute(
        x.clone().requires_grad_(), target=res.targets, interpolate_mode="bilinear"
    ).detach()
    torch.testing.assert_close(res.extras["guided_gradcam.gradient"], ref, atol=1e-7, rtol=1e-4)
    ref_map = normalize_maps(ref.abs().amax(1))
    torch.testing.assert_close(res.maps["guided_gradcam"], ref_map, atol=1e-5, rtol=0)
    assert (res.maps["guided_gradcam[minmax]"] - ref_map).abs().max() > 1e-2
    nearest = attr.attribute(x.clone().requires_grad_(), target=res.targets).detach()
    assert (normalize_maps(nearest.abs().amax(1)) - ref_map).abs().max() > 1e-2
