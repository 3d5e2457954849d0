"""Statistics across seeds and images, the pre-registered decision rule and the testability gate.

A comparison of map ``a`` with map ``b`` on a metric uses the paired per-image differences of every
training seed, oriented so that a positive difference means ``a`` is better. The effect is the mean
over seeds of each seed's mean difference; its interval comes from a crossed (two-way) bootstrap
that resamples seeds and images independently (Owen 2007, "pigeonhole" bootstrap), so that both
the training seed and the choice of test images count as sources of variation. The realised
minimum detectable effect is ``(z_{1-a/2} + z_{power}) * se`` with the bootstrap standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special

from attncam.metrics.compare import metric_direction

#: ``{seed: {map: {metric: {image id: value}}}}``
Values = Mapping[int, Mapping[str, Mapping[str, Mapping[int, float]]]]


def diff_matrix(values: Values, a: str, b: str, metric: str) -> tuple[np.ndarray, list[int]]:
    """``(S, N)`` oriented differences ``a - b`` (NaN where either is missing) and the image ids."""
    sign = -1.0 if metric_direction(metric) == "lower" else 1.0
    seeds = sorted(values)
    ids = sorted({int(i) for s in seeds for m in (a, b) for i in values[s][m].get(metric, {})})
    out = np.full((len(seeds), len(ids)), np.nan)
    col = {i: k for k, i in enumerate(ids)}
    for r, s in enumerate(seeds):
        va, vb = values[s][a].get(metric, {}), values[s][b].get(metric, {})
        for i in va.keys() & vb.keys():
            out[r, col[int(i)]] = sign * (float(va[i]) - float(vb[i]))
    return out, ids


def seed_image_matrix(
    per_seed: Mapping[int, Mapping[int, float | None]],
    transform: Callable[[float], float] = float,
) -> np.ndarray:
    """``(S, N)`` values by seed (sorted) and image id (sorted); NaN where missing or not finite."""
    seeds = sorted(per_seed)
    ids = sorted({int(i) for s in seeds for i in per_seed[s]})
    col = {i: k for k, i in enumerate(ids)}
    m = np.full((len(seeds), len(ids)), np.nan)
    for r, s in enumerate(seeds):
        for i, v in per_seed[s].items():
            if v is not None and math.isfinite(float(v)):
                m[r, col[int(i)]] = transform(float(v))
    return m


def _stat(d: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        per_seed = np.nanmean(d, axis=1)
    return float(np.nanmean(per_seed))


def crossed_bootstrap(d: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of the mean of seed means, resampling seeds and images."""
    rng = np.random.default_rng(seed)
    s, n = d.shape
    out = np.empty(resamples)
    for r in range(resamples):
        rows = rng.integers(0, s, s) if s > 1 else np.zeros(1, dtype=int)
        cols = rng.integers(0, n, n)
        out[r] = _stat(d[np.ix_(rows, cols)])
    return out


def compare(
    values: Values, a: str, b: str, metric: str, sesoi: float, rule: Mapping[str, Any]
) -> dict[str, Any]:
    """Effect of ``a`` over ``b`` on ``metric`` with its intervals, MDE and per-seed directions.

    ``rule``: ``alpha`` (two-sided, before the correction), ``num_primaries`` (Bonferroni
    divisor of the confidence interval used for "beats"), ``power``, ``resamples``.
    """
    d, ids = diff_matrix(values, a, b, metric)
    valid = ~np.isnan(d)
    if valid.sum() < 2:
        return {"a": a, "b": b, "metric": metric, "n_pairs": int(valid.sum()), "missing": True}
    boot = crossed_bootstrap(d, int(rule["resamples"]), int(rule.get("seed", 0)))
    boot = boot[np.isfinite(boot)]
    alpha, m = float(rule["alpha"]), int(rule.get("num_primaries", 1))
    lo, hi = np.quantile(boot, [alpha / (2 * m), 1 - alpha / (2 * m)])
    lo90, hi90 = np.quantile(boot, [alpha, 1 - alpha])
    se = float(boot.std(ddof=1))
    z = float(special.ndtri(1 - alpha / (2 * m)) + special.ndtri(float(rule["power"])))
    with np.errstate(invalid="ignore"):
        per_seed = np.nanmean(d, axis=1)
    return {
        "a": a, "b": b, "metric": metric, "direction": metric_direction(metric),
        "estimate": _stat(d), "ci": [float(lo), float(hi)], "ci_level": 1 - alpha / m,
        "ci90": [float(lo90), float(hi90)], "se": se, "mde": z * se, "sesoi": float(sesoi),
        "per_seed": [float(x) for x in per_seed], "n_seeds": int(d.shape[0]),
        "n_images": len(ids), "n_pairs": int(valid.sum()),
        "seeds_a_better": int((per_seed > 0).sum()),
    }  # fmt: skip


