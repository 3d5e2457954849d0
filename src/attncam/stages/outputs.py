"""What the explain stage writes: tables, figures, maps, predictions, per-image values, W&B.

Every file goes through :mod:`attncam.io` (atomic). File names are part of the interface:
``metrics.json|csv|md``, ``figures/{grid,curves,metrics}.png``, ``maps.npz``,
``predictions.json``, ``per_image.json``, ``sanity.json``, ``manifest.json``, ``COMPLETE``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from attncam import __version__
from attncam.explain.naming import slug
from attncam.io import save_npz_atomic, write_json_atomic, write_text_atomic
from attncam.runtime import library_versions, tune_allocator
from attncam.stages.design import git_state

if TYPE_CHECKING:
    from attncam.stages.explain_module import ExplainModule
    from attncam.stages.inputs import DataInfo, ModelInfo

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"average_drop", "deletion"}
MAIN_METRICS = (
    "average_drop",
    "increase_in_confidence",
    "pointing_game",
    "energy_pointing_game",
    "deletion",
    "insertion",
)
_ORDER = [
    "average_drop", "increase_in_confidence", "percentage_in", "kept_fraction", "pointing_game",
    "energy_pointing_game", "mask_iou", "box_accuracy", "deletion", "insertion", "morf", "lerf",
    "occlusion", "win_vs",
]  # fmt: skip

Results = dict[str, dict[str, dict[str, Any]]]


def fmt(r: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``value [low, high]`` of a result dict, or ``n/a``."""
    if not r or r.get("value") is None:
        return "n/a"
    v, lo, hi = r["value"], r.get("low"), r.get("high")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def metric_order(c: str) -> tuple[int, float, str]:
    """Sort key of a metric column: the fixed family order, then the level after ``@``."""
    level = c.rpartition("@")[2]
    num = float(level) if "@" in c and level.replace(".", "", 1).isdigit() else 0.0
    for i, prefix in enumerate(_ORDER):
        if c.startswith(prefix):
            return i, num, c
    return len(_ORDER), num, c


#: (unit, better) of each metric family, by key prefix (docs/METHODS.md, the metrics table).
#: Longer prefixes first: ``insertion_start`` before ``insertion``, ``lerf_minus_morf`` first.
_UNITS: tuple[tuple[str, str, str], ...] = (
    ("average_drop", "%", "lower"),
    ("increase_in_confidence", "%", "higher"),
    ("percentage_in", "%", "higher"),
    ("kept_fraction", "% of pixels", ""),
    ("energy_pointing_game", "%", "higher"),
    ("grid_pointing_game", "%", "higher"),
    ("pointing_game", "%", "higher"),
    ("mask_iou", "IoU", "higher"),
    ("box_accuracy", "%", "higher"),
    ("deletion", "AUC", "lower"),
    ("insertion_start", "score", ""),
    ("insertion", "AUC", "higher"),
    ("lerf_minus_morf", "score", "higher"),
    ("morf", "score", "lower"),
    ("lerf", "score", "higher"),
    ("occlusion_faithfulness", "Spearman rho", "higher"),
    ("win_vs", "%", "higher"),
)


def _label(c: str) -> str:
    """A column header with its unit and direction, e.g. ``average drop (%, lower better)``."""
    for prefix, unit, better in _UNITS:
        if c.startswith(prefix):
            return c.replace("_", " ") + f" ({unit}{f', {better} better' if better else ''})"
    return c.replace("_", " ")


def _digits(c: str) -> int:
    return (
        3 if c.startswith(("deletion", "insertion", "mask_iou", "morf", "lerf", "occlusion")) else 2
    )


def _csv_text(results: Results, columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["method", *[f"{c}{suffix}" for c in columns for suffix in ("", "_low", "_high", "_n")]]
    )
    for method, row in results.items():
        cells: list[Any] = [method]
        for c in columns:
            r = row.get(c) or {}
            cells += [r.get("value"), r.get("low"), r.get("high"), r.get("n")]
        w.writerow(cells)
    return buf.getvalue()


