"""Grid pointing game (Böhle et al. 2021): golden values, the centre prior's 25 % by symmetry,
skips, and the 2 x 2 grids of the synthetic data it is scored on."""

from __future__ import annotations

import pytest
import torch

from attncam.data.synthetic import (
    GridDataset,
    SyntheticConfig,
    compose_grids,
    generate_split,
    grid_cell_bounds,
)
from attncam.metrics import functional as MF
from attncam.metrics.baselines import centre_prior
from attncam.metrics.localization import GridPointingGame, in_top_k


@pytest.mark.parametrize("size", [(224, 224), (128, 96), (10, 6)])
def test_grid_cells_partition_the_image_row_major(size: tuple[int, int]) -> None:
    h, w = size
    cells = MF.grid_cell_masks(h, w)
    assert cells.shape == (4, h, w) and bool((cells.sum(0) == 1).all())
    assert cells[0, 0, 0] and cells[1, 0, w - 1] and cells[2, h - 1, 0] and cells[3, h - 1, w - 1]
    assert int(cells[0].sum()) == (h // 2) * (w // 2)
    if h == w:  # the data's layout
        for k, (y0, y1, x0, x1) in enumerate(grid_cell_bounds(h)):
            expected = torch.zeros(h, w, dtype=torch.bool)
            expected[y0:y1, x0:x1] = True
            assert torch.equal(cells[k], expected)


@pytest.mark.parametrize("size", [(224, 224), (128, 96)])
def test_centre_prior_scores_exactly_25_percent_in_every_cell(size: tuple[int, int]) -> None:
    maps = centre_prior(8, size)
    cells = torch.arange(8) % 4
    gpg = GridPointingGame()
    gpg.update(maps, cells)
    r = gpg.compute()
    assert r.n == 8 and r.value == pytest.approx(25.0, abs=1e-4)
    assert gpg.values().sub(25.0).abs().max() < 1e-4  # each cell alone, by symmetry


def test_cell_indicator_scores_100_and_split_mass_scores_its_share() -> None:
    h = w = 32
    cells = MF.grid_cell_masks(h, w)
    maps = torch.stack([cells[2].float(), cells[1].float(), torch.zeros(h, w), torch.zeros(h, w)])
    maps[2] = 0.25 * cells[0] + 0.75 * cells[3]  # 1:3 between cells 0 and 3
    maps[3, 0, 0], maps[3, 31, 31] = 1.0, 0.5  # point masses: 1 / 1.5 in cell 0
    target = torch.tensor([2, 1, 0, 0])
    assert MF.grid_energy(maps, target).tolist() == pytest.approx([100.0, 100.0, 25.0, 200 / 3])
    assert MF.grid_energy(maps, torch.tensor([0, 0, 3, 3])).tolist() == pytest.approx(
        [0.0, 0.0, 75.0, 100 / 3]
    )
    # relu: negative attributions do not count as mass
    signed = torch.zeros(1, h, w)
    signed[0, :16, :16] = 1.0
    signed[0, 16:, 16:] = -5.0
    assert MF.grid_energy(signed, torch.tensor([0])).tolist() == [100.0]


def test_skips_are_counted_and_bad_cells_are_errors() -> None:
    cells_mask = MF.grid_cell_masks(16, 16)
    maps = cells_mask[torch.tensor([0, 1, 2, 3, 0])].float()
    maps[3] = 0.0  # a vanished map
    maps[4, 0, 0] = float("nan")
    keep = torch.tensor([True, False, True, True, True])  # pair 1: target not in the top 4
    gpg = GridPointingGame()
    gpg.update(maps, torch.tensor([0, 1, 3, 3, 0]), keep, ids=torch.tensor([10, 11, 12, 13, 14]))
    r = gpg.compute()
    assert r.n == 2 and r.value == pytest.approx(50.0)  # 100 (pair 10) and 0 (pair 12)
    assert r.skipped == {"excluded": 1, "zero_map": 1, "non_finite": 1}
    assert gpg.per_image() == {"grid_pointing_game": {10: 100.0, 12: 0.0}}
    with pytest.raises(ValueError, match=r"cells must lie in 0..3"):
        gpg.update(maps[:1], torch.tensor([4]))
    with pytest.raises(ValueError, match=r"cells must be a \(2,\) integer tensor"):
        gpg.update(maps[:2], torch.tensor([0.0, 1.0]))


@pytest.fixture(scope="module")
def grids() -> GridDataset:
    cfg = SyntheticConfig(image_size=64, num_classes=6, num_train=0, num_val=0, num_test=36)
    data = generate_split(cfg, "test")
    return GridDataset(compose_grids(data, 12, seed=3))


def test_grids_hold_four_distinct_classes_and_the_source_images(grids: GridDataset) -> None:
    g = grids.grids
    data = generate_split(
        SyntheticConfig(image_size=64, num_classes=6, num_train=0, num_val=0, num_test=36), "test"
    )
    assert g.images.shape == (12, 3, 64, 64) and g.images.dtype == torch.uint8
    assert all(len(set(row)) == 4 for row in g.classes.tolist())
    assert torch.equal(g.classes, data.labels[g.sources])
    # Every source image is used at least once and at most twice (48 cells, 36 images).
    counts = torch.bincount(g.sources.flatten(), minlength=36)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 2
    # Each cell is its source image at half the side: 2 x 2 average pooling, rounded.
    for k, (y0, y1, x0, x1) in enumerate(grid_cell_bounds(64)):
        src = data.images[g.sources[:, k]].float()
        pooled = torch.nn.functional.avg_pool2d(src, 2)
        assert (g.images[:, :, y0:y1, x0:x1].float() - pooled).abs().max() <= 0.5
        inside = g.segments[:, y0:y1, x0:x1]
        assert bool(((inside == k) | (inside == -1)).all())
        assert bool((inside == k).flatten(1).any(1).all())  # every object survives the resize
    again = compose_grids(data, 12, seed=3)
    assert torch.equal(again.images, g.images) and torch.equal(again.sources, g.sources)
    assert not torch.equal(compose_grids(data, 12, seed=4).sources, g.sources)


def test_grid_pairs_and_the_oracle_map_score_100(grids: GridDataset) -> None:
    assert len(grids) == 48
    image, target, mask, cell = grids[6]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert target == int(grids.grids.classes[1, 2]) and cell == 2
    assert torch.equal(mask, grids.grids.segments[1] == 2)
    batch = torch.utils.data.default_collate([grids[i] for i in range(len(grids))])
    images, targets, masks, cells = batch
    assert cells.tolist() == [0, 1, 2, 3] * 12
    gpg = GridPointingGame()
    gpg.update(masks.float(), cells)  # the target object's own mask: all mass in its cell
    assert gpg.compute().value == pytest.approx(100.0)
    with pytest.raises(IndexError, match="out of range"):
        grids[48]


def test_top4_keep_on_grid_logits_drives_the_excluded_count() -> None:
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [9.0, 8, 7, 6, 5, 4]])
    targets = torch.tensor([3, 4])  # ranked 4th (kept) and 5th (excluded)
    gpg = GridPointingGame()
    maps = MF.grid_cell_masks(8, 8)[:2].float()
    gpg.update(maps, torch.tensor([0, 1]), in_top_k(logits, targets, 4))
    r = gpg.compute()
    assert r.n == 1 and r.value == 100.0 and r.skipped == {"excluded": 1}


def test_compose_grids_needs_four_classes() -> None:
    cfg = SyntheticConfig(image_size=32, num_classes=3, num_train=0, num_val=0, num_test=9)
    data = generate_split(cfg, "test")
    with pytest.raises(ValueError, match="at least 4 classes; the split has 3"):
        compose_grids(data, 2)
    with pytest.raises(ValueError, match="num_grids must be >= 1; got 0"):
        compose_grids(data, 0)
