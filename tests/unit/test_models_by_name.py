"""Backbones by name (``timm:<name>``, ``tv:<name>``) and the identity of loaded weights.

Random weights only: each by-name network is checked against the library's own model with the same
weights (the split into trunk and head must reproduce its logits), its CAM layer against the
tensor that is pooled, and the weights' identity against what was loaded.
"""

from __future__ import annotations

import functools
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from attncam.explain import Explainer
from attncam.models import AttentionNet, PretrainedWeightsUnavailable
from attncam.models.backbones import NotAChainError, build_by_name, is_weights_enum_name

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=4)
def _reference(name: str) -> nn.Module:
    """The library's model, random weights (seeded)."""
    torch.manual_seed(0)
    source, _, arch = name.partition(":")
    if source == "timm":
        import timm

        return timm.create_model(arch, pretrained=False).eval()
    return torchvision.models.get_model(arch, weights=None).eval()


def _from_reference(name: str, tmp_path: Path, **kwargs: object) -> AttentionNet:
    path = tmp_path / "w.pth"
    torch.save(_reference(name).state_dict(), path)
    return AttentionNet(name, 1000, weights=str(path), **kwargs).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "cam_layer", "gap_fc", "classifier"),
    [
        ("timm:resnet10t", "features.layer4", True, "head.fc"),
        ("tv:mobilenet_v2", "features.features", True, "head.classifier.1"),
        ("tv:squeezenet1_0", "features.features", False, "head.classifier.1"),
    ],
)
def test_by_name_reproduces_the_library_model_and_finds_the_cam_layer(
    name: str, cam_layer: str, gap_fc: bool, classifier: str, tmp_path: Path
) -> None:
    net = _from_reference(name, tmp_path)
    assert (net.cam_layer, net.gap_fc, net.classifier_name) == (cam_layer, gap_fc, classifier)
    assert net.cam_layer == net.stage_names[-1] == net.head_input_layer
    assert net.weights_id is not None and net.weights_id.startswith("file:")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = _reference(name)((x - MEAN) / STD)
        got = net(x)
    assert torch.allclose(got, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))
    # The CAM layer is the last spatial map: what the head receives, (B, C, h, w) with h > 1
    # at 64 px, and the head's first module pools it.
    seen: dict[str, torch.Tensor] = {}
    net.get_submodule(cam_layer).register_forward_hook(lambda _m, _i, o: seen.update(a=o))
    net.head.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
    net(x)
    assert seen["a"].ndim == 4 and seen["a"].shape[-1] > 1 and seen["a"] is seen["h"]


def test_relu_the_forward_applies_before_pooling_joins_the_trunk(tmp_path: Path) -> None:
    # torchvision's DenseNet runs F.relu on `features` inside forward(): the CAM layer must be the
    # pooled (rectified) tensor, as for the registered densenet121.
    net = _from_reference("tv:densenet121", tmp_path)
    assert net.cam_layer == "features.relu_out"
    assert isinstance(net.get_submodule("features.relu_out"), nn.ReLU)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = _reference("tv:densenet121")((x - MEAN) / STD)
        assert torch.allclose(net(x), ref, atol=1e-4)


def test_cbam_goes_after_the_cam_layer_with_placement_last() -> None:
    net = AttentionNet("tv:mobilenet_v2", 4, "cbam", "last").eval()
    names = [n for n, _ in net.features.named_children()]
    assert names[-2:] == ["features", "attention"] and net.attention_names == ["features.attention"]
    assert net.cam_layer == "features.features" and net.head_input_layer == "features.attention"
    assert net.get_submodule("features.attention").channels == 1280
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    new, _ = net.parameter_groups()  # no pretrained weights: everything is new
    assert len(new) == len(list(net.parameters()))


def test_blocks_placement_needs_known_blocks() -> None:
    with pytest.raises(ValueError, match=r"placement='blocks'.*use model\.placement=last"):
        AttentionNet("timm:resnet10t", 4, "cbam", "blocks")
    # torchvision's ResNets are built from the blocks attncam knows: CBAM inside each block.
    net = AttentionNet("tv:resnet18", 4, "cbam", "blocks")
    assert len(net.attention_names) == 8 and net.attention_names[0] == "features.layer1.0.attention"
    assert net.stage_names == [f"features.layer{i}" for i in range(1, 5)]
    assert AttentionNet("timm:resnet10t", 4, "none", "blocks").attention_names == []