def _markdown(
    results: Results, columns: list[str], protocol: Mapping[str, Any], extra: Mapping[str, Any]
) -> str:
    n_images = max((r.get("n") or 0 for row in results.values() for r in row.values()), default=0)
    main = [c for c in columns if not c.startswith("win_vs_")]
    lines = [
        "# Explanation metrics",
        "",
        f"Model: {extra.get('model')}; images: {extra.get('images')} ({extra.get('data')}); "
        f"N per metric is in metrics.csv/json (at most {n_images}). Values are means with "
        f"bootstrap {int(100 * float(extra.get('confidence', 0.95)))}% intervals.",
        "",
        "Protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()),
        "",
        f"Explained class: {extra.get('explained_class') or 'the protocol target'} "
        "(per image: the target column of predictions.json).",
        "",
        *_precision_lines(extra.get("precision")),
        "| method | " + " | ".join(_label(c) for c in main) + " |",
        "|---|" + "---|" * len(main),
    ]
    roles = {**{b: " *(baseline)*" for b in extra.get("baselines") or []},
             **{c: " *(control)*" for c in extra.get("controls") or []}}  # fmt: skip
    for method, row in results.items():
        cells = " | ".join(fmt(row.get(c), _digits(c)) for c in main)
        lines.append(f"| {method}{roles.get(method, '')} | {cells} |")
    lines += _role_notes(extra)
    lines += win_matrix(results)
    lines += skipped_lines(extra.get("skipped_methods") or [])
    return "\n".join(lines) + "\n"


def win_matrix(results: Results) -> list[str]:
    """The Win % section of ``metrics.md``: a square matrix, row beats column (or ``[]``).

    ``win_vs_<b>`` of row ``a`` is stored for one order of each pair; the other order is its
    complement ``100 - v`` (a tie counts half to each side, so the two add up to 100 on the same
    images; docs/METHODS.md, Win %). Pairs never scored (identical maps, baselines) show ``-``.
    """
    win = {
        (a, c.removeprefix("win_vs_")): r
        for a, row in results.items()
        for c, r in row.items()
        if c.startswith("win_vs_") and r and r.get("value") is not None
    }
    if not win:
        return []
    names = [n for n in results if any(n in pair for pair in win)]

    def cell(a: str, b: str) -> str:
        if a == b:
            return "-"
        if (a, b) in win:
            return fmt(win[(a, b)], 1)
        r = win.get((b, a))
        if r is None:
            return "-"
        lo, hi = r.get("low"), r.get("high")
        flipped = {"value": 100.0 - r["value"], "low": None if hi is None else 100.0 - hi,
                   "high": None if lo is None else 100.0 - lo}  # fmt: skip
        return fmt(flipped, 1)

    lines = [
        "",
        "## Win %",
        "",
        "Row beats column on Average Drop, % of images; ties count half. A win is decided per "
        "image by the drop of the explained class's score, Y - O (the smaller drop wins; "
        "docs/METHODS.md, Win %). 95% intervals as above; `-`: not compared.",
        "",
        "| row beats column | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {a} | " + " | ".join(cell(a, b) for b in names) + " |" for a in names]
    return lines


def skipped_lines(skipped: list[Mapping[str, Any]]) -> list[str]:
    """One line per (method, reason) of the skipped methods, with how many variants it covers."""
    if not skipped:
        return []
    counts: dict[tuple[str, str], int] = {}
    for s in skipped:
        key = (str(s["method"]), str(s["reason"]))
        counts[key] = counts.get(key, 0) + 1
    lines = ["", "Skipped methods (not applicable to this model):", ""]
    for (method, reason), n in counts.items():
        variants = f" ({n} variants)" if n > 1 else ""
        lines.append(f"- {method}{variants}: {reason}")
    return lines


def _role_notes(extra: Mapping[str, Any]) -> list[str]:
    notes = []
    if extra.get("baselines"):
        notes.append(
            "Baselines know nothing of the model: baseline_centre is a centred Gaussian, "
            "baseline_random seeded noise on the CAM grid, baseline_oracle the ground-truth mask "
            "pooled to the CAM grid. A method is only informative where it beats the centre and "
            "random baselines; the oracle is the best a map on this grid can localise."
        )
    if extra.get("controls"):
        notes.append(
            "Controls: Grad-CAM on the tensor an attention-guided method explains (not the CAM "
            "layer gated by attention), so a difference from Grad-CAM is not the choice of tensor."
        )
    groups = extra.get("identical_by_construction") or []
    if groups:
        same = "; ".join(" = ".join(g) for g in groups)
        notes.append(
            f"Identical by construction at this layer (not independent evidence; scored once, "
            f"the values copied): {same}."
        )
    return [line for note in notes for line in ("", note)]


