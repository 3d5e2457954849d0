"""MetricSuite: the same numbers as the metrics driven by hand, per-image values by image id."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from attncam.metrics import (
    METRIC_KEYS,
    AverageDrop,
    MetricSuite,
    Perturber,
    WinPercentage,
    build_metrics,
)
from attncam.metrics import functional as MF
from attncam.metrics.suite import slug
from tests.unit.test_metrics_helpers import TinyNet, random_maps

NAMES = ["gradcam", "gradcampp[torchcam020]", "x.y"]


def _cfg(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "protocol": {"steps": 4, "road_percentages": [30, 70], "percentages": [10, 50]},
        "chunk_size": 16,
        "num_resamples": 50,
        "confidence": 0.9,
        "enabled": list(METRIC_KEYS),
        "pointing_tolerance": 2,
        "iou_threshold": 0.4,
        "box_threshold": 0.3,
        "box_iou": 0.4,
        "win": True,
        "occlusion": {"window": 8, "stride": 8},
        "sanity": {"enabled": False},
    }
    cfg.update(over)
    return cfg


def _batches() -> list[tuple[Tensor, Tensor, dict[str, Tensor], Tensor]]:
    """Two batches of (images, labels, maps by method, masks); image 1 has no annotation."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4])
    maps = {n: random_maps(5, 16, 16, seed=k) for k, n in enumerate(NAMES)}
    maps[NAMES[1]][3] = float("nan")  # a skipped map
    masks = torch.zeros(5, 16, 16, dtype=torch.bool)
    masks[0, 2:8, 2:8] = True
    masks[2, 8:, :] = True
    masks[3, :, 10:] = True
    masks[4, 4:12, 4:12] = True
    return [
        (images[s], labels[s], {n: m[s] for n, m in maps.items()}, masks[s])
        for s in (slice(0, 3), slice(3, 5))
    ]


