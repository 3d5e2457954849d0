"""The Lightning side of the explain stage: one test step explains a batch and feeds the metrics.

``ExplainModule`` knows no metric by name: :class:`~attncam.metrics.suite.MetricSuite` decides
which perturbations the enabled metrics need and updates them. Batches carry image ids
(:class:`WithIds`), so per-image results can be joined across methods and runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import Dataset, default_collate

from attncam.explain import Explainer
from attncam.inference import resolve_precision
from attncam.metrics.baselines import baseline_maps
from attncam.metrics.suite import MetricSuite


class WithIds(Dataset):
    """Items ``(*item, image id)`` of ``dataset`` at ``indices``; the id is the index in ``dataset``.

    Batches stay as fast as the wrapped dataset's: an in-memory dataset that batches itself
    (``__getitems__`` and ``collate_fn``) still does.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return (*self.dataset[self.indices[i]], self.indices[i])

    def __getitems__(self, positions: list[int]) -> tuple[Any, list[int]]:
        """The wrapped dataset's batch for these positions, and their ids."""
        ids = [self.indices[p] for p in positions]
        inner = getattr(self.dataset, "__getitems__", None)
        batch = inner(ids) if inner is not None else [self.dataset[i] for i in ids]
        return batch, ids

    def collate_fn(self, batch: tuple[Any, list[int]]) -> list[Any]:
        """``[images, labels, masks, ids]`` with the wrapped dataset's own collate."""
        items, ids = batch
        collate = getattr(self.dataset, "collate_fn", None) or default_collate
        return [*collate(items), torch.tensor(ids, dtype=torch.long)]


#: ``save_maps_dtype`` choices.
MAPS_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _norm(name: str) -> str:
    """A class name compared case- and separator-blind (``Tiger Cat`` = ``tiger_cat``)."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


@dataclass(frozen=True)
class TargetChoice:
    """Which class each map explains (``target=`` of the explain stage).

    Attributes:
        kind: ``protocol`` (the protocol's ``target``: predicted or label), ``class`` (one class
            for every image), ``rank`` (the ``k``-th prediction) or ``per_image``.
        cls: The class of ``kind="class"``.
        rank: ``k`` of ``kind="rank"`` (1 = the top prediction).
        by_id: Image id -> class for ``kind="per_image"``.
        text: What the tables say, e.g. ``tiger_cat (class 281)``.
    """

    kind: str = "protocol"
    cls: int = -1
    rank: int = 0
    by_id: dict[int, int] = field(default_factory=dict)
    text: str = "the protocol's target"

    def targets(self, ids: torch.Tensor, base: Any) -> torch.Tensor:
        """``(B,)`` long target classes of a batch.

        Args:
            ids: ``(B,)`` image ids.
            base: The batch's ``BaseScores`` (``targets`` of the protocol, ``logits (B, C)``).

        Raises:
            ValueError: On a class outside the model's ``C`` outputs or ``k > C``.
        """
        n_classes = int(base.logits.shape[1])
        if self.kind == "protocol":
            return base.targets
        if self.kind == "rank":
            if self.rank > n_classes:
                raise ValueError(f"target=top{self.rank} but the model has {n_classes} classes")
            return base.logits.topk(self.rank, dim=1).indices[:, self.rank - 1]
        if self.kind == "class":
            t = torch.full_like(base.targets, self.cls)
        else:
            t = torch.tensor([self.by_id[int(i)] for i in ids], device=base.targets.device)
        bad = sorted({int(c) for c in t.tolist() if not 0 <= c < n_classes})
        if bad:
            raise ValueError(f"target class(es) {bad} out of range; choose 0..{n_classes - 1}")
        return t.long()


def _class_index(value: Any, names: Sequence[str] | None) -> int:
    """A class index from an index or a class name (error: the close matches)."""
    if isinstance(value, bool):
        raise ValueError(f"target {value!r} is not a class index or name")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"target {value!r} is not a class index or name")
    if not names:
        raise ValueError(
            f"target {value!r} is a class name but the model has no class names; give an index"
        )
    normed = [_norm(n) for n in names]
    if _norm(value) in normed:
        return normed.index(_norm(value))
    close = difflib.get_close_matches(_norm(value), normed, n=5, cutoff=0.6)
    hint = ", ".join(names[normed.index(c)] for c in close) or "none close"
    raise ValueError(f"unknown class name {value!r}; close matches: {hint}")


def _class_text(cls: int, names: Sequence[str] | None) -> str:
    return f"{names[cls]} (class {cls})" if names and 0 <= cls < len(names) else f"class {cls}"


def target_choice(
    value: Any, class_names: Sequence[str] | None, ids: Sequence[int]
) -> TargetChoice:
    """Parse ``target=``: None, an index, a class name, ``topK`` or a list (one per image).

    Args:
        value: ``cfg.target``.
        class_names: The model's class names (the checkpoint's, or ImageNet's when pretrained).
        ids: The explained image ids, in order; a list target gives one class per id.

    Raises:
        ValueError: On an unknown name (listing close matches), ``top0``, or a list whose
            length is not the number of explained images.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null")):
        return TargetChoice(text="the protocol's target (metrics.protocol.target)")
    if isinstance(value, str) and re.fullmatch(r"top\d+", value.strip().lower()):
        k = int(value.strip()[3:])
        if k < 1:
            raise ValueError(f"target {value!r}: k of topK starts at 1 (top1 = the prediction)")
        return TargetChoice(kind="rank", rank=k, text=f"the model's prediction ranked {k} (top{k})")
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(ids):
            raise ValueError(
                f"target lists {len(value)} classes but {len(ids)} images are explained; "
                "give one class per image (in image_ids.json order)"
            )
        by_id = {int(i): _class_index(v, class_names) for i, v in zip(ids, value, strict=True)}
        return TargetChoice(kind="per_image", by_id=by_id, text="one class per image (a list)")
    cls = _class_index(value, class_names)
    return TargetChoice(kind="class", cls=cls, text=_class_text(cls, class_names))