def _precision_lines(precision: Mapping[str, str] | None) -> list[str]:
    """One line saying in which precision the metrics' forwards ran (nothing when unknown)."""
    if not precision:
        return []
    maps = precision.get("maps", "float32")
    option = "`metrics.protocol.precision=auto|float32|bf16`"
    curves = precision.get("curves", precision["metric_forwards"])
    if curves == precision["metric_forwards"]:
        return [f"Metric forwards in {curves} ({precision['why']}); maps in {maps} ({option}).", ""]
    return [
        f"Metric forwards: deletion/insertion curves in {curves} ({precision['curves_why']}); "
        f"Average Drop, Increase in Confidence, Percentage-in and the rest in "
        f"{precision['scores']} ({precision['why']}); maps in {maps} ({option}).",
        "",
    ]


def write_tables(
    out: Path, results: Results, protocol: dict[str, Any], extra: dict[str, Any]
) -> list[Path]:
    """``metrics.json``, ``metrics.csv`` and ``metrics.md``: one row per method."""
    write_json_atomic(out / "metrics.json", {"protocol": protocol, **extra, "methods": results})
    columns = sorted({k for row in results.values() for k in row}, key=metric_order)
    write_text_atomic(out / "metrics.csv", _csv_text(results, columns))
    write_text_atomic(out / "metrics.md", _markdown(results, columns, protocol, extra))
    return [out / "metrics.json", out / "metrics.csv", out / "metrics.md"]


def _class_name(i: int, names: list[str] | None) -> str:
    return names[i] if names and 0 <= i < len(names) else str(i)


def _row_title(rec: Mapping[str, Any], names: list[str] | None, top: int) -> str:
    lines = [f"{_class_name(c, names)} {p:.2f}" for c, p in rec["top5"][:top]]
    if rec["target"] != rec["predicted"]:
        lines.append(f"explains: {_class_name(rec['target'], names)}")
    if rec["label"] >= 0:
        lines.append(f"(true: {_class_name(rec['label'], names)})")
    return "\n".join(lines)


def _explained(rec: Mapping[str, Any], names: list[str] | None) -> str:
    """Which class a map explains, its probability and the true class, for one image."""
    target = rec["target"]
    text = f"explains: {_class_name(target, names)} (class {target})"
    probs = dict(rec["top5"])
    if target in probs:
        text += f", p = {probs[target]:.2f}"
    if rec["label"] >= 0:
        text += f"; true: {_class_name(rec['label'], names)}"
    return text


def _grid_figures(
    out: Path, module: ExplainModule, names: list[str] | None, top: int
) -> list[Path]:
    """The grid (split into files of at most 6 methods) and one overlay per image and method."""
    from attncam.viz import explanation_grid, per_image_overlays

    rows = module.rows
    if not rows.images:
        return []
    images, stacked = torch.stack(rows.images), torch.stack(rows.masks)
    masks = stacked if stacked.any() else None
    maps = {n: torch.stack(v) for n, v in rows.maps.items()}
    titles = [_row_title(r, names, top) for r in rows.records]
    paths = explanation_grid(images, maps, out / "figures" / "grid.png", row_titles=titles,
                             masks=masks)  # fmt: skip
    paths += per_image_overlays(
        images, maps, out / "figures" / "per_image", [r["id"] for r in rows.records],
        titles=[_explained(r, names) for r in rows.records], masks=masks,
    )  # fmt: skip
    return paths


