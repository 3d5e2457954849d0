"""The evaluation's design: stratified subsets, baseline maps, control rows, layer report."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attncam.data.sampling import stratified_subset
from attncam.explain import Explainer
from attncam.metrics.baselines import baseline_maps, centre_prior, oracle_map, random_map
from attncam.models.net import AttentionNet
from attncam.stages.design import control_specs, explained_ids, layer_report


def test_stratified_subset_covers_every_class_of_a_sorted_tree() -> None:
    # An ImageNet-like layout: samples sorted by class folder; the first 6 are all class 0.
    labels = [0] * 10 + [1] * 10 + [2] * 10
    ids = stratified_subset(labels, 6, seed=0)
    assert len(ids) == 6 and ids == sorted(ids)
    assert sorted({labels[i] for i in ids}) == [0, 1, 2]
    assert [sum(labels[i] == c for i in ids) for c in range(3)] == [2, 2, 2]
    assert ids != list(range(6))  # not the first N
    assert stratified_subset(labels, 6, seed=0) == ids  # seeded
    assert stratified_subset(labels, 6, seed=1) != ids


def test_stratified_subset_shares_follow_class_sizes_and_limits() -> None:
    labels = [0] * 20 + [1] * 5 + [2] * 5
    ids = stratified_subset(labels, 6, seed=3)
    assert [sum(labels[i] == c for i in ids) for c in range(3)] == [4, 1, 1]
    assert stratified_subset(labels, 100) == list(range(30))
    try:
        stratified_subset(labels, 0)
    except ValueError as err:
        assert "positive" in str(err)
    else:
        raise AssertionError("limit 0 must be refused")


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return torch.zeros(3, 8, 8), int(self.labels[i]), torch.zeros(8, 8, dtype=torch.bool)


def test_explained_ids_uses_the_dataset_labels() -> None:
    ds = _Labelled([0] * 4 + [1] * 4 + [2] * 4)
    ids = explained_ids(ds, 3, seed=0)
    assert sorted(int(ds.labels[i]) for i in ids) == [0, 1, 2]
    assert explained_ids(ds, None, seed=0) == list(range(12))


def test_centre_prior_peaks_at_the_centre_and_is_normalised() -> None:
    m = centre_prior(2, (9, 9))
    assert m.shape == (2, 9, 9) and float(m.max()) == 1.0 and float(m.min()) == 0.0
    assert int(m[0].argmax()) == 4 * 9 + 4
    assert torch.equal(m[0], m[0].flip(0)) and torch.equal(m[0], m[0].T)


def test_random_map_depends_on_image_id_not_batch() -> None:
    a = random_map(torch.tensor([3, 7]), (7, 7), (56, 56), seed=5)
    b = random_map(torch.tensor([7]), (7, 7), (56, 56), seed=5)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0


def test_oracle_is_the_mask_pooled_to_the_grid_then_upsampled() -> None:
    mask = torch.zeros(1, 56, 56, dtype=torch.bool)
    mask[0, :8, :8] = True  # the top-left cell of a 7x7 grid exactly
    m = oracle_map(mask, (7, 7))
    pooled = F.adaptive_avg_pool2d(mask[:, None].float(), (7, 7))[:, 0]
    assert pooled[0, 0, 0] == 1 and pooled.sum() == 1
    assert int(m[0].argmax()) == 0  # the maximum sits in that cell
    assert float(m[0, 40:, 40:].max()) == 0.0  # nothing far from it
    none = oracle_map(torch.zeros(1, 56, 56, dtype=torch.bool), (7, 7))
    assert float(none.abs().sum()) == 0.0  # no mask: an all-zero map, skipped by the metrics


def test_baseline_maps_rejects_unknown_names() -> None:
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    try:
        baseline_maps(["baseline_middle"], masks, torch.tensor([0]), (4, 4))
    except ValueError as err:
        assert "baseline_centre" in str(err)
    else:
        raise AssertionError


def test_control_row_only_where_the_tensor_is_not_the_gated_cam_layer() -> None:
    specs = [("gradcam", {}), ("attention_guided", {})]
    last = AttentionNet("resnet18", 4, attention="cbam", placement="last")
    assert control_specs(Explainer(last, specs), specs, (64, 64)) == []
    blocks = AttentionNet("resnet18", 4, attention="cbam", placement="blocks")
    controls = control_specs(Explainer(blocks, specs), specs, (64, 64))
    site = "features.layer4.1.attention"
    assert controls == [("gradcam", {"layer": f"{site}:input"})]
    # The control is Grad-CAM on the CBAM's input F: the default variant explains its output F''
    # (Grad-CAM on F'' would be the default variant itself, map for map: no control).
    x = torch.rand(2, 3, 64, 64)
    on_output = [("gradcam", {"layer": site})]
    maps = Explainer(blocks, [*specs, *controls, *on_output])(x)
    assert torch.allclose(maps["attention_guided"], maps[f"gradcam[layer={site}]"])
    # Identity: Grad-CAM on F weighs channels by mean(M_c M_s g''), the default variant maps
    # M_c M_s F with weights mean(g''); with a uniform spatial gate (gamma = 0 at initialisation,
    # as in the official CBAM code) the two are the same map.
    torch.testing.assert_close(maps["attention_guided"], maps[f"gradcam[layer={site}:input]"])
    with torch.no_grad():
        for m in blocks.modules():
            if hasattr(m, "spatial_gate") and m.spatial_gate is not None:
                m.spatial_gate.bn.weight.fill_(1.0)
    x = torch.rand(2, 3, 128, 128)  # a 4x4 grid at layer4
    explainer = Explainer(blocks, [*specs, *controls])
    gaps = {"attention_guided": 0.0, "gradcam": 0.0}
    for target in range(4):  # a random network's map can be all zero for one class
        maps = explainer(x, torch.full((2,), target))
        control = maps[f"gradcam[layer={site}:input]"]
        for name in gaps:
            gaps[name] = max(gaps[name], float((maps[name] - control).abs().max()))
    assert min(gaps.values()) > 0.05
    # spatial_product weights that same tensor: its control is the same row, not a second one
    sp = [*specs, ("attention_guided", {"variant": "spatial_product"})]
    assert control_specs(Explainer(blocks, sp), sp, (64, 64)) == controls


def test_layer_report_gives_sizes_and_flags_small_grids(caplog: object) -> None:
    net = AttentionNet("resnet18", 4, attention="cbam", placement="last")
    rep = layer_report(Explainer(net, ["gradcam", "attention_guided"]), (96, 96))
    assert rep["per_method"]["gradcam"] == {"layers": ["features.layer4"], "sizes": [[3, 3]]}
    assert "features.layer4" in rep["small_grids"]
    rep = layer_report(Explainer(net, ["gradcam"]), (224, 224))
    assert rep["sites"]["features.layer4"] == [7, 7] and rep["small_grids"] == []
