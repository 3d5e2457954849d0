"""Every registered method's contract on every backbone family, with and without CBAM.

Shape ``(B, H, W)``, range [0, 1], no NaN; no hook left (also after an exception inside the
call); no parameter ``.grad`` written; train mode and ``requires_grad`` restored exactly. Images are
32 x 32 to keep the matrix fast, so the last layer is 1 x 1 (2 x 2 for VGG) on most backbones:
Score-CAM then skips every channel as constant (its forwards are tested on the tiny model in
``test_explain_api.py``); Ablation-CAM and occlusion do their forwards.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attncam.explain import Explainer, available_methods, count_hooks
from attncam.explain.methods import gradient
from attncam.models.net import AttentionNet

BACKBONES = ["resnet18", "vgg16", "googlenet", "densenet121", "efficientnet_lite0"]
PERTURBATION = ["scorecam", "sscam", "iscam", "ablationcam", "occlusion"]
# Cheaper settings for the methods that repeat the network many times (their maths is tested
# in test_explain_scorecam_family.py and test_explain_captum.py).
CHEAP = {
    "smoothgradcampp": {"n": 2},
    "integrated_gradients": {"n_steps": 4},
    "smoothgrad": {"n": 2},
}
ATTENTION = ["attention", "attention_guided"]


@pytest.fixture(scope="module", params=[(b, a) for b in BACKBONES for a in ("none", "cbam")],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def net(request: pytest.FixtureRequest) -> AttentionNet:
    backbone, attention = request.param
    torch.manual_seed(0)
    return AttentionNet(backbone, 7, attention=attention)


def _methods(net: AttentionNet) -> list:
    keys = [k for k in available_methods() if k not in PERTURBATION]
    if not net.gap_fc:
        keys.remove("cam")
    if net.attention_kind == "none":
        keys = [k for k in keys if k not in ATTENTION]
    extra = [(k, o) for k, o in CHEAP.items()]
    if net.attention_kind != "none":
        extra += [("attention_guided", {"variant": v}) for v in ("spatial_product", "multi_stage")]
        extra += [("attention_guided", {"variant": "multi_stage", "combine": "mean"})]
    return [k for k in keys if k not in CHEAP] + extra


def _state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def _prepare(model: nn.Module) -> tuple[list[bool], list[bool]]:
    """Train mode with one module in eval and one parameter frozen: all must come back."""
    model.train()
    list(model.modules())[3].eval()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    params[0].requires_grad_(False)
    return _state(model)


def _check_maps(maps: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    for name, m in maps.items():
        assert m.shape == shape, name
        assert torch.isfinite(m).all(), name
        assert m.min() >= 0 and m.max() <= 1, name
        assert m.max() == 1 or m.max() == 0, name


def test_contract_all_methods(net: AttentionNet) -> None:
    before = _prepare(net)
    ex = Explainer(net, _methods(net))
    x = torch.rand(2, 3, 32, 32)
    res = ex.explain(x)
    _check_maps(res.maps, (2, 32, 32))
    assert set(res.maps) == set(ex.names)
    assert _state(net) == before
    assert all(p.grad is None for p in net.parameters())
    assert count_hooks(net) == 0
    assert res.extras["guided_backprop.gradient"].shape == (2, 3, 32, 32)
    for name in ("integrated_gradients[n_steps=4]", "smoothgrad[n=2]", "input_x_gradient"):
        assert res.extras[f"{name}.attribution"].shape == (2, 3, 32, 32)


def test_contract_perturbation_methods(net: AttentionNet) -> None:
    before = _prepare(net)
    # VGG's last layer is 2 x 2 at 32 x 32: 512 full forwards; its first stage has 64 channels.
    own = {"layer": net.stage_names[0]} if net.backbone_name == "vgg16" else {}
    methods = [
        ("scorecam", own),
        ("sscam", {**own, "n": 1, "sigma": 0.1}),
        ("iscam", {**own, "n": 1}),
        "ablationcam",
        ("occlusion", {"window": 16, "stride": 16}),
    ]
    ex = Explainer(net, methods)
    res = ex.explain(torch.rand(1, 3, 32, 32), torch.tensor([3]))
    _check_maps(res.maps, (1, 32, 32))
    assert _state(net) == before
    assert all(p.grad is None for p in net.parameters())
    assert count_hooks(net) == 0
    name = ex.names[0]
    assert 0 <= int(res.extras[f"{name}.skipped"][0]) <= res.extras[f"{name}.channels"]


def test_contract_exception_inside_call(net: AttentionNet, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _prepare(net)
    ex = Explainer(net, ["gradcam", "featuremap"])
    # A failure inside the forward pass, with hooks registered ...
    with pytest.raises(ValueError, match="4 channels"):
        ex(torch.rand(2, 4, 32, 32))
    assert count_hooks(net) == 0 and _state(net) == before

    # ... and one in a weight function, after the backward pass.
    def boom(*_a: object) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(gradient.GradCAM, "weights", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ex(torch.rand(2, 3, 32, 32))
    assert count_hooks(net) == 0 and _state(net) == before
    assert all(p.grad is None for p in net.parameters())


def test_clear_errors_for_missing_parts(net: AttentionNet) -> None:
    if not net.gap_fc:
        with pytest.raises(ValueError, match="needs a GAP -> FC head"):
            Explainer(net, ["cam"])
    if net.attention_kind == "none":
        for key in ATTENTION:
            with pytest.raises(ValueError, match="needs .*attention"):
                Explainer(net, [key])