def write_figures(
    out: Path,
    module: ExplainModule,
    results: Results,
    class_names: list[str] | None,
    top: int,
) -> list[Path]:
    """Figure grid, per-image overlays, deletion/insertion curves and the metric bar chart."""
    from attncam.viz import curves_plot, metric_bars

    paths = _grid_figures(out, module, class_names, top)
    if module.curves:
        aucs = {
            n: (
                results[n].get("deletion", {}).get("value"),
                results[n].get("insertion", {}).get("value"),
            )
            for n in module.curves
        }
        paths.append(curves_plot(module.curves, out / "figures" / "curves.png", aucs=aucs))  # type: ignore[arg-type]
    metrics = [m for m in MAIN_METRICS if any(m in row for row in results.values())]
    if metrics:
        table = {
            n: {m: (r[m]["value"], r[m].get("low"), r[m].get("high")) for m in metrics if m in r}
            for n, r in results.items()
        }
        path = out / "figures" / "metrics.png"
        paths.append(metric_bars(table, metrics, path, lower_is_better=LOWER_IS_BETTER))
    return paths


def write_maps(out: Path, module: ExplainModule, paths: list[str] | None = None) -> list[Path]:
    """``maps.npz`` when maps were kept: one ``(N, H, W)`` array per method under its slug.

    Beside the maps, in the same image order: ``ids`` (image ids, the keys of
    ``per_image.json``), ``targets`` (the class each map explains), ``labels`` (-1: none),
    ``predictions`` (top-1) and ``files`` (the image file, ``""`` for a dataset split), each
    ``(N,)``. Maps are float32 unless ``save_maps_dtype=float16``.
    """
    if not (module.save_maps and any(module.all_maps.values())):
        return []
    arrays = {slug(n): torch.cat(v).numpy() for n, v in module.all_maps.items() if v}
    recs = module.records
    meta = {
        "ids": np.array([r["id"] for r in recs], dtype=np.int64),
        "targets": np.array([r["target"] for r in recs], dtype=np.int64),
        "labels": np.array([r["label"] for r in recs], dtype=np.int64),
        "predictions": np.array([r["predicted"] for r in recs], dtype=np.int64),
        "files": np.array(
            [paths[r["id"]] if paths and r["id"] < len(paths) else "" for r in recs], dtype=str
        ),
    }
    clash = sorted(set(meta) & set(arrays))
    if clash:
        raise ValueError(f"maps.npz: method slug(s) {clash} clash with the metadata arrays")
    return [save_npz_atomic(out / "maps.npz", **arrays, **meta)]


def write_predictions(
    out: Path, module: ExplainModule, paths: list[str] | None, class_names: list[str] | None
) -> list[Path]:
    """``predictions.json``: per image its id, file, label, target, prediction and top-5."""
    rows = []
    for rec in module.records:
        i = rec["id"]
        rows.append(
            {
                "index": i,
                "file": paths[i] if paths and i < len(paths) else None,
                **rec,
                "target_name": _class_name(rec["target"], class_names),
                "top5_names": [class_names[c] if class_names else str(c) for c, _ in rec["top5"]],
            }
        )
    return [write_json_atomic(out / "predictions.json", rows)]


def write_per_image(
    out: Path,
    per_image: Mapping[str, Mapping[str, Mapping[int, float]]],
    ids: list[int],
    name: str = "per_image.json",
) -> list[Path]:
    """``per_image.json``: ``{"image_ids": [...], "methods": {method: {metric: {id: value}}}}``."""
    methods = {
        m: {k: {str(i): float(v) for i, v in sorted(vals.items())} for k, vals in row.items()}
        for m, row in per_image.items()
    }
    return [write_json_atomic(out / name, {"image_ids": ids, "methods": methods})]


