"""The experiments of the reproduction, one function per stage.

a. :func:`stage_train`: every family x attention with ``attncam.stages.train.run`` (An & Joe
   table 2);
b. :func:`explain_run`: the paper's methods on a CBAM backbone with ``attncam.stages.explain.run``
   (An & Joe tables 3, 4), which also writes the per-image values (``per_image.json``), and
   :func:`stage_percentage_variants`: Percentage-in in three variants, re-scored from the maps;
c. :func:`stage_caw`: SCA-CAM's class-activation-weight ratio ``W_fc / mean gradient = Z`` (its
   figure 10) and :func:`stage_scacam_grid`: featuremap vs CAM vs Grad-CAM vs SCA-CAM;
d. :func:`stage_sanity`: Guided Grad-CAM figures and the cascading-randomisation sanity check
   (Adebayo et al. 2018);
e. :func:`significance`: paired-bootstrap tests with Holm's adjustment on the per-image values.

Every stage reads and writes files only; a ``reuse=true`` run picks up finished stage folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from attncam.explain import Explainer
from attncam.explain.naming import slug
from attncam.io import write_bytes_with, write_text_atomic
from attncam.metrics import Perturber, SanityCheck, summarize
from attncam.metrics.compare import minimum_detectable_effect
from attncam.metrics.protocol import EvalProtocol
from attncam.metrics.sanity import block_layers, cascading_randomization
from attncam.metrics.stats import DEFAULT_CONFIDENCE, holm, paired_bootstrap
from attncam.models.checkpoint import load_classifier
from attncam.stages import explain as explain_stage
from attncam.stages import train as train_stage
from attncam.stages.reproduce.names import LOWER_BETTER, PERCENTAGES, SCACAM_METHODS
from attncam.stages.reproduce.settings import (
    ROOT,
    compose_cfg,
    explain_overrides,
    train_overrides,
)
from attncam.viz import explanation_grid, save_figure, scatter_ratio_plot

log = logging.getLogger(__name__)

#: Per-image values: ``{method: {metric key: {image id: value}}}``.
PerImage = dict[str, dict[str, dict[int, float]]]


# --------------------------------------------------------------------------- files


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(path: Path, obj: Any, root: Path = ROOT) -> Path:
    """``obj`` as indented JSON (keys in their order), written atomically.

    Paths inside the checkout ``root`` become relative to it, so the committed tables do not carry
    the machine's directory layout.
    """
    text = json.dumps(obj, indent=2, default=_json_default)
    prefix = json.dumps(str(root) + os.sep)[1:-1]
    return write_text_atomic(path, text.replace(prefix, "") + "\n")


def copy_file(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    data = src.read_bytes()
    return write_bytes_with(dst, lambda handle: handle.write(data))


class Timer:
    """Wall time per stage, kept for the manifest and the report.

    Stage times are saved in ``path`` (``<work_dir>/table2/timings.json``) as each stage ends, so a
    ``reuse=true`` run reports the time the reused stages took when they ran.
    """

    def __init__(self, path: Path | None = None, reuse: bool = False) -> None:
        self.start = time.perf_counter()
        self.path = path
        self.stages: dict[str, float] = {}
        self.previous: dict[str, float] = {}
        if reuse and path is not None and path.is_file():
            self.previous = json.loads(path.read_text())

    def reused(self, name: str) -> None:
        """Record a reused stage with the time it took when it ran (if known)."""
        if name in self.previous:
            self.stages[name] = self.previous[name]
            self._save()

    def _save(self) -> None:
        if self.path is not None:
            write_table(self.path, self.stages)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as stage ``name``."""
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t0, 1)
            self._save()
            log.info("stage %s done in %.0f s", name, self.stages[name])

    @property
    def total(self) -> float:
        """Seconds of this invocation."""
        return round(time.perf_counter() - self.start, 1)

    @property
    def stage_total(self) -> float:
        """Sum of the stage times, reused stages at their recorded time."""
        return round(sum(self.stages.values()), 1)


# --------------------------------------------------------------------------- inputs


def train_data_cfg(ckpt: Path) -> dict[str, Any]:
    """The data config of the training run that wrote ``ckpt`` (its ``config.json``)."""
    return json.loads((ckpt.resolve().parent.parent / "config.json").read_text())["data"]


