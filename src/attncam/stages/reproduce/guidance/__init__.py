"""Reproduction v2 (``part=guidance``): an experiment that can answer "does attention guidance help?"

``python scripts/reproduce.py scale=cpu`` trains every arm of ``conf/reproduce/cpu.yaml``'s
``guidance`` block on cached features of the frozen ImageNet EfficientNet-Lite0 (224 px, 7x7 CAM
grid), scores attention-guided Grad-CAM, Grad-CAM on the same tensor, the controls and the
baselines on the same test images for every seed, applies the pre-registered decision rule and
writes ``docs/REPRODUCTION.md`` from ``docs/reproduction/guidance/results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attncam.io import write_text_atomic
from attncam.models.net import AttentionNet
from attncam.runtime import library_versions, tune_allocator
from attncam.stages.design import git_state
from attncam.stages.reproduce.experiments import Timer, write_table
from attncam.stages.reproduce.guidance import experiment as E
from attncam.stages.reproduce.guidance.data import cached_features, load_data
from attncam.stages.reproduce.guidance.figures import effects_figure, maps_figure
from attncam.stages.reproduce.guidance.report import render
from attncam.stages.reproduce.guidance.results import analyse
from attncam.stages.reproduce.settings import ROOT, resolve_dir

log = logging.getLogger(__name__)


def _design(g: DictConfig, scores: dict[str, Any], primary: str) -> dict[str, Any]:
    first = next(iter(scores[primary].values()))
    p = g.metrics
    return {
        "backbone": g.backbone, **OmegaConf.to_container(g.data, resolve=True),  # type: ignore[dict-item]
        "grid": first["grid"], "layer": first["layer"], "steps": p.protocol.steps,
        "pointing_tolerance": p.pointing_tolerance, "min_accuracy": g.min_accuracy,
    }  # fmt: skip


def _stages(g: DictConfig, s: DictConfig, work: Path, figures: Path, timer: Timer) -> dict:
    reuse = bool(s.reuse)
    all_arms = E.arms(g)
    with timer.stage("data and trunk features"):
        data = load_data(g.data, s.data.get("cache_dir") if s.get("data") else None)
        trunk = AttentionNet(str(g.backbone), data.num_classes, pretrained=True)
        feats = cached_features(trunk, data, E.trunk_sites(all_arms, trunk),
                                work / "features.pt", int(g.feature_batch))  # fmt: skip
    with timer.stage("train tails"):
        trained = E.train_arms(all_arms, g, data, feats, work, reuse)
    with timer.stage("score"):
        scores = E.score_arms(all_arms, trained, g, data, feats, work, reuse)
    with timer.stage("sanity"):
        sanity = E.sanity(trained, all_arms, g, data)
    records = {a: {sd: r for sd, (_, r) in v.items()} for a, v in trained.items()}
    with timer.stage("analysis"):
        results = analyse(all_arms, records, scores, g)
        results["sanity"] = sanity
    primary = results["primary_arm"]
    arm = next(a for a in all_arms if a.name == primary)
    with timer.stage("figures"):
        seed0 = min(trained[primary])
        names = [maps_figure(arm, trained[primary][seed0][0], data, int(g.get("figure_rows", 6)),
                             seed0, figures / "guidance_maps.png"),
                 effects_figure(results["primary"], figures / "guidance_effects.png")]  # fmt: skip
    return {"results": results, "scores": scores, "figures": names, "arms": all_arms,
            "design": _design(g, scores, primary)}  # fmt: skip


def run(s: DictConfig, command: str = "reproduce.py") -> dict[str, Any]:
    """Run the guidance experiment and write its report, JSON, per-image scores and figures."""
    g = s.guidance
    if s.get("threads"):
        torch.set_num_threads(int(s.threads))
    allocator = tune_allocator()
    load_before = list(os.getloadavg())
    work, docs = resolve_dir(s.work_dir) / "guidance", resolve_dir(s.docs_dir)
    tables, figures = docs / "reproduction" / "guidance", docs / "figures"
    for p in (work, tables, figures):
        p.mkdir(parents=True, exist_ok=True)
    timer = Timer(work / "timings.json", bool(s.reuse))
    out = _stages(g, s, work, figures, timer)
    git = git_state(ROOT)
    manifest = {
        "command": command, "scale": s.scale, "part": "guidance", "git_commit": git["commit"],
        "git_dirty": git["dirty"], "written": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": timer.total, "stages_seconds": timer.stages, "reuse": bool(s.reuse),
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "host": platform.node(), "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "allocator": allocator,
        "versions": library_versions(), "design": out["design"], "figures": out["figures"],
        "arms": {a.name: dataclasses.asdict(a) for a in out["arms"]},
        "settings": OmegaConf.to_container(g, resolve=True),
    }  # fmt: skip
    write_table(tables / "results.json", out["results"])
    write_table(tables / "manifest.json", manifest)
    E.write_json_gz(tables / "per_image.json.gz", out["scores"])
    report = docs / "REPRODUCTION.md"
    write_text_atomic(report, rerender(tables))
    log.info("report written to %s in %.0f s", report, timer.total)
    return {"report": str(report), "seconds": timer.total, "docs": str(docs)}


def rerender(tables: Path) -> str:
    """The report from the committed ``results.json`` and ``manifest.json`` in ``tables``."""
    results = json.loads((tables / "results.json").read_text())
    manifest = json.loads((tables / "manifest.json").read_text())
    return render(results, manifest)


__all__ = ["rerender", "run"]