def log_wandb(loggers: list[Any], results: Results, files: list[Path]) -> None:
    """The table, the figures and every value as summary, for each W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        try:
            import wandb

            cols = sorted({k for r in results.values() for k in r}, key=metric_order)
            rows = [[m, *[(r.get(c) or {}).get("value") for c in cols]] for m, r in results.items()]
            lg.experiment.log({"explain/table": wandb.Table(columns=["method", *cols], data=rows)})
            for p in files:
                if p.suffix == ".png":
                    lg.experiment.log({f"explain/{p.stem}": wandb.Image(str(p))})
            summary = {
                f"explain/{m}/{c}": (r.get(c) or {}).get("value")
                for m, r in results.items()
                for c in r
            }
            lg.experiment.summary.update(summary)
        except Exception as err:  # a logging failure must not lose the written results
            log.warning("W&B logging failed: %s", err)


def write_comparison(
    out: Path,
    per_image: Mapping[str, Mapping[str, Mapping[int, float]]],
    cfg: Mapping[str, Any],
) -> list[Path]:
    """``comparison.json`` and ``comparison.md``: every method and baseline against a reference.

    Args:
        out: The run folder.
        per_image: ``{method: {metric: {image id: value}}}`` (``MetricSuite.per_image()``).
        cfg: ``reference`` (a method name), ``primary`` (metrics with Holm), ``sesoi`` (per
            metric; the rest from ``attncam.metrics.compare.DEFAULT_SESOI``), ``resamples``,
            ``alpha``, ``seed``.
    """
    from attncam.metrics.compare import (
        compare_methods,
        format_comparison_markdown,
        paired,
        resolve_sesoi,
    )

    reference = str(cfg["reference"])
    if reference not in per_image:
        raise ValueError(
            f"compare={reference!r} is not a method of this run; choose one of: "
            + ", ".join(per_image)
        )
    sesoi = dict(cfg.get("sesoi") or {})

    def has_sesoi(metric: str) -> bool:
        try:
            resolve_sesoi(metric, sesoi)
        except ValueError:
            return False
        return True

    def enough_pairs(metric: str) -> bool:
        ref = per_image[reference][metric]
        return all(
            len(paired(row.get(metric, {}), ref).ids) >= 2
            for name, row in per_image.items()
            if name != reference
        )

    metrics = [m for m in per_image[reference] if has_sesoi(m)]
    too_few = [m for m in metrics if not enough_pairs(m)]
    metrics = [m for m in metrics if m not in too_few]
    if not metrics:
        log.warning("no metric has 2 or more paired images per method: no comparison written")
        return []
    rows = compare_methods(
        per_image, reference, metrics=metrics, primary=list(cfg.get("primary") or []),
        sesoi=sesoi, alpha=float(cfg.get("alpha", 0.05)),
        resamples=int(cfg.get("resamples", 20_000)), seed=int(cfg.get("seed", 0)),
    )  # fmt: skip
    text = format_comparison_markdown(rows)
    if too_few:
        text += (
            "\nNot compared (fewer than 2 images paired by id for some method): "
            + ", ".join(too_few)
            + "\n"
        )
    log.info("paired comparison against %s:\n%s", reference, text)
    return [
        write_json_atomic(out / "comparison.json", [r.to_dict() for r in rows]),
        write_text_atomic(out / "comparison.md", text),
    ]


def build_manifest(
    cfg: DictConfig, model: ModelInfo, data: DataInfo, module: ExplainModule, run: Mapping[str, Any]
) -> dict[str, Any]:
    """What was explained, how, with which software, in how long."""
    n_images, seconds = run["n_images"], run["seconds"]
    return {
        "attncam_version": __version__,
        "checkpoint": model.checkpoint,
        "checkpoint_sha256": model.checkpoint_sha256,
        "source": model.source,
        "weights_id": getattr(model.net, "weights_id", None),
        "weights_format": getattr(model.net, "weights_format", None),
        "model": model.hparams,
        "layer": module.explainer.layers,
        "methods": module.explainer.names,
        "method_specs": [{"key": k, "options": o} for k, o in run["specs"]],
        "skipped_methods": run["skipped_methods"],
        "protocol": module.protocol.to_dict(),
        "precision": module.precision(),
        "allocator": tune_allocator(),
        "metrics": run["metrics_cfg"],
        "data": data.source,
        "n_images": n_images,
        "skipped_files": data.skipped,
        "seed": int(cfg.get("seed", 0)),
        "seconds": round(seconds, 2),
        "images_per_second": round(n_images / max(seconds, 1e-9), 3),
        "world_size": run["world_size"],
        "baselines": run["plan"]["baselines"],
        "calibration": run["plan"]["calibration"],
        "identical_by_construction": module.explainer.equivalent_groups,
        "controls": [{"key": k, "options": o} for k, o in run["plan"]["controls"]],
        "layers": run["plan"]["layers"],
        "image_ids_file": "image_ids.json",
        "git": git_state(),
        "versions": library_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "files": [str(p.relative_to(run["out"])) for p in run["files"]],
    }