class FigureRows:
    """The first ``keep`` images of the run with their maps and predictions, for the grid."""

    def __init__(self, names: Sequence[str], keep: int) -> None:
        self.keep = keep
        self.images: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.records: list[dict[str, Any]] = []
        self.maps: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def add(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        maps: Mapping[str, torch.Tensor],
        records: list[dict[str, Any]],
    ) -> None:
        """Keep images of this batch until ``keep`` are held."""
        take = self.keep - len(self.images)
        if take <= 0:
            return
        self.images.extend(images[:take].cpu())
        self.masks.extend(masks[:take].cpu())
        self.records.extend(records[:take])
        for n, held in self.maps.items():
            held.extend(maps[n][:take].float().cpu())


def _records(labels: torch.Tensor, ids: torch.Tensor, base: Any) -> list[dict[str, Any]]:
    """Label, target, prediction and top-5 classes with probabilities of each image."""
    probs = base.logits.float().softmax(-1)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    return [
        {
            "id": int(ids[i]),
            "label": int(labels[i]),
            "target": int(base.targets[i]),
            "predicted": int(base.predicted[i]),
            "top5": list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)),
        }
        for i in range(labels.shape[0])
    ]


class ExplainModule(L.LightningModule):
    """Explains each test batch with every method and updates every metric.

    Args:
        net: the classifier (pixel images in, logits out).
        specs: ``[(method key, options)]``.
        layer: CAM layer(s) or None for the model's default.
        metrics_cfg: the ``metrics`` config (protocol, enabled metrics, settings).
        keep_rows: images kept (on rank 0) for the figure grid.
        save_maps: keep every map for ``maps.npz``.
        maps_dtype: ``float32`` (default) or ``float16`` (half the size) for the kept maps.
        baselines: baseline maps scored beside the methods (``attncam.metrics.baselines``).
        grid: ``(h, w)`` of the CAM layer, the resolution of the random and oracle baselines.
        seed: seed of the random baseline.
        target: which class each map explains (``target_choice``); None: the protocol's.
    """

    def __init__(
        self,
        net: nn.Module,
        specs: list[tuple[str, dict[str, Any]]],
        layer: Any,
        metrics_cfg: Mapping[str, Any],
        keep_rows: int = 8,
        save_maps: bool = False,
        baselines: Sequence[str] = (),
        grid: tuple[int, int] = (7, 7),
        seed: int = 0,
        target: TargetChoice | None = None,
        maps_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if maps_dtype not in MAPS_DTYPES:
            raise ValueError(
                f"unknown save_maps_dtype {maps_dtype!r}; choose one of: {', '.join(MAPS_DTYPES)}"
            )
        self.maps_dtype = MAPS_DTYPES[maps_dtype]
        self.target = target or TargetChoice()
        self.net = net
        self.explainer = Explainer(net, specs, layer=layer)
        self.baselines, self.grid, self.seed = list(baselines), grid, seed
        self.names = [*self.explainer.names, *self.baselines]
        self.suite = MetricSuite.from_config(
            metrics_cfg, self.explainer.names, self.baselines, self.explainer.duplicate_of
        )
        self.protocol = self.suite.protocol
        self.rows = FigureRows(self.explainer.names, keep_rows)
        self.save_maps = save_maps
        self.all_maps: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.records: list[dict[str, Any]] = []
        self.skipped_channels: dict[str, float] = {}
        self.curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        #: Called before every perturbation forward (the progress bar listens here).
        self.on_forward: Callable[[], None] | None = None

    def on_test_start(self) -> None:
        """Build the perturbation engine on the right device."""
        self.suite.bind(self.net)
        assert self.suite.perturber is not None
        self.suite.perturber.before_forward = self._before_forward

    def _before_forward(self) -> None:
        self.stop_if_asked()
        if self.on_forward is not None:
            self.on_forward()

    def precision(self) -> dict[str, str]:
        """The metrics' forwards' precision per family and why (maps are always float32).

        ``metric_forwards`` is one word when both families agree, else ``"mixed"``; ``scores``
        covers Average Drop, Increase in Confidence, Percentage-in, ROAD and occlusion, and
        ``curves`` the deletion/insertion curves (``attncam.inference.FAMILIES``).
        """
        perturber = self.suite.perturber
        if perturber is None:  # not bound yet: what it will resolve to
            first = next(self.net.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
            requested = self.protocol.precision
            scores, why = resolve_precision(requested, device, "scores")
            curves, curves_why = resolve_precision(requested, device, "curves")
        else:
            scores, why = perturber.precision, perturber.precision_reason
            curves, curves_why = perturber.curve_precision, perturber.curve_precision_reason
        overall = scores if scores == curves else "mixed"
        return {
            "metric_forwards": overall, "scores": scores, "curves": curves, "why": why,
            "curves_why": curves_why, "maps": "float32",
        }  # fmt: skip

    def forwards_done(self) -> int:
        """Images the perturbation engine has passed through the model so far."""
        perturber = self.suite.perturber
        return perturber.images_forwarded if perturber is not None else 0

    def stop_if_asked(self) -> None:
        """Raise Lightning's SIGTERMException as soon as a SIGTERM arrived (between forwards).

        Lightning itself stops only at the end of a batch, minutes later on a CPU; this stops
        within one perturbation chunk. The interrupted batch feeds no metric: the per-image
        results of the finished batches stay exact.
        """
        trainer = self._trainer
        if trainer is not None and trainer.received_sigterm:
            raise SIGTERMException()

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        """Explain one batch and update every metric."""
        if len(batch) != 4:
            raise ValueError(
                f"an explain batch is [images, labels, masks, image ids] (wrap the dataset in "
                f"WithIds); got {len(batch)} elements"
            )
        images, labels, masks, ids = batch
        self.stop_if_asked()
        if not torch.isfinite(images).all():
            bad = (~torch.isfinite(images.flatten(1))).any(1).nonzero().flatten().tolist()
            raise ValueError(f"images {bad} of batch {batch_idx} hold NaN or inf values")
        known = labels if bool((labels >= 0).all()) else None
        base = self._explained_target(self.suite.base_scores(images, known), ids)
        exp = self.explainer.explain(images, base.targets)
        self._count_skipped_channels(exp.extras)
        maps = {**exp.maps, **baseline_maps(self.baselines, masks, ids, self.grid, self.seed)}
        self.suite.update(images, maps, masks, base, ids, labels=known)
        records = _records(labels, ids, base)
        self.records.extend(records)
        self.rows.add(images, masks, maps, records)
        if self.save_maps:
            for n in self.names:
                self.all_maps[n].append(maps[n].detach().to("cpu", self.maps_dtype))

    def _explained_target(self, base: Any, ids: torch.Tensor) -> Any:
        """``base`` with the chosen targets, and their scores, so maps and metrics agree."""
        if self.target.kind == "protocol":
            return base
        targets = self.target.targets(ids, base).to(base.targets.device)
        assert self.suite.perturber is not None
        scores = self.suite.perturber.scores(base.score_logits, targets)
        return dataclasses.replace(base, targets=targets, scores=scores)

    def _count_skipped_channels(self, extras: Mapping[str, Any]) -> None:
        for key, val in extras.items():
            if key.endswith(".skipped") and isinstance(val, torch.Tensor):
                self.skipped_channels[key] = self.skipped_channels.get(key, 0.0) + float(
                    val.float().sum()
                )

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{method: {metric: MetricResult.to_dict()}}`` after syncing across processes.

        A collective under DDP: every process calls it. Also fills ``curves`` for the figures.
        """
        out = self.suite.results()
        self.curves = self.suite.mean_curves()
        return out

    def per_image(self) -> dict[str, dict[str, dict[int, float]]]:
        """``{method: {metric: {image id: value}}}`` (a collective under DDP)."""
        return self.suite.per_image()
