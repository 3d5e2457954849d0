"""Deletion/insertion, ROAD and occlusion faithfulness on a toy model with known evidence."""

from __future__ import annotations

import pytest
import torch

from attncam.metrics import ROAD, DeletionInsertion, OcclusionFaithfulness, Perturber, Protocol
from attncam.metrics import functional as MF
from tests.unit.test_metrics_helpers import BoxModel, CountingModel, random_maps


def _aucs(eng: Perturber, images: torch.Tensor, maps: dict) -> dict[str, tuple[float, float]]:
    curves = eng.deletion_insertion(images, maps)
    out = {}
    for name, c in curves.items():
        m = DeletionInsertion()
        m.update(c)
        r = m.compute()
        out[name] = (r["deletion"].value, r["insertion"].value)
    return out


def test_deletion_insertion_by_hand_and_ordering() -> None:
    model = BoxModel((4, 12, 4, 12), scale=1 / 192)  # 64 of 256 pixels; logit 1 on ones
    images = torch.ones(4, 3, 16, 16)
    perfect = model.box_mask(4, 16, 16).float()
    maps = {"perfect": perfect, "random": random_maps(4, 16, 16), "inverse": 1 - perfect}
    eng = Perturber(model, Protocol(score="logit", steps=16, blur_kernel=0))
    aucs = _aucs(eng, images, maps)
    # perfect: the box is gone after 1/4 of the pixels -> triangle 0.5 * 0.25 * 1
    assert aucs["perfect"] == pytest.approx((0.125, 0.875))
    # inverse: the box is removed last
    assert aucs["inverse"] == pytest.approx((0.875, 0.125))
    # random order: the expected curve is the straight line 1 - f -> AUC about 0.5
    assert aucs["random"][0] == pytest.approx(0.5, abs=0.08)
    assert aucs["random"][1] == pytest.approx(0.5, abs=0.08)
    assert aucs["perfect"][0] < aucs["random"][0] < aucs["inverse"][0]
    assert aucs["perfect"][1] > aucs["random"][1] > aucs["inverse"][1]


def test_deletion_insertion_with_blur_softmax_keeps_ordering_and_curves() -> None:
    model = BoxModel((4, 12, 4, 12), scale=4 / 192)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    images[:, :, 4:12, 4:12] += 0.5
    images = images.clamp(0, 1)
    perfect = model.box_mask(3, 16, 16).float()
    eng = Perturber(model, Protocol(steps=8))  # softmax, blur 11 / 5
    curves = eng.deletion_insertion(images, {"perfect": perfect, "inverse": 1 - perfect})
    c = curves["perfect"]
    base = eng.base_scores(images)
    assert c.deletion.shape == (3, 9) and torch.allclose(c.fractions, torch.arange(9) / 8)
    assert torch.allclose(c.deletion[:, 0], base.scores) and torch.allclose(
        c.insertion[:, -1], base.scores
    )
    blurred = MF.gaussian_blur(images, 11, 5.0)
    assert torch.allclose(c.insertion[:, 0], eng.base_scores(blurred, targets=base.targets).scores)
    m = DeletionInsertion()
    m.update(c)
    m.compute()
    mc = m.mean_curves()
    assert mc["deletion"].shape == (9,) and torch.all(
        mc["deletion"][:-1] >= mc["deletion"][1:] - 1e-6
    )
    aucs = _aucs(eng, images, {"perfect": perfect, "inverse": 1 - perfect})
    assert aucs["perfect"][0] < aucs["inverse"][0] and aucs["perfect"][1] > aucs["inverse"][1]


def test_deletion_insertion_forward_budget_and_nan_maps() -> None:
    model = CountingModel(BoxModel((2, 6, 2, 6)))
    b, steps, n_methods = 3, 5, 2
    images = torch.rand(b, 3, 10, 10)
    maps = {"a": torch.rand(b, 10, 10), "b": torch.rand(b, 10, 10)}
    maps["b"][1] = float("nan")
    eng = Perturber(model, Protocol(steps=steps), chunk_size=7)
    base = eng.base_scores(images)
    model.images = 0
    curves = eng.deletion_insertion(images, maps, base=base)
    # 1 constant image + 1 blurred copy per image + 2 (S - 1) per finite (method, image)
    assert model.images == 1 + b + 2 * (steps - 1) * (b * n_methods - 1)
    assert torch.isnan(curves["b"].deletion[1]).all()
    m = DeletionInsertion()
    m.update(curves["b"])
    r = m.compute()
    assert r["deletion"].n == 2 and r["deletion"].skipped == {"non_finite": 1}
    with pytest.raises(ValueError, match="fractions changed"):
        m.update(Perturber(model, Protocol(steps=3)).deletion_insertion(images, maps["a"])["map"])