def test_gap_fc_by_name_makes_cam_equal_gradcam() -> None:
    # With global average pooling then one linear layer, Grad-CAM's weights are W_fc / (h w):
    # the two maps are the same (Selvaraju et al., sec. 3.1), so the head was read right.
    torch.manual_seed(1)
    net = AttentionNet("timm:resnet10t", 6, "none").eval()
    maps = Explainer(net, ["gradcam", "cam"])(torch.rand(2, 3, 96, 96))
    assert torch.allclose(maps["gradcam"], maps["cam"], atol=1e-5)


def test_transformers_point_to_reshape_transform() -> None:
    with pytest.raises(NotAChainError, match=r"no spatial feature map.*reshape_transform"):
        AttentionNet("timm:vit_tiny_patch16_224", 3)


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnt10t'; close names: resnet10t"):
        AttentionNet("timm:resnt10t", 3)
    with pytest.raises(ValueError, match=r"unknown torchvision model 'mobilenetv2'.*mobilenet_v2"):
        AttentionNet("tv:mobilenetv2", 3)
    with pytest.raises(ValueError, match=r"timm:<name> or tv:<name>"):
        AttentionNet("keras:resnet50", 3)


def test_a_forward_that_is_not_a_chain_is_refused() -> None:
    class Skip(nn.Module):  # the output adds the stem's map back: not a chain of modules
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.body = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.stem(x)
            return self.fc(self.pool(self.body(s) + s).flatten(1))

    import attncam.models.backbones as backbones

    built = backbones._Built(Skip(), None)
    with pytest.raises(NotAChainError, match="does more than call its modules"):
        x, calls, out = backbones._dry_run(built, "skip")
        backbones._chain(calls, x, out, "skip")


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_timm_weights_offline_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    _offline(monkeypatch)
    before = hf.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        build_by_name("timm", "resnet10t", True, None)
    assert time.perf_counter() - start < 10
    assert "model.weights=PATH" in str(err.value) and "model.pretrained=false" in str(err.value)
    assert hf.HF_HUB_OFFLINE == before  # the hub's offline switch is restored


# --------------------------------------------------------------------------- weights identity


def test_weights_enum_names_are_told_from_paths(tmp_path: Path) -> None:
    assert is_weights_enum_name("IMAGENET1K_V1") and is_weights_enum_name("DEFAULT")
    assert is_weights_enum_name("ResNet50_Weights.IMAGENET1K_V1")
    assert not is_weights_enum_name("weights/r50.pth") and not is_weights_enum_name("r50.pth")
    existing = tmp_path / "IMAGENET1K_V1"
    existing.write_bytes(b"")
    assert not is_weights_enum_name(str(existing))


def test_weights_pinned_by_enum_name_from_the_hub_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``weights=IMAGENET1K_V1`` loads that torchvision file (offline: from torch's hub cache) and
    records its identity; without the cached file the error names the weights and the options."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _offline(monkeypatch)
    member = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    with pytest.raises(PretrainedWeightsUnavailable, match=r"SqueezeNet1_1_Weights\.IMAGENET1K_V1"):
        AttentionNet("squeezenet1_1", 1000, weights="IMAGENET1K_V1")
    ref = torchvision.models.squeezenet1_1(weights=None).eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), cache / Path(member.url).name)
    net = AttentionNet("squeezenet1_1", 1000, weights="IMAGENET1K_V1").eval()
    assert net.weights_id == "SqueezeNet1_1_Weights.IMAGENET1K_V1" == str(member)
    assert net.class_names is not None and net.class_names[281] == "tabby"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), ref((x - MEAN) / STD), atol=1e-5)
    # The qualified spelling pins the same weights; an unknown member lists the valid ones.
    qualified = AttentionNet("squeezenet1_1", 1000, weights="SqueezeNet1_1_Weights.IMAGENET1K_V1")
    assert qualified.weights_id == net.weights_id
    with pytest.raises(PretrainedWeightsUnavailable, match="choose one of: IMAGENET1K_V1, DEFAULT"):
        AttentionNet("squeezenet1_1", 3, weights="IMAGENET1K_V2")
    with pytest.raises(PretrainedWeightsUnavailable, match="has none"):
        AttentionNet("tiny", 3, weights="IMAGENET1K_V1")


def test_weights_id_of_files_and_of_no_weights(tmp_path: Path) -> None:
    import hashlib

    assert AttentionNet("tiny", 3).weights_id is None
    src = AttentionNet("tiny", 1000)
    path = tmp_path / "tiny.pth"
    torch.save(src.state_dict(), path)
    net = AttentionNet("tiny", 1000, weights=str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert net.weights_id == f"file:{path.resolve()} sha256:{digest}"
    assert re.fullmatch(r"file:.* sha256:[0-9a-f]{64}", net.weights_id)
