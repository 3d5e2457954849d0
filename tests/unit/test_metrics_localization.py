"""Pointing game, energy pointing game, mask IoU and box accuracy, by hand and at chance;
the pointing game's tie rule on upsampled CAMs; the localisation keep-mask."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from attncam.data.synthetic import SyntheticConfig, generate_split
from attncam.metrics import (
    BoxAccuracy,
    EnergyPointingGame,
    MaskIoU,
    PointingGame,
    largest_component_boxes,
)
from attncam.metrics import functional as MF
from attncam.metrics.baselines import centre_prior, oracle_map
from attncam.metrics.localization import in_top_k, localisation_keep
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
    # the (0, 0) artefact of the first arg-max; the plateau rule points at the centre instead
    assert MF.pointing_game_hits(maps[:1], masks[:1], 0, rule="argmax").item() == 100.0
    assert MF.map_peaks(maps[:1]).tolist() == [[8, 8]]
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


# --------------------------------------------------------------------------- tie rule


def _cam(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` CAMs upsampled like every attncam map (bilinear, align_corners=False)."""
    up = F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).amin(1)[:, None, None]
    hi = up.flatten(1).amax(1)[:, None, None]
    return (up - lo) / (hi - lo)


def test_three_by_three_map_with_top_left_maximum_points_at_that_cells_centre_at_224() -> None:
    grid = torch.zeros(1, 3, 3)
    grid[0, 0, 0] = 1.0
    maps = _cam(grid, (224, 224))
    # Bilinear upsampling makes a plateau from the border to the cell's centre (224 / 6 px).
    assert maps[0, 0, 0] == 1.0 and maps[0, 36, 36] == 1.0 and maps[0, 37, 37] < 1.0
    centre = 224 / 6 - 0.5  # the cell's centre in pixel indices: 36.83
    assert MF.map_peaks(maps).tolist() == [[36, 36]]  # the plateau's inner edge
    assert MF.map_peaks(maps, "argmax").tolist() == [[0, 0]]  # the old rule: a border pixel
    centre_region = torch.zeros(1, 224, 224, dtype=torch.bool)
    centre_region[0, 35:40, 35:40] = True  # only the cell's centre region
    border_pixel = torch.zeros(1, 224, 224, dtype=torch.bool)
    border_pixel[0, 0, 0] = True  # only the border pixel
    for mask, expected in ((centre_region, 100.0), (border_pixel, 0.0)):
        pg = PointingGame()  # 15 px, the cell-centre rule
        pg.update(maps, mask)
        assert pg.compute().value == expected
        old = PointingGame(rule="argmax")
        old.update(maps, mask)
        assert old.compute().value == 100.0 - expected
    assert abs(MF.map_peaks(maps)[0, 0].item() - centre) < 1


def test_peak_is_within_one_pixel_of_the_maximum_cells_centre_for_any_grid_and_size() -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        h, w = rng.randint(1, 9), rng.randint(1, 9)
        size = (rng.choice([32, 72, 128, 224]), rng.choice([64, 96, 224]))
        grid = 0.5 * torch.rand(1, h, w, generator=gen)
        i, j = rng.randrange(h), rng.randrange(w)
        grid[0, i, j] = 1.0
        peak = MF.map_peaks(_cam(grid, size))[0].tolist()
        cy, cx = (i + 0.5) * size[0] / h - 0.5, (j + 0.5) * size[1] / w - 0.5
        assert abs(peak[0] - cy) < 1 and abs(peak[1] - cx) < 1, (h, w, size, i, j, peak)


