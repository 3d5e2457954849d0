"""What bf16 autocast in the metrics' forwards changes in the metric tables (issue 16, item 1).

Writes ``benchmarks/bf16_agreement.md`` and ``.json``. The maps are computed once, in float32,
and the same maps are scored twice: by a float32 ``MetricSuite`` and by a bf16 one (the protocol
identical but ``precision``). Average Drop, Increase in Confidence and the deletion / insertion
AUCs are compared method by method (means, per-image agreement, the ranking of methods) for two
models: the demo checkpoint (EfficientNet-Lite0 + CBAM on the synthetic test split) and the
bundled ImageNet EfficientNet-Lite0 on the photos that ship in the scikit-image, scikit-learn and
matplotlib wheels. The two suites' ``update()`` calls alternate batch by batch (the order swaps
every batch), so machine load affects both alike.

    python scripts/bench_bf16.py                          # about 2 min on an idle 2-core CPU
    python scripts/bench_bf16.py --ckpt PATH --images 48
    python scripts/bench_bf16.py --train-runs /tmp/fp32train /tmp/bf16train   # + training section

Without ``--ckpt`` the newest ``outputs/demo/*/train/checkpoints/best.ckpt`` is used, else the
demo recipe is trained first (``python train.py experiment=demo``, a few minutes).

The "Training in bf16-mixed" section reads the run folders given to ``--train-runs`` (each
``python train.py experiment=demo [trainer.precision=bf16-mixed] hydra.run.dir=DIR``: its
``results.json`` and ``config.json``); without the option the last report's section is kept.
``--training-only --train-runs DIR ...`` rewrites that section alone, keeping the measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_bf16")

#: The compared metrics: (key in MetricSuite results / per_image, table label).
METRICS: tuple[tuple[str, str], ...] = (
    ("average_drop", "Average Drop (%)"),
    ("increase_in_confidence", "Increase in Confidence (%)"),
    ("deletion", "deletion AUC"),
    ("insertion", "insertion AUC"),
)
#: Agreement holds when every method's |difference of means| is below this share of its
#: float32 95% CI half-width (and no ranking swap outside noise).
SHARE_OF_CI = 0.25
BASELINE_NAMES = ("baseline_centre", "baseline_random")
RULE = (
    "agreement holds when (1) no pair of methods changes order by mean unless its float32 "
    "paired 95% bootstrap CI of the per-image difference contains 0 (a tie), and (2) for each "
    f"metric every method's |bf16 mean - float32 mean| is below {SHARE_OF_CI:g} x its float32 "
    "95% CI half-width (so in particular the largest difference is)"
)


# --------------------------------------------------------------------------- agreement maths


def swapped_pairs(
    means32: Mapping[str, float], means16: Mapping[str, float]
) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` ordered strictly one way by float32 means and strictly the other by bf16.

    ``a`` is the one with the larger float32 mean. Exact ties in either precision are no swap.
    """
    names = [n for n in means32 if n in means16]
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d32, d16 = means32[a] - means32[b], means16[a] - means16[b]
            if d32 * d16 < 0:
                out.append((a, b) if d32 > 0 else (b, a))
    return out


def paired_interval(
    a: Sequence[float], b: Sequence[float], resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)``: the paired 95% percentile-bootstrap interval."""
    from attncam.metrics.stats import paired_bootstrap

    r = paired_bootstrap(torch.tensor(a), torch.tensor(b), num_resamples=resamples, seed=seed)
    return r["diff"], r["low"], r["high"]


def ratio(diff: float, half_width: float) -> float:
    """``|diff| / half_width`` (0 when both are 0, inf for a shift with a zero-width CI)."""
    if half_width > 0:
        return abs(diff) / half_width
    return 0.0 if diff == 0 else math.inf


def correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman and Pearson correlation of paired values (None where one side is constant)."""
    from scipy import stats

    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.size < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return None, None
    return float(stats.spearmanr(xa, ya).statistic), float(stats.pearsonr(xa, ya).statistic)