def test_road_perfect_map_beats_inverse() -> None:
    model = BoxModel((5, 11, 5, 11), scale=1 / 108)  # 36 box pixels
    images = torch.zeros(2, 3, 16, 16)
    images[:, :, 5:11, 5:11] = 1.0  # evidence only in the box: imputation from outside kills it
    perfect = model.box_mask(2, 16, 16).float()
    eng = Perturber(model, Protocol(score="logit", road_percentages=(10, 20, 50), road_noise=0.0))
    base = eng.base_scores(images)
    res = {}
    for name, m in {"perfect": perfect, "inverse": 1 - perfect}.items():
        metric = ROAD((10, 20, 50))
        metric.update(eng.road(images, m, base=base))
        res[name] = metric.compute()
    # perfect map, MoRF 20% (51 px >= 36 box px): the whole box is imputed from zeros -> 0
    assert res["perfect"]["morf@20"].value == pytest.approx(0.0, abs=1e-4)
    # LeRF on the perfect map removes background only -> the score stays 1
    assert res["perfect"]["lerf@50"].value == pytest.approx(1.0, abs=1e-4)
    assert res["inverse"]["morf@10"].value == pytest.approx(1.0, abs=1e-4)
    assert res["perfect"]["lerf_minus_morf"].value > 0.5 > res["inverse"]["lerf_minus_morf"].value
    noisy = Perturber(model, Protocol(score="logit", road_percentages=(20,), road_noise=0.05))
    r1, r2 = noisy.road(images, perfect), noisy.road(images, perfect)
    assert torch.equal(r1.morf, r2.morf)  # seeded noise: reproducible
    with pytest.raises(ValueError, match="built for"):
        ROAD((10,)).update(r1)


def test_occlusion_faithfulness_of_perfect_map_is_high() -> None:
    model = BoxModel((4, 12, 4, 12), scale=1 / 192)
    images = torch.ones(2, 3, 16, 16)
    eng = Perturber(model, Protocol(score="logit"))
    occ = eng.occlusion_sensitivity(images, window=4, stride=2)
    assert occ.shape == (2, 7, 7)
    assert occ[0, 3, 3] == pytest.approx(16 * 3 / 192)  # a 4x4 patch fully inside the box
    perfect = model.box_mask(2, 16, 16).float()
    m = OcclusionFaithfulness(window=4, stride=2)
    m.update(perfect, occ)
    m.update(torch.zeros(1, 16, 16), occ[:1])  # constant map: correlation undefined -> skipped
    r = m.compute()
    assert r.value == pytest.approx(1.0) and r.n == 2 and r.skipped == {"non_finite": 1}


def _insertion_setup() -> tuple[BoxModel, torch.Tensor, dict[str, torch.Tensor]]:
    model = BoxModel((4, 12, 4, 12), scale=1 / 192)  # logit 0: sum over the 64-pixel box / 192
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 16, 16, generator=g)
    maps = {"box": model.box_mask(3, 16, 16).float(), "rand": random_maps(3, 16, 16, seed=2)}
    return model, images, maps


def _box_logit(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, 4:12, 4:12].sum((1, 2, 3)) / 192


