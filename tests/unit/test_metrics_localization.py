"""Pointing game, energy pointing game, mask IoU and box accuracy, by hand and at chance."""

from __future__ import annotations

import pytest
import torch

from attncam.metrics import (
    BoxAccuracy,
    EnergyPointingGame,
    MaskIoU,
    PointingGame,
    largest_component_boxes,
)
from attncam.metrics import functional as MF
from tests.unit.test_metrics_helpers import BoxModel, random_maps


def test_perfect_map_scores_one_and_random_map_scores_chance() -> None:
    box = BoxModel((8, 24, 8, 24))  # 256 of 1024 pixels: chance is 25%
    n = 400
    masks = box.box_mask(n, 32, 32)
    perfect = masks.float()
    pg, en = PointingGame(tolerance=0), EnergyPointingGame()
    pg.update(perfect, masks)
    en.update(perfect, masks)
    assert pg.compute().value == 100.0 and en.compute().value == pytest.approx(100.0)
    pg, en = PointingGame(tolerance=0), EnergyPointingGame()
    rnd = random_maps(n, 32, 32, seed=1)
    pg.update(rnd, masks)
    en.update(rnd, masks)
    r_pg, r_en = pg.compute(), en.compute()
    assert r_pg.value == pytest.approx(25.0, abs=7.0)  # binomial sd 2.2
    assert r_en.value == pytest.approx(25.0, abs=1.0)
    assert r_pg.low < 25.0 < r_pg.high and r_en.low < 25.0 < r_en.high
    # a 15 px tolerance turns near misses into hits
    pg15 = PointingGame()
    pg15.update(rnd, masks)
    assert pg15.compute().value > 90.0


def test_iou_and_box_accuracy_by_hand() -> None:
    maps = torch.zeros(3, 20, 20)
    maps[:, 2:10, 2:10] = 1.0  # 8x8 component
    maps[:, 15:17, 15:17] = 0.6  # a small second component
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 2:10, 2:10] = True  # identical box
    masks[1, 2:10, 6:14] = True  # IoU 32/96 = 1/3 < 0.5
    masks[2, 2:10, 3:10] = True  # IoU 56/64 >= 0.5
    iou = MaskIoU(threshold=0.8)
    iou.update(maps, masks)
    assert iou.compute().value == pytest.approx((1 + 1 / 3 + 56 / 64) / 3, rel=1e-5)
    box = BoxAccuracy(threshold=0.5)
    box.update(maps, masks)
    assert box.compute().value == pytest.approx(200 / 3)
    boxes = torch.tensor([[2.0, 2.0, 10.0, 10.0], [6.0, 2.0, 14.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    box2 = BoxAccuracy(threshold=0.5)
    box2.update(maps, boxes)
    assert box2.compute().value == pytest.approx(100 / 3)
    box3 = BoxAccuracy(threshold=0.5)
    box3.update(maps, [boxes[1:2], torch.cat([boxes[1:2], boxes[0:1]]), torch.zeros(0, 4)])
    r = box3.compute()  # any box counts; no box = no annotation
    assert r.value == pytest.approx(50.0) and r.n == 2 and r.skipped == {"empty_mask": 1}
    b, found = largest_component_boxes(maps > 0.5)
    assert found.all() and torch.equal(b[0], torch.tensor([2.0, 2.0, 10.0, 10.0]))


def test_empty_masks_and_nan_maps_are_counted() -> None:
    maps = torch.rand(4, 8, 8)
    maps[1] = float("nan")
    maps[3] = 0.0
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[[0, 1, 3], :4] = True
    en = EnergyPointingGame()
    en.update(maps, masks)
    r = en.compute()
    assert r.n == 1 and r.skipped == {"non_finite": 1, "empty_mask": 1, "zero_map": 1}
    pg = PointingGame()
    pg.update(maps[2:3], masks[2:3])
    r = pg.compute()
    assert r.n == 0 and r.value is None and r.skipped == {"empty_mask": 1}
    with pytest.raises(TypeError, match="bool"):
        pg.update(maps, masks.float())
    with pytest.raises(ValueError, match=r"masks have shape \(4, 4, 8\); maps have \(4, 8, 8\)"):
        pg.update(maps, masks[:, :4])
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(tolerance=-1)


def test_all_zero_map_is_skipped_and_counted_by_every_localisation_metric() -> None:
    # An all-zero map (a vanished CAM) has its arg-max at pixel (0, 0); with the object in the
    # top-left corner the pointing game used to score it a hit. Every metric skips it alike.
    maps = torch.zeros(3, 16, 16)
    maps[1, 12, 12] = 1.0  # points at the object in image 1 ...
    maps[2, 2, 2] = 1.0  # ... and misses it in image 2
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:2, 10:14, 10:14] = True
    masks[0, :2, :2] = True  # image 0: (0, 0) is inside the mask
    masks[2, 10:14, 10:14] = True
    assert MF.pointing_game_hits(maps[:1], masks[:1], 0).item() == 100.0  # the (0, 0) artefact
    metrics = {
        "pointing_game": (PointingGame(tolerance=0), 50.0),
        "energy_pointing_game": (EnergyPointingGame(), 50.0),
        "mask_iou": (MaskIoU(threshold=0.5), (1 / 16 + 0) / 2),
        "box_accuracy": (BoxAccuracy(threshold=0.5, iou_threshold=0.05), 50.0),
    }
    for name, (metric, expected) in metrics.items():
        metric.update(maps, masks)
        r = metric.compute()
        assert r.n == 2, name
        assert r.skipped == {"zero_map": 1}, name
        assert r.value == pytest.approx(expected), name
        assert metric.skipped_counts()["zero_map"] == 1, name
