"""Methods identical by construction at a layer feeding GAP -> linear (issue 13, item 5).

The groups are found from the model's structure before any forward pass; here every group is also
checked empirically (maps equal to 1e-5 on random weights) and the methods left out of the groups
are checked to differ, so a group is never claimed that the maps contradict.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torchvision

from attncam.explain import Explainer, equivalent_methods, representatives
from attncam.explain.equivalence import describe, gap_fc_layers
from attncam.models.net import AttentionNet

METHODS = [
    "featuremap",
    "cam",
    "gradcam",
    "gradcampp",
    ("smoothgradcampp", {"n": 2, "seed": 0}),
    "xgradcam",
    "layercam",
    "hirescam",
    "scacam",
    ("scacam", {"channel_weight": "fc"}),
    "eigencam",
    ("gradcam", {"counterfactual": True}),
    ("hirescam", {"counterfactual": True}),
    ("gradcampp", {"eps": 1e-6}),
    "guided_gradcam",
    ("guided_gradcam", {"cam": "hirescam"}),
]
EXPECTED = [
    ["cam", "gradcam", "xgradcam", "hirescam"],
    ["gradcampp", "smoothgradcampp[n=2,seed=0]"],
    ["scacam", "scacam[channel_weight=fc]"],
    ["gradcam[counterfactual]", "hirescam[counterfactual]"],
    ["guided_gradcam", "guided_gradcam[cam=hirescam]"],
]


def _check_groups(maps: dict[str, torch.Tensor], groups: list[list[str]]) -> None:
    """Equal within each group, different across (a vanished map counts as no evidence)."""
    for g in groups:
        for name in g[1:]:
            torch.testing.assert_close(maps[name], maps[g[0]], atol=1e-5, rtol=0, msg=name)
    grouped = {n: i for i, g in enumerate(groups) for n in g}
    live = [n for n in maps if maps[n].amax() > 0]
    for a, b in itertools.combinations(live, 2):
        if grouped.get(a, a) != grouped.get(b, b):
            assert (maps[a] - maps[b]).abs().max() > 1e-3, (a, b)


def test_groups_on_attention_net_resnet18_layer4(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = AttentionNet("resnet18", 10).eval()
    assert net.cam_layer == net.head_input_layer == "features.layer4"
    with caplog.at_level(logging.INFO, logger="attncam.explain"):
        ex = Explainer(net, METHODS)
    assert ex.equivalent_groups == EXPECTED
    records = [r for r in caplog.records if "identical by construction" in r.getMessage()]
    assert len(records) == 1 and describe(EXPECTED) in records[0].getMessage()
    assert ex.duplicate_of["hirescam"] == "cam" and "gradcampp" not in ex.duplicate_of
    assert representatives(EXPECTED) == ex.duplicate_of
    maps = ex(torch.rand(2, 3, 96, 96))  # 3 x 3 at layer4
    _check_groups(maps, ex.equivalent_groups)


def test_no_groups_where_the_layer_does_not_feed_the_pooling() -> None:
    net = AttentionNet("resnet18", 10)
    # CAM always uses the pooled layer; every other method here explains layer3: no group.
    assert equivalent_methods(net, METHODS, layer="features.layer3") == []
    vgg = AttentionNet("vgg16", 10)  # no GAP -> FC head
    assert equivalent_methods(vgg, ["gradcam", "xgradcam", "hirescam"]) == []
    # A model that does not say where its GAP -> FC head is gets no group, unless told.
    tv = torchvision.models.resnet18(num_classes=10)
    assert equivalent_methods(tv, ["gradcam", "hirescam"], layer="layer4") == []
    told = equivalent_methods(
        tv, ["gradcam", "hirescam"], layer="layer4", head_input_layer="layer4"
    )
    assert told == [["gradcam", "hirescam"]]


def test_gap_fc_layers_name_every_alias_of_the_pooled_tensor() -> None:
    net = AttentionNet("resnet18", 10)
    assert gap_fc_layers(net) == {"features", "features.layer4", "features.layer4.1"}
    maps = Explainer(net, ["gradcam", ("gradcam", {"layer": "features"})])(torch.rand(1, 3, 64, 64))
    torch.testing.assert_close(maps["gradcam"], maps["gradcam[layer=features]"])


def test_attention_guided_equals_cam_when_the_last_cbam_is_pooled() -> None:
    # placement=last: the CBAM output is the head's input, so attention_guided (cbam_output:
    # Grad-CAM at that output) is CAM; Grad-CAM at the default layer (before CBAM) is not.
    torch.manual_seed(0)
    net = AttentionNet("tiny", 5, attention="cbam", placement="last").eval()
    ex = Explainer(net, ["cam", "gradcam", "attention_guided"])
    assert ex.equivalent_groups == [["cam", "attention_guided"]]
    _check_groups(ex(torch.rand(2, 3, 64, 64)), ex.equivalent_groups)