def ic_flips(
    per32: Mapping[str, Mapping[str, Mapping[int, float]]],
    per16: Mapping[str, Mapping[str, Mapping[int, float]]],
    names: Sequence[str],
) -> dict[str, Any]:
    """Increase-in-Confidence indicators that flip, and how close ``O`` was to ``Y`` there.

    At a flip one precision has ``O > Y`` (Average Drop 0) and the other ``O <= Y``, so the
    larger of the two Average Drops bounds the relative gap ``(Y - O) / Y`` it flipped across.
    """
    gaps = []
    for n in names:
        ic32, ic16 = per32[n]["increase_in_confidence"], per16[n]["increase_in_confidence"]
        ad32, ad16 = per32[n]["average_drop"], per16[n]["average_drop"]
        for i in _common(ic32, ic16):
            if ic32[i] != ic16[i]:
                gaps.append(max(ad32.get(i, math.nan), ad16.get(i, math.nan)))
    return {
        "flips": len(gaps),
        "max_gap_percent": max(gaps) if gaps else None,
        "median_gap_percent": float(np.median(gaps)) if gaps else None,
    }


def metric_reasons(key: str, m: Mapping[str, Any]) -> list[str]:
    """Why one metric's summary breaks :data:`RULE` (empty when it keeps it).

    The summary needs ``max_ratio`` (the largest ``|difference| / float32 CI half-width`` over
    methods) and ``swaps`` (``[{"a", "b", "tie": bool}, ...]``).
    """
    reasons = []
    real = [s for s in m["swaps"] if not s["tie"]]
    if real:
        pairs = ", ".join(f"{s['a']} / {s['b']}" for s in real)
        reasons.append(f"{key}: ranking changes outside noise ({pairs})")
    if not m["max_ratio"] < SHARE_OF_CI:
        reasons.append(
            f"{key}: a difference of means is {m['max_ratio']:.2f} x its float32 CI "
            f"half-width (limit {SHARE_OF_CI:g})"
        )
    return reasons


#: The metric family each compared metric's forwards belong to (``attncam.inference.FAMILIES``).
FAMILY = {
    "average_drop": "scores",
    "increase_in_confidence": "scores",
    "deletion": "curves",
    "insertion": "curves",
}


def auto_verdict(metrics: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str], list[str]]:
    """``(verdict, reasons, bf16 metrics)`` of ``precision=auto`` on a CPU with bf16 units.

    auto runs the families in ``attncam.inference.AUTO_BF16`` in bf16 (their rows here) and the
    others in float32, where its values are the float32 suite's bit for bit (asserted in
    ``tests/unit/test_metrics_confidence.py``), so only the bf16 rows can break the rule.
    """
    from attncam.inference import AUTO_BF16

    bf16 = {k: m for k, m in metrics.items() if FAMILY[k] in AUTO_BF16}
    word, reasons = verdict(bf16)
    return word, reasons, list(bf16)


def verdict(metrics: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str]]:
    """``("agreement holds" | "agreement does not hold", reasons)`` from per-metric summaries
    (:func:`metric_reasons` of each); see :data:`RULE`."""
    reasons = [r for key, m in metrics.items() for r in metric_reasons(key, m)]
    return ("agreement holds" if not reasons else "agreement does not hold"), reasons


def _common(p32: Mapping[int, float], p16: Mapping[int, float]) -> list[int]:
    return [i for i in p32 if i in p16 and math.isfinite(p32[i]) and math.isfinite(p16[i])]


def _method_rows(key: str, r32: Mapping, r16: Mapping, names: Sequence[str]) -> list[dict]:
    rows = []
    for n in names:
        a, b = r32[n][key], r16[n][key]
        if a["value"] is None or b["value"] is None:
            continue
        hw = (a["high"] - a["low"]) / 2
        diff = b["value"] - a["value"]
        rows.append(
            {"method": n, "float32": a["value"], "bf16": b["value"], "diff": diff,
             "half_width": hw, "ratio": ratio(diff, hw), "n": a["n"]}
        )  # fmt: skip
    return rows


