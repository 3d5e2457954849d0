"""``docs/REPRODUCTION.md`` of the guidance experiment, rendered from its JSON only.

``render(results, manifest)`` is a pure function of the two committed files
(``docs/reproduction/guidance/results.json`` and ``manifest.json``), so a test re-renders the
committed report and finds no difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from attncam.stages.reproduce.guidance.heads import ARM_DEFAULTS
from attncam.stages.reproduce.guidance.results import TABLE_METRICS

UNITS = {"average_drop": "pts", "increase_in_confidence": "pts", "grid_pointing_game": "pts",
         "pointing_game": "pts", "energy_pointing_game": "pts"}  # fmt: skip
BETTER = {"average_drop": "lower", "deletion": "lower"}
BASELINE_ROWS = ["baseline_centre", "baseline_random", "baseline_oracle"]
MEANING = {
    "helps": "On at least one primary endpoint attention-guided Grad-CAM beat Grad-CAM on the same "
    "model by more than the smallest effect of interest, in enough seeds, and also beat a gate "
    "taken from another image and a centre prior. For someone choosing between the two methods "
    "on a network like this one, the attention-guided map is the more faithful choice on that "
    "endpoint; the other endpoints are in the table.",
    "does not help": "On every primary endpoint the difference between attention-guided Grad-CAM "
    "and Grad-CAM lies within the smallest effect of interest. For someone choosing between them "
    "on a network like this one, the choice does not matter on these endpoints; pick on cost.",
    "inconclusive": "This run cannot say that attention guidance helps, nor that it does not: "
    "either a difference was found but was smaller than the smallest effect of interest, came "
    "from too few seeds, or was not larger than a control's, or the intervals are too wide to "
    "show equivalence. For someone choosing between the methods, this run is no reason to prefer "
    "either; the per-endpoint rows say which way the evidence leans and how large an effect the "
    "run could have detected.",
}


def _nanmean(xs: Sequence[float]) -> float | None:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else None


def f(x: Any, nd: int = 3) -> str:
    """A number for a table (``-`` when missing)."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 10 else f"{x:.{max(1, nd - 2)}f}"
    return str(x)


def ci(c: Sequence[float] | None, nd: int = 3) -> str:
    return "-" if not c else f"[{f(c[0], nd)}, {f(c[1], nd)}]"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _load(values: Sequence[float] | None) -> str:
    return "-" if not values else " / ".join(f"{v:.2f}" for v in values)


def header(results: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    load = manifest.get("load_average", {})
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in manifest.get("stages_seconds", {}).items())
    dirty = " (with uncommitted changes)" if manifest.get("git_dirty") else ""
    return "\n".join([
        "# Reproduction: does attention guidance help?",
        "",
        f"Written by `{manifest.get('command')}` at commit `{manifest.get('git_commit')}`{dirty} "
        f"on {manifest.get('written')}, {manifest.get('host_cpus')} CPU cores, "
        f"{manifest.get('wall_seconds', 0) / 60:.1f} min wall ({stages}). Load average "
        f"(1 / 5 / 15 min) before {_load(load.get('before'))}, after {_load(load.get('after'))}. "
        "Every number below is read from `docs/reproduction/guidance/results.json`; this file is "
        "rendered from it (`attncam.stages.reproduce.guidance.report`).",
        "",
        "The paper's table-2 analogue (ResNet-50, GoogLeNet, VGG-19 with and without CBAM, from "
        "scratch at 72 px) is a separate part of the same command (`part=table2`) and was "
        "produced by another run: [REPRODUCTION_TABLE2.md](REPRODUCTION_TABLE2.md).",
    ])  # fmt: skip


