"""The perturbation engine's inference copy: conv-BN folding module by module, and its precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attncam import inference
from attncam.inference import fold_conv_bn, inference_copy, resolve_precision


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine maps, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return net.eval()


def _count_bn(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_folding_by_hand_on_one_conv_and_bn() -> None:
    conv, bn = nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1)
    conv.weight.data.fill_(2.0)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0 - bn.eps)  # sqrt(var + eps) = 2
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(0.5)
    net = nn.Sequential(conv, bn).eval()
    report = fold_conv_bn(net, torch.zeros(1, 1, 2, 2))
    assert report.folded == [("0", "1")] and isinstance(net[1], nn.Identity)
    # y = 3 * (2x - 1) / 2 + 0.5 = 3x - 1
    assert net[0].weight.item() == pytest.approx(3.0) and net[0].bias.item() == pytest.approx(-1.0)
    assert net(torch.full((1, 1, 1, 1), 2.0)).item() == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_every_bn_of_resnet_and_efficientnet_lite_folds_and_the_logits_agree(name: str) -> None:
    if name == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(num_classes=10)
    else:
        import timm

        # tf_ variant: same-padding convs (Conv2dSame) and BatchNormAct2d (BN + ReLU6)
        net = timm.create_model("tf_efficientnet_lite0", num_classes=10, pretrained=False)
    net = _randomise_bn(net)
    x = torch.rand(2, 3, 64, 64)
    fast, report = inference_copy(net, x)
    assert len(report.folded) == _count_bn(net) > 10
    assert _count_bn(fast) == 0
    with torch.no_grad():
        want, got = net(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5)
    assert all(not p.requires_grad for p in fast.parameters())
    assert any(p.requires_grad for p in net.parameters()) and _count_bn(net) > 0  # untouched


def test_the_attention_network_folds_although_fx_cannot_trace_it() -> None:
    from attncam.models import AttentionNet

    net = _randomise_bn(AttentionNet("resnet18", 5, "cbam", pretrained=False))
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(Exception):  # noqa: B017, PT011 (fx's error type varies by version)
        from torch.fx.experimental.optimization import fuse

        fuse(net)
    fast, report = inference_copy(net, x)
    # the backbone's BNs fold; CBAM's spatial-gate BN follows its 7x7 conv and folds too
    assert len(report.folded) == _count_bn(net)
    with torch.no_grad():
        assert torch.allclose(net(x), fast(x), rtol=1e-4, atol=1e-5)


class _SharedConvOutput(nn.Module):
    """conv -> bn, but the conv's output is also added back: folding would change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean((2, 3))


def test_a_conv_output_used_twice_is_not_folded_and_the_reason_is_given() -> None:
    net = _randomise_bn(_SharedConvOutput())
    x = torch.rand(2, 3, 8, 8)
    fast, report = inference_copy(net, x)
    assert report.folded == [] and "disagreed" in report.reason
    assert isinstance(fast.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(net(x), fast(x), atol=1e-6)


def test_auto_precision_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with_units = tmp_path / "bf16"
    with_units.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("processor : 0\nflags : fpu sse avx2\n")
    assert inference.cpu_bf16_supported.__wrapped__(str(with_units))
    assert not inference.cpu_bf16_supported.__wrapped__(str(without))
    monkeypatch.setattr(inference, "cpu_bf16_supported", lambda: True)
    # auto: bf16 only for the families whose bf16 agreement holds (the curves)
    assert resolve_precision("auto", "cpu", "curves")[0] == "bf16"
    precision, why = resolve_precision("auto", "cpu", "scores")
    assert precision == "float32" and "does not agree" in why
    assert resolve_precision("auto")[0] == "float32"  # the family defaults to scores
    assert resolve_precision("auto", "cuda", "curves")[0] == "float32"  # GPUs ask for bf16
    for family in inference.FAMILIES:
        assert resolve_precision("float32", "cpu", family) == (
            "float32",
            "asked (precision=float32)",
        )
        assert resolve_precision("bf16", "cpu", family)[0] == "bf16"
    monkeypatch.setattr(inference, "cpu_bf16_supported", lambda: False)
    for family in inference.FAMILIES:
        precision, why = resolve_precision("auto", "cpu", family)
        assert precision == "float32" and "no bf16 matrix units" in why
    assert "slow" in resolve_precision("bf16")[1]
    with pytest.raises(
        ValueError, match="unknown metric family 'maps'; choose one of: scores, curves"
    ):
        resolve_precision("auto", "cpu", "maps")
    with pytest.raises(
        ValueError, match="unknown precision 'fp16'; choose one of: float32, bf16, auto"
    ):
        resolve_precision("fp16")