def _swaps(rows: Sequence[dict], per32: Mapping[str, Mapping[int, float]]) -> list[dict]:
    means32 = {r["method"]: r["float32"] for r in rows}
    means16 = {r["method"]: r["bf16"] for r in rows}
    out = []
    for a, b in swapped_pairs(means32, means16):
        ids = _common(per32[a], per32[b])
        diff, lo, hi = paired_interval([per32[a][i] for i in ids], [per32[b][i] for i in ids])
        out.append({"a": a, "b": b, "diff32": diff, "low": lo, "high": hi, "tie": lo <= 0 <= hi})
    return out


def metric_summary(
    key: str,
    results: tuple[Mapping, Mapping],
    per_image: tuple[Mapping, Mapping],
    names: Sequence[str],
) -> dict[str, Any]:
    """Means, differences, CI scale, per-image agreement and ranking swaps of one metric."""
    rows = _method_rows(key, results[0], results[1], names)
    per32 = {n: per_image[0][n][key] for n in names}
    per16 = {n: per_image[1][n][key] for n in names}
    xs, ys, worst = [], [], {"spearman": None, "pearson": None}
    for n in names:
        ids = _common(per32[n], per16[n])
        x, y = [per32[n][i] for i in ids], [per16[n][i] for i in ids]
        xs += x
        ys += y
        for name, c in zip(("spearman", "pearson"), correlations(x, y), strict=True):
            if c is not None and (worst[name] is None or c < worst[name]):
                worst[name] = c
    spearman, pearson = correlations(xs, ys)
    d = np.abs(np.asarray(ys) - np.asarray(xs))
    top = max(rows, key=lambda r: abs(r["diff"]))
    return {
        "rows": rows,
        "largest": {"method": top["method"], "diff": top["diff"], "half_width": top["half_width"]},
        "max_ratio": max(r["ratio"] for r in rows),
        "spearman": spearman, "pearson": pearson,
        "min_spearman": worst["spearman"], "min_pearson": worst["pearson"],
        "per_image_abs_diff_mean": float(d.mean()), "per_image_abs_diff_max": float(d.max()),
        "per_image_changed": int((d > 0).sum()), "per_image_pairs": int(d.size),
        "swaps": _swaps(rows, per32),
    }  # fmt: skip


# --------------------------------------------------------------------------- models and data


@dataclasses.dataclass
class Subject:
    """One model and its images."""

    key: str
    title: str
    short: str
    net: nn.Module
    images: Tensor
    labels: Tensor | None
    ids: Tensor
    source: str


def demo_checkpoint(ckpt: Path | None) -> tuple[Path, str]:
    """``(path, how it was found)``: ``--ckpt``, the newest demo run, or a fresh training
    (``bench_speed.demo_checkpoint``, the one implementation)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_speed import demo_checkpoint as find

    return find(str(ckpt) if ckpt else None, Path(tempfile.mkdtemp(prefix="bench_bf16_demo_")))


def demo_subject(ckpt: Path, how: str, n_images: int) -> Subject:
    """The demo checkpoint on a seeded class-stratified subset of its data's test split."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from attncam.models.checkpoint import load_classifier
    from attncam.stages.design import explained_ids

    module = load_classifier(str(ckpt))
    dm = instantiate(OmegaConf.create(module.run_metadata["data"]))
    dm.prepare_data()
    dm.setup("test")
    ds = dm.explain_dataset("test")
    ids = explained_ids(ds, n_images, seed=0)
    items = [ds[i] for i in ids]
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items])
    side = images.shape[-1]
    return Subject(
        "demo", "Demo model: EfficientNet-Lite0 + CBAM on the synthetic test split",
        "demo EfficientNet-Lite0 + CBAM (synthetic)",
        module.net.eval(), images, labels, torch.tensor(ids),
        f"checkpoint `{ckpt}` ({how}); {len(ids)} test images (seeded class-stratified), "
        f"{side} px",
    )  # fmt: skip


