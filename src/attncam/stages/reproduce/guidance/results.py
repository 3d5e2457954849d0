"""From per-image scores to the report's tables: the pre-registered analysis, in one JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from attncam.metrics.compare import resolve_sesoi
from attncam.stages.reproduce.guidance import analysis as A
from attncam.stages.reproduce.guidance.heads import Arm

AG, GC, MS, CENTRE = "attention_guided", "gradcam", "attention", "baseline_centre"
#: Metrics shown in the levels tables, in order.
TABLE_METRICS = ["average_drop", "increase_in_confidence", "deletion", "insertion",
                 "grid_pointing_game", "pointing_game", "energy_pointing_game", "pixel_auc"]  # fmt: skip


def included_seeds(records: Mapping[int, Mapping[str, Any]], min_acc: float) -> list[int]:
    """Seeds whose test top-1 reaches ``min_acc`` (the others enter no verdict)."""
    return sorted(s for s, r in records.items() if r["test_accuracy"] >= min_acc)


def values_of(scores: Mapping[int, Mapping[str, Any]], seeds: Sequence[int]) -> dict[int, Any]:
    """``{seed: {map: {metric: {id: value}}}}`` of the given seeds."""
    return {s: scores[s]["per_image"] for s in seeds if s in scores}


def _sesoi(p: DictConfig, metric: str) -> float:
    """The smallest effect of interest: ``preregistration.sesoi`` or ``compare.DEFAULT_SESOI``."""
    return resolve_sesoi(metric, OmegaConf.to_container(p.sesoi) if p.get("sesoi") else None)  # type: ignore[arg-type]


def registered(p: DictConfig) -> dict[str, Any]:
    """The pre-registration as run, every endpoint's SESOI resolved (what the report prints)."""
    out = OmegaConf.to_container(p, resolve=True)
    assert isinstance(out, dict)
    keys = dict.fromkeys([*p.primary_endpoints, *p.exploratory, *p.testability])
    out["sesoi"] = {k: _sesoi(p, k) for k in keys}
    return out


def _rule(p: DictConfig, m: int) -> dict[str, Any]:
    return {"alpha": float(p.alpha), "power": float(p.power), "resamples": int(p.resamples),
            "num_primaries": m, "min_seeds_same_direction": int(p.min_seeds_same_direction)}  # fmt: skip


def levels(values: A.Values, resamples: int) -> dict[str, dict[str, Any]]:
    """Per map and metric, the level with its interval."""
    names = sorted({n for v in values.values() for n in v})
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        row = {k: A.level(values, n, k, resamples) for k in TABLE_METRICS}
        out[n] = {k: v for k, v in row.items() if v is not None}
    return out


def primary_analysis(values: A.Values, p: DictConfig) -> dict[str, Any]:
    """The pre-registered comparison, its controls, the verdict and the exploratory endpoints."""
    prim = list(p.primary_endpoints)
    rule = _rule(p, len(prim))
    comps = [A.compare(values, AG, GC, k, _sesoi(p, k), rule) for k in prim]
    controls = {k: [A.compare(values, AG, c, k, _sesoi(p, k), rule) for c in p.controls]
                for k in prim}  # fmt: skip
    decision = A.decide(comps, controls, rule)
    for c in comps:
        c["verdict"] = A.endpoint_verdict(c, rule)
    other = [k for k in p.exploratory if k not in prim]
    secondary = [A.compare(values, AG, GC, k, _sesoi(p, k), _rule(p, 1)) for k in other]
    secondary = [c for c in secondary if not c.get("missing")]
    for c in secondary:
        c["verdict"] = A.endpoint_verdict(c, _rule(p, 1))
    return {"comparisons": comps, "controls": controls, "decision": decision,
            "secondary": secondary}  # fmt: skip


def testability(
    values: A.Values, gates: Mapping[int, Mapping[int, float]], p: DictConfig
) -> dict[str, Any]:
    """Does the learned gate localise? ``M_s`` alone against the centre prior, and its contrast."""
    keys = [k for k in p.testability]
    rule = _rule(p, len(keys))
    comps = [A.compare(values, MS, CENTRE, k, _sesoi(p, k), rule) for k in keys]
    contrast = A.ratio_summary(gates, int(p.resamples))
    return {"comparisons": comps, "contrast": contrast, **A.testability(comps, contrast)}