def _by_hand(model: torch.nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The dispatch the explain stage wrote by hand before the suite, as a reference."""
    protocol, _ = build_metrics(cfg)
    engine = Perturber(model, protocol, chunk_size=int(cfg["chunk_size"]))
    metrics = {n: build_metrics(cfg)[1] for n in NAMES}
    common = {"num_resamples": cfg["num_resamples"], "confidence": cfg["confidence"], "seed": 0}
    pairs = list(itertools.combinations(NAMES, 2))
    win = {p: WinPercentage(**common) for p in pairs}
    occ_cfg = cfg["occlusion"]
    for images, labels, maps, masks in _batches():
        base = engine.base_scores(images, labels)
        table = engine.confidence_table(images, maps, base=base)
        curves = engine.deletion_insertion(images, maps, base=base)
        road = {n: engine.road(images, maps[n], base=base) for n in NAMES}
        occ = engine.occlusion_sensitivity(
            images, base=base, window=occ_cfg["window"], stride=occ_cfg["stride"]
        )
        for n in NAMES:
            for key, metric in metrics[n].items():
                if key in ("average_drop", "increase_in_confidence"):
                    metric.update(base.scores, table.masked[n], base.keep)
                elif key == "percentage_in":
                    metric.update(
                        base.scores, table.percentage_in[n], base.keep, kept=table.kept_fraction[n]
                    )
                elif key == "deletion_insertion":
                    metric.update(curves[n], base.keep)
                elif key == "road":
                    metric.update(road[n], base.keep)
                elif key == "occlusion_faithfulness":
                    metric.update(maps[n], occ, base.keep)
                else:
                    metric.update(maps[n], masks, base.keep)
        for a, b in pairs:
            win[(a, b)].update(base.scores, table.masked[a], table.masked[b], base.keep)
    out = {n: _rows(metrics[n]) for n in NAMES}
    for a, b in pairs:
        out[a][f"win_vs_{b}"] = win[(a, b)].compute().to_dict()
    return out


def _rows(metrics: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, metric in metrics.items():
        res = metric.compute()
        items = res.items() if isinstance(res, Mapping) else [(key, res)]
        row.update({k: r.to_dict() for k, r in items})
    return row


def _run_suite(model: torch.nn.Module, cfg: Mapping[str, Any], ids: list[Tensor]) -> MetricSuite:
    suite = MetricSuite.from_config(cfg, NAMES)
    suite.bind(model)
    for (images, labels, maps, masks), i in zip(_batches(), ids, strict=True):
        base = suite.base_scores(images, labels)
        suite.update(images, maps, masks, base, i)
    return suite


def test_suite_matches_metrics_driven_by_hand() -> None:
    model = TinyNet(5).eval()
    cfg = _cfg()
    suite = _run_suite(model, cfg, [torch.arange(3), torch.arange(3, 5)])
    got = suite.results()
    assert got == _by_hand(model, cfg)
    assert list(got[NAMES[0]])[:4] == [
        "average_drop",
        "increase_in_confidence",
        "percentage_in@10",
        "percentage_in@50",
    ]
    assert set(got[NAMES[0]]) >= {"win_vs_gradcampp[torchcam020]", "win_vs_x.y", "morf@30"}
    assert got[NAMES[1]]["average_drop"]["skipped"] == {"non_finite": 1}
    curves = suite.mean_curves()
    assert list(curves) == NAMES and curves[NAMES[0]][0].shape == (5,)
    assert set(suite.method_metrics) == {slug(n) for n in NAMES}


def test_suite_runs_only_the_perturbations_its_metrics_need() -> None:
    model = TinyNet(5).eval()
    cfg = _cfg(enabled=["pointing_game", "mask_iou"], win=False)
    suite = _run_suite(model, cfg, [torch.arange(3), torch.arange(3, 5)])
    assert suite.needs == set() and suite.perturber is not None
    # the base scores only: one forward per distinct precision (float32 picks the predicted
    # class; auto on a bf16 CPU adds the curves' bf16 Y even when no curve is drawn)
    engine = suite.perturber
    distinct = {"float32", engine.precision, engine.curve_precision}
    assert engine.images_forwarded == 5 * len(distinct)
    assert list(suite.results()[NAMES[0]]) == ["pointing_game", "mask_iou"]
    win_only = MetricSuite.from_config(_cfg(enabled=[], win=True), NAMES)
    assert win_only.needs == {"confidence"}


def test_per_image_joins_by_id_with_skips_and_ids_out_of_order() -> None:
    model = TinyNet(5).eval()
    ids = [torch.tensor([40, 10, 30]), torch.tensor([0, 20])]
    suite = _run_suite(model, _cfg(), ids)
    per = suite.per_image()
    assert list(per) == NAMES
    row = per[NAMES[0]]
    assert "win_vs_x.y" not in row
    assert set(row) == {k for k in suite.results()[NAMES[0]] if not k.startswith("win_vs")}
    # Image 1 (id 10) has an all-False mask: skipped by the pointing game, kept by Average Drop.
    assert list(row["average_drop"]) == [40, 10, 30, 0, 20]
    assert list(row["pointing_game"]) == [40, 30, 0, 20]
    # Image 3 (id 0) has a NaN map for the second method only: absent from its values alone.
    assert 0 not in per[NAMES[1]]["average_drop"] and 0 not in per[NAMES[1]]["pointing_game"]
    assert list(per[NAMES[1]]["deletion"]) == [40, 10, 30, 20]
    assert list(per[NAMES[2]]["average_drop"]) == [40, 10, 30, 0, 20]
    # The values at an id are that image's values.
    engine = Perturber(model, suite.protocol, chunk_size=16)
    flat_ids = torch.cat(ids).tolist()
    for images, labels, maps, masks in _batches():
        base = engine.base_scores(images, labels)
        table = engine.confidence_table(images, maps, base=base)
        drop = MF.average_drop(base.scores, table.masked[NAMES[0]])
        hits = MF.pointing_game_hits(maps[NAMES[0]], masks, 2.0)
        for j in range(images.shape[0]):
            image_id = flat_ids.pop(0)
            assert row["average_drop"][image_id] == pytest.approx(float(drop[j]), abs=0)
            if masks[j].any():
                assert row["pointing_game"][image_id] == float(hits[j])
    # Every reported mean is the mean of the per-image values.
    res = suite.results()[NAMES[0]]
    for key in ("average_drop", "deletion", "morf", "lerf_minus_morf", "percentage_in@50"):
        vals = torch.tensor(list(row[key].values()), dtype=torch.float64)
        assert res[key]["n"] == vals.numel()
        assert res[key]["value"] == pytest.approx(float(vals.mean()), rel=1e-6)


def test_metric_ids_default_to_a_running_counter() -> None:
    m = AverageDrop()
    m.update(torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.1]))  # image 1: Y <= 0, skipped
    m.update(torch.tensor([0.4]), torch.tensor([0.1]))
    assert m.per_image() == {"average_drop": {0: 50.0, 2: pytest.approx(75.0)}}
    assert m.values("ids").tolist() == [0, 2] and m.values().shape == (2,)
    m.reset()
    m.update(torch.tensor([0.5]), torch.tensor([0.5]), ids=torch.tensor([9]))
    m.update(torch.tensor([0.5]), torch.tensor([0.5]))
    assert m.per_image() == {"average_drop": {9: 0.0, 1: 0.0}}
    with pytest.raises(ValueError, match="unknown per-image state 'nope'.*choose one of: ids"):
        m.values("nope")
    with pytest.raises(ValueError, match=r"ids must be a \(1,\) integer tensor"):
        m.update(torch.tensor([0.5]), torch.tensor([0.5]), ids=torch.tensor([0.5]))


def test_suite_errors_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="unknown metrics \\['drop'\\]; choose from: average_drop"):
        MetricSuite.from_config(_cfg(enabled=["drop"]), NAMES)
    with pytest.raises(ValueError, match="unknown occlusion settings \\['size'\\]"):
        MetricSuite.from_config(_cfg(occlusion={"size": 3}), NAMES)
    with pytest.raises(ValueError, match="unknown metric settings \\['tolerance'\\]"):
        MetricSuite(NAMES, build_metrics(_cfg())[0], ["pointing_game"], settings={"tolerance": 1})
    with pytest.raises(ValueError, match="distinct method names"):
        MetricSuite(["a.b", "a_b"], build_metrics(_cfg())[0], [])
    suite = MetricSuite.from_config(_cfg(), NAMES)
    images, labels, maps, masks = _batches()[0]
    with pytest.raises(RuntimeError, match="call bind\\(model\\)"):
        suite.base_scores(images, labels)
    suite.bind(TinyNet(5).eval())
    base = suite.base_scores(images, labels)
    with pytest.raises(ValueError, match="maps for \\['x.y'\\] missing"):
        suite.update(images, {n: maps[n] for n in NAMES[:2]}, masks, base, torch.arange(3))
    with pytest.raises(ValueError, match="ids must be a \\(3,\\) integer tensor"):
        suite.update(images, maps, masks, base, torch.arange(4))


def test_unlabelled_images_use_the_predicted_class() -> None:
    suite = MetricSuite.from_config(_cfg(enabled=["average_drop"]), NAMES)
    model = TinyNet(5).eval()
    suite.bind(model)
    images = _batches()[0][0]
    base = suite.base_scores(images, torch.full((3,), -1))
    assert torch.equal(base.targets, model(images).argmax(1))
    label_cfg = _cfg(protocol={"target": "label"})
    strict = MetricSuite.from_config(label_cfg, NAMES)
    strict.bind(model)
    with pytest.raises(ValueError, match="need labels"):
        strict.base_scores(images, torch.full((3,), -1))


class _Counting(torch.nn.Module):
    """Counts the images the perturbation engine pushes through the model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights in every run compared
        self.net = TinyNet()
        self.images = 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        return self.net(x)


def _run_with_duplicates(
    duplicates: Mapping[str, str] | None,
    names: tuple[str, ...] = ("gradcam", "xgradcam", "layercam"),
) -> tuple[dict[str, Any], dict[str, Any], int]:
    model = _Counting()
    enabled = ["average_drop", "increase_in_confidence", "deletion_insertion", "pointing_game"]
    suite = MetricSuite.from_config(
        _cfg(enabled=enabled, win=True), list(names), duplicates=duplicates
    )
    suite.bind(model)
    images, labels, maps, masks = _batches()[0]
    maps = {
        "gradcam": maps[NAMES[0]],
        "xgradcam": maps[NAMES[0]] + 1e-7,
        "layercam": maps[NAMES[2]],
    }
    base = suite.base_scores(images, labels)
    model.images = 0
    suite.update(images, maps, masks, base, torch.arange(images.shape[0]))
    return suite.results(), suite.per_image(), model.images


def test_duplicate_methods_share_their_perturbation_forwards() -> None:
    res, per_image, forwards = _run_with_duplicates({"xgradcam": "gradcam"})
    res_all, _, forwards_all = _run_with_duplicates(None)
    _, _, forwards_two = _run_with_duplicates(None, ("gradcam", "layercam"))
    assert forwards == forwards_two < forwards_all  # the duplicate costs no perturbation forward
    for key in ("average_drop", "increase_in_confidence", "deletion", "insertion"):
        assert res["xgradcam"][key] == {**res["gradcam"][key], "name": res["xgradcam"][key]["name"]}
        assert per_image["xgradcam"][key] == per_image["gradcam"][key]
    assert res["layercam"] == res_all["layercam"]  # the other method is untouched
    assert "win_vs_xgradcam" not in res["gradcam"]  # no Win % between identical maps
    assert "win_vs_layercam" in res["gradcam"]


def test_duplicates_must_name_methods_of_the_suite() -> None:
    with pytest.raises(ValueError, match="duplicates name unknown methods"):
        MetricSuite.from_config(_cfg(), ["gradcam"], duplicates={"cam": "gradcam"})