def run_data_cfg(run: Mapping[str, Any], ckpt: Path) -> dict[str, Any]:
    """The data config an explain run used (the training run's when it set none)."""
    return run["manifest"]["config"].get("data") or train_data_cfg(ckpt)


def run_ids(run: Mapping[str, Any]) -> list[int] | None:
    """The image ids an explain run explained, in order (``image_ids.json``; None if absent)."""
    path = Path(run["output_dir"]) / "image_ids.json"
    return [int(i) for i in json.loads(path.read_text())] if path.is_file() else None


def load_images(
    data_cfg: Mapping[str, Any], split: str, n: int, ids: Sequence[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``n`` explain items of a split, or of ``ids`` (an explain run's images).

    Returns:
        Images ``(N, 3, H, W)``, labels ``(N,)`` and masks ``(N, H, W)`` (bool).
    """
    dm = instantiate(OmegaConf.create(dict(data_cfg)))
    dm.prepare_data()
    dm.setup("test")
    ds = dm.explain_dataset(split)
    order = list(ids) if ids is not None else list(range(len(ds)))
    items = [ds[i] for i in order[: min(n, len(order))]]
    return (
        torch.stack([it[0] for it in items]),
        torch.tensor([int(it[1]) for it in items]),
        torch.stack([torch.as_tensor(it[2]) for it in items]).bool(),
    )


def load_maps(run_dir: Path, names: Sequence[str]) -> dict[str, Tensor]:
    """Maps ``(N, H, W)`` stored by ``save_maps=true`` (``maps.npz``), by result name."""
    z = np.load(run_dir / "maps.npz")
    return {n: torch.from_numpy(z[slug(n)]).float() for n in names if slug(n) in z}


def load_per_image(run_dir: Path) -> PerImage:
    """The explain stage's ``per_image.json`` (written with ``save_per_image=true``).

    Args:
        run_dir: The explain run's folder.

    Returns:
        ``{method: {metric key: {image id: value}}}``; an image is present under a metric only if
        that metric kept it. Image ids index the explained split.

    Raises:
        FileNotFoundError: the run wrote no per-image values.
    """
    path = run_dir / "per_image.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the explain stage with save_per_image=true")
    raw = json.loads(path.read_text())
    return {
        method: {key: {int(i): float(v) for i, v in vals.items()} for key, vals in row.items()}
        for method, row in raw["methods"].items()
    }


def with_lerf_minus_morf(values: PerImage) -> PerImage:
    """Add ``lerf_minus_morf`` per image (ROAD, LeRF - MoRF) where a method has both curves.

    Computed in float32 from the per-image MoRF and LeRF joined on image id, as ROAD computes its
    summary, so the paired tests see the same numbers.
    """
    for row in values.values():
        if "morf" in row and "lerf" in row:
            ids = sorted(row["morf"].keys() & row["lerf"].keys())
            m = torch.tensor([row["morf"][i] for i in ids], dtype=torch.float32)
            le = torch.tensor([row["lerf"][i] for i in ids], dtype=torch.float32)
            row["lerf_minus_morf"] = dict(zip(ids, (le - m).tolist(), strict=True))
    return values


# --------------------------------------------------------------------------- a. training


def stage_train(s: DictConfig, work: Path, timer: Timer) -> dict[str, dict[str, Any]]:
    """Fine-tune every family x attention; ``{f"{family}/{attention}": results}``."""
    out: dict[str, dict[str, Any]] = {}
    for family in s.train.families:
        for att in s.train.attentions:
            run_dir = work / "train" / f"{family}_{att}"
            res_file = run_dir / "results.json"
            key = f"{family}/{att}"
            if s.reuse and res_file.is_file():
                out[key] = json.loads(res_file.read_text())
                timer.reused(f"train {key}")
                log.info("reusing %s", res_file)
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cfg = compose_cfg("train", train_overrides(s, family, att))
            with open_dict(cfg):
                cfg.output_dir = str(run_dir)
            with timer.stage(f"train {key}"):
                out[key] = train_stage.run(cfg)
            out[key]["wall_seconds"] = timer.stages[f"train {key}"]
    return out


# --------------------------------------------------------------------------- b. methods


def _explain_cfg(s: DictConfig, ckpt: Path, run_dir: Path, beyond: bool) -> DictConfig:
    """The explain config: the paper's methods, plus every other method for the beyond family."""
    e = s.explain
    metrics = list(e.beyond_metrics if beyond else e.paper_metrics)
    cfg = compose_cfg("explain", explain_overrides(s, ckpt, metrics))
    with open_dict(cfg):
        cfg.output_dir = str(run_dir)
        if beyond:
            for m in e.beyond_methods:
                sub = compose_cfg("explain", [f"method={m}"]).method
                cfg.method[m] = sub[m]
            cfg.method["scacam_fc"] = {"key": "scacam", "options": {"channel_weight": "fc"}}
    return cfg


def _finished_explain_run(run_dir: Path) -> dict[str, Any]:
    """What a finished explain run left: its results, methods, manifest and per-image values."""
    table = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {
        "output_dir": str(run_dir),
        "results": table["methods"],
        "methods": manifest["methods"],
        "manifest": manifest,
        "per_image": with_lerf_minus_morf(load_per_image(run_dir)),
    }


def explain_run(
    s: DictConfig, work: Path, family: str, ckpt: Path, beyond: bool, timer: Timer
) -> dict[str, Any]:
    """Explain one CBAM backbone: the paper's methods (and, for the beyond family, every other
    method and metric).

    Returns:
        The explain stage's results plus ``manifest`` and ``per_image`` (see
        :func:`load_per_image`, with ``lerf_minus_morf`` added).
    """
    run_dir = work / "explain" / f"{family}_cbam"
    name = f"explain {family}" + (" (every method)" if beyond else "")
    complete = (run_dir / "COMPLETE").is_file() and (run_dir / "per_image.json").is_file()
    if s.reuse and complete:
        log.info("reusing %s", run_dir)
        timer.reused(name)
        return _finished_explain_run(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = _explain_cfg(s, ckpt, run_dir, beyond)
    with timer.stage(name):
        res = explain_stage.run(cfg)
    res["manifest"] = json.loads((run_dir / "manifest.json").read_text())
    res["per_image"] = with_lerf_minus_morf(load_per_image(run_dir))
    res["wall_seconds"] = timer.stages[name]
    return res


def _confidences(
    eng: Perturber,
    images: Tensor,
    labels: Tensor | None,
    maps: Mapping[str, Tensor],
    variant: str,
    batch_size: int,
) -> dict[str, Tensor]:
    """Base scores ``__base__`` ``(N,)`` and each method's scores at every level ``(N, P)``."""
    parts: dict[str, list[Tensor]] = {m: [] for m in maps}
    base_l = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        base = eng.base_scores(x, labels=None if labels is None else labels[i : i + batch_size])
        tab = eng.confidence_table(
            x, {m: v[i : i + batch_size] for m, v in maps.items()}, base=base,
            percentages=PERCENTAGES, variant=variant,
        )  # fmt: skip
        base_l.append(base.scores)
        for m in maps:
            parts[m].append(tab.percentage_in[m])
    out = {m: torch.cat(v) for m, v in parts.items()}
    out["__base__"] = torch.cat(base_l)
    return out


def _variant_summaries(
    scores: Mapping[str, Mapping[str, Tensor]], method: str, variants: Sequence[str], s: DictConfig
) -> dict[str, Any]:
    """One method's Percentage-in per variant and level: mean with its bootstrap interval.

    ``binary`` and ``soft``: the share (%) of images whose confidence rises; ``gain``: the mean
    relative gain (%) of the binary variant's confidences.
    """
    row: dict[str, Any] = {}
    for variant in variants:
        src = scores["binary" if variant == "gain" else variant]
        y, o = src["__base__"].double(), src[method].double()
        if variant == "gain":
            vals = 100 * (o - y[:, None]).clamp(min=0) / y[:, None]
        else:
            vals = 100 * (o > y[:, None]).double()
        row[variant] = {
            f"{p:g}": summarize(f"percentage_in@{p:g}", vals[:, j], None,
                                int(s.explain.num_resamples), DEFAULT_CONFIDENCE,
                                int(s.seed)).to_dict()
            for j, p in enumerate(PERCENTAGES)
        }  # fmt: skip
    return row


def _binary_matches(row: Mapping[str, Any], ours: Mapping[str, Any]) -> bool:
    """Whether the re-scored binary variant equals the explain stage's Percentage-in."""
    return all(
        abs(row["binary"][f"{p:g}"]["value"] - ours[f"percentage_in@{p:g}"]["value"]) < 1e-6
        for p in PERCENTAGES
        if f"percentage_in@{p:g}" in ours and ours[f"percentage_in@{p:g}"]["value"] is not None
    )


def stage_percentage_variants(
    s: DictConfig, run: dict[str, Any], ckpt: Path, timer: Timer, family: str
) -> dict[str, Any]:
    """Percentage-in in the binary, soft and gain variants, re-scored from the stored maps.

    ``binary`` and ``gain`` share their forward passes (``E = B_p * I``); ``soft`` needs its own.
    The binary numbers must equal the explain stage's (checked and reported).
    """
    pv = s.percentage_variants
    manifest = run["manifest"]
    methods = [m for m in pv.methods if m in run["methods"]]
    with timer.stage(f"percentage-in variants {family}"):
        net = load_classifier(str(ckpt)).net.eval()
        split = manifest["config"].get("split", "test")
        images, labels, _ = load_images(
            run_data_cfg(run, ckpt), split, int(manifest["n_images"]), run_ids(run)
        )
        maps = load_maps(Path(run["output_dir"]), methods)
        protocol = EvalProtocol.from_dict(manifest["protocol"])
        eng = Perturber(net, protocol, optimize=True)
        lab = labels if protocol.target == "label" else None
        bs = int(s.explain.batch_size)
        scores = {
            v: _confidences(eng, images, lab, {m: maps[m] for m in methods}, v, bs)
            for v in pv.variants
            if v != "gain"
        }
        out: dict[str, Any] = {"methods": {}, "n_images": int(images.shape[0])}
        for m in methods:
            row = _variant_summaries(scores, m, list(pv.variants), s)
            row["binary_matches_explain_stage"] = _binary_matches(row, run["results"][m])
            out["methods"][m] = row
    return out


# --------------------------------------------------------------------------- c. SCA-CAM


def stage_caw(s: DictConfig, ckpt: Path, family: str, figures: Path) -> dict[str, Any]:
    """SCA-CAM figure 10: for a GAP -> FC network, ``W_fc[c, k] / mean_ij(dy^c/dA^k_ij) = Z``."""
    net = load_classifier(str(ckpt)).net.eval()
    images, _, _ = load_images(train_data_cfg(ckpt), "test", int(s.caw.num_images))
    with torch.enable_grad():
        feats = net.features(net.normalize(images)).detach().requires_grad_(True)
        logits = net.head(feats)
        c = logits.argmax(1)
        (grad,) = torch.autograd.grad(logits.gather(1, c[:, None]).sum(), feats)
    h, w = feats.shape[-2:]
    z = int(h * w)
    mean_grad = grad.mean((2, 3)).detach()  # (B, K)
    weight = net.classifier().weight.detach()[c]  # (B, K)
    ok = mean_grad.abs() > 1e-12
    ratio = weight[ok] / mean_grad[ok]
    path = scatter_ratio_plot(
        mean_grad[0],
        weight[0],
        figures / "scacam_caw_ratio.png",
        xlabel="mean gradient of y^c over A^k (Grad-CAM weight)",
        ylabel="FC weight W[c, k] (CAM weight)",
        title=f"{family}+CBAM, image 0, class {int(c[0])}: slope = Z = h*w = {z}",
    )
    x, y = mean_grad.flatten().double(), weight.flatten().double()
    slope = float((x * y).sum() / (x * x).sum())
    return {
        "family": family,
        "layer": net.head_input_layer,
        "feature_size": [int(h), int(w)],
        "Z": z,
        "n_images": int(images.shape[0]),
        "n_channels": int(feats.shape[1]),
        "pairs": int(ok.sum()),
        "ratio_median": float(ratio.median()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "max_relative_deviation": float(((ratio - z).abs() / z).max()),
        "least_squares_slope": slope,
        "figure": path.name,
    }


def stage_scacam_grid(run: dict[str, Any], ckpt: Path, figures: Path, rows: int) -> dict[str, Any]:
    """featuremap vs CAM vs Grad-CAM vs SCA-CAM on the same images; CAM == Grad-CAM check."""
    maps = load_maps(Path(run["output_dir"]), SCACAM_METHODS)
    split = run["manifest"]["config"].get("split", "test")
    images, _, masks = load_images(run_data_cfg(run, ckpt), split, rows, run_ids(run))
    explanation_grid(
        images,
        {n: m[:rows] for n, m in maps.items()},
        figures / "scacam_grid.png",
        masks=masks if masks.any() else None,
    )
    out: dict[str, Any] = {"figure": "scacam_grid.png"}
    if "cam" in maps and "gradcam" in maps:
        out["cam_vs_gradcam_max_abs_diff"] = float((maps["cam"] - maps["gradcam"]).abs().max())
    if "scacam" in maps and "scacam[channel_weight=fc]" in maps:
        out["scacam_grad_vs_fc_max_abs_diff"] = float(
            (maps["scacam"] - maps["scacam[channel_weight=fc]"]).abs().max()
        )
    return out


# --------------------------------------------------------------------------- d. sanity


def randomized_maps(
    net: nn.Module,
    methods: Sequence[str],
    images: Tensor,
    targets: Tensor,
    groups: Sequence[str],
    seed: int,
) -> dict[str, dict[str, Tensor]]:
    """Every method's maps after each cumulative block re-initialisation, top-down.

    One ``Explainer`` call explains every method per step (the methods share their passes): the
    explain function hands ``cascading_randomization`` the maps stacked as ``(B, M, H, W)``.

    Returns:
        ``{method: {group: maps (B, H, W)}}``.
    """
    names = list(methods)

    def explain_all(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        got = Explainer(model, names)(x, t)
        return torch.stack([got[m] for m in names], dim=1)

    after: dict[str, dict[str, Tensor]] = {m: {} for m in names}
    steps = cascading_randomization(net, explain_all, images, targets, groups, seed=seed,
                                    recursive=True)  # fmt: skip
    for group, stacked in steps:
        for i, m in enumerate(names):
            after[m][group] = stacked[:, i].contiguous()
    return after


def _sanity_figures(
    images: Tensor,
    masks: Tensor,
    original: Mapping[str, Tensor],
    after: Mapping[str, Mapping[str, Tensor]],
    groups: Sequence[str],
    figures: Path,
) -> list[str]:
    """The trained maps (Guided Grad-CAM paper figure) and the maps after randomising the top
    block, half the network and everything."""
    cols = {f"{m}\ntrained": v for m, v in original.items()}
    explanation_grid(
        images, cols, figures / "guided_gradcam.png", masks=masks if masks.any() else None,
        max_columns=len(cols),
    )  # fmt: skip
    steps = [(0, "top"), (len(groups) // 2, "half"), (len(groups) - 1, "all")]
    cols = {}
    for m in ("gradcam", "guided_backprop"):
        if m not in original:
            continue
        cols[f"{m}\ntrained"] = original[m]
        for j, label in steps:
            cols[f"{m}\nrandom: {label} ({groups[j]})"[:60]] = after[m][groups[j]]
    explanation_grid(  # one file: the trained map beside its randomised versions
        images[:4], {k: v[:4] for k, v in cols.items()}, figures / "sanity_cascade.png",
        max_columns=len(cols),
    )  # fmt: skip
    return ["guided_gradcam.png", "sanity_cascade.png"]


def stage_sanity(s: DictConfig, ckpt: Path, figures: Path) -> dict[str, Any]:
    """Grad-CAM paper / Adebayo et al. 2018: cascading randomisation, block by block from the top.

    Guided Backprop should barely change while Grad-CAM decorrelates. Maps of every method are
    compared with the trained model's by Spearman rank correlation and SSIM (``SanityCheck``).
    """
    sc = s.sanity
    net = load_classifier(str(ckpt)).net.eval()
    images, _, masks = load_images(train_data_cfg(ckpt), "test", int(sc.num_images))
    methods = list(sc.methods)
    first = Explainer(net, methods).explain(images)
    targets, original = first.targets, first.maps
    groups = block_layers(net, net.classifier_name)
    after = randomized_maps(net, methods, images, targets, groups, int(s.seed))
    out: dict[str, Any] = {"groups": groups, "n_images": int(images.shape[0]), "methods": {}}
    for m in methods:
        metric = SanityCheck(groups, num_resamples=int(s.explain.num_resamples), seed=int(s.seed))
        metric.update(original[m], after[m])
        res = {k: v.to_dict() for k, v in metric.compute().items()}
        out["methods"][m] = {
            "spearman": [res[f"spearman@{g}"] for g in groups],
            "ssim": [res[f"ssim@{g}"] for g in groups],
            "constant_maps": metric.constant_map_counts(),
        }
    original_maps = {m: original[m] for m in methods}
    out["figures"] = _sanity_figures(images, masks, original_maps, after, groups, figures)
    return out


def sanity_plot(sanity: Mapping[str, Any], path: Path) -> Path:
    """Spearman and SSIM vs the number of randomised blocks, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    xs = list(range(1, len(sanity["groups"]) + 1))
    for m, r in sanity["methods"].items():
        for ax, key in zip(axes, ("spearman", "ssim"), strict=True):
            ax.plot(xs, [x["value"] for x in r[key]], marker="o", ms=3, label=m)
            ax.fill_between(xs, [x["low"] for x in r[key]], [x["high"] for x in r[key]], alpha=0.2)
    for ax, key in zip(axes, ("Spearman rank correlation", "SSIM"), strict=True):
        ax.set_xlabel("blocks randomised, from the top (cascading)")
        ax.set_ylabel(key)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.legend(fontsize=8)
    fig.suptitle("Cascading randomisation: maps vs the trained model's (mean, 95% CI)")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- e. significance


def paired_values(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[Tensor, Tensor]:
    """Two methods' values on the images both kept, joined on image id (sorted ids).

    Returns:
        ``(values of a, values of b)``, each ``(N,)`` float64, ``N`` the images in common.
    """
    ids = sorted(a.keys() & b.keys())
    return (
        torch.tensor([a[i] for i in ids], dtype=torch.float64),
        torch.tensor([b[i] for i in ids], dtype=torch.float64),
    )


def _compare(
    a: Mapping[int, float], b: Mapping[int, float], metric: str, sig: DictConfig, seed: int
) -> dict[str, Any]:
    """One paired test ``a - b`` on the images in common (at least 2), with its verdict and the
    minimum detectable effect (two-sided, 5%, 80% power) of its per-image differences."""
    va, vb = paired_values(a, b)
    if va.numel() < 2:
        reason = f"too few images in common ({va.numel()}; {len(a)} vs {len(b)})"
        return {"paired": False, "reason": reason}
    row: dict[str, Any] = {"paired": True}
    row.update(paired_bootstrap(va, vb, int(sig.num_resamples), float(sig.confidence), seed))
    row["mde"] = minimum_detectable_effect((va - vb).numpy())
    row["significant"] = bool(row["low"] > 0 or row["high"] < 0)
    better = row["diff"] < 0 if metric in LOWER_BETTER else row["diff"] > 0
    row["a_better"] = bool(better) if row["significant"] else None
    return row


def significance(
    values: Mapping[str, Mapping[str, Mapping[int, float]]],
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str],
    s: DictConfig,
) -> list[dict[str, Any]]:
    """Paired-bootstrap tests ``a - b`` for every pair and metric with per-image values.

    Each test uses the images both methods kept (joined on image id); with fewer than two in
    common the row says so. Holm-adjusted p-values (``p_holm``) cover the paired rows, one family.
    """
    rows = []
    for a, b in pairs:
        for m in metrics:
            va, vb = values.get(a, {}).get(m), values.get(b, {}).get(m)
            if va is None or vb is None:
                continue
            rows.append({"a": a, "b": b, "metric": m,
                         **_compare(va, vb, m, s.significance, int(s.seed))})  # fmt: skip
    paired = [r for r in rows if r.get("paired")]
    for r, p_holm in zip(paired, holm([r["p"] for r in paired]), strict=True):
        r["p_holm"] = p_holm
    return rows


__all__ = [
    "PerImage",
    "Timer",
    "copy_file",
    "explain_run",
    "load_images",
    "load_maps",
    "load_per_image",
    "paired_values",
    "randomized_maps",
    "run_data_cfg",
    "sanity_plot",
    "significance",
    "stage_caw",
    "stage_percentage_variants",
    "stage_sanity",
    "stage_scacam_grid",
    "stage_train",
    "train_data_cfg",
    "with_lerf_minus_morf",
    "write_table",
]
