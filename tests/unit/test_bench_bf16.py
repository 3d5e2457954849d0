"""The agreement maths of scripts/bench_bf16.py on hand-made numbers (no model, no data)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_bf16", ROOT / "scripts" / "bench_bf16.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_swapped_pairs_finds_strict_reversals_only(bench: ModuleType) -> None:
    f32 = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 1.0}
    f16 = {"a": 1.5, "b": 2.0, "c": 1.0, "d": 1.2}
    # a > b becomes a < b; a > c stays; c = d in float32 is no swap; b > d stays.
    assert bench.swapped_pairs(f32, f16) == [("a", "b")]
    assert bench.swapped_pairs(f32, f32) == []
    # the pair is named with the float32 winner first, whatever the dict order
    assert bench.swapped_pairs({"x": 1.0, "y": 2.0}, {"x": 2.0, "y": 1.0}) == [("y", "x")]


def test_ratio_and_correlations(bench: ModuleType) -> None:
    assert bench.ratio(-0.5, 2.0) == 0.25
    assert bench.ratio(0.0, 0.0) == 0.0
    assert math.isinf(bench.ratio(1e-9, 0.0))
    s, p = bench.correlations([1, 2, 3, 4], [10, 20, 30, 100])
    assert s == pytest.approx(1.0) and 0.8 < p < 1.0
    assert bench.correlations([1, 1, 1], [1, 2, 3]) == (None, None)


def _summary(bench: ModuleType, per32: dict, per16: dict) -> dict:
    """A metric_summary from per-image values; every CI half-width is 1.0."""

    def result(values: dict) -> dict:
        v = list(values.values())
        mean = sum(v) / len(v)
        return {"value": mean, "low": mean - 1.0, "high": mean + 1.0, "n": len(v)}

    results = tuple({n: {"m": result(p[n])} for n in p} for p in (per32, per16))
    per_image = tuple({n: {"m": p[n]} for n in p} for p in (per32, per16))
    return bench.metric_summary("m", results, per_image, list(per32))


def test_a_swap_of_tied_methods_is_a_tie(bench: ModuleType) -> None:
    # a and b differ by +-0.1 image by image: the float32 mean difference's CI holds 0.
    a32 = {i: 5.0 + (0.1 if i % 2 else -0.1) for i in range(40)}
    b32 = {i: 5.0 + 0.01 for i in range(40)}
    a16 = {i: v + 0.02 for i, v in a32.items()}
    m = _summary(bench, {"a": a32, "b": b32}, {"a": a16, "b": b32})
    assert [(s["a"], s["b"], s["tie"]) for s in m["swaps"]] == [("b", "a", True)]
    assert m["largest"]["method"] == "a" and m["largest"]["diff"] == pytest.approx(0.02)
    assert m["max_ratio"] == pytest.approx(0.02)  # half-width 1.0 by construction
    word, reasons = bench.verdict({"m": m})
    assert word == "agreement holds" and reasons == []


def test_verdict_fails_on_a_real_swap_or_a_large_shift(bench: ModuleType) -> None:
    a32 = {i: 6.0 + 0.01 * i for i in range(40)}  # a clearly above b in float32
    b32 = {i: 5.0 + 0.01 * i for i in range(40)}
    a16 = {i: v - 1.5 for i, v in a32.items()}  # bf16 puts a below b: a real swap
    m = _summary(bench, {"a": a32, "b": b32}, {"a": a16, "b": b32})
    assert [(s["a"], s["b"], s["tie"]) for s in m["swaps"]] == [("a", "b", False)]
    word, reasons = bench.verdict({"m": m})
    assert word == "agreement does not hold"
    assert any("ranking changes outside noise (a / b)" in r for r in reasons)
    assert any("1.50 x its float32 CI half-width" in r for r in reasons)
    # a shift of 0.3 half-widths is too much (the limit is 0.25), even without a swap
    up = {i: v + 0.3 for i, v in a32.items()}
    shifted = _summary(bench, {"a": a32, "b": b32}, {"a": up, "b": b32})
    assert shifted["swaps"] == []
    assert bench.verdict({"m": shifted})[0] == "agreement does not hold"
    assert bench.verdict({"m": {**shifted, "max_ratio": 0.249}})[0] == "agreement holds"


def test_auto_verdict_judges_only_the_metrics_auto_runs_in_bf16(bench: ModuleType) -> None:
    ok = {"max_ratio": 0.05, "swaps": []}
    bad = {"max_ratio": 0.40, "swaps": []}  # as Increase in Confidence measured
    metrics = {"average_drop": ok, "increase_in_confidence": bad, "deletion": ok, "insertion": ok}
    assert bench.verdict(metrics)[0] == "agreement does not hold"
    word, reasons, bf16 = bench.auto_verdict(metrics)
    assert (word, reasons, bf16) == ("agreement holds", [], ["deletion", "insertion"])
    word, reasons, _ = bench.auto_verdict({**metrics, "insertion": bad})
    assert word == "agreement does not hold" and reasons[0].startswith("insertion:")
    assert set(bench.FAMILY) == {k for k, _ in bench.METRICS}


def test_ic_flips_bound_the_gap_by_the_larger_average_drop(bench: ModuleType) -> None:
    per32 = {"m": {"increase_in_confidence": {0: 100.0, 1: 0.0, 2: 0.0},
                   "average_drop": {0: 0.0, 1: 0.05, 2: 3.0}}}  # fmt: skip
    per16 = {"m": {"increase_in_confidence": {0: 0.0, 1: 100.0, 2: 0.0},
                   "average_drop": {0: 0.1, 1: 0.0, 2: 2.9}}}  # fmt: skip
    f = bench.ic_flips(per32, per16, ["m"])
    assert f["flips"] == 2
    assert f["max_gap_percent"] == pytest.approx(0.1)
    assert f["median_gap_percent"] == pytest.approx(0.075)
    none = bench.ic_flips(per32, per32, ["m"])
    assert none == {"flips": 0, "max_gap_percent": None, "median_gap_percent": None}
