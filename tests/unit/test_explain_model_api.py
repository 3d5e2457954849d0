"""The model contract: ``ExplainableModel``, its accessors, taps by attribute, one layer error."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from attncam.explain import ExplainableModel, Explainer, capture, model_api
from attncam.explain.explainer import check_layers
from attncam.explain.hooks import resolve_module
from attncam.explain.model_api import AttentionTapLike
from attncam.models.attention import AttentionTap
from attncam.models.net import AttentionNet

EXPLAIN = Path(__file__).resolve().parents[2] / "src" / "attncam" / "explain"


class MyTap(nn.Identity):
    """A tap of another class: recognised by its attribute alone."""

    is_attention_tap = True

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind


class AttentionTapImpostor(nn.Identity):
    """Named like a tap but not declaring itself one: not a tap."""

    kind = "spatial"


class Gate(nn.Module):
    def __init__(self, tap: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 1, 1)
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.tap(torch.sigmoid(self.conv(x)))


class PlainNet(nn.Module):
    """A model with no metadata at all, and one attention gate with a tap of its own class."""

    def __init__(self, tap: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = Gate(tap)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.body(x)).mean((2, 3)))


def test_attention_net_is_an_explainable_model_and_accessors_read_it() -> None:
    net = AttentionNet("tiny", 5, "cbam", "last")
    assert isinstance(net, ExplainableModel)
    assert model_api.cam_layer(net) == net.cam_layer
    assert model_api.head_input_layer(net) == net.head_input_layer
    assert model_api.classifier_name(net) == net.classifier_name
    assert model_api.gap_fc(net) is True
    assert model_api.attention_names(net) == ["features.attention"]
    assert model_api.stage_attention_names(net) == net.stage_attention_names
    assert model_api.model_name(net) == "tiny"
    assert model_api.describe(net) == "'tiny' (attention='cbam')"
    assert model_api.input_mean(net) == net.input_mean
    assert model_api.input_std(net) == net.input_std
    assert model_api.num_classes(net) == 5
    assert model_api.class_names(net) is None
    w = model_api.classifier_weight(net)
    assert w.shape == (5, net.get_submodule(net.classifier_name).in_features)
    assert not w.requires_grad


def test_accessors_on_a_model_without_metadata() -> None:
    net = PlainNet(MyTap("spatial"))
    assert not isinstance(net, ExplainableModel)
    for read in (
        model_api.cam_layer, model_api.head_input_layer, model_api.classifier_name,
        model_api.gap_fc, model_api.attention_names, model_api.stage_attention_names,
        model_api.input_mean, model_api.input_std, model_api.num_classes, model_api.class_names,
    ):  # fmt: skip
        assert read(net) is None, read.__name__
    assert model_api.model_name(net) == "PlainNet"
    assert model_api.describe(net) == "'PlainNet'"
    with pytest.raises(ValueError, match="has no classifier_name; pass the option classifier="):
        model_api.classifier_weight(net)
    assert model_api.classifier_weight(net, "fc").shape == (4, 8)
    with pytest.raises(ValueError, match="has no cam_layer attribute; pass layer="):
        Explainer(net, "gradcam")


def test_taps_are_found_by_attribute_not_by_class_name() -> None:
    assert AttentionTap.is_attention_tap is True
    assert isinstance(AttentionTap("spatial"), AttentionTapLike)
    net = PlainNet(MyTap("spatial"))
    assert list(model_api.attention_taps(net)) == ["gate.tap"]
    assert model_api.attention_modules(net) == ["gate"]
    assert model_api.spatial_tap(net, "gate") == "gate.tap"
    assert model_api.attention_taps(net, "channel") == {}
    with pytest.raises(ValueError, match="unknown tap kind 'depth'; choose one of: channel"):
        model_api.attention_taps(net, "depth")
    # The learned map is explained through the custom tap like through attncam's own.
    maps = Explainer(net, "attention", layer="body")(torch.rand(2, 3, 8, 8))
    assert maps["attention"].shape == (2, 8, 8)

    impostor = PlainNet(AttentionTapImpostor())
    assert model_api.attention_taps(impostor) == {}
    assert model_api.tap_kind(impostor.gate.tap) is None
    with pytest.raises(ValueError, match="needs attention modules .* 'PlainNet' has none"):
        Explainer(impostor, "attention", layer="body")


def test_attention_net_taps_agree_with_the_model() -> None:
    net = AttentionNet("tiny", 3, "cbam")
    assert list(model_api.attention_taps(net)) == list(net.attention_taps())
    assert list(model_api.attention_taps(net, "spatial")) == list(net.attention_taps("spatial"))


def test_one_unknown_layer_error_for_the_explainer_and_capture() -> None:
    net = AttentionNet("tiny", 3, "none")
    messages = []
    for raise_it in (
        lambda: check_layers(net, ["features.layer9:input"]),
        lambda: resolve_module(net, "features.layer9"),
        lambda: Explainer(net, "gradcam", layer="features.layer9"),
        lambda: capture(net, ["features.layer9"]).__enter__(),
    ):
        with pytest.raises(ValueError) as err:
            raise_it()
        messages.append(str(err.value))
    assert len(set(messages)) == 1
    assert messages[0].startswith("unknown layer 'features.layer9' in AttentionNet; layers under ")
    assert "'features': features." in messages[0]


def test_model_api_is_the_only_reader_of_model_attributes() -> None:
    """No other module in attncam.explain calls getattr/hasattr on the attributes of the contract."""
    contract = set(ExplainableModel.__annotations__) | set(AttentionTapLike.__annotations__)
    offenders = []
    for path in EXPLAIN.rglob("*.py"):
        if path.name == "model_api.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in contract | {"weight"}
            ):
                offenders.append(f"{path.name}:{node.lineno} {node.args[1].value}")
            if isinstance(node, ast.Constant) and node.value == "AttentionTap":
                offenders.append(f"{path.name}:{node.lineno} class name 'AttentionTap'")
    assert offenders == []