def preregistration(results: Mapping[str, Any]) -> str:
    p = results["preregistration"]
    rows = [[k, f(p["sesoi"][k]), BETTER.get(k, "higher")] for k in p["primary_endpoints"]]
    m = len(p["primary_endpoints"])
    return "\n".join([
        "## 1. Pre-registration (fixed in `conf/reproduce/cpu.yaml` before the results)",
        "",
        table(["primary endpoint", "smallest effect of interest (SESOI)", "better"], rows),
        "",
        f"Effects are attention-guided minus Grad-CAM on the same model and images, oriented so "
        f"that > 0 means attention-guided is better; intervals come from a crossed bootstrap over "
        f"training seeds and test images ({p['resamples']} resamples). Decision rule:",
        "",
        f"- **helps** only if, on a primary endpoint, the lower end of the "
        f"{1 - p['alpha'] / m:.1%} interval (Bonferroni over {m} primaries) exceeds the SESOI, at "
        f"least {p['min_seeds_same_direction']} seeds' effects point the same way, and "
        f"attention-guided also beats each control ({', '.join(p['controls'])}) on that endpoint "
        "(interval above 0);",
        f"- **does not help** only if the {1 - 2 * p['alpha']:.0%} interval lies inside +-SESOI "
        "on every primary endpoint (equivalence, TOST);",
        "- otherwise **inconclusive**.",
        "",
        "Before the verdict, the testability gate (section 3) asks whether the learned attention "
        "localises at all; if it does not on any measure, the hypothesis was not testable here.",
    ])  # fmt: skip