def photo_subject(limit: int | None) -> Subject:
    """The bundled ImageNet EfficientNet-Lite0 on the photos shipped in the installed wheels."""
    from attncam.data.files import ImageFilesDataset
    from attncam.data.synthetic import photo_paths
    from attncam.models.net import AttentionNet

    named = photo_paths()[:limit]
    ds = ImageFilesDataset([p for _, p in named], 224)
    named = [(n, p) for n, p in named if p in ds.paths]  # unreadable files are skipped
    net = AttentionNet("efficientnet_lite0", 1000, "none", pretrained=True).eval()
    images = torch.stack(ds.images)
    return Subject(
        "imagenet", "ImageNet EfficientNet-Lite0 (bundled weights) on the wheels' photos",
        "ImageNet EfficientNet-Lite0 (photos)",
        net, images, None, torch.arange(images.shape[0]),
        f"`AttentionNet('efficientnet_lite0', 1000, 'none', pretrained=True)` "
        f"({net.weights_id}); {images.shape[0]} photos ({', '.join(n for n, _ in named)}), "
        "resized and centre-cropped to 224 px; target: the predicted class",
    )  # fmt: skip


# --------------------------------------------------------------------------- scoring


def compose_explain(overrides: Sequence[str]) -> Any:
    """The explain stage's composed config (``conf/explain.yaml``) with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("explain", overrides=list(overrides))


def suite_config(metrics: Any, precision: str, resamples: int) -> dict[str, Any]:
    """The ``metrics`` config with AD, IC and deletion/insertion only, in ``precision``."""
    from omegaconf import OmegaConf

    m: dict[str, Any] = OmegaConf.to_container(metrics, resolve=True)  # type: ignore[assignment]
    m["enabled"] = ["average_drop", "increase_in_confidence", "deletion_insertion"]
    m["protocol"] = {**m["protocol"], "precision": precision, "percentages": []}
    m.update(win=False, num_resamples=resamples)
    return m


def _batches(s: Subject, size: int) -> Iterable[tuple[int, Tensor, Tensor | None, Tensor]]:
    for k, start in enumerate(range(0, s.images.shape[0], size)):
        stop = start + size
        labels = None if s.labels is None else s.labels[start:stop]
        yield k, s.images[start:stop], labels, s.ids[start:stop]


def score(s: Subject, specs: list, metrics: Any, batch_size: int, resamples: int) -> dict:
    """Explain ``s`` once in float32; score the maps with a float32 and a bf16 suite."""
    from attncam.explain import Explainer
    from attncam.metrics.baselines import baseline_maps
    from attncam.metrics.suite import MetricSuite

    explainer = Explainer(s.net, specs)
    names = explainer.names
    grid = explainer.layer_sizes(tuple(s.images.shape[-2:]))[explainer.layers[0]]
    suites = {
        p: MetricSuite.from_config(
            suite_config(metrics, p, resamples), names, BASELINE_NAMES, explainer.duplicate_of
        )
        for p in ("float32", "bf16")
    }
    for suite in suites.values():
        suite.bind(s.net)
    seconds = {"float32": 0.0, "bf16": 0.0, "maps": 0.0}
    ratios = []
    for k, x, y, ids in _batches(s, batch_size):
        base = {p: suite.base_scores(x, y) for p, suite in suites.items()}
        if not torch.equal(base["float32"].targets, base["bf16"].targets):
            raise RuntimeError("the two suites' targets differ: both come from float32 forwards")
        t0 = time.perf_counter()
        maps = explainer(x, base["float32"].targets)
        seconds["maps"] += time.perf_counter() - t0
        masks = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
        maps.update(baseline_maps(BASELINE_NAMES, masks, ids, grid))
        took = {}
        for p in ("float32", "bf16") if k % 2 == 0 else ("bf16", "float32"):
            t0 = time.perf_counter()
            suites[p].update(x, maps, masks, base[p], ids, labels=y)
            took[p] = time.perf_counter() - t0
            seconds[p] += took[p]
        ratios.append(took["float32"] / took["bf16"])
        log.info(
            "%s batch %d: float32 %.1f s, bf16 %.1f s", s.key, k, took["float32"], took["bf16"]
        )
    engine = suites["bf16"].perturber
    assert engine is not None
    return {
        "names": [*names, *BASELINE_NAMES],
        "methods": names,
        "duplicates": explainer.duplicate_of,
        "results": {p: suite.results() for p, suite in suites.items()},
        "per_image": {p: suite.per_image() for p, suite in suites.items()},
        "seconds": seconds,
        "speedup": seconds["float32"] / seconds["bf16"],
        "speedup_batch_median": float(np.median(ratios)),
        "batches": len(ratios),
        "bf16_reason": engine.precision_reason,
        "protocol": suites["float32"].protocol.to_dict(),
    }


def evaluate(s: Subject, cfg: Any, batch_size: int, resamples: int) -> dict[str, Any]:
    """Score one subject and summarise every metric; the model's verdict."""
    from omegaconf import OmegaConf

    from attncam.explain import methods_from_config
    from attncam.stages.inputs import applicable_specs

    specs = methods_from_config(OmegaConf.to_container(cfg.method, resolve=True))  # type: ignore[arg-type]
    kept, skipped = applicable_specs(s.net, specs, None, strict=False)
    t0 = time.perf_counter()
    scored = score(s, kept, cfg.metrics, batch_size, resamples)
    names = scored["names"]
    metrics = {
        key: metric_summary(
            key,
            (scored["results"]["float32"], scored["results"]["bf16"]),
            (scored["per_image"]["float32"], scored["per_image"]["bf16"]),
            names,
        )
        for key, _ in METRICS
    }
    word, reasons = verdict(metrics)
    auto_word, auto_reasons, auto_bf16 = auto_verdict(metrics)
    flips = ic_flips(scored["per_image"]["float32"], scored["per_image"]["bf16"], names)
    return {
        "ic_flips": flips,
        "title": s.title, "short": s.short, "source": s.source, "images": int(s.images.shape[0]),
        "methods": scored["methods"], "baselines": list(BASELINE_NAMES),
        "duplicates": scored["duplicates"],
        "skipped_methods": [f"{x['method']} {x['options']}" for x in skipped],
        "protocol": scored["protocol"], "bf16_reason": scored["bf16_reason"],
        "seconds": {**scored["seconds"], "total": time.perf_counter() - t0},
        "speedup": scored["speedup"], "speedup_batch_median": scored["speedup_batch_median"],
        "batches": scored["batches"], "metrics": metrics, "verdict": word, "reasons": reasons,
        "auto": {"verdict": auto_word, "reasons": auto_reasons, "bf16_metrics": auto_bf16},
    }  # fmt: skip


