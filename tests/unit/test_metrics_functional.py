"""Pure tensor maths of attncam.metrics.functional, against hand values and scipy/skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.sparse.linalg import spsolve
from scipy.stats import spearmanr

from attncam.metrics import functional as MF


def test_average_drop_and_increase_on_constructed_pairs() -> None:
    y = torch.tensor([0.5, 0.8, 0.2, 0.4])
    o = torch.tensor([0.25, 0.9, 0.1, 0.4])
    assert torch.allclose(MF.average_drop(y, o), torch.tensor([50.0, 0.0, 50.0, 0.0]))
    assert torch.equal(MF.increase_in_confidence(y, o), torch.tensor([0.0, 100.0, 0.0, 0.0]))
    assert torch.allclose(MF.confidence_gain(y, o), torch.tensor([0.0, 12.5, 0.0, 0.0]))
    # a vs b: a's drops (0.25, -0.1, 0.1, 0) against b's (0.5, 0, 0.1, 0.1)
    ob = torch.tensor([0.0, 0.8, 0.1, 0.3])
    assert torch.equal(MF.win(y, o, ob), torch.tensor([100.0, 100.0, 50.0, 100.0]))


@pytest.mark.parametrize("p", [5, 10, 20, 25, 50])
def test_percentage_thresholds_at_exact_percentiles(p: int) -> None:
    maps = torch.randperm(400).float().view(1, 20, 20) / 399  # distinct values
    keep = MF.top_percent_mask(maps, p)
    assert int(keep.sum()) == 400 * p // 100
    # exactly the top-p% values
    assert float(maps[keep].min()) == float(maps.flatten().sort(descending=True).values[4 * p - 1])
    # the threshold is the (100-p)th percentile: (100-p)% of pixels lie strictly below it
    assert int((maps < MF.top_percent_threshold(maps, p)[:, None, None]).sum()) == 400 - 4 * p


def test_percentage_threshold_ties_and_constant_map() -> None:
    assert bool(MF.top_percent_mask(torch.zeros(2, 8, 8), 5).all())  # constant map keeps all
    m = torch.zeros(1, 10, 10)
    m[0, 0, :3] = 1.0  # 3 top pixels tie: 5% -> 5 pixels needed -> threshold 0 keeps all
    assert int(MF.top_percent_mask(m, 2).sum()) == 3
    with pytest.raises(ValueError, match="percent"):
        MF.top_percent_mask(m, 0)


def test_perturbation_counts_and_auc() -> None:
    assert MF.perturbation_counts(256, 16) == list(range(0, 257, 16))
    assert MF.perturbation_counts(10, 4) == [0, 3, 6, 9, 10]
    f = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(MF.curve_auc(torch.tensor([[1.0, 0.0, 0.0]]), f), torch.tensor([0.25]))
    with pytest.raises(ValueError, match="steps"):
        MF.perturbation_counts(10, 0)


def test_saliency_ranks_is_a_permutation_by_decreasing_value() -> None:
    maps = torch.rand(3, 5, 7)
    r = MF.saliency_ranks(maps)
    assert torch.equal(r.sort(dim=1).values, torch.arange(35).expand(3, 35))
    top = maps.flatten(1).argmax(dim=1)
    assert torch.equal(r.gather(1, top[:, None]).flatten(), torch.zeros(3, dtype=torch.long))


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    x = torch.full((1, 3, 20, 20), 0.3)
    assert torch.allclose(MF.gaussian_blur(x, 11, 5.0), x, atol=1e-6)
    k = MF.gaussian_kernel1d(11, 5.0)
    assert abs(float(k.sum()) - 1) < 1e-6 and int(k.argmax()) == 5


def test_pointing_game_tolerance_is_euclidean() -> None:
    maps = torch.zeros(3, 40, 40)
    maps[:, 20, 20] = 1.0
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[0, 20, 20] = True  # at the max
    masks[1, 20, 35] = True  # 15 px right: hit at tolerance 15
    masks[2, 31, 31] = True  # sqrt(242) = 15.6 px diagonal: miss
    assert torch.equal(MF.pointing_game_hits(maps, masks, 15), torch.tensor([100.0, 100.0, 0.0]))
    assert torch.equal(MF.pointing_game_hits(maps, masks, 0), torch.tensor([100.0, 0.0, 0.0]))


def test_energy_iou_and_boxes() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, :2, :2] = 1.0
    maps[0, 3, 3] = 1.0
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :] = True
    assert torch.allclose(MF.energy_in_mask(maps, mask), torch.tensor([80.0]))
    assert torch.allclose(MF.mask_iou(maps > 0.5, mask), torch.tensor([4 / 9]))
    assert torch.equal(MF.masks_to_boxes(mask), torch.tensor([[0.0, 0.0, 4.0, 2.0]]))
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    assert torch.allclose(MF.box_iou(a, b), torch.tensor([1 / 3]))


def test_rankdata_and_spearman_match_scipy() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (4, 50), generator=g).float()  # many ties
    b = torch.rand(4, 50, generator=g) + 0.1 * a
    rho = MF.spearman(a, b)
    for i in range(4):
        ref = spearmanr(a[i].numpy(), b[i].numpy()).statistic
        assert abs(float(rho[i]) - ref) < 1e-5
    assert torch.isnan(MF.spearman(torch.zeros(1, 9), torch.rand(1, 9))).all()


def test_ssim_matches_skimage() -> None:
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 32, 32, generator=g)
    b = (a + 0.2 * torch.rand(2, 32, 32, generator=g)).clamp(0, 1)
    s = MF.ssim(a, b)
    for i in range(2):
        ref = skm.structural_similarity(
            a[i].double().numpy(),
            b[i].double().numpy(),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(float(s[i]) - ref) < 1e-5
    assert torch.allclose(MF.ssim(a, a), torch.ones(2))


def _spsolve_impute(img: np.ndarray, remove: np.ndarray) -> np.ndarray:
    """Reference: the ROAD linear system assembled explicitly and solved with scipy."""
    c, h, w = img.shape
    unknown = np.flatnonzero(remove.ravel())
    vid = -np.ones(h * w, dtype=int)
    vid[unknown] = np.arange(unknown.size)
    a = sparse.lil_matrix((unknown.size, unknown.size))
    rhs = np.zeros((unknown.size, c))
    nb = [
        ((dy, dx), 1 / 12 if dy and dx else 1 / 6)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    ]
    for row, pix in enumerate(unknown):
        y, x = divmod(pix, w)
        for (dy, dx), wt in nb:
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w):
                continue
            a[row, row] += wt
            q = yy * w + xx
            if vid[q] >= 0:
                a[row, vid[q]] -= wt
            else:
                rhs[row] += wt * img[:, yy, xx]
    sol = spsolve(a.tocsc(), rhs)
    out = img.reshape(c, -1).copy()
    out[:, unknown] = sol.T
    return out.reshape(c, h, w)


def test_linear_imputation_matches_sparse_direct_solve() -> None:
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 12, 14, generator=g)
    remove = torch.rand(2, 12, 14, generator=g) < 0.6
    remove[1, 2:10, 3:12] = True  # a large hole
    out, iters, rel = MF.linear_impute(img, remove, tol=1e-9, max_iter=5000)
    assert rel <= 1e-9 and iters > 0
    for i in range(2):
        ref = _spsolve_impute(img[i].double().numpy(), remove[i].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-6
    assert torch.equal(out[~remove[:, None].expand_as(img)], img[~remove[:, None].expand_as(img)])
    noisy = MF.noisy_linear_impute(img, remove, 0.5, torch.Generator().manual_seed(0))
    kept = ~remove[:, None].expand_as(img)
    assert torch.equal(noisy[kept], img[kept]) and not torch.allclose(noisy, out)
    with pytest.raises(ValueError, match="kept pixel"):
        MF.linear_impute(img, torch.ones(2, 12, 14, dtype=torch.bool))


def test_check_maps_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\); got \(2, 1, 8, 8\)"):
        MF.check_maps(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch size 2 but there are 3 images"):
        MF.check_maps(torch.rand(2, 8, 8), batch_size=3)
    with pytest.raises(ValueError, match=r"resolution \(8, 8\); expected the input resolution"):
        MF.check_maps(torch.rand(2, 8, 8), size=(16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]; got min"):
        MF.check_maps(torch.rand(2, 8, 8) * 3)
    with pytest.raises(TypeError, match="floating"):
        MF.check_maps(torch.ones(2, 8, 8, dtype=torch.long))
    maps = torch.rand(3, 4, 4)
    maps[1, 0, 0] = float("nan")
    assert MF.check_maps(maps).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="unknown score 'prob'; choose one of: softmax, logit"):
        MF.select_scores(torch.rand(2, 3), torch.zeros(2, dtype=torch.long), "prob")
