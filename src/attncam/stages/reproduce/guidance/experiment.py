"""The guidance experiment's stages: train every arm and seed, score them, run the sanity checks."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from attncam.explain import Explainer
from attncam.io import write_bytes_with
from attncam.metrics import functional as MF
from attncam.metrics.sanity import block_layers, run_sanity_check
from attncam.models.net import AttentionNet
from attncam.stages.reproduce.guidance.data import Data, as_float
from attncam.stages.reproduce.guidance.heads import Arm, Tail, cache_site, fit_arm
from attncam.stages.reproduce.guidance.scoring import (
    merge_grid,
    method_specs,
    score_grids,
    score_test,
    temperature,
)

log = logging.getLogger(__name__)

Trained = dict[str, dict[int, tuple[AttentionNet, dict[str, Any]]]]


def arms(g: DictConfig) -> list[Arm]:
    """The arms of the settings, in order; exactly one has ``role: primary``.

    An arm with ``seeds: []`` is left out (a smaller run, e.g. ``scale=tiny``).
    """
    out = [Arm.from_config(str(name), opts) for name, opts in g.arms.items()]
    roles = {"primary", "control", "recipe", "sanity"}
    bad = [a.name for a in out if a.extra.get("role") not in roles]
    if bad:
        raise ValueError(f"guidance.arms {bad}: role must be one of {sorted(roles)}")
    primary = [a.name for a in out if a.extra["role"] == "primary"]
    if len(primary) != 1:
        raise ValueError(f"guidance.arms needs exactly one arm with role: primary; got {primary}")
    if not out[[a.name for a in out].index(primary[0])].extra.get("seeds", [0]):
        raise ValueError(f"guidance.arms.{primary[0]} (the primary arm) needs at least one seed")
    return [a for a in out if a.extra.get("seeds", [0])]


def trunk_sites(all_arms: list[Arm], net: AttentionNet) -> list[str]:
    """Every layer an arm's tail starts from."""
    return sorted({cache_site(a, net) for a in all_arms})


def train_arms(
    all_arms: list[Arm],
    g: DictConfig,
    data: Data,
    feats: dict[str, dict[str, torch.Tensor]],
    work: Path,
    reuse: bool,
) -> Trained:
    """Train (or, with ``reuse``, load) every arm for each of its seeds."""
    labels = {"train": data.train.labels, "val": data.val.labels, "test": data.test.labels}
    out: Trained = {}
    for arm in all_arms:
        out[arm.name] = {}
        for seed in arm.extra.get("seeds", [0]):
            path = work / "tails" / f"{arm.name}_seed{seed}.pt"
            if path.exists() and not reuse:
                path.unlink()  # scratch of an earlier run in work_dir, not a result
            path.parent.mkdir(parents=True, exist_ok=True)
            out[arm.name][int(seed)] = fit_arm(arm, int(seed), g, feats, labels,
                                               data.num_classes, path)  # fmt: skip
    return out


def _score_one(
    arm: Arm,
    seed: int,
    net: AttentionNet,
    g: DictConfig,
    data: Data,
    feats: dict[str, Any],
) -> dict[str, Any]:
    site = cache_site(arm, net)
    temp = temperature(Tail(net, site), feats["val"][site], data.val.labels)
    role = arm.extra["role"]
    paper = role == "primary" and seed == int(g.paper_baselines_seed)
    enabled = list(g.recipe_metrics) if role == "recipe" else None
    scores = score_test(arm, net, data, g, temp, paper, seed, enabled)
    merge_grid(scores, score_grids(arm, net, data, g, temp, seed))
    return scores


