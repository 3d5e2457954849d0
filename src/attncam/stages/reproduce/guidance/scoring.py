"""Maps and per-image scores of one trained arm: methods, controls and baselines on one tensor.

For an arm with attention, every map is computed at the attention's own site: Grad-CAM explains
the attention module's input ``F`` and attention-guided Grad-CAM (``cbam_output``) its output
``F''``, so the two differ only by the attention gating. Controls computed from the same model:

- ``ag_shuffled_gate``: attention-guided Grad-CAM with the spatial gate ``M_s`` of another test
  image (a seeded derangement) put in place of the image's own during the forward pass: if the
  image's gate carries information, this control is worse;
- ``gradcam_x_centre``: Grad-CAM times the centre prior (a map guided by a gate that knows
  nothing of the image);
- ``attention``: ``M_s`` alone, upsampled (class-agnostic);
- the baselines ``baseline_centre``, ``baseline_random`` and ``baseline_oracle``.

Every map is scored by one ``MetricSuite`` (calibrated scores, deletion / insertion, pointing
games) on the test images and by a second one on the 2 x 2 grids (grid pointing game), plus the
pixel AUC of the map against the object mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attncam.explain import Explainer
from attncam.explain.hooks import capture
from attncam.explain.methods.base import normalize_maps
from attncam.metrics import functional as MF
from attncam.metrics.baselines import BASELINES, baseline_maps, centre_prior
from attncam.metrics.calibration import calibrate
from attncam.metrics.suite import MetricSuite
from attncam.runtime import eval_mode
from attncam.stages.grid_pass import _suite_config as grid_suite_config
from attncam.stages.reproduce.guidance.data import Data, as_float
from attncam.stages.reproduce.guidance.heads import Arm, Tail, attention_module, cache_site

#: The paper's baselines (An & Joe tables 3 and 4) and the torchcam 0.2.0 variants.
PAPER_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("gradcampp", {}), ("smoothgradcampp", {}), ("xgradcam", {}),
    ("gradcampp", {"variant": "torchcam020"}), ("smoothgradcampp", {"variant": "torchcam020"}),
]  # fmt: skip
SHUFFLED, CENTRED = "ag_shuffled_gate", "gradcam_x_centre"


def derangement(n: int, seed: int) -> Tensor:
    """A seeded permutation of ``range(n)`` without fixed points (``n >= 2``)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(1)
    return out


def gate_tap(net: nn.Module) -> str:
    """The dotted name of the spatial gate's output (``M_s``) of the single attention module."""
    attn = next(n for n, m in net.named_modules() if m is attention_module(net))  # type: ignore[arg-type]
    return f"{attn}.spatial_gate.tap"


@torch.no_grad()
def raw_gates(net: nn.Module, images: Tensor, batch: int) -> Tensor:
    """``M_s`` ``(N, h, w)`` of every image, in (0, 1), at the attention's grid."""
    tap, out = gate_tap(net), []
    with eval_mode(net):
        for s in range(0, images.shape[0], batch):
            with capture(net, [tap]) as acts:
                net(as_float(images[s : s + batch]))
            out.append(acts[tap][:, 0].float())
    return torch.cat(out)


@contextlib.contextmanager
def foreign_gate(net: nn.Module, gates: Tensor) -> Iterator[dict[str, Tensor]]:
    """While open, the spatial gate outputs ``gates[state["ids"]]`` instead of its own map."""
    state: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
        return gates[state["ids"]][:, None].to(out.dtype).expand_as(out).contiguous()

    handle = net.get_submodule(gate_tap(net)).register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def with_controls(arm: Arm) -> bool:
    """Whether the arm's maps include ``M_s`` and the derived controls (not for control arms,
    whose own maps are the control: Grad-CAM and attention-guided only)."""
    return arm.has_attention and arm.extra.get("role") != "control"


