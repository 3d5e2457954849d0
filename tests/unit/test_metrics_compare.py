"""Paired method comparison (attncam.metrics.compare): hand-checkable cases and the verdict rule."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from attncam.metrics.compare import (
    DEFAULT_SESOI,
    bca_interval,
    binary_scale,
    bootstrap_means,
    compare_methods,
    decide_verdict,
    format_comparison_markdown,
    holm,
    load_per_image,
    mcnemar_exact,
    metric_direction,
    minimum_detectable_effect,
    paired,
    sign_flip_test,
    tost_p,
    wilson_interval,
)

R_FAST = 2000  # where the exact p does not matter
Z975 = 1.959963984540054  # Phi^-1(0.975)
Z80 = 0.8416212335729143  # Phi^-1(0.8)


def _exact(values: np.ndarray, mean: float, sd: float) -> np.ndarray:
    """``values`` shifted and scaled to have exactly this mean and sample sd."""
    z = (values - values.mean()) / values.std(ddof=1)
    return mean + sd * z


def _per_image(ref: np.ndarray, method: np.ndarray, metric: str) -> dict:
    return {
        "gradcam": {metric: {i: float(v) for i, v in enumerate(ref)}},
        "ours": {metric: {i: float(v) for i, v in enumerate(method)}},
    }


# --- join ---------------------------------------------------------------------------------------


def test_paired_joins_on_image_id_not_position() -> None:
    a = {5: 50.0, 1: 10.0, 3: 30.0, 9: 90.0}  # image 7 skipped here
    b = {"3": 3.0, "7": 7.0, "1": 1.0, "5": 5.0, "8": 8.0}  # images 9 skipped, string ids
    ids, va, vb = paired(a, b)
    assert ids == (1, 3, 5)
    assert va.tolist() == [10.0, 30.0, 50.0] and vb.tolist() == [1.0, 3.0, 5.0]
    pair = paired(a, b)
    assert (pair.only_in_a, pair.only_in_b) == (1, 2)  # {9} and {7, 8}


def test_compare_joins_methods_with_different_skipped_images() -> None:
    # gradcam kept images 0..5 except 4; ours kept 1..7 except 2. Common: 1, 3, 5.
    ref = {0: 40.0, 1: 10.0, 2: 20.0, 3: 30.0, 5: 50.0}
    ours = {1: 11.0, 3: 33.0, 4: 99.0, 5: 55.0, 6: 66.0, 7: 77.0}
    per_image = {"gradcam": {"insertion": ref}, "ours": {"insertion": ours}}
    (row,) = compare_methods(per_image, "gradcam", sesoi={"insertion": 1.0}, resamples=R_FAST)
    assert (row.n, row.only_in_method, row.only_in_reference) == (3, 3, 2)
    assert row.mean_reference == pytest.approx(30.0)  # (10 + 30 + 50) / 3, not the first three
    assert row.mean_method == pytest.approx(33.0)  # (11 + 33 + 55) / 3
    assert row.diff == pytest.approx(3.0)  # mean of d = (1, 3, 5)
    assert row.win_rate == 1.0 and row.ties == 0 and row.losses == 0
    assert row.p_perm_exact and row.p_perm == pytest.approx(2 / 8)  # only the two extreme flips


def test_load_per_image_reads_the_explain_file(tmp_path: Path) -> None:
    doc = {
        "image_ids": [0, 1, 2],
        "methods": {"gradcam": {"pointing_game": {"0": 100.0, "2": 0.0}}},
    }
    (tmp_path / "per_image.json").write_text(json.dumps(doc))
    assert load_per_image(tmp_path) == {"gradcam": {"pointing_game": {0: 100.0, 2: 0.0}}}
    assert load_per_image(tmp_path / "per_image.json") == load_per_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_per_image=true"):
        load_per_image(tmp_path / "missing")
    doc["methods"]["gradcam"]["pointing_game"]["5"] = 1.0
    (tmp_path / "per_image.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"image ids \[5\] are not in the file's image_ids"):
        load_per_image(tmp_path)
    doc["methods"]["gradcam"]["pointing_game"] = {"0": float("nan")}
    (tmp_path / "per_image.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not finite"):
        load_per_image(tmp_path)


# --- verdicts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["average_drop", "insertion", "pointing_game"])
def test_identical_values_are_never_better(metric: str) -> None:
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 2, 60) * 100.0 if metric == "pointing_game" else rng.random(60) * 50
    per_image = {**_per_image(ref, ref.copy(), metric)}
    (row,) = compare_methods(per_image, "gradcam", sesoi={}, resamples=R_FAST)
    assert row.diff == 0 and row.ci_low == row.ci_high == 0 and row.d_z == 0
    assert row.p_test == 1.0 and row.ties == 60 and row.win_rate == 0
    assert row.verdict == "equivalent"  # default SESOI > 0
    (row0,) = compare_methods(per_image, "gradcam", sesoi={metric: 0.0}, resamples=R_FAST)
    assert row0.verdict == "inconclusive"  # SESOI 0: nothing can be equivalent
    assert row.binary == (metric == "pointing_game")


def test_large_effect_in_the_right_direction_with_default_resamples() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(40.0, 10.0, 40)
    d = _exact(rng.normal(size=40), mean=5.0, sd=1.0)
    per_image = {
        "gradcam": {
            "average_drop": dict(enumerate(ref)),
            "energy_pointing_game": dict(enumerate(ref)),
        },
        "plus5": {
            "average_drop": dict(enumerate(ref + d)),
            "energy_pointing_game": dict(enumerate(ref + d)),
        },
        "minus5": {
            "average_drop": dict(enumerate(ref - d)),
            "energy_pointing_game": dict(enumerate(ref - d)),
        },
    }
    rows = compare_methods(per_image, "gradcam", primary=["average_drop"], sesoi={})
    verdicts = {(r.method, r.metric): r.verdict for r in rows}
    assert verdicts == {
        ("plus5", "average_drop"): "worse",  # lower is better
        ("plus5", "energy_pointing_game"): "better",
        ("minus5", "average_drop"): "better",
        ("minus5", "energy_pointing_game"): "worse",
    }
    row = rows[0]
    assert row.direction == "lower" and row.d_z == pytest.approx(5.0)
    assert row.diff == pytest.approx(5.0) and row.ci_low < 5.0 < row.ci_high
    assert row.ci_low > 4.4 and row.ci_high < 5.6  # about 5 +/- 1.96 / sqrt(40)
    assert row.win_rate == 0.0 and row.losses == 40
    assert row.p_perm_resamples == 20_000 and not row.p_perm_exact
    assert row.p_perm_none_exceeded and row.p_perm == pytest.approx(1 / 20_001)
    assert row.p_holm == pytest.approx(2 / 20_001)  # two primary endpoints
    table = format_comparison_markdown(rows)
    assert "< 1/20000" in table and "**worse**" in table and "better (exploratory)" in table


def test_difference_inside_sesoi_is_equivalent_with_large_n() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(40.0, 10.0, 400)
    d = _exact(rng.normal(size=400), mean=0.1, sd=1.0)
    (row,) = compare_methods(
        _per_image(ref, ref + d, "average_drop"), "gradcam", sesoi={}, resamples=R_FAST
    )
    assert row.sesoi == DEFAULT_SESOI["average_drop"] == 2.0
    assert row.tost_p < 1e-10 and row.verdict == "equivalent"


def test_significant_difference_smaller_than_sesoi_is_not_better() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(0.5, 0.1, 400)
    d = _exact(rng.normal(size=400), mean=0.008, sd=0.01)  # insertion; SESOI 0.01
    (row,) = compare_methods(
        _per_image(ref, ref + d, "insertion"), "gradcam", sesoi={}, resamples=R_FAST
    )
    assert row.p_test < 1e-3 and row.ci_low > 0  # clearly non-zero ...
    assert row.verdict in {"equivalent", "inconclusive"}  # ... but never "better"
    # the same data with a SESOI below the effect is "better"
    (row2,) = compare_methods(
        _per_image(ref, ref + d, "insertion"),
        "gradcam",
        sesoi={"insertion": 0.005},
        resamples=R_FAST,
    )
    assert row2.verdict == "better"


def test_verdict_rule_boundaries() -> None:
    # significant, interval excludes 0, but |diff| == sesoi: not better (strictly larger needed)
    assert decide_verdict(2.0, (1.0, 3.0), 0.001, 0.9, 2.0, "higher") == "inconclusive"
    assert decide_verdict(2.1, (1.0, 3.0), 0.001, 0.9, 2.0, "higher") == "better"
    assert decide_verdict(2.1, (1.0, 3.0), 0.001, 0.9, 2.0, "lower") == "worse"
    assert decide_verdict(2.1, (-0.1, 3.0), 0.001, 0.9, 2.0, "higher") == "inconclusive"
    assert decide_verdict(2.1, (1.0, 3.0), 0.06, 0.9, 2.0, "higher") == "inconclusive"
    assert decide_verdict(0.1, (-0.2, 0.4), 0.5, 0.01, 2.0, "higher") == "equivalent"
    assert decide_verdict(0.1, (-0.2, 0.4), 0.5, 0.01, 0.0, "higher") == "inconclusive"


# --- the individual statistics ------------------------------------------------------------------


def test_sign_flip_p_exact_for_tiny_n() -> None:
    # d = (1, -1, 3), sum 3; the 8 sign flips give sums 5, 3, 3, 1, -1, -3, -3, -5, so
    # |sum*| >= 3 for 6 of 8.
    result = sign_flip_test(np.array([1.0, -1.0, 3.0]), resamples=8)
    assert result.exact and result.resamples == 8 and result.p == pytest.approx(6 / 8)
    # d = (1, 2, 4): only (+,+,+) and (-,-,-) reach |7|.
    assert sign_flip_test(np.array([1.0, 2.0, 4.0]), resamples=8).p == pytest.approx(2 / 8)
    assert sign_flip_test(np.zeros(3), resamples=8).p == 1.0
    # 2^3 > 7: random version, p = (1 + count) / (1 + R)
    rnd = sign_flip_test(np.array([1.0, 2.0, 4.0]), resamples=7, seed=0)
    assert not rnd.exact and rnd.resamples == 7 and rnd.p > 0


def test_sign_flip_random_matches_exact_and_reports_none_exceeded() -> None:
    d = np.random.default_rng(5).normal(0.4, 1.0, 12)
    exact = sign_flip_test(d, resamples=4096)  # 2^12 = 4096: enumerated
    rnd = sign_flip_test(d, resamples=4095, seed=1)
    assert exact.exact and not rnd.exact
    assert rnd.p == pytest.approx(exact.p, abs=0.03)
    none = sign_flip_test(np.arange(1.0, 31.0), resamples=R_FAST, seed=0)  # all positive, n=30
    assert none.none_exceeded and none.p == pytest.approx(1 / (R_FAST + 1))


def test_mcnemar_exact_against_hand_binomial() -> None:
    # 7 pairs only a succeeds, 2 pairs only b, 5 both, 6 neither.
    a = np.array([100] * 7 + [0] * 2 + [100] * 5 + [0] * 6, dtype=float)
    b = np.array([0] * 7 + [100] * 2 + [100] * 5 + [0] * 6, dtype=float)
    p, n10, n01 = mcnemar_exact(a, b)
    assert (n10, n01) == (7, 2)
    hand = 2 * sum(math.comb(9, k) for k in range(3)) / 2**9  # 2 (1 + 9 + 36) / 512
    assert p == pytest.approx(hand) == pytest.approx(92 / 512)
    assert mcnemar_exact(a, a)[0] == 1.0
    per_image = _per_image(b, a, "pointing_game")
    (row,) = compare_methods(per_image, "gradcam", sesoi={}, resamples=R_FAST)
    assert row.binary and row.test == "mcnemar" and row.p_test == pytest.approx(hand)
    assert row.mcnemar_discordant == (7, 2)
    # Wilson intervals in the metric's unit (percent): 12/20 and 7/20
    assert row.wilson_method == pytest.approx(tuple(100 * x for x in wilson_interval(12, 20)))
    assert row.wilson_reference == pytest.approx(tuple(100 * x for x in wilson_interval(7, 20)))


def test_wilson_interval_against_the_formula() -> None:
    low, high = wilson_interval(0, 40)
    assert low == 0.0 and high == pytest.approx(Z975**2 / (40 + Z975**2))  # = 0.0876
    assert high == pytest.approx(0.0876, abs=1e-4)
    k, n = 12, 40
    p, z2 = k / n, Z975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))
    with pytest.raises(ValueError, match="41/40"):
        wilson_interval(41, 40)


def test_binary_detection() -> None:
    assert binary_scale([0.0, 100.0, 100.0], "pointing_game") == 100.0
    assert binary_scale([0.0, 1.0], "whatever") == 1.0
    assert binary_scale([0.0, 0.0], "box_accuracy") == 100.0  # percent metric, all misses
    assert binary_scale([0.0, 50.0, 100.0], "energy_pointing_game") is None


def test_bca_close_to_percentile_on_symmetric_data_and_to_scipy() -> None:
    rng = np.random.default_rng(6)
    sym = rng.normal(0.0, 1.0, 200)
    low, high = bca_interval(sym, resamples=R_FAST, seed=0)
    boot = bootstrap_means(sym, R_FAST, seed=0)
    plow, phigh = np.quantile(boot, [0.025, 0.975])
    width = phigh - plow
    assert abs(low - plow) < 0.05 * width and abs(high - phigh) < 0.05 * width
    skew = rng.exponential(1.0, 60)  # skewed: acceleration and bias correction matter
    ours = bca_interval(skew, resamples=20_000, seed=1)  # 20,000: Monte Carlo error ~1% of width
    ref = stats.bootstrap(
        (skew,), np.mean, n_resamples=20_000, method="BCa", random_state=np.random.default_rng(2)
    ).confidence_interval
    width = ref.high - ref.low
    assert ours == pytest.approx((ref.low, ref.high), abs=0.04 * width)
    # BCa moves the interval to the right of the percentile one on right-skewed data
    plow, phigh = np.quantile(bootstrap_means(skew, 20_000, seed=1), [0.025, 0.975])
    assert ours[1] > phigh


def test_bca_degenerate_cases() -> None:
    assert bca_interval(np.full(10, 3.0)) == (3.0, 3.0)  # zero variance: the point
    assert bca_interval(np.array([1.0, 4.0])) == (1.0, 4.0)  # n < 3: the range
    with pytest.raises(ValueError, match="non-empty"):
        bca_interval(np.array([]))


def test_minimum_detectable_effect_formula() -> None:
    d = _exact(np.random.default_rng(7).normal(size=50), mean=0.3, sd=2.0)
    assert minimum_detectable_effect(d) == pytest.approx((Z975 + Z80) * 2.0 / math.sqrt(50))
    assert (Z975 + Z80) == pytest.approx(2.8016, abs=1e-4)


def test_tost_p_against_the_t_formula() -> None:
    d = _exact(np.random.default_rng(8).normal(size=25), mean=0.5, sd=2.0)
    se, df = 2.0 / 5.0, 24
    hand = max(stats.t.sf((0.5 + 1.5) / se, df), stats.t.cdf((0.5 - 1.5) / se, df))
    assert tost_p(d, 1.5) == pytest.approx(hand)
    assert tost_p(d, 0.0) == 1.0
    assert tost_p(np.zeros(5), 0.1) == 0.0


def test_holm_over_primary_endpoints_only() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(9)
    ref = {m: rng.random(30) for m in ("average_drop", "deletion", "insertion", "mask_iou")}
    per_image = {
        "gradcam": {m: dict(enumerate(v)) for m, v in ref.items()},
        "ours": {m: dict(enumerate(v + rng.normal(0.05, 0.1, 30))) for m, v in ref.items()},
    }
    kwargs = dict(primary=["average_drop", "deletion"], sesoi={}, resamples=R_FAST)
    few = compare_methods(per_image, "gradcam", ["average_drop", "deletion"], **kwargs)
    many = compare_methods(per_image, "gradcam", list(ref), **kwargs)
    assert [r.p_holm for r in few] == [r.p_holm for r in many[:2]]
    assert holm([r.p_test for r in few]) == [r.p_holm for r in few]
    assert all(r.p_holm is None and not r.primary for r in many[2:])


def test_metric_direction() -> None:
    assert metric_direction("average_drop") == "lower" and metric_direction("morf@20") == "lower"
    assert metric_direction("lerf_minus_morf") == "higher"
    assert metric_direction("percentage_in@5") == "higher"


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_bad_value_and_the_choices() -> None:
    per_image = _per_image(np.arange(5.0), np.arange(5.0) + 1, "insertion")
    with pytest.raises(ValueError, match="unknown reference method 'gradcam\\+'.*gradcam, ours"):
        compare_methods(per_image, "gradcam+", sesoi={})
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['nope'\]; choose from: insertion"):
        compare_methods(per_image, "gradcam", ["nope"], sesoi={})
    with pytest.raises(ValueError, match=r"primary metric\(s\) \['deletion'\]"):
        compare_methods(per_image, "gradcam", primary=["deletion"], sesoi={})
    with pytest.raises(ValueError, match=r"sesoi for unknown metric\(s\) \['insertoin'\]"):
        compare_methods(per_image, "gradcam", sesoi={"insertoin": 0.1})
    with pytest.raises(ValueError, match="no smallest effect of interest for metric 'custom'"):
        compare_methods(
            {"gradcam": {"custom": {0: 1.0, 1: 2.0}}, "ours": {"custom": {0: 1.0, 1: 3.0}}},
            "gradcam",
            sesoi={},
        )
    per_image["ours"]["insertion"] = {0: 1.0, 17: 2.0}
    with pytest.raises(
        ValueError, match=r"1 paired image\(s\) \(only in ours: 1, only in gradcam: 4\)"
    ):
        compare_methods(per_image, "gradcam", sesoi={}, resamples=R_FAST)


# --- the script ---------------------------------------------------------------------------------


def test_script_writes_new_files_and_never_replaces(tmp_path: Path, capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "scripts" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare_script", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(10)
    ref = rng.random(10) * 50
    doc = {
        "image_ids": list(range(10)),
        "methods": {
            "gradcam": {"average_drop": {str(i): v for i, v in enumerate(ref)}},
            "ours": {"average_drop": {str(i): v - 1 for i, v in enumerate(ref)}},
        },
    }
    (tmp_path / "per_image.json").write_text(json.dumps(doc))
    args = [str(tmp_path), "--primary", "average_drop", "--sesoi", "average_drop=0.5"]
    assert script.main(args) == 0
    assert "| ours | average_drop |" in capsys.readouterr().out
    first = (tmp_path / "comparison.md").read_text()
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rows"][0]["verdict"] == "better" and saved["settings"]["sesoi"] == {
        "average_drop": 0.5
    }
    assert script.main(args) == 0
    assert (tmp_path / "comparison-2.md").is_file() and (tmp_path / "comparison-2.json").is_file()
    assert (tmp_path / "comparison.md").read_text() == first
    out = tmp_path / "mine.md"
    out.write_text("keep")
    with pytest.raises(SystemExit):
        script.main([*args, "--out", str(out)])
    assert out.read_text() == "keep"
    with pytest.raises(SystemExit):
        script.main([*args, "--resamples", "100"])


def test_wilson_bounds_are_exact_at_the_extremes() -> None:
    """0/96 has lower bound exactly 0 and 96/96 upper bound exactly 1 (no 3e-16 round-off)."""
    from attncam.metrics.compare import wilson_interval

    low, high = wilson_interval(0, 96)
    assert low == 0.0 and 0.03 < high < 0.04
    low, high = wilson_interval(96, 96)
    assert high == 1.0 and 0.96 < low < 0.97