def score_arms(
    all_arms: list[Arm],
    trained: Trained,
    g: DictConfig,
    data: Data,
    feats: dict[str, Any],
    work: Path,
    reuse: bool,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Per arm and seed, the per-image scores of every map (cached in ``work/scores``)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in all_arms:
        if arm.extra["role"] == "sanity":
            continue
        out[arm.name] = {}
        for seed, (net, record) in trained[arm.name].items():
            path = work / "scores" / f"{arm.name}_seed{seed}.json.gz"
            if reuse and path.is_file():
                out[arm.name][seed] = _read_scores(path)
                continue
            log.info("scoring arm %s seed %d (test %.1f%%)", arm.name, seed,
                     record["test_accuracy"])  # fmt: skip
            out[arm.name][seed] = _score_one(arm, seed, net, g, data, feats)
            write_json_gz(path, out[arm.name][seed])
    return out


def write_json_gz(path: Path, obj: Any) -> None:
    """``obj`` as gzip-compressed JSON (reproducible bytes: no timestamp), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = gzip.compress(json.dumps(obj).encode(), mtime=0)
    write_bytes_with(path, lambda f: f.write(blob))


def _read_scores(path: Path) -> dict[str, Any]:
    raw = json.loads(gzip.decompress(path.read_bytes()))

    def ints(d: Any) -> Any:
        if isinstance(d, dict):
            return {(int(k) if k.isdigit() else k): ints(v) for k, v in d.items()}
        return d

    return ints(raw)


def _explain_fn(spec: Any, layer: str, name: str) -> Any:
    def fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return Explainer(model, [spec], layer=layer)(x, t)[name]

    return fn


def sanity(trained: Trained, all_arms: list[Arm], g: DictConfig, data: Data) -> dict[str, Any]:
    """Cascading randomisation (model and CBAM only) and data randomisation (shuffled labels)."""
    primary = next(a for a in all_arms if a.extra["role"] == "primary")
    net = trained[primary.name][int(g.sanity.seed)][0]
    n = int(g.sanity.num_images)
    x = as_float(data.test.images[:n])
    with torch.no_grad():
        targets = net(x).argmax(1)
    layer, specs = method_specs(primary, net, paper=False)
    explainer = Explainer(net, specs[:2], layer=layer)
    cascade = block_layers(net, net.classifier_name)
    attn = [c for c in cascade if "attention" in c]
    out: dict[str, Any] = {"layers": cascade, "attention_layers": attn, "methods": {}}
    for spec, name in zip(specs[:2], explainer.names, strict=True):
        fn = _explain_fn(spec, layer, name)
        res: dict[str, Any] = {}
        for label, layers in (("cascade", cascade), ("cbam_only", attn)):
            metric = run_sanity_check(net, fn, x, targets, layers, recursive=True, seed=0,
                                      num_resamples=200)  # fmt: skip
            res[label] = {k: r.to_dict() for k, r in metric.compute().items()}
        out["methods"][name] = res
    out["data_randomisation"] = _data_randomisation(trained, all_arms, g, explainer, x, targets)
    return out


def _data_randomisation(
    trained: Trained,
    all_arms: list[Arm],
    g: DictConfig,
    explainer: Explainer,
    x: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, Any]:
    """Spearman / SSIM between the maps of the trained model and a model trained on shuffled
    labels (Adebayo et al. 2018, sec. 3.2), for the same images and classes."""
    arm = next((a for a in all_arms if a.extra["role"] == "sanity"), None)
    if arm is None:
        return {}
    net_r, record = next(iter(trained[arm.name].values()))
    layer = explainer.layers[0]
    random_maps = Explainer(net_r, [s.name for s in explainer.methods], layer=layer)(x, targets)
    real = explainer(x, targets)
    out: dict[str, Any] = {"test_accuracy": record["test_accuracy"]}
    for name, m in real.items():
        rho = MF.spearman(m.flatten(1), random_maps[name].flatten(1))
        ssim = MF.ssim(m, random_maps[name])
        out[name] = {"spearman": rho.tolist(), "ssim": ssim.tolist()}
    return out


__all__ = ["arms", "sanity", "score_arms", "train_arms", "trunk_sites", "write_json_gz"]