def method_specs(arm: Arm, net: nn.Module, paper: bool) -> tuple[str, list[Any]]:
    """``(Grad-CAM's layer, method specs)`` of an arm: at the attention's input when it has one."""
    layer = cache_site(arm, net)  # type: ignore[arg-type]
    specs: list[Any] = ["gradcam"]
    if arm.has_attention:
        specs += ["attention_guided", *(["attention"] if with_controls(arm) else [])]
    if paper:
        specs += PAPER_SPECS
    return layer, specs


def temperature(tail: Tail, feats: Tensor, labels: Tensor) -> float:
    """The calibration temperature of the arm on the validation split (Guo et al. 2017)."""
    with torch.no_grad(), eval_mode(tail):
        logits = tail(feats)
    return float(calibrate(logits, labels).temperature)


def suite_config(
    m: DictConfig, temp: float, enabled: Sequence[str] | None = None
) -> dict[str, Any]:
    """The main pass's metrics settings (``guidance.metrics``) with the fitted temperature."""
    cfg = OmegaConf.to_container(m, resolve=True)
    assert isinstance(cfg, dict)
    cfg["protocol"] = {**cfg.get("protocol", {}), "temperature": temp}
    if enabled is not None:
        cfg["enabled"] = list(enabled)
    return cfg


def pixel_auc(maps: Tensor, masks: Tensor) -> Tensor:
    """Per image, the probability that an object pixel outranks a background pixel (ties half).

    The Mann-Whitney form of the ROC AUC of the map as a detector of the object's pixels; a
    constant map scores 0.5. NaN for an image without object or background pixels.
    """
    pos = masks.flatten(1)
    n = pos.shape[1]
    n_pos = pos.sum(1).double()
    ranks = MF.rankdata(maps.flatten(1).double())
    u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
    auc = u / (n_pos * (n - n_pos))
    return torch.where((n_pos > 0) & (n_pos < n), auc, torch.nan).float()


def gate_contrast(gates: Tensor, masks: Tensor, cover: float = 0.25) -> Tensor:
    """Per image, mean ``M_s`` on object cells over mean ``M_s`` on cells without object pixels.

    Cells of the attention's grid count as on the object when the mask covers at least
    ``cover`` of them; NaN when an image has no such cell or no empty cell. 1 means the gate
    does not single the object out.
    """
    grid = tuple(gates.shape[-2:])
    frac = torch.nn.functional.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
    on, off = frac >= cover, frac == 0
    num = (gates * on).flatten(1).sum(1) / on.flatten(1).sum(1)
    den = (gates * off).flatten(1).sum(1) / off.flatten(1).sum(1)
    return num / den


def _batches(n: int, size: int) -> Iterator[Tensor]:
    for s in range(0, n, size):
        yield torch.arange(s, min(n, s + size))


def maps_with_controls(
    explainer: Explainer,
    net: nn.Module,
    x: Tensor,
    targets: Tensor,
    ids: Tensor,
    shuffled: tuple[Explainer, Tensor] | None,
) -> dict[str, Tensor]:
    """The methods' maps and the derived controls for one batch."""
    exp = explainer.explain(x, targets)
    maps = {str(k): v for k, v in exp.maps.items()}
    if shuffled is not None:
        ag, gates = shuffled
        with foreign_gate(net, gates) as state:
            state["ids"] = ids
            maps[SHUFFLED] = ag.explain(x, targets).maps["attention_guided"]
    if "attention" in maps:
        prior = centre_prior(x.shape[0], tuple(x.shape[-2:]))  # type: ignore[arg-type]
        maps[CENTRED] = normalize_maps(maps["gradcam"] * prior)
    return maps


def _grid_shape(explainer: Explainer, size: int) -> tuple[int, int]:
    sizes = explainer.layer_sizes((size, size))
    return sizes[explainer.layers[0]]