def test_tie_rule_on_full_resolution_maps_and_plateaus() -> None:
    maps = torch.zeros(4, 20, 30)
    maps[0, 0, 7] = 1.0  # a one-pixel maximum on the border: that pixel
    maps[0, 5, 5] = 0.9
    maps[1] = 0.5  # a constant map: the middle of the image
    maps[2, 4:7, 10:16] = 1.0  # an interior plateau: its centroid (5, 12.5) rounded
    maps[3, 2:4, 2:4] = 1.0  # two equal maxima: the component of the first arg-max
    maps[3, 15:18, 20:27] = 1.0
    assert MF.map_peaks(maps).tolist() == [[0, 7], [10, 15], [5, 13], [3, 3]]
    assert MF.map_peaks(maps, "argmax").tolist() == [[0, 7], [0, 0], [4, 10], [2, 2]]
    with pytest.raises(ValueError, match="unknown peak rule 'max'; choose one of: cell_centre"):
        MF.map_peaks(maps, "max")
    with pytest.raises(ValueError, match="unknown peak rule 'max'; choose one of: cell_centre"):
        PointingGame(rule="max")


@pytest.fixture(scope="module")
def masks_224() -> torch.Tensor:
    """Object masks of 64 built-in synthetic test images at 224 px (default settings)."""
    cfg = SyntheticConfig(image_size=224, num_train=0, num_val=0, num_test=64)
    return generate_split(cfg, "test").masks


def test_perfect_map_pooled_to_a_coarse_grid_beats_the_centre_point(
    masks_224: torch.Tensor,
) -> None:
    # The finding: a perfect map (the mask pooled to the CAM grid) lost hits to the
    # first-arg-max rule, whose border plateaus point at border pixels.
    n = masks_224.shape[0]
    centre = MF.pointing_game_hits(centre_prior(n, (224, 224)), masks_224).mean().item()
    perfect = oracle_map(masks_224, (3, 3))
    assert bool(MF.nonzero_maps(perfect).all())
    new = MF.pointing_game_hits(perfect, masks_224).mean().item()
    old = MF.pointing_game_hits(perfect, masks_224, rule="argmax").mean().item()
    assert new >= centre and new >= 95.0
    assert old <= 90.0  # the old rule loses at least 5 points of hits on the same maps
    # The centre point itself is a one-pixel-wide peak: both rules agree on it.
    old_centre = MF.pointing_game_hits(centre_prior(n, (224, 224)), masks_224, rule="argmax")
    assert abs(old_centre.mean().item() - centre) <= 100.0 / n


# --------------------------------------------------------------------------- keep-masks


def test_localisation_keep_leaves_out_misclassified_images_and_counts_them() -> None:
    keep = torch.tensor([True, True, False, True])
    predicted = torch.tensor([0, 1, 2, 3])
    labels = torch.tensor([0, 2, 2, 3])
    assert localisation_keep(keep, predicted, labels).tolist() == [True, False, False, True]
    assert localisation_keep(keep, predicted, labels, only_correct=False).tolist() == keep.tolist()
    assert localisation_keep(keep, predicted, None).tolist() == keep.tolist()
    unlabelled = torch.tensor([-1, -1, -1, -1])
    assert localisation_keep(keep, predicted, unlabelled).tolist() == keep.tolist()
    maps = torch.zeros(4, 8, 8)
    maps[:, 2, 2] = 1.0
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, 2, 2] = True
    pg = PointingGame(tolerance=0)
    pg.update(maps, masks, localisation_keep(keep, predicted, labels))
    r = pg.compute()
    assert r.n == 2 and r.value == 100.0 and r.skipped == {"excluded": 2}


def test_in_top_k() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    targets = torch.tensor([3, 1])
    assert in_top_k(logits, targets, 4).tolist() == [True, False]
    assert in_top_k(logits, targets, 5).tolist() == [True, True]
    assert in_top_k(logits, targets, 1).tolist() == [False, False]
    assert in_top_k(logits, targets, 100).tolist() == [True, True]
    ties = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    assert in_top_k(ties, torch.tensor([4]), 4).tolist() == [True]  # a tie with the 4th counts
    with pytest.raises(ValueError, match="k must be >= 1; got 0"):
        in_top_k(logits, targets, 0)
