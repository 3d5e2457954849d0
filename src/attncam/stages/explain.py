"""The explain stage: ``run(cfg)`` explains a model's decisions and scores every map.

Inputs are a checkpoint written by ``train.py`` (``ckpt=PATH``) or a registered backbone with its
pretrained weights (``model=NAME``), and either a data split (``data=...``, ``split=test``) or
image files (``images='photos/*.jpg'``). The work runs in a Lightning
``Trainer(inference_mode=False)``, so ``trainer=ddp`` spreads one evaluation over processes and
nodes with the metrics synced. Outputs go to the run's own folder: tables (CSV, Markdown, JSON),
figures (PNG), optional maps (``.npz``) and a manifest; ``COMPLETE`` is written last, so a folder
without it is an interrupted run.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import logging
import os
import platform
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attncam import __version__
from attncam.explain import Explainer, available_methods, get_method, methods_from_config
from attncam.metrics import Perturber, Protocol, WinPercentage, build_metrics
from attncam.models.lit_module import load_classifier
from attncam.models.net import AttentionNet
from attncam.stages.common import build_loggers, output_dir, write_json_atomic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
LOWER_IS_BETTER = {"average_drop", "deletion"}
MAIN_METRICS = (
    "average_drop",
    "increase_in_confidence",
    "pointing_game",
    "energy_pointing_game",
    "deletion",
    "insertion",
)


class ExplainInputError(ValueError):
    """The explain stage's inputs are missing or inconsistent."""


# --------------------------------------------------------------------------- inputs


@dataclass
class ModelInfo:
    """The network to explain and where it came from."""

    net: nn.Module
    source: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] | None = None
    class_names: list[str] | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(cfg: DictConfig) -> ModelInfo:
    """The network from ``ckpt=PATH`` or ``model=NAME`` (pretrained), in eval mode."""
    ckpt, name = cfg.get("ckpt"), cfg.get("model")
    if ckpt and name:
        raise ExplainInputError(
            f"give ckpt=PATH or model=NAME, not both (got ckpt={ckpt!r}, model={name.backbone!r})"
        )
    if ckpt:
        path = Path(str(ckpt))
        module = load_classifier(str(path), trust_checkpoint=bool(cfg.get("trust_checkpoint")))
        train_cfg = None
        cfg_file = path.resolve().parent.parent / "config.json"
        if cfg_file.is_file():
            train_cfg = json.loads(cfg_file.read_text())
        return ModelInfo(
            net=module.net.eval(),
            source="checkpoint",
            checkpoint=str(path),
            checkpoint_sha256=_sha256(path),
            hparams=dict(module.hparams),
            train_config=train_cfg,
        )
    if name:
        if not isinstance(name, Mapping) or "backbone" not in name:
            raise ExplainInputError(
                f"model must name a backbone config such as model=efficientnet_lite0, got {name!r}"
            )
        weights = name.get("weights")
        net = AttentionNet(
            str(name.backbone),
            1000,
            attention="none",
            pretrained=bool(name.get("pretrained", True)) and weights is None,
            weights=weights,
        ).eval()
        return ModelInfo(
            net=net,
            source="pretrained",
            hparams={"backbone": str(name.backbone), "attention": "none", "num_classes": 1000},
            class_names=net.class_names,
        )
    raise ExplainInputError(
        "nothing to explain: pass ckpt=PATH (a checkpoint written by train.py) or model=NAME "
        "(a backbone with pretrained weights, e.g. model=efficientnet_lite0)"
    )