# --------------------------------------------------------------------------- report


def _num(x: float | None, key: str = "") -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3f}" if key in ("average_drop", "increase_in_confidence") else f"{x:.4f}"


def _signed(x: float, key: str) -> str:
    return f"{x:+.3f}" if key in ("average_drop", "increase_in_confidence") else f"{x:+.5f}"


def means_table(r: Mapping[str, Any]) -> list[str]:
    """Per metric and method: float32 mean, bf16 mean, difference, float32 CI half-width."""
    lines = [
        "| metric | method | float32 | bf16 | bf16 - float32 | float32 95% CI half-width | "
        "\\|diff\\| / half-width |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        for row in r["metrics"][key]["rows"]:
            lines.append(
                f"| {label} | {row['method']} | {_num(row['float32'], key)} | "
                f"{_num(row['bf16'], key)} | {_signed(row['diff'], key)} | "
                f"{_num(row['half_width'], key)} | {row['ratio']:.3f} |"
            )
    return lines


def swaps_lines(r: Mapping[str, Any]) -> list[str]:
    """One bullet per metric with swapped pairs: the pair, its float32 paired CI, tie or not."""
    lines = []
    for key, label in METRICS:
        swaps = r["metrics"][key]["swaps"]
        if not swaps:
            continue
        pairs = "; ".join(
            f"{s['a']} / {s['b']} ({'tie' if s['tie'] else '**not a tie**'}: float32 "
            f"{s['diff32']:+.3g}, CI [{s['low']:.3g}, {s['high']:.3g}])"
            for s in swaps
        )
        lines.append(f"- {label}: {pairs}.")
    if not lines:
        return ["No pair of methods changes order by mean.", ""]
    head = (
        "Pairs whose order by mean differs between the precisions (float32 winner first; the "
        "float32 paired per-image difference and its 95% bootstrap CI):"
    )
    return [head, "", *lines, ""]


def summary_table(r: Mapping[str, Any]) -> list[str]:
    """Per metric: the largest difference, its CI scale, per-image agreement, ranking swaps."""
    lines = [
        "| metric | largest \\|diff of means\\| (method) | its float32 CI half-width | "
        "max over methods of \\|diff\\| / half-width | Spearman: pooled; lowest method | "
        "Pearson: pooled; lowest method | per-image \\|diff\\|: mean / max | "
        "images x methods changed | order swaps (outside noise) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        m = r["metrics"][key]
        big = m["largest"]
        real = sum(not s["tie"] for s in m["swaps"])
        lines.append(
            f"| {label} | {abs(big['diff']):.3g} ({big['method']}) | {big['half_width']:.3g} | "
            f"{m['max_ratio']:.3f} | {_num(m['spearman'])}; {_num(m['min_spearman'])} | "
            f"{_num(m['pearson'])}; {_num(m['min_pearson'])} | "
            f"{m['per_image_abs_diff_mean']:.3g} / {m['per_image_abs_diff_max']:.3g} | "
            f"{m['per_image_changed']} of {m['per_image_pairs']} | {len(m['swaps'])} ({real}) |"
        )
    return lines


def _flip_line(f: Mapping[str, Any], images: int) -> list[str]:
    one = f"one image moves a method's IC by {100 / images:.3g} points"
    if not f["flips"]:
        return [f"- Increase in Confidence: no image's indicator flips ({one})."]
    return [
        f"- Increase in Confidence: {f['flips']} (image, method) indicators flip ({one}); at them "
        f"Y and O differ by at most {f['max_gap_percent']:.3g}% of Y (median "
        f"{f['median_gap_percent']:.3g}%; the larger of the two precisions' Average Drop)."
    ]


def model_section(r: Mapping[str, Any]) -> list[str]:
    """The Markdown section of one model."""
    sec = r["seconds"]
    dup = ", ".join(f"{a} = {b}" for a, b in r["duplicates"].items()) or "none"
    lines = [
        f"## {r['title']}",
        "",
        f"- Model and images: {r['source']}.",
        f"- Methods: {', '.join(r['methods'])}; baselines: {', '.join(r['baselines'])}. "
        f"Skipped (the model has no attention): {', '.join(r['skipped_methods']) or 'none'}. "
        f"Identical maps by construction (scored once, copied): {dup}.",
        f"- bf16 suite: {r['bf16_reason']}.",
        *_flip_line(r["ic_flips"], r["images"]),
        f"- Time: maps {sec['maps']:.0f} s; `update()` float32 {sec['float32']:.1f} s, bf16 "
        f"{sec['bf16']:.1f} s over {r['batches']} alternating batches: bf16 "
        f"**{r['speedup_batch_median']:.2f}x** faster (median of the per-batch ratios; "
        f"{r['speedup']:.2f}x in total, the first batch's one-off set-up and load swings "
        "included).",
        "",
        *summary_table(r),
        "",
        *swaps_lines(r),
        "Per method (AD and IC in %, the AUCs in [0, 1]):",
        "",
        *means_table(r),
        "",
        f"**Verdict: {r['verdict']}.**"
        + (" " + "; ".join(r["reasons"]) + "." if r["reasons"] else ""),
        "",
        *auto_lines(r),
    ]
    return lines


def auto_lines(r: Mapping[str, Any]) -> list[str]:
    """The verdict of ``precision=auto`` (the default), when the report has one."""
    auto = r.get("auto")
    if not auto:
        return []
    rest = [k for k in r["metrics"] if k not in auto["bf16_metrics"]]
    return [
        f"**`precision=auto` (the default; on this CPU {', '.join(auto['bf16_metrics'])} in "
        f"bf16, {', '.join(rest)} in float32, equal to the float32 suite's values): "
        f"{auto['verdict']}.**"
        + (" " + "; ".join(auto["reasons"]) + "." if auto["reasons"] else ""),
        "",
    ]


def training_section(training: Mapping[str, Any] | None) -> list[str]:
    """The "Training in bf16-mixed" section (from ``--train-runs`` or the last report)."""
    lines = ["## Training in bf16-mixed", ""]
    if not training:
        return [*lines, "Not measured: pass `--train-runs DIR ...` (see the docstring).", ""]
    reused = " (reused from the last report)" if training.get("reused") else ""
    lines += [
        f"Measured {training['date']}{reused}, in this order; {training['note']}",
        "",
        "```",
        *[run["command"] for run in training["runs"]],
        "```",
        "",
        "| run | precision | val/acc | test/acc | fit s |",
        "|---|---|---|---|---|",
    ]
    for run in training["runs"]:
        lines.append(
            f"| `{run['dir']}` | {run['precision']} | {run['val/acc']:.4f} | "
            f"{run['test/acc']:.4f} | {run['fit_seconds']:.0f} |"
        )
    lines += [
        "",
        "Fit time bf16-mixed / float32 per pair of consecutive runs: "
        + ", ".join(f"{x:.2f}x" for x in training["pair_ratios"])
        + f"; median **{training['fit_ratio']:.2f}x**. The default trainer precision stays "
        "`32-true` (`conf/trainer/cpu.yaml`).",
        "",
    ]
    return lines


def read_training(dirs: Sequence[Path], note: str) -> dict[str, Any]:
    """val/test accuracy and fit time of demo trainings (precision from each ``config.json``)."""
    runs = []
    for d in dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        precision = str(json.loads((Path(d) / "config.json").read_text())["trainer"]["precision"])
        extra = "" if precision == "32-true" else f" trainer.precision={precision}"
        runs.append(
            {"dir": str(d), "precision": precision,
             "command": f"python train.py experiment=demo{extra} hydra.run.dir={d}",
             **{k: float(res[k]) for k in ("val/acc", "test/acc", "fit_seconds")}}
        )  # fmt: skip
    pairs = [runs[i : i + 2] for i in range(0, len(runs), 2)]
    ratios = []
    for pair in pairs:
        by = {r["precision"]: r["fit_seconds"] for r in pair}
        if set(by) != {"32-true", "bf16-mixed"}:
            raise ValueError(
                "--train-runs takes pairs of one 32-true and one bf16-mixed run; got "
                f"{[r['precision'] for r in pair]}"
            )
        ratios.append(by["bf16-mixed"] / by["32-true"])
    return {
        "date": dt.date.today().isoformat(), "note": note, "runs": runs,
        "pair_ratios": ratios, "fit_ratio": float(np.median(ratios)),
    }  # fmt: skip


def machine() -> dict[str, Any]:
    """CPU, cores, torch threads and version, whether the CPU has bf16 units, load average."""
    from attncam.inference import cpu_bf16_supported

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_all import cpu_name  # the one lscpu reader

    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "bf16_units": cpu_bf16_supported(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }  # fmt: skip


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (a training)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def write_report(out: Path, res: Mapping[str, Any]) -> None:
    """``out`` (Markdown) and ``out.with_suffix('.json')``."""
    m = res["machine"]
    for r in res["models"].values():
        for key, summary in r["metrics"].items():
            summary["within_rule"] = not metric_reasons(key, summary)
    lines = [
        "# bf16 metric forwards: do the tables change?",
        "",
        f"Written by `{res['command']}` on {res['date']} in {res['seconds'] / 60:.1f} min "
        f"({res['cpu_seconds'] / 60:.1f} CPU-min): "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"bf16 units: {'yes' if m['bf16_units'] else 'no'}; load average before / after "
        f"{res['load_before']} / {m['load']} (the machine was shared with other jobs).",
        "",
        "The maps are computed once in float32 and the same maps are scored twice, by a float32 "
        "and a bf16 `MetricSuite` whose protocols differ only in `precision` (`conf/metrics/"
        "fast.yaml`'s protocol: pixel mask space, softmax of the predicted class, "
        f"{res['steps']} deletion/insertion steps, insertion from a blurred copy; "
        f"{res['resamples']} bootstrap resamples). In both suites the target is the class "
        "predicted by a float32 forward, and Y comes from the suite's own precision.",
        "",
        f"Demo images: {res['args']['images']} (`--images`; the default is 64: 64 images took "
        "1.9 min on a nearly idle 2-core CPU and 10 min at a load average of about 4, so "
        "`--images 96`, `make demo`'s size, takes about 3 min on an idle one).",
        "",
        f"Rule: {RULE}.",
        "",
        "| model | verdict, every forward in bf16 | verdict, `precision=auto` (the default) | "
        "max over methods of \\|diff\\| / float32 CI half-width (metric) | "
        "ranking swaps outside noise | bf16 speed-up of `update()`: median per batch (total) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["models"].values():
        worst = max(r["metrics"], key=lambda k: r["metrics"][k]["max_ratio"])
        real = sum(not s["tie"] for m in r["metrics"].values() for s in m["swaps"])
        lines.append(
            f"| {r['short']} | {r['verdict']} | {r.get('auto', {}).get('verdict', 'n/a')} | "
            f"{r['metrics'][worst]['max_ratio']:.3f} ({worst}) | {real} | "
            f"{r['speedup_batch_median']:.2f}x ({r['speedup']:.2f}x) |"
        )
    lines.append("")
    for r in res["models"].values():
        lines += model_section(r)
    lines += training_section(res.get("training"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")


def _training(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.train_runs:
        note = "the machine was shared with other jobs, so the fit-time ratio is indicative."
        if args.train_note:
            note += " " + args.train_note
        return read_training(args.train_runs, note)
    previous = args.out.with_suffix(".json")
    if previous.is_file():
        old = json.loads(previous.read_text()).get("training")
        if old:
            return {**old, "reused": True}
    return None


def _repo_relative(value: Any) -> str:
    """A path inside the checkout as a path relative to it (no machine layout in the JSON)."""
    if isinstance(value, Path) and value.resolve().is_relative_to(ROOT):
        return str(value.resolve().relative_to(ROOT))
    return str(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="demo checkpoint (default: newest demo run)")
    ap.add_argument(
        "--images",
        type=int,
        default=64,
        help="demo test images (make demo explains 96: 1.5x the time)",
    )
    ap.add_argument("--photos", type=int, default=None, help="at most this many photos")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument(
        "--models", nargs="+", choices=["demo", "imagenet"], default=["demo", "imagenet"]
    )
    ap.add_argument("--quick", action="store_true", help="32 demo images, 8 photos")
    ap.add_argument("--train-runs", nargs="+", type=Path, metavar="DIR",
                    help="pairs of float32 and bf16-mixed demo run dirs, in the order run")  # fmt: skip
    ap.add_argument("--train-note", default="", help="said about the training runs")
    ap.add_argument("--training-only", action="store_true",
                    help="rewrite the report's training section (--train-runs), keep the rest")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="global seed before each model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bf16_agreement.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.photos = min(args.images, 32), min(args.photos or 8, 8)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Score both models in both precisions and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.training_only:
        res = json.loads(args.out.with_suffix(".json").read_text())
        write_report(args.out, {**res, "training": _training(args)})
        log.info("rewrote %s with the training section only", args.out)
        return
    torch.set_num_threads(args.threads)
    t0, load_before = time.perf_counter(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    cfg = compose_explain(["method=paper", "metrics=fast", "logger=none"])
    makers: dict[str, Callable[[], Subject]] = {
        "demo": lambda: demo_subject(*demo_checkpoint(args.ckpt), args.images),
        "imagenet": lambda: photo_subject(args.photos),
    }
    models = {}
    for key in args.models:
        torch.manual_seed(args.seed)  # Smooth Grad-CAM++ draws its noise from the global RNG
        models[key] = evaluate(makers[key](), cfg, args.batch_size, args.resamples)
        log.info("%s: %s", key, models[key]["verdict"])
    res = {
        "command": "python scripts/bench_bf16.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "load_before": load_before,
        "args": json.loads(json.dumps(vars(args), default=_repo_relative)),
        "steps": int(cfg.metrics.protocol.steps), "resamples": args.resamples, "rule": RULE,
        "models": models, "verdict": {k: r["verdict"] for k, r in models.items()},
        "training": _training(args), "seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds(),
    }  # fmt: skip
    write_report(args.out, res)
    log.info("wrote %s (%.1f min)", args.out, res["seconds"] / 60)


if __name__ == "__main__":
    main()
