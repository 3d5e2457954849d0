"""Reproduce, as far as this codebase can, the three papers' results and write the reports.

One command runs the part of the reproduction asked for (setting ``part``):

* ``guidance`` (default): the primary experiment, "does attention guidance help?" (package
  ``attncam.stages.reproduce.guidance``), which writes ``docs/REPRODUCTION.md``;
* ``table2``: the paper's table-2 analogue (ResNet-50, GoogLeNet, VGG-19 x {none, cbam}), which
  trains (or reuses) the backbones, explains them, scores every map and writes
  ``docs/REPRODUCTION_TABLE2.md`` with its tables (``docs/reproduction/table2``) and figures;
* ``all``: guidance, then table2.

::

    python scripts/reproduce.py scale=cpu                # the primary experiment
    python scripts/reproduce.py scale=cpu part=table2    # the table-2 analogue (~30 min, 2 cores)
    python scripts/reproduce.py scale=tiny part=table2 work_dir=/tmp/r docs_dir=/tmp/r/docs
    python scripts/reproduce.py scale=imagenet part=table2   # the published protocol (GPU)
    python scripts/reproduce.py scale=cpu --print-commands   # the table-2 part's commands

Settings live in ``conf/reproduce/<scale>.yaml``; any key can be overridden as ``key=value``
(OmegaConf dot-list, e.g. ``explain.limit=100 reuse=true``); the published numbers the report
prints beside ours are in ``conf/reproduce/paper.yaml``. The table-2 stages (``experiments``):

a. fine-tuning: every family x {none, cbam} with ``attncam.stages.train.run`` (An & Joe table 2);
b. the paper's methods on every CBAM backbone with ``attncam.stages.explain.run`` (tables 3, 4),
   plus the Percentage-in variants re-scored from the stored maps;
c. SCA-CAM: the class-activation-weight ratio ``W_fc / mean gradient = Z`` (its figure 10), and
   featuremap vs CAM vs Grad-CAM vs SCA-CAM;
d. Grad-CAM: Guided Grad-CAM figures and the cascading-randomisation sanity check;
e. every method on one GAP -> FC backbone with insertion/deletion, ROAD and the pointing games,
   with paired-bootstrap tests on the per-image values.

The table-2 report (``report``) is rendered from the tables the run writes into
``docs/reproduction/table2``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attncam.runtime import library_versions
from attncam.stages.design import git_state
from attncam.stages.reproduce.experiments import (
    Timer,
    copy_file,
    explain_run,
    load_per_image,
    sanity_plot,
    significance,
    stage_caw,
    stage_percentage_variants,
    stage_sanity,
    stage_scacam_grid,
    stage_train,
    write_table,
)
from attncam.stages.reproduce.geometry import cam_from_explain_manifest, control_name
from attncam.stages.reproduce.names import AG_VARIANTS, PAPER_BASELINES, is_paired_metric
from attncam.stages.reproduce.report import (
    TABLES_DIR,
    ReportInputs,
    closest_variant,
    run_info,
    split_by_accuracy,
    write_report,
)
from attncam.stages.reproduce.settings import (
    ROOT,
    check_part,
    load_paper,
    load_settings,
    resolve_dir,
    scale_commands,
    table2_work_dir,
)

log = logging.getLogger(__name__)


def _explain_all(
    s: DictConfig, work: Path, trained: dict[str, dict[str, Any]], timer: Timer
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Path]]:
    """Explain every CBAM backbone (the beyond family first) and re-score its Percentage-in.

    Returns:
        ``(runs, percentage-in variants, checkpoints)``, runs in the order of the families.
    """
    runs: dict[str, dict[str, Any]] = {}
    pvar: dict[str, Any] = {}
    ckpts: dict[str, Path] = {}
    families = list(s.train.families)
    beyond = s.explain.beyond_family
    order = [beyond, *[f for f in families if f != beyond]] if beyond in families else families
    for fam in order:
        key = f"{fam}/cbam"
        if key not in trained:
            continue
        ckpt = Path(trained[key]["best_checkpoint"] or trained[key]["last_checkpoint"])
        ckpts[fam] = ckpt
        runs[fam] = explain_run(s, work, fam, ckpt, fam == beyond, timer)
        pvar[fam] = stage_percentage_variants(s, runs[fam], ckpt, timer, fam)
    return {f: runs[f] for f in families if f in runs}, pvar, ckpts


def _copy_run_figures(runs: dict[str, dict[str, Any]], figures: Path) -> list[str]:
    """The explain runs' grid, curves and metrics figures as ``<family>_<name>.png``."""
    names: list[str] = []
    for fam, r in runs.items():
        for name in ("grid", "curves", "metrics"):
            src = Path(r["output_dir"]) / "figures" / f"{name}.png"
            if src.is_file():
                copy_file(src, figures / f"{fam}_{name}.png")
                names.append(f"{fam}_{name}.png")
    return names