class ImageFilesDataset(Dataset):
    """Image files without labels, resized and centre-cropped; unreadable files are skipped.

    Items are ``(image (3, S, S), -1, mask (S, S) all False)``.
    """

    def __init__(self, paths: list[Path], image_size: int, crop_pct: float = 0.875) -> None:
        from attncam.data.transforms import EvalTransform, load_image

        self.transform = EvalTransform(image_size, crop_pct)
        self.paths: list[Path] = []
        self.images: list[torch.Tensor] = []
        self.skipped: list[tuple[str, str]] = []
        for p in paths:
            try:
                img, _ = self.transform(load_image(p))
            except Exception as err:  # not an image, truncated, unsupported format
                self.skipped.append((str(p), f"{type(err).__name__}: {err}"[:200]))
                continue
            self.paths.append(p)
            self.images.append(img)
        if self.skipped:
            log.warning(
                "skipped %d file(s) that are not readable images: %s",
                len(self.skipped),
                ", ".join(s for s, _ in self.skipped[:5]),
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        img = self.images[i]
        return img, -1, torch.zeros(img.shape[-2:], dtype=torch.bool)


def _image_paths(spec: str | list[str]) -> list[Path]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for s in specs:
        p = Path(os.path.expanduser(str(s)))
        if p.is_dir():
            paths.extend(
                sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
            )
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                raise ExplainInputError(
                    f"images={s!r} matches no file or folder (give files, a folder or a glob such "
                    "as 'photos/*.jpg')"
                )
            paths.extend(m for m in matches if m.is_file())
    return paths


@dataclass
class DataInfo:
    """What is explained."""

    dataset: Dataset
    class_names: list[str] | None
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    paths: list[str] | None = None


def load_data(cfg: DictConfig, model: ModelInfo) -> DataInfo:
    """The images to explain: ``images=...`` files, ``data=...`` split, or the training data."""
    if cfg.get("images"):
        paths = _image_paths(
            OmegaConf.to_object(cfg.images) if not isinstance(cfg.images, str) else cfg.images
        )  # type: ignore[arg-type]
        image_size = int(cfg.get("image_size") or 224)
        if not paths:
            raise ExplainInputError(f"images={cfg.images!r} holds no files")
        ds = ImageFilesDataset(paths, image_size)
        if len(ds) == 0:
            raise ExplainInputError(
                f"images={cfg.images!r}: none of the {len(paths)} file(s) is a readable image"
            )
        return DataInfo(
            dataset=ds,
            class_names=model.class_names,
            source=f"images={cfg.images}",
            skipped=ds.skipped,
            paths=[str(p) for p in ds.paths],
        )
    data_cfg = cfg.get("data")
    if data_cfg is None and model.train_config is not None:
        data_cfg = OmegaConf.create(model.train_config["data"])
        log.info("explaining the data the checkpoint was trained on: %s", data_cfg._target_)
    if data_cfg is None:
        raise ExplainInputError(
            "no images: pass data=NAME (e.g. data=synthetic) with split=test, or images=GLOB"
        )
    dm = instantiate(data_cfg)
    dm.prepare_data()
    dm.setup("test")
    split = cfg.get("split", "test")
    ds = dm.explain_dataset(split)
    if len(ds) == 0:
        raise ExplainInputError(f"the {split} split of {data_cfg._target_} is empty")
    names = list(dm.class_names)
    n_model = int(getattr(model.net, "num_classes", len(names)))
    if len(names) != n_model:
        raise ExplainInputError(
            f"the data has {len(names)} classes but the model predicts {n_model}: explain a "
            "checkpoint with the data it was trained on"
        )
    skipped = [(p, "unreadable") for p in getattr(ds, "skipped_paths", [])]
    return DataInfo(
        dataset=ds, class_names=names, source=f"{data_cfg._target_}:{split}", skipped=skipped
    )


# --------------------------------------------------------------------------- methods


def method_specs(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """``[(key, options)]`` from the ``method`` group (one file, a list of files, or a group).

    Each ``conf/method/<key>.yaml`` adds ``{key, options}`` under its own name in ``method``, so
    ``method=[gradcam,xgradcam]`` and the groups ``paper`` and ``all`` compose.
    """
    group = cfg.get("method")
    if not group:
        raise ExplainInputError(f"no method given; choose from: {', '.join(available_methods())}")
    try:
        specs = methods_from_config(OmegaConf.to_container(group, resolve=True))  # type: ignore[arg-type]
    except ValueError as err:
        raise ExplainInputError(str(err)) from None
    for key, _ in specs:
        get_method(key)  # unknown keys fail here, listing the valid ones
    return specs


def applicable_specs(
    net: nn.Module, specs: list[tuple[str, dict[str, Any]]], layer: Any, strict: bool
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, str]]]:
    """Keep the methods the model supports; the rest are an error (strict) or skipped, reported."""
    kept, skipped = [], []
    for key, opts in specs:
        try:
            Explainer(net, [(key, opts)], layer=layer)
        except (ValueError, TypeError) as err:
            if strict:
                raise
            skipped.append({"method": key, "options": json.dumps(opts), "reason": str(err)})
            continue
        kept.append((key, opts))
    for s in skipped:
        log.warning("method %s skipped: %s", s["method"], s["reason"])
    if not kept:
        reasons = "; ".join(f"{s['method']}: {s['reason']}" for s in skipped)
        raise ExplainInputError(f"no requested method applies to this model ({reasons})")
    return kept, skipped


