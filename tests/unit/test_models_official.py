"""The CBAM authors' ImageNet checkpoints load into ``AttentionNet`` (``weights_format=cbam_official``).

The reference network below is written from the published definition (Jongchan/attention-module,
``MODELS/model_resnet.py``, ``cbam.py``, ``bam.py``: module names, the order of operations and
the ImageNet stem/head), with random weights and random BN statistics; it is saved the way the
authors' ``train_imagenet.py`` saves it (``nn.DataParallel`` state dict, so every key starts with
``module.``, inside ``{"epoch", "arch", "state_dict", "best_prec1", "optimizer"}``), loaded into
``AttentionNet`` and compared logit by logit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attncam.models import AttentionNet, PretrainedWeightsUnavailable
from attncam.models.attention import BAM
from attncam.models.official import OfficialBAM, official_key

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# --------------------------------------------------------------------------- reference network


class RefFlatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class RefBasicConv(nn.Module):
    """conv -> BN (eps 1e-5, momentum 0.01), no ReLU in the spatial gate."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=1, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class RefChannelGate(nn.Module):
    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            RefFlatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = (x.size(2), x.size(3))
        att = self.mlp(F.avg_pool2d(x, hw, stride=hw)) + self.mlp(F.max_pool2d(x, hw, stride=hw))
        return x * torch.sigmoid(att)[..., None, None].expand_as(x)


class RefSpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = RefBasicConv(2, 1, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), 1)
        return x * torch.sigmoid(self.spatial(pooled))


class RefCBAM(nn.Module):
    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.ChannelGate = RefChannelGate(c, r)
        self.SpatialGate = RefSpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class RefBAMChannel(nn.Module):
    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", RefFlatten())
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(c, c // r))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(c // r))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(c // r, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2))
        return self.gate_c(pooled).unsqueeze(2).unsqueeze(3).expand_as(x)


class RefBAMSpatial(nn.Module):
    def __init__(self, c: int, r: int = 16, dilation: int = 4) -> None:
        super().__init__()
        h = c // r
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(c, h, 1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(h))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(2):
            conv = nn.Conv2d(h, h, 3, padding=dilation, dilation=dilation)
            self.gate_s.add_module(f"gate_s_conv_di_{i}", conv)
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(h))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(h, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_s(x).expand_as(x)


class RefBAM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.channel_att = RefBAMChannel(c)
        self.spatial_att = RefBAMSpatial(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x))) * x


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class RefBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, down: nn.Module | None, cbam: bool):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = down
        self.cbam = RefCBAM(planes, 16) if cbam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + residual)


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, down: nn.Module | None, cbam: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = down
        self.cbam = RefCBAM(planes * 4, 16) if cbam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + residual)


class RefResNet(nn.Module):
    """``ResidualNet("ImageNet", depth, 1000, att_type)`` of the authors' code."""

    def __init__(self, block: type, layers: list[int], att_type: str | None) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AvgPool2d(7)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        e = block.expansion
        if att_type == "BAM":
            self.bam1, self.bam2, self.bam3 = RefBAM(64 * e), RefBAM(128 * e), RefBAM(256 * e)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        cbam = att_type == "CBAM"
        self.layer1 = self._make_layer(block, 64, layers[0], 1, cbam)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, cbam)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, cbam)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, cbam)
        self.fc = nn.Linear(512 * e, 1000)

    def _make_layer(self, block: type, planes: int, n: int, stride: int, cbam: bool):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, down, cbam)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, cbam) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i, layer in enumerate([self.layer1, self.layer2, self.layer3, self.layer4], 1):
            x = layer(x)
            bam = getattr(self, f"bam{i}", None)
            if bam is not None:
                x = bam(x)
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


DEPTHS = {18: (RefBasicBlock, [2, 2, 2, 2]), 50: (RefBottleneck, [3, 4, 6, 3])}


def _reference(depth: int, att_type: str | None) -> nn.Module:
    """Random weights, and random BN statistics and affine parameters (none left at 0 or 1)."""
    torch.manual_seed(depth)
    block, layers = DEPTHS[depth]
    ref = RefResNet(block, layers, att_type)
    for m in ref.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(12345)
    return ref.eval()


def _save_official(ref: nn.Module, path: Path, drop_counters: bool = False) -> Path:
    state = nn.DataParallel(ref).state_dict()
    assert all(k.startswith("module.") for k in state)
    if drop_counters:  # checkpoints written before torch 0.4.1 have no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}
    ckpt = {"epoch": 90, "arch": "resnet", "state_dict": state, "best_prec1": torch.tensor(77.3)}
    torch.save({**ckpt, "optimizer": optimizer}, path)
    return path


def _logits_match(net: nn.Module, ref: nn.Module, size: int = 224) -> float:
    torch.manual_seed(7)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        want = ref((x - MEAN) / STD)
        got = net.eval()(x)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