def endpoint_verdict(c: Mapping[str, Any], rule: Mapping[str, Any]) -> str:
    """``beats`` (lower bound above the SESOI and enough seeds agree), ``equivalent`` (the 90%
    interval inside +-SESOI), ``worse`` (upper bound below -SESOI), else ``inconclusive``."""
    if c.get("missing"):
        return "inconclusive"
    lo, hi = c["ci"]
    need = int(rule["min_seeds_same_direction"])
    enough = c["seeds_a_better"] >= min(need, c["n_seeds"])
    if lo > c["sesoi"] and enough:
        return "beats"
    if hi < -c["sesoi"]:
        return "worse"
    lo90, hi90 = c["ci90"]
    if -c["sesoi"] < lo90 and hi90 < c["sesoi"]:
        return "equivalent"
    return "inconclusive"


def control_beaten(c: Mapping[str, Any]) -> bool:
    """Whether ``a`` beats a control: the corrected interval above zero."""
    return not c.get("missing") and c["ci"][0] > 0


def decide(
    primary: Sequence[Mapping[str, Any]],
    controls: Mapping[str, Sequence[Mapping[str, Any]]],
    rule: Mapping[str, Any],
) -> dict[str, Any]:
    """The pre-registered verdict: ``helps``, ``does not help`` or ``inconclusive``.

    ``primary``: the comparisons of attention-guided with Grad-CAM, one per primary endpoint.
    ``controls``: per endpoint metric, the comparisons of attention-guided with each control.
    """
    rows = []
    for c in primary:
        v = endpoint_verdict(c, rule)
        beaten = {x["b"]: control_beaten(x) for x in controls.get(c["metric"], [])}
        helps = v == "beats" and bool(beaten) and all(beaten.values())
        rows.append({"metric": c["metric"], "verdict": v, "controls_beaten": beaten,
                     "helps": helps})  # fmt: skip
    if any(r["helps"] for r in rows):
        verdict = "helps"
    elif rows and all(r["verdict"] == "equivalent" for r in rows):
        verdict = "does not help"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "endpoints": rows}


def testability(gate: Sequence[Mapping[str, Any]], contrast: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the learned gate localises: ``M_s`` alone beats the centre prior on any measure
    (the corrected interval above zero) or its on-object contrast exceeds 1."""
    beats = {c["metric"]: control_beaten(c) for c in gate}
    contrast_ok = bool(contrast.get("ci") and contrast["ci"][0] > 1.0)
    return {"localises": any(beats.values()) or contrast_ok, "beats_centre": beats,
            "contrast_above_one": contrast_ok}  # fmt: skip


def ratio_summary(
    per_seed: Mapping[int, Mapping[int, float]], resamples: int, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Geometric mean of a per-image ratio (the gate contrast) with a crossed-bootstrap interval."""
    m = seed_image_matrix(per_seed, lambda v: math.log(v) if v > 0 else math.nan)
    if np.isnan(m).all():
        return {"estimate": None, "ci": None, "n_pairs": 0}
    boot = crossed_bootstrap(m, resamples, seed)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": math.exp(_stat(m)), "ci": [math.exp(lo), math.exp(hi)],
            "n_pairs": int((~np.isnan(m)).sum())}  # fmt: skip


__all__ = ["compare", "control_beaten", "level", "crossed_bootstrap", "decide", "diff_matrix",
           "endpoint_verdict", "ratio_summary", "testability"]  # fmt: skip


def level(
    values: Values, name: str, metric: str, resamples: int, seed: int = 0, level_: float = 0.95
) -> dict[str, Any] | None:
    """Mean of a map's metric over seeds (each seed's image mean), crossed-bootstrap interval."""
    per_seed = {s: v[name][metric] for s, v in values.items() if metric in v.get(name, {})}
    if not per_seed:
        return None
    m = seed_image_matrix(per_seed)
    if np.isnan(m).all():
        return None
    boot = crossed_bootstrap(m, resamples, seed)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - level_) / 2, (1 + level_) / 2])
    return {"estimate": _stat(m), "ci": [float(lo), float(hi)], "n_seeds": len(per_seed),
            "n_pairs": int((~np.isnan(m)).sum())}  # fmt: skip