def _insertion_by_hand(images: torch.Tensor, start: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The insertion curve built pixel by pixel: the top-k ranked pixels of I over ``start``."""
    ranks = MF.saliency_ranks(m).view(-1, 1, 16, 16)
    counts = MF.perturbation_counts(256, 4)
    return torch.stack([_box_logit(torch.where(ranks < k, images, start)) for k in counts], 1)


def test_insertion_from_mean_colour_starts_at_the_mean_image_score() -> None:
    model, images, maps = _insertion_setup()
    eng = Perturber(model, Protocol(score="logit", steps=4, insertion_baseline="mean"))
    curves = eng.deletion_insertion(images, maps)
    mean_image = images.mean((2, 3), keepdim=True).expand_as(images)
    want_start = images.mean((2, 3)).sum(1) * 64 / 192  # the box at the mean colour
    for name, c in curves.items():
        assert torch.allclose(c.insertion_start, want_start, atol=1e-6)
        assert torch.equal(c.insertion_start, c.insertion[:, 0])
        want = _insertion_by_hand(images, mean_image, maps[name])
        assert torch.allclose(c.insertion, want, atol=1e-5)
    blur = Perturber(model, Protocol(score="logit", steps=4)).deletion_insertion(images, maps)
    for name, c in curves.items():  # deletion does not depend on the insertion baseline
        assert torch.equal(c.deletion, blur[name].deletion)
        assert not torch.allclose(c.insertion_start, blur[name].insertion_start)
    # the mean colour is taken in pixel space whatever the mask space
    norm = Perturber(
        model, Protocol(score="logit", insertion_baseline="mean", mask_space="normalized")
    )
    assert torch.allclose(norm.insertion_start_images(images), mean_image)


def test_insertion_from_seeded_noise_is_one_image_for_every_input() -> None:
    model, images, maps = _insertion_setup()
    eng = Perturber(model, Protocol(score="logit", steps=4, insertion_baseline="noise", seed=7))
    curves = eng.deletion_insertion(images, maps)
    noise = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    for name, c in curves.items():
        assert torch.allclose(c.insertion_start, _box_logit(noise).expand(3), atol=1e-6)
        want = _insertion_by_hand(images, noise.expand_as(images), maps[name])
        assert torch.allclose(c.insertion, want, atol=1e-5)
    # the same noise for a sub-batch (no dependence on batch composition) and on a second call
    part = eng.deletion_insertion(images[1:], {n: m[1:] for n, m in maps.items()})
    assert torch.equal(part["rand"].insertion, curves["rand"].insertion[1:])
    other = Perturber(model, Protocol(score="logit", steps=4, insertion_baseline="noise", seed=8))
    assert not torch.allclose(other.insertion_start_images(images), noise.expand_as(images))
    with pytest.raises(ValueError, match="unknown insertion_baseline 'gray'; choose one of: blur"):
        Protocol(insertion_baseline="gray")


@pytest.mark.parametrize("baseline", ["blur", "mean", "noise"])
def test_insertion_baseline_costs_one_forward_per_image(baseline: str) -> None:
    model = CountingModel(BoxModel((2, 6, 2, 6)))
    b, steps = 3, 5
    images = torch.rand(b, 3, 10, 10)
    eng = Perturber(model, Protocol(steps=steps, insertion_baseline=baseline))
    base = eng.base_scores(images)
    model.images = 0
    eng.deletion_insertion(images, {"a": torch.rand(b, 10, 10)}, base=base)
    assert model.images == 1 + b + 2 * (steps - 1) * b
    kernel0 = Perturber(model, Protocol(steps=steps, blur_kernel=0))
    model.images = 0
    kernel0.deletion_insertion(images, {"a": torch.rand(b, 10, 10)}, base=base)
    assert model.images == 1 + 2 * (steps - 1) * b  # the deletion baseline's score is reused


def test_deletion_insertion_reports_the_insertion_start() -> None:
    model, images, maps = _insertion_setup()
    for baseline in ("blur", "mean"):
        eng = Perturber(model, Protocol(score="logit", steps=4, insertion_baseline=baseline))
        c = eng.deletion_insertion(images, maps)["rand"]
        m = DeletionInsertion()
        m.update(c, ids=torch.tensor([5, 6, 7]))
        r = m.compute()
        assert list(r) == ["deletion", "insertion", "insertion_start"]
        assert r["insertion_start"].value == pytest.approx(float(c.insertion_start.mean()))
        assert r["insertion_start"].n == 3
        want = dict(zip([5, 6, 7], c.insertion_start.tolist(), strict=True))
        assert m.per_image()["insertion_start"] == pytest.approx(want)