def score_test(
    arm: Arm,
    net: nn.Module,
    data: Data,
    g: DictConfig,
    temp: float,
    paper: bool,
    seed: int,
    enabled: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-image scores of every map of ``net`` on the test split (and the gate measures).

    ``enabled``: the metrics of the main pass (default ``guidance.metrics.enabled``).
    """
    layer, specs = method_specs(arm, net, paper)
    explainer = Explainer(net, specs, layer=layer)
    grid = _grid_shape(explainer, data.config.image_size)
    shuffled = None
    gates = raw_gates(net, data.test.images, int(g.batch_size)) if with_controls(arm) else None
    if gates is not None:
        perm = derangement(gates.shape[0], seed)
        shuffled = (Explainer(net, ["attention_guided"], layer=layer), gates[perm])
    names = [*explainer.names, *([SHUFFLED, CENTRED] if gates is not None else [])]
    suite = MetricSuite.from_config(suite_config(g.metrics, temp, enabled), names, list(BASELINES))
    suite.bind(net)
    auc: dict[str, dict[int, float]] = {}
    for ids in _batches(len(data.test), int(g.batch_size)):
        x, masks = as_float(data.test.images[ids]), data.test.masks[ids]
        base = suite.base_scores(x, data.test.labels[ids])
        maps = maps_with_controls(explainer, net, x, base.targets, ids, shuffled)
        maps.update(baseline_maps(list(BASELINES), masks, ids, grid, seed))
        suite.update(x, maps, masks, base, ids, labels=data.test.labels[ids])
        for name, m in maps.items():
            vals = pixel_auc(m.detach(), masks)
            auc.setdefault(name, {}).update(zip(ids.tolist(), vals.tolist(), strict=True))
    values = suite.per_image()
    for name, per in auc.items():
        values[name]["pixel_auc"] = per
    out: dict[str, Any] = {"per_image": values, "grid": list(grid), "layer": layer,
                           "temperature": temp, "names": names}  # fmt: skip
    if gates is not None:
        contrast = gate_contrast(gates, data.test.masks)
        out["gate"] = {"contrast": dict(enumerate(contrast.tolist())),
                       "range": [float(gates.min()), float(gates.max())]}  # fmt: skip
    return out


def score_grids(
    arm: Arm, net: nn.Module, data: Data, g: DictConfig, temp: float, seed: int
) -> dict[str, dict[int, float]]:
    """Per grid-class pair, the grid pointing game of every map (Böhle et al. 2021).

    The shuffled-gate control takes the gate of another grid (a derangement of the grids).
    """
    layer, specs = method_specs(arm, net, paper=False)
    explainer = Explainer(net, specs, layer=layer)
    grid = _grid_shape(explainer, data.config.image_size)
    cfg = grid_suite_config(suite_config(g.metrics, temp))
    gs = data.grids
    shuffled = None
    if with_controls(arm):
        gates = raw_gates(net, gs.images, int(g.batch_size))
        other = gates[derangement(gates.shape[0], seed)]
        shuffled = (Explainer(net, ["attention_guided"], layer=layer), other)
    names = [*explainer.names, *([SHUFFLED, CENTRED] if shuffled is not None else [])]
    suite = MetricSuite.from_config(cfg, names, list(BASELINES))
    suite.bind(net)
    for ids in _batches(len(gs) * 4, int(g.batch_size)):
        src, cells = ids // 4, ids % 4
        x = as_float(gs.images[src])
        masks = gs.segments[src] == cells[:, None, None].to(gs.segments.dtype)
        base = suite.base_scores(x, gs.classes[src, cells])
        maps = maps_with_controls(explainer, net, x, base.targets, src, shuffled)  # gates by grid
        maps.update(baseline_maps(list(BASELINES), masks, ids, grid, seed))
        suite.update(x, maps, masks, base, ids, cells=cells)
    return {n: v.get("grid_pointing_game", {}) for n, v in suite.per_image().items()}


def merge_grid(test: dict[str, Any], grids: Mapping[str, Mapping[int, float]]) -> None:
    """Add the grid pointing game's pairs to the test scores, by map name."""
    for name, per in grids.items():
        test["per_image"].setdefault(name, {})["grid_pointing_game"] = dict(per)


__all__ = ["PAPER_SPECS", "derangement", "foreign_gate", "gate_contrast", "merge_grid",
           "maps_with_controls", "method_specs", "pixel_auc", "with_controls", "raw_gates", "score_grids", "score_test",
           "suite_config", "temperature"]  # fmt: skip
