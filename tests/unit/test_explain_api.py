"""Explainer API: targets, method specs, result names, configs, layers, Score-CAM's formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from attncam.explain import Explainer, available_methods, methods_from_config, normalize_maps
from attncam.explain.methods.base import upsample
from attncam.models.net import AttentionNet

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"


@pytest.fixture(scope="module")
def tiny() -> AttentionNet:
    torch.manual_seed(0)
    return AttentionNet("tiny", 5, attention="cbam").eval()


def test_targets_default_explicit_and_errors(tiny: AttentionNet) -> None:
    x = torch.rand(3, 3, 32, 32)
    ex = Explainer(tiny, ["gradcam"])
    res = ex.explain(x)
    assert torch.equal(res.targets, tiny(x).argmax(1))
    res = ex.explain(x, torch.tensor([0, 1, 2]))
    assert res.targets.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="shape \\(2,\\) but the batch has 3"):
        ex(x, [0, 1])
    with pytest.raises(ValueError, match="broadcast=True"):
        ex(x, 2)
    out = Explainer(tiny, ["gradcam"], broadcast=True).explain(x, 2)
    assert out.targets.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match=r"\[5\] out of range .* 5 classes \(valid: 0..4\)"):
        ex(x, [0, 5, 1])
    with pytest.raises(ValueError, match="integer class indices"):
        ex(x, torch.tensor([0.0, 1.0, 2.0]))


def test_method_specs_names_and_errors(tiny: AttentionNet) -> None:
    ex = Explainer(
        tiny,
        [
            "gradcam",
            ("gradcampp", {"variant": "torchcam020"}),
            {"key": "scacam", "options": {"channel_weight": "fc"}},
            {"layercam": {"counterfactual": True}},
        ],
    )
    assert ex.names == [
        "gradcam",
        "gradcampp[torchcam020]",
        "scacam[channel_weight=fc]",
        "layercam[counterfactual]",
    ]
    assert Explainer(tiny, {"gradcam": {}, "xgradcam": None}).names == ["gradcam", "xgradcam"]
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+'; choose one of: featuremap"):
        Explainer(tiny, ["gradcam+"])
    with pytest.raises(ValueError, match="unknown option\\(s\\) 'sigma' for method 'gradcam'"):
        Explainer(tiny, [("gradcam", {"sigma": 1})])
    with pytest.raises(ValueError, match="invalid variant='x' .* choose one of: formula"):
        Explainer(tiny, [("gradcampp", {"variant": "x"})])
    with pytest.raises(ValueError, match="requested twice"):
        Explainer(tiny, ["gradcam", "gradcam"])
    with pytest.raises(ValueError, match="'sigma' apply to none"):
        Explainer(tiny, ["gradcam"], sigma=0.1)


def test_gradient_methods_share_one_forward_and_backward(tiny: AttentionNet) -> None:
    calls = {"fwd": 0, "grad": 0}
    handle = tiny.register_forward_pre_hook(lambda *_: calls.__setitem__("fwd", calls["fwd"] + 1))
    grad = torch.autograd.grad

    def counting(*a: object, **k: object) -> object:
        calls["grad"] += 1
        return grad(*a, **k)

    keys = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scacam"]
    keys += ["attention_guided", "featuremap", "cam", "attention"]
    try:
        torch.autograd.grad = counting  # type: ignore[assignment]
        Explainer(tiny, keys)(torch.rand(2, 3, 32, 32))
    finally:
        torch.autograd.grad = grad
        handle.remove()
    assert calls == {"fwd": 1, "grad": 1}


def test_scorecam_matches_paper_formula(tiny: AttentionNet) -> None:
    x = torch.rand(2, 3, 32, 32)
    res = Explainer(tiny, ["scorecam"], upsample=True).explain(x)
    feats = {}
    h = tiny.get_submodule(tiny.cam_layer).register_forward_hook(
        lambda _m, _i, o: feats.__setitem__("a", o)
    )
    with torch.no_grad():
        tiny(x)
    h.remove()
    a = feats["a"]
    expected, skipped = [], []
    for b in range(2):
        raw = torch.zeros(a.shape[-2:])
        n_skip = 0
        for k in range(a.shape[1]):
            up = upsample(a[b : b + 1, k], (32, 32))[0]
            if up.max() == up.min():
                n_skip += 1
                continue
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                prob = torch.softmax(tiny(x[b : b + 1] * mask), 1)[0, res.targets[b]]
            raw += prob * a[b, k]
        expected.append(upsample(raw.clamp(min=0)[None], (32, 32))[0])
        skipped.append(n_skip)
    torch.testing.assert_close(res.maps["scorecam"], normalize_maps(torch.stack(expected)))
    assert res.extras["scorecam.skipped"].tolist() == skipped


def test_multi_layer_fusion_and_layer_size(tiny: AttentionNet) -> None:
    x = torch.rand(2, 3, 32, 32)
    layers = ["features.layer1", "features.layer2"]
    fused = Explainer(tiny, ["gradcam"], layer=layers)(x)["gradcam"]
    each = [Explainer(tiny, ["gradcam"], layer=la)(x)["gradcam"] for la in layers]
    torch.testing.assert_close(fused, normalize_maps((each[0] + each[1]) / 2))
    low = Explainer(tiny, ["gradcam"], upsample=False)(x)["gradcam"]
    assert low.shape == (2, 4, 4)


def test_reshape_transform_tokens() -> None:
    # A layer giving tokens (B, h*w, K): reshape_transform turns it into (B, K, h, w).
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    ref = Explainer(net, ["gradcam", "layercam"], layer="layer4")(x)

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.tok = torch.nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.net.layer4(self.net.layer3(self.net.layer2(self.net.layer1(
                self.net.maxpool(self.net.relu(self.net.bn1(self.net.conv1(x))))))))  # fmt: skip
            t = self.tok(f.flatten(2).transpose(1, 2))  # (B, hw, K)
            return self.net.fc(t.mean(1))

    def to_bkhw(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 2, 2)

    out = Explainer(Tokens(), ["gradcam", "layercam"], layer="tok", reshape_transform=to_bkhw)(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    with pytest.raises(ValueError, match="pass reshape_transform"):
        Explainer(Tokens(), ["gradcam"], layer="tok")(x)


def test_inplace_relu_vgg_and_frozen_model() -> None:
    torch.manual_seed(0)
    net = torchvision.models.vgg11(num_classes=3)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, 32, 32)
    # features.18 is a conv followed by an in-place ReLU: the capture keeps the conv's output
    # (the maps equal the out-of-place ground truth: test_explain_inplace.py).
    for layer in ("features.20", "features.18"):
        maps = Explainer(net, ["gradcam", "guided_gradcam"], layer=layer)(x)
        assert all(torch.isfinite(m).all() for m in maps.values())
    assert not any(p.requires_grad for p in net.parameters())
    assert net.training


def test_cam_needs_classifier_on_plain_models() -> None:
    net = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match="classifier='fc'|'classifier': 'fc'"):
        Explainer(net, ["cam"], layer="layer4")
    x = torch.rand(2, 3, 64, 64)
    out = Explainer(net, ["cam", "gradcam"], layer="layer4", classifier="fc")(x)
    torch.testing.assert_close(out["cam[classifier=fc]"], out["gradcam"])


def _compose_method(choice: str) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose("explain", overrides=[f"method={choice}"])
    return OmegaConf.to_container(cfg.method, resolve=True)


def test_method_configs() -> None:
    files = sorted(CONF.glob("*.yaml"))
    keys = {f.stem for f in files} - {"paper", "all"}
    assert keys == set(available_methods())
    net = AttentionNet("tiny", 5, attention="cbam")
    for f in files:
        specs = methods_from_config(_compose_method(f.stem))
        if f.stem in keys:
            assert [k for k, _ in specs] == [f.stem]
        ex = Explainer(net, specs)
        assert len(set(ex.names)) == len(specs)
    pair = methods_from_config(_compose_method("[gradcam,xgradcam]"))
    assert [k for k, _ in pair] == ["gradcam", "xgradcam"]
    with pytest.raises(ValueError, match="has no 'key'"):
        methods_from_config({"gradcam": {"options": {}}})
    paper = methods_from_config(_compose_method("paper"))
    assert [k for k, _ in paper][:5] == [
        "gradcam",
        "gradcampp",
        "smoothgradcampp",
        "xgradcam",
        "attention_guided",
    ]
    names = Explainer(AttentionNet("tiny", 5, attention="cbam"), paper).names
    assert names[:5] == ["gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "attention_guided"]