@pytest.mark.parametrize(
    ("depth", "attention"),
    [(50, "cbam"), (18, "cbam"), (18, "bam"), pytest.param(50, "bam", marks=pytest.mark.slow)],
)
def test_official_checkpoint_gives_the_reference_logits(
    depth: int, attention: str, tmp_path: Path
) -> None:
    ref = _reference(depth, attention.upper())
    path = _save_official(ref, tmp_path / "RESNET_model_best.pth.tar")
    net = AttentionNet(
        f"resnet{depth}",
        1000,
        attention,
        "blocks",
        weights=str(path),
        weights_format="cbam_official",
    )
    assert _logits_match(net, ref) <= 1e-5
    assert net.weights_id is not None and net.weights_id.startswith("cbam_official:file:")
    assert net.pretrained_loaded and net.class_names is not None and len(net.class_names) == 1000
    new, old = net.parameter_groups()
    assert new == [] and len(old) == len(list(net.parameters()))  # attention is pretrained too
    if attention == "bam":
        assert [type(net.get_submodule(n)) for n in net.attention_names] == [OfficialBAM] * 3


def test_bam_gate_of_the_paper_is_not_the_released_one(tmp_path: Path) -> None:
    """The authors' code gates with 1 + sigmoid(M_c * M_s); the BAM paper (eq. 1-2) and
    attncam's ``BAM`` with sigmoid(M_c + M_s): the same weights give other logits."""
    ref = _reference(18, "BAM")
    path = _save_official(ref, tmp_path / "bam.pth.tar")
    net = AttentionNet(
        "resnet18", 1000, "bam", "blocks", weights=str(path), weights_format="cbam_official"
    )
    for name in net.attention_names:
        net.get_submodule(name).__class__ = BAM
    assert _logits_match(net, ref) > 1e-3


def test_old_checkpoints_and_another_class_count(tmp_path: Path) -> None:
    ref = _reference(18, "CBAM")
    path = _save_official(ref, tmp_path / "old.pth.tar", drop_counters=True)
    net = AttentionNet("resnet18", 1000, "cbam", weights=str(path), weights_format="cbam_official")
    assert _logits_match(net, ref) <= 1e-5
    # Fine-tuning on 10 classes: everything loads but the head, which is new.
    ten = AttentionNet("resnet18", 10, "cbam", weights=str(path), weights_format="cbam_official")
    assert ten.num_classes == 10 and ten.class_names is None
    new, _ = ten.parameter_groups()
    assert {id(p) for p in new} == {id(p) for p in ten.classifier().parameters()}
    same = ten.get_submodule("features.layer1.0.attention.channel_gate.mlp.0").weight
    assert torch.equal(same, ref.layer1[0].cbam.ChannelGate.mlp[1].weight)


def test_rebuilt_from_a_checkpoint_without_the_file(tmp_path: Path) -> None:
    """``load_classifier`` rebuilds with weights=None: the official BAM gate must still be used."""
    ref = _reference(18, "BAM")
    path = _save_official(ref, tmp_path / "bam.pth.tar")
    net = AttentionNet("resnet18", 1000, "bam", weights=str(path), weights_format="cbam_official")
    again = AttentionNet("resnet18", 1000, "bam", weights_format="cbam_official")
    again.load_state_dict(net.state_dict())
    assert _logits_match(again, ref) <= 1e-5


def test_mismatches_are_clear_errors(tmp_path: Path) -> None:
    path = _save_official(_reference(18, "CBAM"), tmp_path / "r18.pth.tar")
    with pytest.raises(PretrainedWeightsUnavailable, match=r"does not fit.*missing \['features"):
        AttentionNet("resnet50", 1000, "cbam", weights=str(path), weights_format="cbam_official")
    with pytest.raises(PretrainedWeightsUnavailable, match="unexpected"):
        AttentionNet("resnet18", 1000, "none", weights=str(path), weights_format="cbam_official")
    with pytest.raises(ValueError, match=r"unsupported: model 'vgg16'"):
        AttentionNet("vgg16", 1000, "cbam", weights=str(path), weights_format="cbam_official")
    with pytest.raises(ValueError, match=r"placement 'last'"):
        AttentionNet("resnet18", 10, "cbam", "last", weights_format="cbam_official")
    with pytest.raises(ValueError, match="unknown weights_format 'caffe'; choose one of: null"):
        AttentionNet("resnet18", 10, weights_format="caffe")


def test_key_mapping_by_hand() -> None:
    cases = {
        "module.conv1.weight": "features.conv1.weight",
        "module.fc.bias": "head.fc.bias",
        "module.layer2.3.bn3.running_var": "features.layer2.3.bn3.running_var",
        "module.layer1.0.cbam.ChannelGate.mlp.3.weight": (
            "features.layer1.0.attention.channel_gate.mlp.2.weight"
        ),
        "module.layer4.2.cbam.SpatialGate.spatial.bn.weight": (
            "features.layer4.2.attention.spatial_gate.bn.weight"
        ),
        "module.bam2.channel_att.gate_c.gate_c_bn_1.running_mean": (
            "features.attention_layer2.channel_mlp.1.running_mean"
        ),
        "module.bam3.spatial_att.gate_s.gate_s_conv_final.bias": (
            "features.attention_layer3.spatial.9.bias"
        ),
    }
    for theirs, ours in cases.items():
        assert official_key(theirs) == ours
