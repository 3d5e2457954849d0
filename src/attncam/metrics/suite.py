"""MetricSuite: every enabled metric for every explanation method, fed from one batch.

The suite owns the dispatch that a caller would otherwise write as an if/elif chain over metric
names: each metric kind declares which model calls it needs (``METRIC_KINDS``: the confidence
table, deletion/insertion curves, ROAD, occlusion, or nothing beyond the maps), the suite runs each
needed perturbation once per batch through ``Perturber`` and feeds every metric of every method,
plus Win % for every pair of methods. Results come back as the tables' rows
(``results()``), as per-image values keyed by image id (``per_image()``) and as mean curves.

Typical use (in a Lightning module's test loop)::

    suite = MetricSuite.from_config(cfg.metrics, names=["gradcam", "gradcampp"])
    suite.bind(model)                                    # once the model is on its device
    base = suite.base_scores(images, labels)             # Y, targets, keep
    maps = explainer.explain(images, base.targets).maps  # {method: (B, H, W)}
    suite.update(images, maps, masks, base, ids)
    suite.results()["gradcam"]["average_drop"]           # MetricResult.to_dict()
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from attncam.metrics.confidence import (
    AverageDrop,
    IncreaseInConfidence,
    PercentageIn,
    WinPercentage,
)
from attncam.metrics.curves import ROAD, DeletionInsertion, OcclusionFaithfulness
from attncam.metrics.localization import (
    BoxAccuracy,
    EnergyPointingGame,
    GridPointingGame,
    MaskIoU,
    PointingGame,
    in_top_k,
    localisation_keep,
)
from attncam.metrics.perturb import DEFAULT_CHUNK_SIZE, BaseScores, Perturber
from attncam.metrics.protocol import EvalProtocol
from attncam.metrics.stats import DEFAULT_CONFIDENCE, DEFAULT_NUM_RESAMPLES, PerImageMetric
from attncam.runtime import slug

log = logging.getLogger(__name__)

#: Grid pointing game: only grid-class pairs whose class the model ranks in its top 4 count.
GRID_TOP_K = 4

#: Per-metric settings a suite accepts (``conf/metrics/*.yaml`` top-level keys of the same name).
SETTING_KEYS: tuple[str, ...] = (
    "localisation_only_correct",
    "pointing_tolerance",
    "iou_threshold",
    "box_threshold",
    "box_iou",
    "occlusion",
)
OCCLUSION_KEYS: tuple[str, ...] = ("window", "stride")


# --------------------------------------------------------------------------- one batch


@dataclass
class _Batch:
    """What one ``update`` works on: inputs, and the perturbations computed so far."""

    images: Tensor
    maps: Mapping[str, Tensor]
    masks: Tensor
    base: BaseScores
    ids: Tensor
    names: list[str]
    occlusion_grid: tuple[int, int] | None
    scored: dict[str, Any] = field(default_factory=dict)
    loc_keep: Tensor | None = None  # the localisation metrics' keep-mask (correct images only)
    cells: Tensor | None = None  # grid pointing game: the target's cell of each 2 x 2 grid


def _confidence_table(engine: Perturber, b: _Batch) -> Any:
    return engine.confidence_table(b.images, b.maps, base=b.base)


def _deletion_insertion(engine: Perturber, b: _Batch) -> Any:
    return engine.deletion_insertion(b.images, b.maps, base=b.base)


def _road(engine: Perturber, b: _Batch) -> Any:
    return {n: engine.road(b.images, b.maps[n], base=b.base) for n in b.names}


def _occlusion(engine: Perturber, b: _Batch) -> Any:
    assert b.occlusion_grid is not None
    window, stride = b.occlusion_grid
    return engine.occlusion_sensitivity(b.images, base=b.base, window=window, stride=stride)


def _alias(scored: Any, duplicates: Mapping[str, str]) -> Any:
    """Give each duplicate method the representative's perturbation results (no recomputation).

    ``scored`` is a ``{method: ...}`` dict or a dataclass whose dict fields are keyed by method.
    """
    if not duplicates:
        return scored
    tables = [scored] if isinstance(scored, dict) else [
        v for v in vars(scored).values() if isinstance(v, dict)
    ]  # fmt: skip
    for table in tables:
        for dup, rep in duplicates.items():
            if rep in table:
                table[dup] = table[rep]
    return scored


#: The model calls a metric may need, in the order they run: name -> ``f(engine, batch)``.
PERTURBATIONS: dict[str, Callable[[Perturber, _Batch], Any]] = {
    "confidence": _confidence_table,  # O and Percentage-in: ConfidenceTable
    "curves": _deletion_insertion,  # {method: Curves}
    "road": _road,  # {method: RoadScores}
    "occlusion": _occlusion,  # (B, gh, gw) score drops, shared by every method
}


# --------------------------------------------------------------------------- metric kinds


@dataclass(frozen=True)
class MetricKind:
    """How to build one metric and feed it from a batch.

    Attributes:
        build: ``build(protocol, settings, common) -> metric``; ``settings`` holds the
            ``SETTING_KEYS`` given (absent ones take the metric class's default), ``common`` the
            bootstrap settings and seed.
        needs: The entry of ``PERTURBATIONS`` it reads, or None (maps and masks only).
        feed: ``feed(metric, batch, method)`` calls the metric's ``update`` for one method.
    """

    build: Callable[[EvalProtocol, Mapping[str, Any], dict[str, Any]], PerImageMetric]
    needs: str | None
    feed: Callable[[Any, _Batch, str], None]


def _given(settings: Mapping[str, Any], **names: str) -> dict[str, Any]:
    """Constructor keywords for the settings present: ``{argument: settings[key]}``."""
    return {arg: settings[key] for arg, key in names.items() if key in settings}


def _feed_masked(metric: Any, b: _Batch, n: str) -> None:
    table = b.scored["confidence"]
    metric.update(b.base.scores, table.masked[n], b.base.keep, ids=b.ids)


def _feed_percentage_in(metric: Any, b: _Batch, n: str) -> None:
    table = b.scored["confidence"]
    metric.update(
        b.base.scores, table.percentage_in[n], b.base.keep, ids=b.ids, kept=table.kept_fraction[n]
    )


def _feed_curves(metric: Any, b: _Batch, n: str) -> None:
    metric.update(b.scored["curves"][n], b.base.keep, ids=b.ids)


def _feed_road(metric: Any, b: _Batch, n: str) -> None:
    metric.update(b.scored["road"][n], b.base.keep, ids=b.ids)


def _feed_occlusion(metric: Any, b: _Batch, n: str) -> None:
    metric.update(b.maps[n], b.scored["occlusion"], b.base.keep, ids=b.ids)


def _feed_localisation(metric: Any, b: _Batch, n: str) -> None:
    keep = b.base.keep if b.loc_keep is None else b.loc_keep
    metric.update(b.maps[n], b.masks, keep, ids=b.ids)


def _occlusion_metric(
    p: EvalProtocol, s: Mapping[str, Any], common: dict[str, Any]
) -> OcclusionFaithfulness:
    occ = dict(s.get("occlusion") or {})
    unknown = sorted(set(occ) - set(OCCLUSION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown occlusion settings {unknown}; choose from: {', '.join(OCCLUSION_KEYS)}"
        )
    return OcclusionFaithfulness(**_given(occ, window="window", stride="stride"), **common)


#: Metric key (``conf/metrics/*.yaml`` ``enabled`` entries) -> how to build and feed it.
METRIC_KINDS: dict[str, MetricKind] = {
    "average_drop": MetricKind(lambda p, s, c: AverageDrop(**c), "confidence", _feed_masked),
    "increase_in_confidence": MetricKind(
        lambda p, s, c: IncreaseInConfidence(**c), "confidence", _feed_masked
    ),
    "percentage_in": MetricKind(
        lambda p, s, c: PercentageIn(p.percentages, p.percentage_variant, **c),
        "confidence",
        _feed_percentage_in,
    ),
    "deletion_insertion": MetricKind(
        lambda p, s, c: DeletionInsertion(**c), "curves", _feed_curves
    ),
    "road": MetricKind(lambda p, s, c: ROAD(p.road_percentages, **c), "road", _feed_road),
    "occlusion_faithfulness": MetricKind(_occlusion_metric, "occlusion", _feed_occlusion),
    "pointing_game": MetricKind(
        lambda p, s, c: PointingGame(**_given(s, tolerance="pointing_tolerance"), **c),
        None,
        _feed_localisation,
    ),
    "energy_pointing_game": MetricKind(
        lambda p, s, c: EnergyPointingGame(**c), None, _feed_localisation
    ),
    "mask_iou": MetricKind(
        lambda p, s, c: MaskIoU(**_given(s, threshold="iou_threshold"), **c),
        None,
        _feed_localisation,
    ),
    "box_accuracy": MetricKind(
        lambda p, s, c: BoxAccuracy(
            **_given(s, threshold="box_threshold", iou_threshold="box_iou"), **c
        ),
        None,
        _feed_localisation,
    ),
}


def _feed_grid(metric: Any, b: _Batch, n: str) -> None:
    if b.cells is None:
        raise ValueError(
            "grid_pointing_game needs 2 x 2 grids with the target's cell: enable it with "
            "metrics.grid_pointing.enabled=true (a pass over composed grids), not in `enabled`"
        )
    keep = b.base.keep & in_top_k(b.base.logits, b.base.targets, GRID_TOP_K)
    metric.update(b.maps[n], b.cells, keep, ids=b.ids)


METRIC_KINDS["grid_pointing_game"] = MetricKind(
    lambda p, s, c: GridPointingGame(**c), None, _feed_grid
)

#: Metric keys accepted in ``conf/metrics/*.yaml`` ``enabled`` lists.
#: (grid_pointing_game is not among them: it runs in its own pass, metrics.grid_pointing.)
METRIC_KEYS: tuple[str, ...] = tuple(k for k in METRIC_KINDS if k != "grid_pointing_game")


def check_metric_keys(keys: Sequence[str]) -> list[str]:
    """The keys as a list, or an error naming the unknown ones and the valid choices.

    Raises:
        ValueError: On a key not in ``METRIC_KEYS``.
    """
    unknown = [k for k in keys if k not in METRIC_KINDS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from: {', '.join(METRIC_KEYS)}")
    return list(keys)


def _check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(
            f"unknown metric settings {unknown}; choose from: {', '.join(SETTING_KEYS)}"
        )
    return dict(settings)


def _config_parts(cfg: Mapping[str, Any]) -> tuple[EvalProtocol, list[str], dict[str, Any]]:
    """Protocol, enabled keys (default: all) and settings of a ``conf/metrics`` mapping."""
    protocol = EvalProtocol.from_dict(dict(cfg.get("protocol") or {}))
    enabled = cfg.get("enabled")
    keys = check_metric_keys(list(METRIC_KEYS if enabled is None else enabled))
    settings = {k: cfg[k] for k in SETTING_KEYS if k in cfg and cfg[k] is not None}
    return protocol, keys, settings


def build_metrics(cfg: Mapping[str, Any]) -> tuple[EvalProtocol, dict[str, PerImageMetric]]:
    """Protocol and one fresh metric per enabled key, from a ``conf/metrics`` config.

    Per-method metrics are built once per call: call it (or ``copy.deepcopy`` the result) for
    every explanation method, or use ``MetricSuite``, which does that and feeds them.
    ``WinPercentage`` and ``SanityCheck`` are built by the caller (they need a method pair / the
    layer list).

    Args:
        cfg: Mapping with ``protocol``, ``enabled``, ``num_resamples``, ``confidence`` and the
            per-metric settings (``SETTING_KEYS``) of ``conf/metrics/default.yaml``.

    Returns:
        ``(protocol, {key: metric})``, metrics in ``enabled`` order.

    Raises:
        ValueError: On an unknown metric key or setting.
    """
    protocol, keys, settings = _config_parts(cfg)
    common = {
        "num_resamples": int(cfg.get("num_resamples", DEFAULT_NUM_RESAMPLES)),
        "confidence": float(cfg.get("confidence", DEFAULT_CONFIDENCE)),
        "seed": protocol.seed,
    }
    return protocol, {k: METRIC_KINDS[k].build(protocol, settings, common) for k in keys}


# --------------------------------------------------------------------------- the suite


class MetricSuite(nn.Module):
    """Every enabled metric for every method, Win % for every pair, fed from one batch.

    Metrics are ``torchmetrics.Metric`` submodules, so they move with the suite (``.to``) and
    sync under DDP; ``results()``, ``per_image()`` and ``mean_curves()`` are collectives there.

    Args:
        names: Result names of the explanation methods, in table order.
        protocol: The evaluation protocol.
        enabled: Metric keys (``METRIC_KEYS``), in table-column order.
        win: Win % (Average-Drop based) between every pair of methods (a over b for a before b).
        num_resamples: Bootstrap resamples of every interval.
        confidence: Interval coverage.
        chunk_size: Images per forward pass of the perturbation engine.
        optimize_model: Give the engine a folded, channels-last inference copy of the model.
        settings: Per-metric settings, keys in ``SETTING_KEYS``: ``pointing_tolerance`` (px),
            ``iou_threshold``, ``box_threshold``, ``box_iou`` and ``occlusion``
            (``{window, stride}``); an absent key takes the metric class's default.
        baselines: Names of baseline maps (``metrics.baselines``) scored after the methods with
            the same metrics, never paired for Win %.
        duplicates: ``{method: representative}`` for methods whose maps equal another's by
            construction (``Explainer.duplicate_of``): their perturbation forwards are not run
            again, the representative's scores are copied; no Win % between them.

    Attributes:
        protocol: The evaluation protocol.
        names: The method names, then the baselines.
        baselines: The baseline names.
        enabled: The enabled metric keys.
        pairs: ``(a, b)`` method pairs with a Win % metric.
        method_metrics: ``ModuleDict`` ``slug(method)`` -> ``ModuleDict`` key -> metric.
        win_metrics: ``ModuleDict`` ``"<slug(a)>__vs__<slug(b)>"`` -> ``WinPercentage``.
        perturber: The perturbation engine (None before ``bind``).

    Raises:
        ValueError: On no or clashing method names, or an unknown metric key or setting.
    """

    def __init__(
        self,
        names: Sequence[str],
        protocol: EvalProtocol,
        enabled: Sequence[str],
        *,
        win: bool = True,
        num_resamples: int = DEFAULT_NUM_RESAMPLES,
        confidence: float = DEFAULT_CONFIDENCE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        optimize_model: bool = False,
        settings: Mapping[str, Any] | None = None,
        baselines: Sequence[str] = (),
        duplicates: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.baselines = list(baselines)
        self.names = [*names, *self.baselines]
        self.duplicates = dict(duplicates or {})
        stray = [n for pair in self.duplicates.items() for n in pair if n not in self.names]
        if stray:
            raise ValueError(f"duplicates name unknown methods {stray}; methods: {self.names}")
        keys = {slug(n) for n in self.names}
        if not self.names or len(keys) != len(self.names):
            raise ValueError(f"need distinct method names with distinct slugs; got {self.names}")
        self.protocol = protocol
        keys_enabled = check_metric_keys(list(enabled))
        self.enabled = frozenset(keys_enabled)
        self.chunk_size = int(chunk_size)
        self.optimize_model = bool(optimize_model)
        settings = _check_settings(settings or {})
        self.only_correct = bool(settings.pop("localisation_only_correct", True))
        common = {"num_resamples": num_resamples, "confidence": confidence, "seed": protocol.seed}
        self.method_metrics = nn.ModuleDict(
            {
                slug(n): nn.ModuleDict(
                    {k: METRIC_KINDS[k].build(protocol, settings, common) for k in keys_enabled}
                )
                for n in self.names
            }
        )
        methods = [n for n in self.names if n not in self.baselines]
        group = {n: self.duplicates.get(n, n) for n in methods}  # same map: Win % is meaningless
        pairs = [(a, b) for a, b in itertools.combinations(methods, 2) if group[a] != group[b]]
        self.pairs = pairs if win else []
        self.win_metrics = nn.ModuleDict(
            {_pair_key(a, b): WinPercentage(**common) for a, b in self.pairs}
        )
        self.needs = {METRIC_KINDS[k].needs for k in keys_enabled} - {None}
        if self.pairs:
            self.needs.add("confidence")
        first = self.method_metrics[slug(self.names[0])]
        self.occlusion_grid = (
            (first["occlusion_faithfulness"].window, first["occlusion_faithfulness"].stride)
            if "occlusion_faithfulness" in first
            else None
        )
        self.perturber: Perturber | None = None

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        names: Sequence[str],
        baselines: Sequence[str] = (),
        duplicates: Mapping[str, str] | None = None,
    ) -> MetricSuite:
        """A suite from the ``metrics`` config (``conf/metrics/default.yaml``).

        Args:
            cfg: ``protocol``, ``enabled`` (default: every metric), ``win`` (default False),
                ``num_resamples``, ``confidence``, ``chunk_size``, ``optimize_model`` and the
                ``SETTING_KEYS``; other keys (e.g. ``sanity``) are not the suite's.
            names: Result names of the explanation methods.
            baselines: Names of baseline maps scored beside them.
            duplicates: ``{method: representative}`` of methods with identical maps.

        Raises:
            ValueError: On an unknown metric key, setting or protocol key, naming the valid ones.
        """
        protocol, keys, settings = _config_parts(cfg)
        return cls(
            names,
            protocol,
            keys,
            win=bool(cfg.get("win", False)),
            num_resamples=int(cfg.get("num_resamples", DEFAULT_NUM_RESAMPLES)),
            confidence=float(cfg.get("confidence", DEFAULT_CONFIDENCE)),
            chunk_size=int(cfg.get("chunk_size", DEFAULT_CHUNK_SIZE)),
            optimize_model=bool(cfg.get("optimize_model", False)),
            settings=settings,
            baselines=baselines,
            duplicates=duplicates,
        )

    # ------------------------------------------------------------------ per batch

    def bind(self, model: nn.Module) -> None:
        """Build the perturbation engine for ``model`` (call once it is on its device)."""
        self.perturber = Perturber(
            model, self.protocol, chunk_size=self.chunk_size, optimize=self.optimize_model
        )

    def _engine(self) -> Perturber:
        if self.perturber is None:
            raise RuntimeError("MetricSuite has no model: call bind(model) before scoring")
        return self.perturber

    def base_scores(self, images: Tensor, labels: Tensor | None) -> BaseScores:
        """``Y``, targets and the protocol's keep-mask: one forward pass per image.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            labels: ``(B,)`` ground-truth classes; None, or any label ``< 0`` (unlabelled image
                files), means no labels.

        Returns:
            ``BaseScores`` (targets: the protocol's ``target``).
        """
        has_labels = labels is not None and bool((labels >= 0).all())
        return self._engine().base_scores(images, labels=labels if has_labels else None)

    def update(
        self,
        images: Tensor,
        maps: Mapping[str, Tensor],
        masks: Tensor,
        base: BaseScores,
        ids: Tensor,
        labels: Tensor | None = None,
        cells: Tensor | None = None,
    ) -> None:
        """Run the perturbations the enabled metrics need and update every metric.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            maps: Method name -> ``(B, H, W)`` maps in [0, 1]; every name in ``names``.
            masks: ``(B, H, W)`` bool ground truth (all False: no annotation).
            base: ``base_scores(images, labels)``.
            ids: ``(B,)`` integer image ids (e.g. dataset indices), the keys of ``per_image()``.
            labels: ``(B,)`` ground truth; with ``localisation_only_correct`` (default true) the
                localisation metrics leave misclassified images out (counted as ``excluded``).
            cells: ``(B,)`` the target's cell (0..3) of each 2 x 2 grid, for the grid pointing
                game (Böhle et al. 2021); pairs outside the model's top 4 are left out.

        Raises:
            ValueError: On a missing method's maps or ids of the wrong shape.
        """
        missing = [n for n in self.names if n not in maps]
        if missing:
            raise ValueError(f"maps for {missing} missing; got maps for: {', '.join(maps)}")
        n_img = images.shape[0]
        if not isinstance(ids, Tensor) or ids.shape != (n_img,):
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a ({n_img},) integer tensor; got {got}")
        unique = [n for n in self.names if n not in self.duplicates]
        distinct = {n: maps[n] for n in unique}
        batch = _Batch(images, distinct, masks, base, ids, unique, self.occlusion_grid)
        batch.loc_keep = localisation_keep(base.keep, base.predicted, labels, self.only_correct)
        batch.cells = cells
        engine = self._engine()
        for name, compute in PERTURBATIONS.items():
            if name in self.needs:
                batch.scored[name] = _alias(compute(engine, batch), self.duplicates)
        batch.maps = maps
        for n in self.names:
            for key, metric in self.method_metrics[slug(n)].items():
                METRIC_KINDS[key].feed(metric, batch, n)
        for a, b in self.pairs:
            table = batch.scored["confidence"]
            self.win_metrics[_pair_key(a, b)].update(
                base.scores, table.masked[a], table.masked[b], base.keep, ids=ids
            )

    # ------------------------------------------------------------------ results

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{method: {metric key: MetricResult.to_dict()}}`` plus ``win_vs_<b>`` for pairs.

        A collective under DDP: every process calls it.
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for n in self.names:
            row: dict[str, dict[str, Any]] = {}
            for key, metric in self.method_metrics[slug(n)].items():
                res = metric.compute()
                if isinstance(res, Mapping):
                    for sub, r in res.items():
                        row[str(sub)] = r.to_dict()
                else:
                    row[key] = res.to_dict()
            out[n] = row
        for a, b in self.pairs:
            out[a][f"win_vs_{b}"] = self.win_metrics[_pair_key(a, b)].compute().to_dict()
        return out

    def per_image(self) -> dict[str, dict[str, dict[int, float]]]:
        """``{method: {metric key: {image id: value}}}`` for the keys of ``results()``.

        Win % is not included. A collective under DDP: every process calls it.
        """
        out: dict[str, dict[str, dict[int, float]]] = {}
        for n in self.names:
            row: dict[str, dict[int, float]] = {}
            for metric in self.method_metrics[slug(n)].values():
                row.update(metric.per_image())
            out[n] = row
        return out

    def mean_curves(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Mean ``(fractions, deletion, insertion)`` curves per method, on CPU, for plotting.

        Methods without a valid curve are left out (logged; the tables count the skips). A
        collective under DDP: every process calls it.
        """
        out = {}
        for n in self.names:
            mm = self.method_metrics[slug(n)]
            if "deletion_insertion" not in mm:
                continue
            try:
                c = mm["deletion_insertion"].mean_curves()
            except ValueError as err:  # no valid curve: reported in the table's skipped counts
                log.warning("no deletion/insertion curve for %s: %s", n, err)
                continue
            out[n] = (c["fractions"].cpu(), c["deletion"].cpu(), c["insertion"].cpu())
        return out


def _pair_key(a: str, b: str) -> str:
    return f"{slug(a)}__vs__{slug(b)}"


__all__ = [
    "METRIC_KEYS",
    "METRIC_KINDS",
    "OCCLUSION_KEYS",
    "PERTURBATIONS",
    "SETTING_KEYS",
    "MetricKind",
    "MetricSuite",
    "build_metrics",
    "check_metric_keys",
    "slug",
]
