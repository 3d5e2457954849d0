"""Temperature scaling, ECE (Guo et al. 2017) and the calibrated scores of the Perturber."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from attncam.metrics import AverageDrop, Perturber, Protocol
from attncam.metrics.calibration import (
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    Calibration,
    calibrate,
    collect_logits,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from tests.unit.test_metrics_helpers import BoxModel, PixelModel, TinyNet


def _sampled(n: int = 4000, c: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Logits ``z`` and labels drawn from ``softmax(z)``: ``z`` is calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    return z, torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)


# --------------------------------------------------------------------------- the fit


def test_two_point_case_has_the_analytic_optimum() -> None:
    # Three images with logits (a, 0): labels 0, 0, 1. The NLL is minimal where
    # sigmoid(a / T) = 2/3, i.e. T = a / log 2.
    a = 2.0
    logits = torch.tensor([[a, 0.0]] * 3)
    t = fit_temperature(logits, torch.tensor([0, 0, 1]))
    assert t == pytest.approx(a / math.log(2), rel=1e-10)


def test_scaled_logits_recover_the_scale() -> None:
    z, y = _sampled()
    t1 = fit_temperature(z, y)
    assert t1 == pytest.approx(1.0, abs=0.05)  # labels drawn from softmax(z): T near 1
    for k in (0.5, 3.0, 20.0):
        # The NLL of (k z) / T is the NLL of z / (T / k): the optimum scales exactly with k.
        assert fit_temperature(k * z, y) == pytest.approx(k * t1, rel=1e-8)


def test_fit_agrees_with_a_brute_force_grid_search() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 7, generator=g) * 4 + torch.randn(300, 1, generator=g)
    labels = torch.randint(7, (300,), generator=g)
    labels[:150] = logits[:150].argmax(1)  # half right, half random: T neither 0 nor inf
    grid = torch.exp(torch.linspace(math.log(0.1), math.log(30.0), 2001, dtype=torch.float64))
    z = logits.double()[None] / grid[:, None, None]  # (G, N, C)
    nll = -z.log_softmax(2).gather(2, labels.expand(len(grid), -1)[..., None]).mean((1, 2))
    best = int(nll.argmin())
    t = fit_temperature(logits, labels)
    assert float(grid[best - 1]) <= t <= float(grid[best + 1])
    assert negative_log_likelihood(logits, labels, t) <= float(nll[best]) + 1e-12


def test_bounds_and_degenerate_inputs() -> None:
    separable = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([0, 1, 0])
    assert fit_temperature(separable, labels) == TEMPERATURE_MIN  # NLL falls as T -> 0
    assert calibrate(separable, labels).at_bound
    assert fit_temperature(separable, 1 - labels) == TEMPERATURE_MAX  # all wrong: T -> inf
    assert fit_temperature(torch.zeros(3, 4), torch.tensor([0, 1, 2])) == 1.0  # any T fits
    assert not calibrate(*_sampled(200)).at_bound


def test_fit_errors_name_the_bad_value() -> None:
    z, y = _sampled(10)
    with pytest.raises(ValueError, match="no sample"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels out of range \[0, 5\): \[5, 7\]"):
        fit_temperature(z, torch.tensor([0, 1, 5, 7, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"labels must be an integer \(10,\) tensor"):
        fit_temperature(z, y[:3])
    with pytest.raises(ValueError, match=r"floating \(N, C\) tensor"):
        fit_temperature(z[:, 0], y)
    bad = z.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(bad, y)
    with pytest.raises(ValueError, match="max_iter must be >= 1; got 0"):
        fit_temperature(z, y, max_iter=0)
    with pytest.raises(ValueError, match="temperature must be > 0; got -1"):
        negative_log_likelihood(z, y, -1.0)


# --------------------------------------------------------------------------- ECE


def test_ece_on_hand_built_bins() -> None:
    # Two bins (0, 0.5] and (0.5, 1]. Bin 1: conf 0.4 (right) and 0.5 (wrong, on the edge: a
    # right-closed bin keeps it here) -> |0.5 - 0.45| * 2/4. Bin 2: conf 0.9 (right), 0.7
    # (wrong) -> |0.5 - 0.8| * 2/4. ECE = 0.025 + 0.15.
    probs = torch.tensor(
        [[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.4, 0.35, 0.25], [0.5, 0.3, 0.2]], dtype=torch.float64
    )
    labels = torch.tensor([0, 1, 0, 2])
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.175, abs=1e-12)
    # One bin: |accuracy - mean confidence| = |0.5 - 0.625|.
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.125, abs=1e-12)
    # Confidence 0.75 everywhere with 3 of 4 right: perfectly calibrated.
    even = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(even, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        expected_calibration_error(probs * 3, labels)
    with pytest.raises(ValueError, match="bins must be >= 1; got 0"):
        expected_calibration_error(probs, labels, bins=0)


def test_calibrate_reports_before_and_after() -> None:
    z, y = _sampled()
    same = calibrate(z, y)
    # Calibrated by construction: T near 1 barely changes the ECE; at T = 1 exactly nothing moves.
    assert same.ece_after == pytest.approx(same.ece_before, abs=0.005)
    assert expected_calibration_error((z / 1.0).softmax(1), y) == expected_calibration_error(
        z.softmax(1), y
    )
    over = calibrate(4 * z, y)  # over-confident logits
    assert over.temperature == pytest.approx(4 * same.temperature, rel=1e-8)
    assert over.ece_before > 0.2 > 0.03 > over.ece_after
    assert over.nll_after < over.nll_before
    assert over.nll_after == pytest.approx(same.nll_after, rel=1e-9)  # the same probabilities
    d = over.to_dict()
    assert d["n"] == 4000 and d["bins"] == 15 and d["at_bound"] is False
    assert Calibration(**d) == over


def test_collect_logits_runs_eval_and_concatenates() -> None:
    torch.manual_seed(0)
    net = PixelModel(TinyNet(4), (0.5,) * 3, (0.25,) * 3)
    net.net.features.append(nn.Dropout(0.9))  # train mode would change every call
    images = torch.rand(5, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0])
    net.train()
    batches = [(images[:3], labels[:3], "extra"), (images[3:], labels[3:], "extra")]
    logits, got_labels = collect_logits(net, batches)
    assert net.training  # restored
    with torch.no_grad():
        want = net.eval()(images)
    assert torch.allclose(logits, want, atol=1e-6) and torch.equal(got_labels, labels)
    with pytest.raises(ValueError, match="no batch"):
        collect_logits(net, [])


# --------------------------------------------------------------------------- calibrated scores


def _saturated() -> tuple[BoxModel, Tensor, Tensor]:
    # Logit 0 = 40 on the all-ones image (logit 1 = 0): softmax is 1 in float32.
    model = BoxModel((4, 12, 4, 12), scale=40 / 192)
    return model, torch.ones(2, 3, 16, 16), model.box_mask(2, 16, 16).float()


def test_temperature_unsaturates_average_drop() -> None:
    model, images, perfect = _saturated()
    half = perfect * 0.5  # O: logit 20
    plain = Perturber(model, Protocol())
    base = plain.base_scores(images)
    masked = plain.masked_scores(images, half, base=base)
    assert torch.equal(base.scores, torch.ones(2)) and torch.equal(masked, torch.ones(2))
    ad = AverageDrop()
    ad.update(base.scores, masked)
    assert ad.compute().value == 0.0  # saturated: no map can be told from another
    cal = Perturber(model, Protocol(score="calibrated", temperature=10.0))
    base_c = cal.base_scores(images)
    masked_c = cal.masked_scores(images, half, base=base_c)
    y, o = torch.sigmoid(torch.tensor(4.0)), torch.sigmoid(torch.tensor(2.0))  # 40/T, 20/T
    assert torch.allclose(base_c.scores, y.expand(2)) and torch.allclose(masked_c, o.expand(2))
    ad = AverageDrop()
    ad.update(base_c.scores, masked_c)
    assert ad.compute().value == pytest.approx(float(100 * (y - o) / y), rel=1e-5)
    assert torch.equal(base_c.predicted, base.predicted)  # T never changes the arg-max


def test_calibrated_is_the_tempered_softmax_everywhere() -> None:
    # BoxModel has two classes with logit 1 = 0, so p(class 0) = sigmoid(logit 0 / T): every
    # calibrated score is that function of the logit score of the same perturbed image.
    model = BoxModel((4, 12, 4, 12), scale=4 / 192)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    maps = {"box": model.box_mask(3, 16, 16).float(), "rand": torch.rand(3, 16, 16, generator=g)}
    t = 2.5
    logit = Perturber(model, Protocol(score="logit", steps=5))
    cal = Perturber(model, Protocol(steps=5).with_temperature(t))
    assert cal.protocol.score == "calibrated" and cal.protocol.temperature == t

    def f(x: Tensor) -> Tensor:
        return torch.sigmoid(x / t)

    bl, bc = logit.base_scores(images), cal.base_scores(images)
    assert torch.allclose(bc.scores, f(bl.scores), atol=1e-6)
    tl, tc = logit.confidence_table(images, maps, base=bl), cal.confidence_table(images, maps)
    for n in maps:
        assert torch.allclose(tc.masked[n], f(tl.masked[n]), atol=1e-6)
        assert torch.allclose(tc.percentage_in[n], f(tl.percentage_in[n]), atol=1e-6)
    cl, cc = logit.deletion_insertion(images, maps), cal.deletion_insertion(images, maps)
    for n in maps:
        assert torch.allclose(cc[n].deletion, f(cl[n].deletion), atol=1e-6)
        assert torch.allclose(cc[n].insertion, f(cl[n].insertion), atol=1e-6)
    rl, rc = logit.road(images, maps["box"]), cal.road(images, maps["box"])
    assert torch.allclose(rc.morf, f(rl.morf), atol=1e-6)
    occ_l = logit.occlusion_sensitivity(images, window=8, stride=4)
    occ_c = cal.occlusion_sensitivity(images, window=8, stride=4)
    base_l = bl.scores[:, None, None]
    assert torch.allclose(occ_c, f(base_l) - f(base_l - occ_l), atol=1e-6)


def test_temperature_one_is_bit_identical_to_softmax() -> None:
    torch.manual_seed(0)
    model = PixelModel(TinyNet(6), (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.rand(4, 3, 12, 12)
    maps = {"a": torch.rand(4, 12, 12), "b": torch.rand(4, 12, 12)}
    sm = Perturber(model, Protocol(steps=4))
    one = Perturber(model, Protocol(steps=4, score="calibrated", temperature=1.0))
    assert torch.equal(sm.base_scores(images).scores, one.base_scores(images).scores)
    ta, tb = sm.confidence_table(images, maps), one.confidence_table(images, maps)
    assert all(torch.equal(ta.masked[n], tb.masked[n]) for n in maps)
    assert all(torch.equal(ta.percentage_in[n], tb.percentage_in[n]) for n in maps)
    ca, cb = sm.deletion_insertion(images, maps), one.deletion_insertion(images, maps)
    assert all(torch.equal(ca[n].insertion, cb[n].insertion) for n in maps)


def test_calibrated_protocol_validation() -> None:
    with pytest.raises(ValueError, match="needs a temperature"):
        Perturber(BoxModel((0, 1, 0, 1)), Protocol(score="calibrated"))
    assert Protocol(score="calibrated").needs_temperature
    assert not Protocol().needs_temperature
    with pytest.raises(ValueError, match="used only with score='calibrated'; got score='softmax'"):
        Protocol(temperature=2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            Protocol(score="calibrated", temperature=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown score 'temp'; choose one of: "):
        Protocol(score="temp")
    p = Protocol(score="calibrated", temperature=2)
    assert p.temperature == 2.0 and isinstance(p.temperature, float)
    d = p.to_dict()
    assert d["temperature"] == 2.0 and d["score"] == "calibrated"
    assert Protocol.from_dict(d) == p
    assert Protocol.from_dict({"score": "calibrated", "temperature": None}).needs_temperature