def _significance_all(
    s: DictConfig, runs: dict[str, dict[str, Any]], cams: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Per backbone: every method vs the reference, each attention-guided variant vs the other
    baselines and vs Grad-CAM on its attention's input (the explain stage's control row, when it
    added one), on every paired per-image metric."""
    sig: dict[str, list[dict[str, Any]]] = {}
    ref = s.significance.reference
    for fam, r in runs.items():
        names = r["methods"]
        pairs = [(m, ref) for m in names if m != ref]
        pairs += [
            (v, b) for v in AG_VARIANTS if v in names for b in PAPER_BASELINES[1:] if b in names
        ]
        pairs += [
            (v, control_name(cams[fam], v))
            for v in AG_VARIANTS
            if v in names and control_name(cams[fam], v) in names
        ]
        metrics = sorted({k for v in r["per_image"].values() for k in v if is_paired_metric(k)})
        sig[fam] = significance(r["per_image"], pairs, metrics, s)
    return sig


def _write_tables(
    s: DictConfig, tables: Path, paper: dict[str, Any], results: dict[str, Any]
) -> None:
    """``docs/reproduction/table2/*.json``: every table of the report (the manifest comes last)."""
    runs, beyond = results["runs"], results["beyond"]
    write_table(tables / "methods.json", {
        "paper": paper["an_joe"],
        "backbones": {f: {"results": r["results"], "run": r["output_dir"]} for f, r in runs.items()},
    })  # fmt: skip
    entering, _ = split_by_accuracy(
        results["trained"], list(runs), float(s.table2.verdict_min_accuracy)
    )
    closest = closest_variant(results["pvar"], paper, list(entering))
    write_table(
        tables / "percentage_in_variants.json",
        {"closest": closest, "backbones": results["pvar"]},
    )
    write_table(tables / "scacam.json", {"caw": results["caw"], "maps": results["scagrid"]})
    write_table(tables / "sanity.json", results["sanity"])
    write_table(tables / "significance.json", results["sig"])
    write_table(tables / "beyond.json", {
        "family": beyond, "results": runs[beyond]["results"], "paper": {
            k: paper[k] for k in ("rise_resnet50", "gradcampp_vgg16", "scorecam_vgg16")},
    })  # fmt: skip


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 min load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _explain_record(r: dict[str, Any], cam: dict[str, Any]) -> dict[str, Any]:
    """One explain run in the manifest: where, how many images (which), methods, CAM geometry."""
    return {
        "output_dir": r["output_dir"],
        "n_images": r["manifest"]["n_images"],
        "subset": "stratified" if "image_ids_file" in r["manifest"] else "first",
        "methods": r["methods"],
        "seconds": r["manifest"].get("seconds"),
        "checkpoint_sha256": r["manifest"].get("checkpoint_sha256"),
        "cam": cam,
    }


def manifest(
    s: DictConfig, info: dict[str, Any], timer: Timer, results: dict[str, Any], docs: Path,
    report: Path,
) -> dict[str, Any]:  # fmt: skip
    """The run's manifest: command, commit, settings, timings, load, host, versions, runs,
    tables, figures. ``info``: ``command``, ``git_commit``, ``git_dirty``, ``written`` and
    ``load_average_before``."""
    tables = docs / TABLES_DIR
    return {
        **{k: info[k] for k in ("command", "git_commit", "git_dirty", "written")},
        "part": "table2",
        "scale": s.scale,
        "settings": OmegaConf.to_container(s, resolve=True),
        "wall_seconds": timer.total,
        "stage_seconds_total": timer.stage_total,
        "reuse": bool(s.reuse),
        "stages_seconds": timer.stages,
        "load_average": {"before": info["load_average_before"], "after": _load_average()},
        "host": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": library_versions(),
        "train_runs": {
            k: {"output_dir": v.get("output_dir"), "best_checkpoint": v.get("best_checkpoint")}
            for k, v in results["trained"].items()
        },
        "explain_runs": {
            f: _explain_record(r, results["cams"][f]) for f, r in results["runs"].items()
        },
        "tables": sorted(p.name for p in tables.glob("*.json")),
        "figures": results["figures"],
        "report": str(report.relative_to(docs)),
    }


def run_experiments(
    s: DictConfig, work: Path, docs: Path, timer: Timer, paper: dict[str, Any]
) -> dict[str, Any]:
    """Every stage: training, explain runs, SCA-CAM, sanity, significance.

    Returns:
        ``trained``, ``runs``, ``cams`` (per explained family its CAM layer, grid and the tensor
        of each attention-guided variant), ``pvar``, ``caw``, ``scagrid``, ``sanity``, ``sig``,
        ``figures`` and ``beyond`` (the family explained with every method).
    """
    figures, tables = docs / "figures", docs / TABLES_DIR
    trained = stage_train(s, work, timer)
    write_table(tables / "finetune.json", {"runs": trained, "paper": paper["cbam_resnet50"]})
    runs, pvar, ckpts = _explain_all(s, work, trained, timer)
    cams = {f: cam_from_explain_manifest(r["manifest"]) for f, r in runs.items()}
    fig_names = _copy_run_figures(runs, figures)
    beyond = s.explain.beyond_family
    with timer.stage("scacam"):
        caw = stage_caw(s, ckpts[s.caw.family], s.caw.family, figures)
        scagrid = stage_scacam_grid(
            runs[beyond], ckpts[beyond], figures, int(s.explain.figure_rows)
        )
    fig_names += [caw["figure"], scagrid["figure"]]
    with timer.stage("sanity"):
        sanity = stage_sanity(s, ckpts[s.sanity.family], figures)
        sanity_plot(sanity, figures / "sanity_curves.png")
    fig_names += [*sanity["figures"], "sanity_curves.png"]
    with timer.stage("significance"):
        sig = _significance_all(s, runs, cams)
    return {
        "trained": trained, "runs": runs, "cams": cams, "pvar": pvar, "caw": caw, "scagrid": scagrid,
        "sanity": sanity, "sig": sig, "figures": fig_names, "beyond": beyond,
    }  # fmt: skip


def run_table2(s: DictConfig, command: str = "reproduce.py") -> dict[str, Any]:
    """The table-2 part: run every stage of the settings' scale and write its report and tables.

    Args:
        s: Settings from :func:`~attncam.stages.reproduce.settings.load_settings`.
        command: The command line recorded in the manifest.

    Returns:
        ``{"report": path, "seconds": wall seconds, "docs": the docs folder}``.
    """
    if s.get("threads"):
        torch.set_num_threads(int(s.threads))
    work, docs = table2_work_dir(s), resolve_dir(s.docs_dir)
    for p in (work, docs / "figures", docs / TABLES_DIR):
        p.mkdir(parents=True, exist_ok=True)
    git = git_state(ROOT)
    info = {
        "command": command, "git_commit": git["commit"], "git_dirty": git["dirty"],
        "load_average_before": _load_average(),
    }  # fmt: skip
    timer = Timer(work / "timings.json", bool(s.reuse))
    log.info("reproduce scale=%s part=table2 -> %s (work %s)", s.scale, docs, work)
    paper = load_paper()
    results = run_experiments(s, work, docs, timer, paper)
    _write_tables(s, docs / TABLES_DIR, paper, results)
    info["written"] = time.strftime("%Y-%m-%d %H:%M")
    inputs = ReportInputs(
        settings=s, paper=paper, **{k: v for k, v in results.items() if k != "beyond"},
        stages=timer.stages, stage_total=timer.stage_total, total=timer.total,
        written=info["written"], host=platform.node(), torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(), run_info=run_info(info, results["runs"]),
    )  # fmt: skip
    report = write_report(inputs, docs)
    write_table(
        docs / TABLES_DIR / "manifest.json", manifest(s, info, timer, results, docs, report)
    )
    log.info("report written to %s in %.0f s", report, timer.total)
    return {"report": str(report), "seconds": timer.total, "docs": str(docs)}


def _run_guidance(s: DictConfig, command: str) -> dict[str, Any]:
    """The guidance part (imported here: it is a separate package, loaded only when asked for)."""
    try:
        from attncam.stages.reproduce.guidance import run as run_guidance
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.guidance":
            raise
        raise ModuleNotFoundError(
            f"part=guidance needs the package {__name__}.guidance, which this checkout lacks; "
            "run part=table2 for the table-2 analogue"
        ) from err
    return run_guidance(s, command)


def run(s: DictConfig, command: str = "reproduce.py") -> dict[str, Any]:
    """Run the part of the reproduction the settings ask for (``part``).

    Args:
        s: Settings from :func:`~attncam.stages.reproduce.settings.load_settings`.
        command: The command line recorded in the manifests.

    Returns:
        ``{"part": part}`` plus each part's results under its name (``guidance``, ``table2``).

    Raises:
        ValueError: ``part`` is not ``guidance``, ``table2`` or ``all``.
    """
    part = check_part(s)
    out: dict[str, Any] = {"part": part}
    if part in ("guidance", "all"):
        out["guidance"] = _run_guidance(s, command)
    if part in ("table2", "all"):
        out["table2"] = run_table2(s, command)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: ``scale=cpu|tiny|imagenet``, ``part=guidance|table2|all``,
    ``key=value``, ``--print-commands``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="scale=cpu|tiny|imagenet, part=guidance|table2|all and key=value",
    )
    parser.add_argument("--print-commands", action="store_true",
                        help="print the table-2 part's train.py / explain.py commands of the "
                             "scale asked for and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.print_commands:
        sys.stdout.write("\n".join(scale_commands(load_settings(args.overrides))) + "\n")
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    s = load_settings(args.overrides)
    command = " ".join([Path(sys.argv[0]).name, *(args.overrides or [])])
    return run(s, command)


__all__ = [
    "load_per_image",
    "load_settings",
    "main",
    "manifest",
    "run",
    "run_experiments",
    "run_table2",
]