# --------------------------------------------------------------------------- Lightning


class ImagesPerSecondBar(TQDMProgressBar):
    """The test progress bar counts images and images per second, not batches."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._images = 0
        self._start = 0.0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the counters."""
        super().on_test_start(trainer, pl_module)
        self._images, self._start = 0, time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Show images done and images per second."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._images += int(batch[0].shape[0])
        rate = self._images / max(time.perf_counter() - self._start, 1e-9)
        if self.test_progress_bar is not None:
            self.test_progress_bar.set_postfix(images=self._images, img_s=f"{rate:.2f}")


class ExplainModule(L.LightningModule):
    """Explains each test batch with every method and updates every metric.

    Args:
        net: the classifier (pixel images in, logits out).
        specs: ``[(method key, options)]``.
        layer: CAM layer(s) or None for the model's default.
        metrics_cfg: the ``metrics`` config (protocol, enabled metrics, settings).
        keep_rows: images kept (on rank 0) for the figure grid.
        save_maps: keep every map for ``maps.npz``.
    """

    def __init__(
        self,
        net: nn.Module,
        specs: list[tuple[str, dict[str, Any]]],
        layer: Any,
        metrics_cfg: Mapping[str, Any],
        keep_rows: int = 8,
        save_maps: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.explainer = Explainer(net, specs, layer=layer)
        self.names = self.explainer.names
        self.metrics_cfg = dict(metrics_cfg)
        protocol, _ = build_metrics(self.metrics_cfg)
        self.protocol: Protocol = protocol
        self.method_metrics = nn.ModuleDict(
            {_safe(n): nn.ModuleDict(build_metrics(self.metrics_cfg)[1]) for n in self.names}
        )
        common = {
            "num_resamples": int(self.metrics_cfg.get("num_resamples", 1000)),
            "confidence": float(self.metrics_cfg.get("confidence", 0.95)),
            "seed": protocol.seed,
        }
        self.pairs = (
            list(itertools.combinations(self.names, 2)) if self.metrics_cfg.get("win") else []
        )
        self.win = nn.ModuleDict(
            {f"{_safe(a)}__vs__{_safe(b)}": WinPercentage(**common) for a, b in self.pairs}
        )
        self.enabled = set(self.metrics_cfg.get("enabled") or [])
        self.perturber: Perturber | None = None
        self.keep_rows = keep_rows
        self.save_maps = save_maps
        self.rows: dict[str, Any] = {"images": [], "maps": {n: [] for n in self.names}}
        self.all_maps: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.records: list[dict[str, Any]] = []
        self.skipped_channels: dict[str, float] = {}
        self.images_seen = 0
        self.curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on_test_start(self) -> None:
        """Build the perturbation engine on the right device."""
        self.perturber = Perturber(
            self.net,
            self.protocol,
            chunk_size=int(self.metrics_cfg.get("chunk_size", 64)),
            optimize=bool(self.metrics_cfg.get("optimize_model", False)),
        )

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Explain one batch and update every metric."""
        images, labels, masks = batch[0], batch[1], batch[2]
        assert self.perturber is not None
        has_labels = bool((labels >= 0).all())
        lab = labels if has_labels else None
        if not torch.isfinite(images).all():
            bad = (~torch.isfinite(images.flatten(1))).any(1).nonzero().flatten().tolist()
            raise ValueError(f"images {bad} of batch {batch_idx} hold NaN or inf values")
        base = self.perturber.base_scores(images, labels=lab)
        exp = self.explainer.explain(images, base.targets)
        maps = exp.maps
        for key, val in exp.extras.items():
            if key.endswith(".skipped") and isinstance(val, torch.Tensor):
                self.skipped_channels[key] = self.skipped_channels.get(key, 0.0) + float(
                    val.float().sum()
                )
        table = None
        if self.enabled & {"average_drop", "increase_in_confidence", "percentage_in"} or self.pairs:
            table = self.perturber.confidence_table(images, maps, labels=lab, base=base)
        curves = None
        if "deletion_insertion" in self.enabled:
            curves = self.perturber.deletion_insertion(images, maps, labels=lab, base=base)
        road = None
        if "road" in self.enabled:
            road = {
                n: self.perturber.road(images, maps[n], labels=lab, base=base) for n in self.names
            }
        occ = None
        if "occlusion_faithfulness" in self.enabled:
            occ = self.perturber.occlusion_sensitivity(images, labels=lab, base=base)
        for n in self.names:
            mm = self.method_metrics[_safe(n)]
            for key, metric in mm.items():
                if key in ("average_drop", "increase_in_confidence") and table is not None:
                    metric.update(base.scores, table.masked[n], base.keep)
                elif key == "percentage_in" and table is not None:
                    metric.update(base.scores, table.percentage_in[n], base.keep)
                elif key == "deletion_insertion" and curves is not None:
                    metric.update(curves[n], base.keep)
                elif key == "road" and road is not None:
                    metric.update(road[n], base.keep)
                elif key == "occlusion_faithfulness" and occ is not None:
                    metric.update(maps[n], occ, base.keep)
                elif key in ("pointing_game", "energy_pointing_game", "mask_iou", "box_accuracy"):
                    metric.update(maps[n], masks, base.keep)
        for a, b in self.pairs:
            assert table is not None
            self.win[f"{_safe(a)}__vs__{_safe(b)}"].update(
                base.scores, table.masked[a], table.masked[b], base.keep
            )
        probs = base.logits.float().softmax(-1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        for i in range(images.shape[0]):
            self.records.append(
                {
                    "label": int(labels[i]),
                    "target": int(base.targets[i]),
                    "predicted": int(base.predicted[i]),
                    "top5": list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)),
                }
            )
        if len(self.rows["images"]) < self.keep_rows:
            take = self.keep_rows - len(self.rows["images"])
            self.rows["images"].extend(images[:take].cpu())
            self.rows.setdefault("masks", []).extend(masks[:take].cpu())
            self.rows.setdefault("records", []).extend(self.records[-images.shape[0] :][:take])
            for n in self.names:
                self.rows["maps"][n].extend(maps[n][:take].float().cpu())
        if self.save_maps:
            for n in self.names:
                self.all_maps[n].append(maps[n].half().cpu())
        self.images_seen += images.shape[0]

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{method: {metric: MetricResult.to_dict()}}`` after syncing across processes."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for n in self.names:
            row: dict[str, dict[str, Any]] = {}
            for key, metric in self.method_metrics[_safe(n)].items():
                res = metric.compute()
                if isinstance(res, Mapping):
                    for sub, r in res.items():
                        row[str(sub)] = r.to_dict()
                else:
                    row[key] = res.to_dict()
            out[n] = row
        for a, b in self.pairs:
            res = self.win[f"{_safe(a)}__vs__{_safe(b)}"].compute().to_dict()
            out[a][f"win_vs_{b}"] = res
        self.curves = self.mean_curves()
        return out

    def mean_curves(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Mean ``(fractions, deletion, insertion)`` curves per method, for plotting.

        A collective under DDP: every process calls it (``results`` does).
        """
        out = {}
        for n in self.names:
            mm = self.method_metrics[_safe(n)]
            if "deletion_insertion" not in mm:
                continue
            try:
                c = mm["deletion_insertion"].mean_curves()
            except ValueError as err:  # no valid curve: reported in the table's skipped counts
                log.warning("no deletion/insertion curve for %s: %s", n, err)
                continue
            out[n] = (c["fractions"].cpu(), c["deletion"].cpu(), c["insertion"].cpu())
        return out


def _safe(name: str) -> str:
    """A ModuleDict key for a result name such as ``gradcampp[torchcam020]``."""
    return (
        name.replace(".", "_")
        .replace("[", "__")
        .replace("]", "")
        .replace("=", "-")
        .replace(",", "_")
    )


# --------------------------------------------------------------------------- outputs


def _fmt(r: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not r or r.get("value") is None:
        return "n/a"
    v, lo, hi = r["value"], r.get("low"), r.get("high")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def write_tables(
    out: Path,
    results: dict[str, dict[str, dict[str, Any]]],
    protocol: dict[str, Any],
    extra: dict[str, Any],
) -> list[Path]:
    """``metrics.json``, ``metrics.csv`` and ``metrics.md``: one row per method."""
    write_json_atomic(out / "metrics.json", {"protocol": protocol, **extra, "methods": results})
    columns = sorted({k for row in results.values() for k in row}, key=_metric_order)
    tmp = out / ".metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["method", *[f"{c}{suffix}" for c in columns for suffix in ("", "_low", "_high", "_n")]]
        )
        for method, row in results.items():
            cells: list[Any] = [method]
            for c in columns:
                r = row.get(c) or {}
                cells += [r.get("value"), r.get("low"), r.get("high"), r.get("n")]
            w.writerow(cells)
    os.replace(tmp, out / "metrics.csv")
    n_images = max((r.get("n") or 0 for row in results.values() for r in row.values()), default=0)
    lines = [
        "# Explanation metrics",
        "",
        f"Model: {extra.get('model')}; images: {extra.get('images')} ({extra.get('data')}); "
        f"N per metric is in metrics.csv/json (at most {n_images}). Values are means with "
        f"bootstrap {int(100 * float(extra.get('confidence', 0.95)))}% intervals.",
        "",
        "Protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()),
        "",
        "| method | " + " | ".join(_label(c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, row in results.items():
        lines.append(
            f"| {method} | " + " | ".join(_fmt(row.get(c), _digits(c)) for c in columns) + " |"
        )
    skipped = extra.get("skipped_methods") or []
    if skipped:
        lines += ["", "Skipped methods (not applicable to this model):", ""]
        lines += [f"- {s['method']}: {s['reason']}" for s in skipped]
    tmp = out / ".metrics.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "metrics.md")
    return [out / "metrics.json", out / "metrics.csv", out / "metrics.md"]


_ORDER = [
    "average_drop", "increase_in_confidence", "percentage_in", "pointing_game",
    "energy_pointing_game", "mask_iou", "box_accuracy", "deletion", "insertion", "morf", "lerf",
    "occlusion", "win_vs",
]  # fmt: skip


def _metric_order(c: str) -> tuple[int, float, str]:
    level = c.rpartition("@")[2]
    num = float(level) if "@" in c and level.replace(".", "", 1).isdigit() else 0.0
    for i, prefix in enumerate(_ORDER):
        if c.startswith(prefix):
            return i, num, c
    return len(_ORDER), num, c


def _label(c: str) -> str:
    arrow = " (lower better)" if c in LOWER_IS_BETTER else ""
    return c.replace("_", " ") + arrow


def _digits(c: str) -> int:
    return (
        3 if c.startswith(("deletion", "insertion", "mask_iou", "morf", "lerf", "occlusion")) else 2
    )


def _row_title(rec: Mapping[str, Any], names: list[str] | None, top: int) -> str:
    def name(i: int) -> str:
        return names[i] if names and 0 <= i < len(names) else str(i)

    lines = [f"{name(c)} {p:.2f}" for c, p in rec["top5"][:top]]
    if rec["label"] >= 0:
        lines.append(f"(true: {name(rec['label'])})")
    return "\n".join(lines)


def write_figures(
    out: Path,
    module: ExplainModule,
    results: dict[str, dict[str, dict[str, Any]]],
    class_names: list[str] | None,
    top: int,
) -> list[Path]:
    """Figure grid, deletion/insertion curves and the metric bar chart."""
    from attncam.viz import curves_plot, explanation_grid, metric_bars

    paths = []
    rows = module.rows
    if rows["images"]:
        masks = torch.stack(rows["masks"])
        paths.append(
            explanation_grid(
                torch.stack(rows["images"]),
                {n: torch.stack(v) for n, v in rows["maps"].items()},
                out / "figures" / "grid.png",
                row_titles=[_row_title(r, class_names, top) for r in rows["records"]],
                masks=masks if masks.any() else None,
            )
        )
    curves = module.curves
    if curves:
        aucs = {
            n: (
                results[n].get("deletion", {}).get("value"),
                results[n].get("insertion", {}).get("value"),
            )
            for n in curves
        }
        paths.append(curves_plot(curves, out / "figures" / "curves.png", aucs=aucs))  # type: ignore[arg-type]
    metrics = [m for m in MAIN_METRICS if any(m in row for row in results.values())]
    if metrics:
        table = {
            n: {m: (r[m]["value"], r[m].get("low"), r[m].get("high")) for m in metrics if m in r}
            for n, r in results.items()
        }
        paths.append(
            metric_bars(
                table, metrics, out / "figures" / "metrics.png", lower_is_better=LOWER_IS_BETTER
            )
        )
    return paths


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "attncam": __version__}
    for pkg in ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "timm", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch"] = torch.__version__  # with its build tag (+cpu, +cu130)
    return out


def sanity_check(
    net: nn.Module,
    specs: list[tuple[str, dict[str, Any]]],
    layer: Any,
    dataset: Dataset,
    collate: Any,
    sanity_cfg: Mapping[str, Any],
    common: Mapping[str, Any],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Cascading weight randomisation (Adebayo et al. 2018) for every method.

    The first ``num_images`` images are explained for their predicted class by the trained model,
    then by copies whose layers are re-initialised from the top down; Spearman rank correlation
    and SSIM to the original map per layer (``attncam.metrics.sanity``).
    """
    from attncam.metrics import randomizable_layers, run_sanity_check

    n = min(int(sanity_cfg.get("num_images") or 8), len(dataset))  # type: ignore[arg-type]
    batch = next(iter(DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=n,
                                 collate_fn=collate)))  # fmt: skip
    images = batch[0]
    with torch.no_grad():
        targets = net.eval()(images).argmax(1)
    layers = list(sanity_cfg.get("layers") or randomizable_layers(net))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, opts in specs:
        name = Explainer(net, [(key, opts)], layer=layer).names[0]

        def explain_fn(
            model: nn.Module, x: torch.Tensor, t: torch.Tensor, k: str = key, o: Any = opts,
            n: str = name,
        ) -> torch.Tensor:  # fmt: skip
            return Explainer(model, [(k, o)], layer=layer)(x, t)[n]

        metric = run_sanity_check(net, explain_fn, images, targets, layers, **common)
        out[name] = {k: r.to_dict() for k, r in metric.compute().items()}
    return out


# --------------------------------------------------------------------------- run


def run(cfg: DictConfig) -> dict[str, Any]:
    """Explain and score; write tables, figures and a manifest into the run's folder.

    Returns:
        ``{"output_dir", "methods", "results", "n_images", "skipped_files", ...}``.
    """
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "COMPLETE"
    if done.exists() or (out / "metrics.json").exists():
        raise FileExistsError(f"{out} already holds an explain run; results are never overwritten")
    L.seed_everything(int(cfg.get("seed", 0)), workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))

    model = load_model(cfg)
    data = load_data(cfg, model)
    class_names = data.class_names or model.class_names
    layer = (
        OmegaConf.to_object(cfg.layer)
        if isinstance(cfg.get("layer"), DictConfig | list)
        else cfg.get("layer")
    )
    if hasattr(layer, "__iter__") and not isinstance(layer, str):
        layer = list(layer)  # type: ignore[arg-type]
    specs, skipped_methods = applicable_specs(
        model.net, method_specs(cfg), layer, strict=bool(cfg.get("strict_methods", False))
    )
    metrics_cfg = OmegaConf.to_container(cfg.metrics, resolve=True)
    assert isinstance(metrics_cfg, dict)

    dataset = data.dataset
    limit = cfg.get("limit")
    if limit:
        n = min(int(limit), len(dataset))  # type: ignore[arg-type]
        dataset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.get("batch_size", 16)),
        shuffle=False,
        num_workers=int(cfg.get("num_workers", 0)),
        # In-memory datasets batch themselves (__getitems__) and bring their own collate.
        collate_fn=getattr(data.dataset, "collate_fn", None),
    )
    module = ExplainModule(
        model.net,
        specs,
        layer,
        metrics_cfg,
        keep_rows=int(cfg.get("figure_rows", 8)),
        save_maps=bool(cfg.get("save_maps", False)),
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    for k in (
        "max_epochs",
        "fast_dev_run",
        "limit_train_batches",
        "limit_val_batches",
        "log_every_n_steps",
        "sync_batchnorm",  # training only (attncam's DistributedBatchNorm); explaining is eval
    ):
        trainer_kwargs.pop(k, None)
    loggers = build_loggers(cfg, out)
    trainer = L.Trainer(
        **trainer_kwargs,  # type: ignore[arg-type]
        default_root_dir=str(out),
        inference_mode=False,
        logger=loggers or False,
        callbacks=[ImagesPerSecondBar()],
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    try:
        trainer.test(module, dataloaders=loader, verbose=False)
    except SIGTERMException:
        # Lightning raises SystemExit(None) on SIGTERM, which would exit 0; COMPLETE is not written.
        log.warning("explain run stopped by SIGTERM; %s is incomplete (no COMPLETE file)", out)
        raise SystemExit(128 + signal.SIGTERM) from None
    seconds = time.perf_counter() - start
    results = module.results()
    n_images = len(dataset)  # type: ignore[arg-type]
    if not trainer.is_global_zero:
        return {"output_dir": str(out), "results": results}

    protocol = module.protocol.to_dict()
    extra = {
        "model": model.hparams.get("backbone"),
        "attention": model.hparams.get("attention"),
        "data": data.source,
        "images": n_images,
        "confidence": metrics_cfg.get("confidence", 0.95),
        "skipped_methods": skipped_methods,
        "skipped_files": data.skipped,
        "skipped_constant_channels": module.skipped_channels,
    }
    files = write_tables(out, results, protocol, extra)
    sanity_cfg = metrics_cfg.get("sanity") or {}
    if sanity_cfg.get("enabled"):
        sanity = sanity_check(
            model.net,
            specs,
            layer,
            data.dataset,
            getattr(data.dataset, "collate_fn", None),
            sanity_cfg,
            {
                "num_resamples": int(metrics_cfg.get("num_resamples", 1000)),
                "confidence": float(metrics_cfg.get("confidence", 0.95)),
            },
        )
        write_json_atomic(out / "sanity.json", sanity)
        files.append(out / "sanity.json")
        log.info("sanity check (cascading randomisation) written to %s", out / "sanity.json")
    files += write_figures(out, module, results, class_names, int(cfg.get("top", 5)))
    if module.save_maps and any(module.all_maps.values()):
        tmp = out / ".maps.npz.tmp.npz"
        np.savez_compressed(
            tmp, **{_safe(n): torch.cat(v).numpy() for n, v in module.all_maps.items() if v}
        )
        os.replace(tmp, out / "maps.npz")
        files.append(out / "maps.npz")
    predictions = [
        {
            "index": i,
            "file": (data.paths[i] if data.paths and i < len(data.paths) else None),
            **r,
            "top5_names": [class_names[c] if class_names else str(c) for c, _ in r["top5"]],
        }
        for i, r in enumerate(module.records)
    ]
    write_json_atomic(out / "predictions.json", predictions)
    files.append(out / "predictions.json")
    explainer = module.explainer
    manifest = {
        "attncam_version": __version__,
        "checkpoint": model.checkpoint,
        "checkpoint_sha256": model.checkpoint_sha256,
        "source": model.source,
        "model": model.hparams,
        "layer": explainer.layers,
        "methods": explainer.names,
        "method_specs": [{"key": k, "options": o} for k, o in specs],
        "skipped_methods": skipped_methods,
        "protocol": protocol,
        "metrics": metrics_cfg,
        "data": data.source,
        "n_images": n_images,
        "skipped_files": data.skipped,
        "seed": int(cfg.get("seed", 0)),
        "seconds": round(seconds, 2),
        "images_per_second": round(n_images / max(seconds, 1e-9), 3),
        "world_size": trainer.world_size,
        "versions": _versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "files": [str(p.relative_to(out)) for p in files],
    }
    write_json_atomic(out / "manifest.json", manifest)
    _log_wandb(loggers, out, results, files)
    done.write_text(json.dumps({"files": manifest["files"]}) + "\n")
    log.info(
        "explained %d images with %d methods in %.0f s -> %s", n_images, len(specs), seconds, out
    )
    for method, row in results.items():
        log.info(
            "%-28s AD %s  IC %s  PG %s",
            method,
            _fmt(row.get("average_drop")),
            _fmt(row.get("increase_in_confidence")),
            _fmt(row.get("pointing_game")),
        )
    return {
        "output_dir": str(out),
        "methods": explainer.names,
        "results": results,
        "n_images": n_images,
        "skipped_files": data.skipped,
        "skipped_methods": skipped_methods,
        "seconds": seconds,
    }


def _log_wandb(loggers: list[Any], out: Path, results: dict[str, Any], files: list[Path]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        try:
            import wandb

            rows = []
            cols = sorted({k for r in results.values() for k in r}, key=_metric_order)
            for m, r in results.items():
                rows.append([m, *[(r.get(c) or {}).get("value") for c in cols]])
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
