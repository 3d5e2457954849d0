"""The Explainer under bad input: clear errors, and the model left exactly as it was.

Hooks gone, mode and ``requires_grad`` restored and no ``.grad`` written after normal calls and
calls failing inside the forward or a weight function are covered for every method and backbone in
``tests/unit/test_explain_contract.py``; here the same state checks follow every *input* error,
plus bit-for-bit determinism and a ``slow`` memory test over 2,000 batches.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from attncam.explain import Explainer, count_hooks
from attncam.models.net import AttentionNet


@pytest.fixture(scope="module")
def net() -> AttentionNet:
    torch.manual_seed(0)
    return AttentionNet("tiny", 5, attention="cbam")


def _snapshot(model: nn.Module) -> tuple[list[bool], list[bool], list[bool]]:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad is None for p in model.parameters()],
    )


def _untouched(model: nn.Module, before: tuple[list[bool], list[bool], list[bool]]) -> None:
    assert count_hooks(model) == 0
    assert _snapshot(model) == before


def test_unknown_layer_lists_the_layers_that_exist(net: AttentionNet) -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'layer9'.*top level: normalize, features"):
        Explainer(net, ["gradcam"], layer="layer9")
    with pytest.raises(ValueError, match=r"under 'features': features.conv1, .*features.layer2"):
        Explainer(net, ["gradcam"], layer="features.layer9")
    with pytest.raises(ValueError, match=r"under 'features.layer2.0': .*features.layer2.0.conv1"):
        Explainer(net, ["gradcam"], layer=["features.layer1", "features.layer2.0.conv9"])
    assert count_hooks(net) == 0
    Explainer(net, ["gradcam"], layer="features.layer1.0:input")  # the ':input' form is valid


class _TupleOut(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x), x.mean((1, 2, 3))


def _aux(out: tuple | dict) -> torch.Tensor:
    return out["aux"] if isinstance(out, dict) else out[1]


class _DictOut(_TupleOut):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": self.inner(x), "aux": x.mean((1, 2, 3))}


@pytest.mark.parametrize(
    ("wrapper", "transform", "shown"),
    [(_TupleOut, lambda out: out[0], "a tuple"),
     (_DictOut, lambda out: out["logits"], "a dict with keys ['aux', 'logits']")],
)  # fmt: skip
def test_tuple_or_dict_outputs_need_output_transform(
    net: AttentionNet, wrapper: type[nn.Module], transform: Callable, shown: str
) -> None:
    model = wrapper(net)
    x = torch.rand(2, 3, 32, 32)
    methods = ["gradcam", "gradcampp", "scorecam", "xgradcam"]
    before = _snapshot(model)
    with pytest.raises(TypeError, match=re.escape(f"the model returned {shown}, not logits")):
        Explainer(model, methods, layer="inner.features.layer2")(x)
    _untouched(model, before)
    got = Explainer(model, methods, layer="inner.features.layer2", output_transform=transform)(x)
    ref = Explainer(net, methods, layer="features.layer2")(x)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    _untouched(model, before)
    with pytest.raises(TypeError, match=r"output_transform returned a tensor of shape \(2,\)"):
        Explainer(model, ["gradcam"], layer="inner.features.layer2", output_transform=_aux)(x)
    _untouched(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_inputs_are_an_error_not_a_silent_map(net: AttentionNet, bad: float) -> None:
    x = torch.rand(3, 3, 32, 32)
    x[1, 2, 5, 7] = bad
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"images \[1\] of the batch hold NaN or inf"):
        Explainer(net, ["gradcam", "scorecam"]).explain(x)
    _untouched(net, before)


def test_class_index_out_of_range_leaves_the_model_untouched(net: AttentionNet) -> None:
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"target class\(es\) \[5\] out of range .*valid: 0..4"):
        Explainer(net, ["gradcam"])(torch.rand(2, 3, 32, 32), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="one class per image"):
        Explainer(net, ["gradcam"])(torch.rand(2, 3, 32, 32), torch.tensor([0, 1, 2]))
    _untouched(net, before)


def test_same_seed_same_maps_bit_for_bit() -> None:
    def maps() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        model = AttentionNet("tiny", 5, attention="cbam")
        x = torch.rand(4, 3, 32, 32)
        methods = ["gradcam", "gradcampp", ("smoothgradcampp", {"n": 3}), "xgradcam", "scorecam",
                   "attention_guided", "layercam"]  # fmt: skip
        return Explainer(model, methods)(x)

    a, b = maps(), maps()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


@pytest.mark.slow
def test_explaining_2000_batches_keeps_memory_flat() -> None:
    torch.manual_seed(0)
    model = AttentionNet("tiny", 5, attention="cbam")
    explainer = Explainer(model, ["gradcam", "gradcampp", "xgradcam", "attention_guided"])
    x = torch.rand(4, 3, 32, 32)
    samples = []
    for i in range(2000):
        res = explainer.explain(x)
        assert res.maps["gradcam"].shape == (4, 32, 32)
        if i + 1 in (200, 2000):  # warm-up: allocator pools and caches filled by then
            gc.collect()
            samples.append(_rss_kib())
    warm, end = samples
    assert end <= warm * 1.05, f"RSS grew from {warm} KiB to {end} KiB over 1,800 batches"
    assert count_hooks(model) == 0