def design(results: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    d = manifest.get("design", {})
    rows = []
    for arm, recs in results["accuracy"].items():
        kept = set(str(s) for s in results["included_seeds"].get(arm, []))
        accs = ", ".join(f"{r['test_accuracy']:.1f}" + ("" if str(s) in kept else " (excluded)")
                         for s, r in recs.items())  # fmt: skip
        opts = manifest.get("arms", {}).get(arm, {})
        recipe = (
            ", ".join(
                f"{k}={v}" for k, v in opts.items() if k in ARM_DEFAULTS and v != ARM_DEFAULTS[k]
            )
            or "official CBAM"
        )
        rows.append([arm, opts.get("extra", {}).get("role", "-"), recipe, len(recs), accs])
    return "\n".join([
        "## 2. Design",
        "",
        f"- Network: the ImageNet `{d.get('backbone')}` (bundled weights), frozen, at "
        f"{d.get('image_size')} px; CAM grid {'x'.join(str(v) for v in d.get('grid', []))} at `{d.get('layer')}`. One CBAM "
        "after the last stage (`placement=last`): Grad-CAM explains the CBAM's input F, "
        "attention-guided Grad-CAM (`cbam_output`) its output F'', so the two differ only by the "
        "gating. The trunk is frozen and each arm's tail (attention and classifier; for "
        "`after:blocks.5` also the layers after it) is trained on cached trunk features: no "
        "fully fine-tuned seed in this run.",
        f"- Data: `{d.get('preset')}`: {d.get('num_train')} train, {d.get('num_val')} val "
        f"(calibration temperature), {d.get('num_test')} test images (the same for every seed), "
        f"{d.get('num_grids')} 2x2 grids ({4 * int(d.get('num_grids') or 0)} grid-class pairs); "
        "objects of 2-7% of the image anywhere in it, hue independent of the class.",
        f"- Scores: `score=calibrated` (softmax(z/T), T fitted on val per model), deletion / "
        f"insertion with {d.get('steps')} steps, pointing game tolerance "
        f"{d.get('pointing_tolerance')} px, localisation on correctly classified images only.",
        f"- Arms and test top-1 (%) per seed; a seed below {d.get('min_accuracy')}% enters no "
        "verdict:",
        "",
        table(["arm", "role", "recipe (vs the official CBAM defaults)", "seeds",
               "test top-1 per seed"], rows),
    ])  # fmt: skip


def _cmp_rows(comps: Sequence[Mapping[str, Any]], label_b: bool = False) -> list[list[Any]]:
    rows = []
    for c in comps:
        if c.get("missing"):
            rows.append([c["metric"], *["-"] * 7])
            continue
        lead = [c["metric"]] if not label_b else [c["metric"], c["b"]]
        rows.append([*lead, f(c["estimate"]), ci(c["ci"]), f(c["mde"]), f(c["sesoi"]),
                     f"{c['seeds_a_better']}/{c['n_seeds']}", c["n_pairs"],
                     c.get("verdict", "-")])  # fmt: skip
    return rows


CMP_HEADER = ["effect (> 0: first better)", "interval", "MDE", "SESOI", "seeds first better",
              "pairs", "verdict"]  # fmt: skip


def testability_section(results: Mapping[str, Any]) -> str:
    t = results["testability"]
    c = t["contrast"]
    ok = t["localises"]
    lines = [
        "## 3. Testability gate: does the learned attention localise?",
        "",
        "M_s alone (the learned spatial gate, upsampled) against a centred Gaussian that knows "
        "nothing of the image, on the primary arm's included seeds:",
        "",
        table(["measure", *CMP_HEADER], _cmp_rows([
            {**c, "verdict": "beats the centre prior" if c.get("ci", [0])[0] > 0 else
             "does not beat it"} for c in t["comparisons"]])),  # fmt: skip
        "",
        f"Gate on-object contrast (mean M_s on cells the object covers >= 25% over mean M_s on "
        f"empty cells; 1 = no contrast), geometric mean over images and seeds: "
        f"{f(c.get('estimate'))} {ci(c.get('ci'))} (95%, {c.get('n_pairs')} image-seeds).",
        "",
        ("**The learned attention localises** on at least one measure, so the hypothesis is "
         "testable in this run." if ok else
         "**The learned attention does not localise on any measure: the hypothesis that attention "
         "guidance helps was not testable in this run.** The verdict below is reported for "
         "completeness and must not be read as evidence either way."),
    ]  # fmt: skip
    return "\n".join(lines)


READING = {
    "beats": "attention-guided is better than Grad-CAM by more than the SESOI",
    "worse": "attention-guided is worse than Grad-CAM by more than the SESOI",
    "equivalent": "equivalent: the 90% interval lies inside +-SESOI",
    "inconclusive": "neither shown better or worse by more than the SESOI nor equivalent",
}


def _reading(c: Mapping[str, Any]) -> str:
    text = READING[c["verdict"]]
    if c["verdict"] == "inconclusive" and (c["ci"][1] < 0 or c["ci"][0] > 0):
        side = "worse" if c["ci"][1] < 0 else "better"
        text = (f"attention-guided is {side} than Grad-CAM (the interval excludes 0) but not shown "
                "to differ by more than the SESOI")  # fmt: skip
    return text


def readings(prim: Mapping[str, Any]) -> list[str]:
    """One plain sentence per primary endpoint, built from its numbers."""
    lines = []
    for c in prim["comparisons"]:
        if c.get("missing"):
            lines.append(f"- {c['metric']}: too few paired values to compare.")
            continue
        ctrl = {x["b"]: x for x in prim["controls"].get(c["metric"], []) if not x.get("missing")}
        vs = "; ".join(f"against {b}: {f(x['estimate'])} {ci(x['ci'])}" for b, x in ctrl.items())
        lines.append(
            f"- **{c['metric']}**: {f(c['estimate'])} {ci(c['ci'])}, {c['seeds_a_better']} of "
            f"{c['n_seeds']} seeds favour attention-guided; {_reading(c)} "
            f"(SESOI {f(c['sesoi'])}, MDE {f(c['mde'])}). Attention-guided {vs}."
        )
    return lines


def verdict_section(results: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    prim = results["primary"]
    dec = prim["decision"]
    ctrl_rows = []
    for _metric, comps in prim["controls"].items():
        ctrl_rows += _cmp_rows([{**c, "verdict": "beaten" if c.get("ci", [0])[0] > 0 else
                                 "not beaten"} for c in comps], label_b=True)  # fmt: skip
    verdict = (
        dec["verdict"]
        if results["testability"]["localises"]
        else (f"not testable (the rule gives: {dec['verdict']})")
    )
    return "\n".join([
        "## 4. Verdict on the pre-registered comparison",
        "",
        f"**{verdict}.** {MEANING[dec['verdict']]}",
        "",
        "Attention-guided Grad-CAM vs Grad-CAM (same model, same images, same "
        f"{'x'.join(str(v) for v in manifest.get('design', {}).get('grid', []))} grid):",
        "",
        table(["primary endpoint", *CMP_HEADER], _cmp_rows(prim["comparisons"])),
        "",
        "MDE: the smallest effect this run could detect with 80% power at the corrected level; "
        "an effect smaller than it being absent is not shown by a non-significant result.",
        "",
        "What the rows say (effects > 0 favour attention-guided):",
        "",
        *readings(prim),
        "",
        "Attention-guided against the controls on the same endpoints:",
        "",
        table(["endpoint", "control", *CMP_HEADER], ctrl_rows),
    ])  # fmt: skip


def levels_table(
    results: Mapping[str, Any],
    arm: str,
    metrics: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> str:
    """Levels of an arm's maps (baselines last) with 95% crossed-bootstrap intervals."""
    lv = results["levels"].get(arm, {})
    wanted = metrics or TABLE_METRICS
    metrics = [k for k in wanted if any(k in v for v in lv.values())]
    keep = [n for n in lv if names is None or n in names]
    order = sorted(keep, key=lambda n: (n in BASELINE_ROWS, n.startswith("ag_") or "_x_" in n, n))
    rows = []
    for n in order:
        row = [n + (" *(baseline)*" if n in BASELINE_ROWS else "")]
        for k in metrics:
            v = lv[n].get(k)
            row.append("-" if v is None else f"{f(v['estimate'])} {ci(v['ci'], 2)}")
        rows.append(row)
    units = [f"{k} ({'lower' if k in BETTER else 'higher'} better)" for k in metrics]
    return table(["map", *units], rows)


def levels_section(results: Mapping[str, Any], arm: str, title: str) -> str:
    return "\n".join([title, "", levels_table(results, arm)])


LOCALISATION = ["grid_pointing_game", "pointing_game", "energy_pointing_game", "pixel_auc"]
ARM_MAPS = ["gradcam", "attention_guided", "attention", *BASELINE_ROWS]


def controls_section(results: Mapping[str, Any]) -> str:
    rows = []
    for comps in results["controls"].values():
        for c in comps:
            rows.append([c["a"], c["b"], *(_cmp_rows([c])[0])])
    return "\n".join([
        "## 7. Control models",
        "",
        "The primary model's maps against a plain network (no CBAM, Grad-CAM) and a CBAM whose "
        "spatial gate was held at its initial value during training (untrained attention), on the "
        "same images and seeds (different models, so these compare explanations of different "
        "networks):",
        "",
        table(["first", "second", "metric", *CMP_HEADER], rows) if rows else "(no control arm)",
        *[f"\nLevels on the `{arm}` models, with the baselines scored on the same models:\n\n"
          + levels_table(results, arm, ["average_drop", "deletion", *LOCALISATION], ARM_MAPS)
          for arm in results["controls"]],
    ])  # fmt: skip


def recipes_section(results: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    rows = []
    for arm, r in results["recipes"].items():
        t = r["testability"]
        for c in r["comparisons"]:
            rows.append([arm, *(_cmp_rows([c])[0])])
        rows.append([arm, "gate contrast", f(t["contrast"].get("estimate")),
                     ci(t["contrast"].get("ci")), "", "", "", t["contrast"].get("n_pairs"),
                     "localises" if t["localises"] else "does not localise"])  # fmt: skip
    return "\n".join([
        "## 8. The attention recipe as a factor (exploratory)",
        "",
        "Each recipe: attention-guided vs Grad-CAM at the same layer (the CBAM's input and "
        "output), uncorrected 95% intervals; recipes other than the primary skip the deletion "
        "curves (cost). `gamma` is the spatial-BN weight initialisation (0 in the official code), "
        "`after:blocks.5` places the CBAM one stage earlier (blocks.6 and the head trained too).",
        "",
        table(["arm", "metric", *CMP_HEADER], rows),
        *[f"\nLocalisation on the `{arm}` models, with the baselines:\n\n"
          + levels_table(results, arm, LOCALISATION, ARM_MAPS)
          for arm in results["recipes"]],
    ])  # fmt: skip


def sanity_section(results: Mapping[str, Any]) -> str:
    s = results.get("sanity") or {}
    rows = []
    for name, res in s.get("methods", {}).items():
        for label, vals in res.items():
            for key, v in vals.items():
                if key.startswith("spearman@"):
                    rows.append(
                        [
                            name,
                            label,
                            key.split("@", 1)[1],
                            f(v["value"]),
                            ci([v["low"], v["high"]]),
                        ]
                    )
    dr = s.get("data_randomisation") or {}
    dr_rows = [[n, f(_nanmean(v["spearman"])), f(_nanmean(v["ssim"])),
                sum(1 for x in v["spearman"] if not math.isfinite(x))]
               for n, v in dr.items() if isinstance(v, dict)]  # fmt: skip
    return "\n".join([
        "## 9. Sanity checks (Adebayo et al. 2018), primary arm, seed 0",
        "",
        "Spearman rank correlation between the trained model's maps and maps after re-initialising "
        "the named layer and every layer above it (cascade), or the CBAM alone (cbam_only). A map "
        "that stays correlated after its model is randomised does not explain the model.",
        "",
        table(["method", "randomisation", "up to layer", "Spearman", "95% interval"], rows),
        "",
        f"Data randomisation: the same architecture trained on shuffled labels (test top-1 "
        f"{f(dr.get('test_accuracy'), 1)}%); mean Spearman and SSIM between its maps and the "
        "trained model's, same images and classes:",
        "",
        table(["method", "Spearman", "SSIM", "constant maps (no rank correlation)"], dr_rows)
        if dr_rows else "(not run)",
    ])  # fmt: skip


def imagenet_section() -> str:
    return "\n".join([
        "## 11. On ImageNet (`scale=imagenet`, GPU)",
        "",
        "`python scripts/reproduce.py scale=imagenet --print-commands` prints the train and "
        "explain commands of the published protocol: ImageNet V1 weights pinned, `placement=last` "
        "as the primary arm, a seeded class-stratified subset of ImageNet val, and the same "
        "metrics and comparisons as here. Expected Grad-CAM anchors (An & Joe 2022, table 3/4): "
        "Average Drop 45.27, Increase in Confidence 23.06; a Grad-CAM row far from them means the "
        "protocol differs.",
    ])  # fmt: skip


def figures_section(manifest: Mapping[str, Any]) -> str:
    figs = manifest.get("figures", [])
    lines = ["## 10. Figures", ""]
    lines += [f"![{n}](figures/{n})" for n in figs]
    return "\n".join(lines)


def render(results: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """The whole report."""
    primary = results["primary_arm"]
    parts = [
        header(results, manifest),
        preregistration(results),
        design(results, manifest),
        testability_section(results),
        verdict_section(results, manifest),
        "## 5. Exploratory endpoints (primary arm, uncorrected)\n\n"
        + table(["metric", *CMP_HEADER], _cmp_rows(results["primary"]["secondary"])),
        levels_section(results, primary, "## 6. Every map on the primary arm, with baselines\n\n"
                       "Mean over included seeds of each seed's image mean, 95% crossed-bootstrap "
                       "interval. The paper's baselines (Grad-CAM++, Smooth Grad-CAM++, XGrad-CAM "
                       "and the torchcam 0.2.0 variants) ran on one seed only."),
        controls_section(results),
        recipes_section(results, manifest),
        sanity_section(results),
        figures_section(manifest),
        imagenet_section(),
    ]  # fmt: skip
    return "\n\n".join(parts) + "\n"


__all__ = ["render"]