def recipe_row(
    values: A.Values,
    gates: Mapping[int, Mapping[int, float]],
    p: DictConfig,
    metrics: Sequence[str],
) -> dict[str, Any]:
    """One attention recipe: attention-guided vs Grad-CAM at the same layer, and its gate."""
    rule = _rule(p, 1)
    comps = [A.compare(values, AG, GC, k, _sesoi(p, k), rule) for k in metrics]
    comps = [c for c in comps if not c.get("missing")]
    for c in comps:
        c["verdict"] = A.endpoint_verdict(c, rule)
    gate = testability(values, gates, p)
    return {"comparisons": comps, "testability": gate}


def cross_arm(
    scores: Mapping[str, Mapping[int, Any]],
    a: tuple[str, str],
    b: tuple[str, str],
    metrics: Sequence[str],
    p: DictConfig,
) -> list[dict[str, Any]]:
    """Map ``a = (arm, map)`` vs ``b`` on the same images and seeds (different models)."""
    seeds = sorted(set(scores[a[0]]) & set(scores[b[0]]))
    merged = {s: {"a": scores[a[0]][s]["per_image"][a[1]], "b": scores[b[0]][s]["per_image"][b[1]]}
              for s in seeds}  # fmt: skip
    out = []
    for k in metrics:
        c = A.compare(merged, "a", "b", k, _sesoi(p, k), _rule(p, 1))
        if not c.get("missing"):
            c.update(a="/".join(a), b="/".join(b), verdict=A.endpoint_verdict(c, _rule(p, 1)))
            out.append(c)
    return out


def gate_values(scores: Mapping[int, Mapping[str, Any]], seeds: Sequence[int]) -> dict[int, Any]:
    return {s: scores[s]["gate"]["contrast"] for s in seeds if "gate" in scores[s]}


def analyse(
    all_arms: list[Arm],
    records: Mapping[str, Mapping[int, Any]],
    scores: Mapping[str, Mapping[int, Any]],
    g: DictConfig,
) -> dict[str, Any]:
    """Every table of the report (see the module docstring)."""
    p = g.preregistration
    keep = {a.name: included_seeds(records[a.name], float(g.min_accuracy)) for a in all_arms}
    primary = next(a.name for a in all_arms if a.extra["role"] == "primary")
    vals = values_of(scores[primary], keep[primary])
    out: dict[str, Any] = {
        "preregistration": registered(p),
        "accuracy": {n: {s: r for s, r in recs.items()} for n, recs in records.items()},
        "included_seeds": keep, "primary_arm": primary,
        "primary": primary_analysis(vals, p),
        "testability": testability(vals, gate_values(scores[primary], keep[primary]), p),
        "levels": {n: levels(values_of(sc, keep[n]), int(p.resamples)) for n, sc in scores.items()},
        "recipes": {}, "controls": {},
    }  # fmt: skip
    recipe_metrics = [*g.recipe_metrics, "grid_pointing_game", "pixel_auc"]
    for a in all_arms:
        if a.extra["role"] in ("primary", "recipe") and a.name in scores:
            out["recipes"][a.name] = recipe_row(values_of(scores[a.name], keep[a.name]),
                                                gate_values(scores[a.name], keep[a.name]), p,
                                                recipe_metrics)  # fmt: skip
    out["controls"] = control_arms(all_arms, scores, keep, p)
    return out


def control_arms(
    all_arms: list[Arm],
    scores: Mapping[str, Mapping[int, Any]],
    keep: Mapping[str, Sequence[int]],
    p: DictConfig,
) -> dict[str, Any]:
    """The primary model's maps against those of the control models, on the primaries."""
    primary = next(a.name for a in all_arms if a.extra["role"] == "primary")
    kept = {n: {s: v for s, v in sc.items() if s in keep[n]} for n, sc in scores.items()}
    metrics = list(p.primary_endpoints)
    out: dict[str, Any] = {}
    for a in all_arms:
        if a.extra["role"] != "control" or a.name not in kept or not kept[a.name]:
            continue
        rows = cross_arm(kept, (primary, AG), (a.name, GC), metrics, p)
        rows += cross_arm(kept, (primary, GC), (a.name, GC), metrics, p)
        if a.has_attention:
            rows += cross_arm(kept, (primary, AG), (a.name, AG), metrics, p)
        out[a.name] = rows
    return out


__all__ = ["analyse", "included_seeds", "levels", "primary_analysis", "testability"]
