"""Average Drop, Increase in Confidence, Win %, Percentage-in and the Perturber's forward budget."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from attncam import inference
from attncam.metrics import (
    AverageDrop,
    IncreaseInConfidence,
    PercentageIn,
    Perturber,
    Protocol,
    WinPercentage,
)
from attncam.metrics import functional as MF
from tests.unit.test_metrics_helpers import BoxModel, CountingModel, PixelModel, TinyNet


def test_average_drop_and_increase_by_hand() -> None:
    y = torch.tensor([0.5, 0.8, 0.2, 0.4])
    o = torch.tensor([0.25, 0.9, 0.1, 0.4])
    ad, ic = AverageDrop(), IncreaseInConfidence()
    ad.update(y[:2], o[:2])
    ad.update(y[2:], o[2:])
    ic.update(y, o)
    r = ad.compute()
    assert r.name == "average_drop" and r.n == 4 and r.value == pytest.approx(25.0)
    assert r.low <= r.value <= r.high and r.skipped == {}
    assert ic.compute().value == pytest.approx(25.0)
    d = r.to_dict()
    assert set(d) >= {"value", "n", "low", "high", "skipped"}


def test_skips_are_counted_never_nan() -> None:
    y = torch.tensor([0.5, 0.5, -1.0, 0.5])
    o = torch.tensor([0.25, float("nan"), 0.2, 0.1])
    keep = torch.tensor([True, True, True, False])
    ad = AverageDrop()
    ad.update(y, o, keep)
    r = ad.compute()
    assert r.n == 1 and r.value == pytest.approx(50.0)
    assert r.skipped == {"excluded": 1, "non_finite": 1, "non_positive_base": 1}
    empty = IncreaseInConfidence()
    empty.update(y[1:2], o[1:2])
    r = empty.compute()
    assert r.n == 0 and r.value is None and r.low is None and r.skipped == {"non_finite": 1}
    with pytest.raises(ValueError, match="batch size 2; expected 4"):
        ad.update(y, o[:2])
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        ad.update(y, o, torch.ones(4))


def test_win_percentage() -> None:
    w = WinPercentage()
    y = torch.tensor([0.5, 0.5, 0.5, 0.5])
    w.update(y, torch.tensor([0.4, 0.4, 0.1, 0.3]), torch.tensor([0.3, 0.4, 0.2, 0.35]))
    assert w.compute().value == pytest.approx((100 + 50 + 0 + 0) / 4)


def test_percentage_in_metric_variants() -> None:
    y = torch.tensor([0.5, 0.2])
    o = torch.tensor([[0.6, 0.4], [0.1, 0.3]])
    m = PercentageIn((5, 50), "binary")
    m.update(y, o)
    r = m.compute()
    assert list(r) == ["percentage_in@5", "percentage_in@50"]
    assert r["percentage_in@5"].value == pytest.approx(50.0)
    assert r["percentage_in@50"].value == pytest.approx(50.0)
    g = PercentageIn((5, 50), "gain")
    g.update(y, o)
    r = g.compute()
    assert r["percentage_in@5"].value == pytest.approx((20.0 + 0.0) / 2)
    assert r["percentage_in@50"].value == pytest.approx((0.0 + 50.0) / 2)
    with pytest.raises(
        ValueError, match="unknown variant 'hard'; choose one of: binary, soft, gain"
    ):
        PercentageIn((5,), "hard")
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        m.update(y, o[:, :1])


def _box_setup() -> tuple[BoxModel, Tensor, Tensor]:
    model = BoxModel((4, 12, 4, 12), scale=1 / 192)  # logit 0 = 1 on an all-ones image
    images = torch.ones(2, 3, 16, 16)
    return model, images, model.box_mask(2, 16, 16).float()


def test_engine_scores_by_hand_on_box_model() -> None:
    model, images, perfect = _box_setup()
    eng = Perturber(model, Protocol(score="logit"))
    base = eng.base_scores(images)
    assert torch.allclose(base.scores, torch.ones(2))
    half = perfect * 0.5
    table = eng.confidence_table(images, {"perfect": perfect, "half": half}, base=base)
    assert torch.allclose(table.masked["perfect"], torch.ones(2))
    assert torch.allclose(table.masked["half"], torch.full((2,), 0.5))
    # a ramp inside the box: top-p% pixels are known exactly (64 box pixels of 256)
    ramp = torch.zeros(2, 16, 16)
    ramp[:, 4:12, 4:12] = (torch.arange(64).float().view(8, 8) + 1) / 64
    pin = eng.percentage_in_scores(images, ramp, base=base)  # binary: kept box pixels / 64
    kept = torch.tensor([13, 26, 52, 64, 64]) / 64  # ceil(p% of 256), capped by the box
    assert torch.allclose(pin, kept.expand(2, 5))
    soft = eng.percentage_in_scores(images, ramp, base=base, variant="soft")
    want = torch.tensor([sum(range(64 - k + 1, 65)) / 64 / 64 for k in (13, 26, 52, 64, 64)])
    assert torch.allclose(soft, want.expand(2, 5), atol=1e-6)
    # softmax: p(class 0) = sigmoid(logit)
    eng_sm = Perturber(model, Protocol(score="softmax"))
    assert torch.allclose(eng_sm.base_scores(images).scores, torch.sigmoid(torch.ones(2)))


def test_mask_space_normalized_masks_the_normalized_tensor() -> None:
    model, images, perfect = _box_setup()
    model.input_mean = (0.5, 0.5, 0.5)
    eng = Perturber(model, Protocol(score="logit", mask_space="normalized"))
    assert eng.mean == (0.5, 0.5, 0.5)  # read from the model
    # E = L * (I - 0.5) + 0.5 with L = 0 everywhere -> the mean image
    e = eng.apply_weights(images, torch.zeros(2, 16, 16))
    assert torch.allclose(e, torch.full_like(images, 0.5))
    out = eng.masked_scores(images, perfect * 0)
    assert torch.allclose(out, torch.full((2,), 0.5))


def test_targets_labels_and_only_correct() -> None:
    model, images, _ = _box_setup()
    eng = Perturber(model, Protocol(target="label", only_correct=True, score="logit"))
    labels = torch.tensor([0, 1])
    base = eng.base_scores(images, labels)
    assert base.targets.tolist() == [0, 1] and base.keep.tolist() == [True, False]
    assert torch.allclose(base.scores, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="need labels"):
        eng.base_scores(images)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        eng.base_scores(images, torch.tensor([0]))


def test_protocol_validation_and_round_trip() -> None:
    p = Protocol(percentages=[5, 10], steps=7)
    d = p.to_dict()
    assert d["percentages"] == [5.0, 10.0] and d["steps"] == 7
    assert Protocol.from_dict(d) == p
    assert d["temperature"] is None and d["insertion_baseline"] == "blur"  # the defaults
    noisy = Protocol(insertion_baseline="noise", seed=3)
    assert Protocol.from_dict(noisy.to_dict()) == noisy
    with pytest.raises(
        ValueError, match="unknown mask_space 'image'; choose one of: pixel, normalized"
    ):
        Protocol(mask_space="image")
    with pytest.raises(ValueError, match="unknown target"):
        Protocol(target="top1")
    with pytest.raises(ValueError, match="unknown protocol keys"):
        Protocol.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="blur_kernel"):
        Protocol(blur_kernel=4)


def test_engine_bad_maps_error_or_skip() -> None:
    model, images, perfect = _box_setup()
    counted = CountingModel(model)
    eng = Perturber(counted, Protocol(score="logit"))
    with pytest.raises(ValueError, match="batch size 1 but there are 2 images"):
        eng.masked_scores(images, perfect[:1])
    with pytest.raises(ValueError, match="input resolution"):
        eng.masked_scores(images, perfect[:, :8, :8])
    bad = perfect.clone()
    bad[1, 0, 0] = float("nan")
    base = eng.base_scores(images)
    counted.images = 0
    out = eng.masked_scores(images, bad, base=base)
    assert counted.images == 1  # no forward spent on the NaN map
    ad = AverageDrop()
    ad.update(base.scores, out)
    assert ad.compute().skipped == {"non_finite": 1}


def test_paper_table_costs_at_most_1_plus_5x6_forwards_per_image() -> None:
    torch.manual_seed(0)
    model = CountingModel(PixelModel(TinyNet(), (0.5,) * 3, (0.25,) * 3))
    b, h, w = 5, 24, 24
    images = torch.rand(b, 3, h, w)
    methods = {f"m{k}": torch.rand(b, h, w) for k in range(5)}
    eng = Perturber(model, Protocol(precision="float32"), chunk_size=16)
    base = eng.base_scores(images)
    table = eng.confidence_table(images, methods, base=base)
    assert model.images == b * (1 + 5 * 6)
    assert model.calls == -(-b // 16) + -(-b * 30 // 16)  # batched in chunks of 16
    # in bf16 the full images take one more float32 forward: the predicted class is float32's
    model.images = 0
    Perturber(model, Protocol(precision="bf16"), chunk_size=16).base_scores(images)
    assert model.images == 2 * b
    for name, m in methods.items():  # the batched table equals one-by-one calls
        single = eng.masked_scores(images, m, base=base)
        assert torch.allclose(table.masked[name], single, atol=1e-6)
        for j, p in enumerate((5, 10, 20, 25, 50)):
            one = eng.percentage_in_scores(images, m, base=base, percentages=(p,))
            assert torch.allclose(table.percentage_in[name][:, j], one[:, 0], atol=1e-6)
    assert isinstance(model.model.net.fc.weight.grad, type(None))


def test_engine_restores_train_mode_and_uses_inference_mode() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(torch.is_inference_mode_enabled() and not self.training)
            return torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], 1)

    probe = Probe().train()
    eng = Perturber(probe)
    eng.masked_scores(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8))
    assert seen and all(seen) and probe.training


class _FixedCAM:
    """A torchcam-compatible extractor that returns given maps (same maps for both libraries)."""

    def __init__(self, model: nn.Module, maps: Tensor) -> None:
        self.model, self.maps = model, maps

    def __call__(
        self, class_idx: object = None, scores: object = None, **_: object
    ) -> list[Tensor]:
        return [self.maps]

    def fuse_cams(self, cams: list[Tensor]) -> Tensor:
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        yield


def test_matches_torchcam_classification_metric_normalized_softmax() -> None:
    tm = pytest.importorskip("torchcam.metrics")
    from functools import partial

    torch.manual_seed(1)  # a net where some explanations raise the score (IC strictly in (0, 100))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    net = TinyNet().eval()
    pixel_model = PixelModel(net, mean, std)
    images = torch.rand(16, 3, 20, 20)
    maps = torch.rand(16, 20, 20)
    normalized = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ref = tm.ClassificationMetric(_FixedCAM(net, maps), partial(torch.softmax, dim=-1))
    ref.update(normalized)
    want = ref.summary()

    # float32: the definitions are compared, not bf16 rounding (measured in benchmarks/)
    protocol = Protocol(mask_space="normalized", score="softmax", precision="float32")
    eng = Perturber(pixel_model, protocol)
    base = eng.base_scores(images)
    o = eng.masked_scores(images, maps, base=base)
    ad, ic = AverageDrop(), IncreaseInConfidence()
    ad.update(base.scores, o)
    ic.update(base.scores, o)
    # torchcam reports fractions and divides by (Y + 1e-7); attncam divides by Y (rel. diff <= 1e-4)
    assert ad.compute().value == pytest.approx(100 * want["avg_drop"], rel=1e-3)
    assert ic.compute().value == pytest.approx(100 * want["conf_increase"], abs=1e-9)
    assert ic.compute().n == ref.total == 16
    assert 0 < ic.compute().value < 100 and ad.compute().value > 0


def test_deletion_insertion_matches_torchcam_without_blur() -> None:
    tm = pytest.importorskip("torchcam.metrics")
    from functools import partial

    from attncam.metrics import DeletionInsertion

    torch.manual_seed(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    net = TinyNet().eval()
    images = torch.rand(6, 3, 20, 20)
    maps = torch.rand(6, 20, 20)
    normalized = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ref = tm.DeletionInsertionMetric(_FixedCAM(net, maps), partial(torch.softmax, dim=-1), steps=7)
    ref.update(normalized)
    want = ref.summary()
    # torchcam inserts into its (zero) deletion baseline: blur_kernel=0 is that protocol
    protocol = Protocol("normalized", blur_kernel=0, steps=7, precision="float32")
    eng = Perturber(PixelModel(net, mean, std), protocol)
    metric = DeletionInsertion()
    metric.update(eng.deletion_insertion(images, maps)["map"])
    got = metric.compute()
    assert got["deletion"].value == pytest.approx(want["deletion_auc"], rel=1e-4)
    assert got["insertion"].value == pytest.approx(want["insertion_auc"], rel=1e-4)


def test_optimized_inference_copy_agrees_and_tracks_weight_updates() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    net[1].running_mean.uniform_(-1, 1)
    model = PixelModel(net, (0.5,) * 3, (0.25,) * 3).train()
    images, maps = torch.rand(3, 3, 12, 12), torch.rand(3, 12, 12)
    fp32 = Protocol(precision="float32")
    plain, fast = Perturber(model, fp32), Perturber(model, fp32, optimize=True)
    assert (plain.precision, fast.precision) == ("float32", "float32")
    a, b = plain.base_scores(images), fast.base_scores(images)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and model.training
    assert torch.allclose(
        plain.masked_scores(images, maps, base=a),
        fast.masked_scores(images, maps, base=b),
        atol=1e-5,
    )
    assert fast.images_forwarded == 6
    with torch.no_grad():
        net[5].weight.mul_(3)  # an in-place update (as an optimiser step) rebuilds the copy
    assert torch.allclose(
        plain.base_scores(images).logits, fast.base_scores(images).logits, atol=1e-5
    )
    # bf16 forwards (the default on CPUs with bf16 units) agree to bf16's 8 mantissa bits
    bf16 = Perturber(model, Protocol(precision="bf16"), optimize=True)
    c = bf16.base_scores(images)
    assert bf16.precision == "bf16" and c.logits.dtype == torch.float32
    assert torch.allclose(plain.base_scores(images).logits, c.logits, rtol=2e-2, atol=2e-2)
    assert not torch.equal(plain.base_scores(images).logits, c.logits)  # it did run in bf16


def _tied_maps() -> Tensor:
    m = torch.zeros(3, 4, 4)
    m[0, 0, 0] = 1.0  # one top pixel, then five tied at 0.5, then ten at 0
    m[0, 1, :] = 0.5
    m[0, 2, 0] = 0.5
    m[1] = torch.arange(16).float().view(4, 4) / 15  # distinct values
    m[2] = float("nan")
    return m


def test_auto_precision_runs_the_curves_in_bf16_and_the_rest_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """precision=auto on a CPU with bf16 units: Y, Average Drop / IC and Percentage-in are the
    float32 engine's bit for bit; the deletion/insertion curves (their Y included) the bf16
    engine's."""
    monkeypatch.setattr(inference, "cpu_bf16_supported", lambda: True)
    torch.manual_seed(0)
    model = PixelModel(TinyNet(), (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.rand(4, 3, 16, 16)
    maps = {"a": torch.rand(4, 16, 16), "b": torch.rand(4, 16, 16)}
    engines = {
        p: Perturber(model, Protocol(precision=p, steps=5)) for p in ("auto", "float32", "bf16")
    }
    auto = engines["auto"]
    assert (auto.precision, auto.curve_precision) == ("float32", "bf16")
    assert Protocol().precision == "auto"  # the default
    base = {p: e.base_scores(images) for p, e in engines.items()}
    assert torch.equal(base["auto"].scores, base["float32"].scores)
    assert torch.equal(base["auto"].curve_logits, base["bf16"].score_logits)
    table = {
        p: engines[p].confidence_table(images, maps, base=base[p]) for p in ("auto", "float32")
    }
    curves = {p: e.deletion_insertion(images, maps, base=base[p]) for p, e in engines.items()}
    for n in maps:
        assert torch.equal(table["auto"].masked[n], table["float32"].masked[n])
        assert torch.equal(table["auto"].percentage_in[n], table["float32"].percentage_in[n])
        for kind in ("deletion", "insertion"):
            got, want = getattr(curves["auto"][n], kind), getattr(curves["bf16"][n], kind)
            assert torch.equal(got, want)
            exact = getattr(curves["float32"][n], kind)
            assert not torch.equal(got, exact) and torch.allclose(got, exact, atol=2e-2)
    # Another explained class (explain's target=...): the curves' Y follows it, in bf16
    other = (base["auto"].targets + 1) % 10
    swapped = dataclasses.replace(
        base["auto"], targets=other, scores=auto.scores(base["auto"].score_logits, other)
    )
    first = auto.deletion_insertion(images, maps["a"], base=swapped)["map"].deletion[:, 0]
    assert torch.equal(first, auto.scores(base["bf16"].score_logits, other))


def test_kept_fraction_counts_ties_at_the_threshold() -> None:
    # logit 0 = the share of the 16 pixels left on an all-ones image: the binary
    # Percentage-in score *is* the fraction of pixels the engine actually kept.
    model = BoxModel((0, 4, 0, 4), scale=1 / 48)
    pcts = (5, 25, 50, 100)
    eng = Perturber(model, Protocol(score="logit", percentages=pcts))
    m = _tied_maps()
    table = eng.confidence_table(torch.ones(3, 3, 4, 4), {"m": m})
    kept = table.kept_fraction["m"]
    # p=25: the 4th largest value is 0.5, and all six pixels >= 0.5 are kept, not four;
    # p=50: the 8th largest is 0, so every pixel is kept.
    want = torch.tensor([[1, 6, 16, 16], [1, 4, 8, 16]]) / 16
    assert torch.equal(kept[:2], want) and torch.isnan(kept[2]).all()
    assert torch.allclose(kept[:2], table.percentage_in["m"][:2], atol=1e-6)
    for j, p in enumerate(pcts):
        thr = MF.top_percent_threshold(m[:2], p)
        assert torch.equal(kept[:2, j], (m[:2] >= thr[:, None, None]).float().mean((1, 2)))


def test_percentage_in_reports_kept_fraction_beside_each_level() -> None:
    model = BoxModel((0, 4, 0, 4), scale=1 / 48)
    pcts = (5, 25, 50, 100)
    eng = Perturber(model, Protocol(score="logit", percentages=pcts))
    images = torch.ones(3, 3, 4, 4)
    table = eng.confidence_table(images, {"m": _tied_maps()})
    metric = PercentageIn(pcts)
    base = eng.base_scores(images).scores
    metric.update(base, table.percentage_in["m"], kept=table.kept_fraction["m"])
    r = metric.compute()
    assert list(r) == [f"percentage_in@{p}" for p in pcts] + [f"kept_fraction@{p}" for p in pcts]
    assert r["kept_fraction@25"].value == pytest.approx((37.5 + 25.0) / 2)
    assert r["kept_fraction@25"].n == r["percentage_in@25"].n == 2
    assert r["kept_fraction@25"].skipped == {"non_finite": 1}  # the NaN map, counted once
    assert r["kept_fraction@5"].value == pytest.approx(100 / 16)
    per = metric.per_image()
    assert per["kept_fraction@25"] == {0: 37.5, 1: 25.0} and set(per) == set(r)
    with pytest.raises(ValueError, match="passed to some updates of PercentageIn but not"):
        metric.update(base, table.percentage_in["m"])
    with pytest.raises(ValueError, match=r"kept must have the shape of scores \(3, 4\)"):
        metric.update(base, table.percentage_in["m"], kept=table.kept_fraction["m"][:, :2])
    metric.reset()
    metric.update(base, table.percentage_in["m"])  # without kept: the old columns only
    assert list(metric.compute()) == [f"percentage_in@{p}" for p in pcts]
