"""Model-parameter randomisation sanity check (Adebayo et al. 2018, sec. 3.1, cascading).

The layers of a copy of the model are re-initialised one by one from the top (output) down,
keeping earlier layers randomised; after each step the maps are recomputed with a caller-supplied
``explain_fn(model, images, targets) -> (B, H, W)`` and compared with the original maps by the
Spearman rank correlation and SSIM. A layer is either one module (``randomizable_layers``,
``reset_parameters`` of that module) or a whole block (``block_layers`` with ``recursive=True``:
every parameterised submodule and BatchNorm statistics). A method that passes produces maps that
decorrelate as the weights are destroyed. The metric never imports ``attncam.explain``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from attncam.metrics import functional as MF
from attncam.metrics.stats import MetricResult, PerImageMetric, keep_mask

log = logging.getLogger(__name__)

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
MapsT = TypeVar("MapsT")


def randomizable_layers(model: nn.Module) -> list[str]:
    """Dotted names of the leaf modules with their own parameters and ``reset_parameters``,
    ordered from the top (output) of the network down (reverse registration order).

    Args:
        model: The network.

    Returns:
        Layer names, top first.
    """
    names = [
        name
        for name, m in model.named_modules()
        if name
        and hasattr(m, "reset_parameters")
        and any(True for _ in m.parameters(recurse=False))
    ]
    return names[::-1]


def block_layers(model: nn.Module, classifier: str) -> list[str]:
    """Cascading-randomisation units block by block, top (output) first.

    The classifier, then every module with its own parameters in ``head`` (bottom-up), then each
    block of ``features``: the children of a multi-module ``nn.Sequential`` stage (residual blocks,
    inception modules) one by one, any other child with parameters as one unit, down to the stem.
    Adebayo et al. (2018) randomise block by block for Inception v3. Reads the module tree only.
    Use with ``cascading_randomization(..., recursive=True)``.

    Args:
        model: A network with ``features`` and ``head`` submodules (an ``AttentionNet``).
        classifier: Dotted name of the final linear layer (``AttentionNet.classifier_name``).

    Returns:
        Dotted module names, top first.

    Raises:
        ValueError: If ``model`` has no ``features`` or ``head`` submodule, or no ``classifier``.
    """
    try:
        head, features = model.get_submodule("head"), model.get_submodule("features")
        model.get_submodule(classifier)
    except AttributeError as err:
        children = ", ".join(n for n, _ in model.named_children())
        raise ValueError(
            f"block_layers needs 'features', 'head' and the classifier '{classifier}' "
            f"submodules; the model has children: {children}"
        ) from err
    groups: list[str] = [classifier]
    for name, m in reversed(list(head.named_modules())):
        full = f"head.{name}"
        if name and full != classifier and _has_own_parameters(m):
            groups.append(full)
    for name, child in reversed(list(features.named_children())):
        subs = list(child.named_children())
        if isinstance(child, nn.Sequential) and len(subs) > 1:
            for sub, m in reversed(subs):
                if any(True for _ in m.parameters()):
                    groups.append(f"features.{name}.{sub}")
        elif any(True for _ in child.parameters()):
            groups.append(f"features.{name}")
    return groups


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _reinitialise(module: nn.Module, name: str, recursive: bool) -> None:
    """Re-initialise ``module`` with the global RNG (the caller seeds and restores it).

    Non-recursive: ``module.reset_parameters()``. Recursive: every submodule with parameters of
    its own and ``reset_parameters``, in registration order, and BatchNorm running statistics.
    """
    if not recursive:
        if not hasattr(module, "reset_parameters"):
            raise ValueError(f"layer '{name}' ({type(module).__name__}) has no reset_parameters")
        module.reset_parameters()
        return
    for m in module.modules():
        if hasattr(m, "reset_parameters") and _has_own_parameters(m):
            m.reset_parameters()
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()


def cascading_randomization(
    model: nn.Module,
    explain_fn: Callable[[nn.Module, Tensor, Tensor], MapsT],
    images: Tensor,
    targets: Tensor,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    *,
    recursive: bool = False,
) -> Iterator[tuple[str, MapsT]]:
    """Yield ``(layer, maps)`` after re-initialising each layer of a copy, cascading top-down.

    Adebayo et al. 2018, sec. 3.1. The original model is never modified (one
    ``copy.deepcopy``, randomised cumulatively); layer ``j`` is re-initialised with the global
    RNG seeded ``seed + j`` inside ``torch.random.fork_rng``, so the caller's RNG state is
    unchanged.

    Args:
        model: The trained network.
        explain_fn: ``explain_fn(model, images, targets)``, e.g. ``(B, H, W)`` maps in [0, 1]
            or a mapping method -> maps; whatever it returns is yielded.
        images: ``(B, 3, H, W)``.
        targets: ``(B,)`` target classes, fixed to the original model's targets.
        layers: Dotted module names, top first; default ``randomizable_layers(model)``.
        seed: Base seed of the re-initialisations.
        recursive: Re-initialise whole blocks: every submodule with parameters (recursively)
            and BatchNorm running statistics, for units such as ``block_layers(model, ...)``.
            Default: the named module's own ``reset_parameters()`` only.

    Yields:
        ``(layer name, explain_fn(randomised copy, images, targets))`` with that layer and every
        layer above it randomised.

    Raises:
        ValueError: On an empty layer list, an unknown layer, or (non-recursive) a layer without
            ``reset_parameters``.
    """
    names = list(layers) if layers is not None else randomizable_layers(model)
    if not names:
        raise ValueError("no layer to randomise: the model has no module with reset_parameters")
    randomized = copy.deepcopy(model)
    devices = [images.device] if images.device.type == "cuda" else []
    for j, name in enumerate(names):
        try:
            module = randomized.get_submodule(name)
        except AttributeError as err:
            valid = ", ".join(randomizable_layers(model)[:10])
            raise ValueError(f"unknown layer '{name}'; valid layers include: {valid}, ...") from err
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + j)
            _reinitialise(module, name, recursive)
        yield name, explain_fn(randomized, images, targets)


class SanityCheck(PerImageMetric):
    """Per-layer Spearman rank correlation and SSIM between original and randomised maps.

    Adebayo et al. 2018, sec. 3.1 (cascading randomisation); SSIM: Wang et al. 2004, Gaussian
    window 11, sigma 1.5. A constant map has no ranks: its correlation is taken as 0 (no
    association) and counted per layer (``constant_maps``), never NaN. Lower is better (the map
    depends on the weights).

    Args:
        layers: Layer names in the cascading order, as yielded by ``cascading_randomization``.
        ssim_kernel: SSIM window size.
        ssim_sigma: SSIM window standard deviation.
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = False

    def __init__(
        self,
        layers: Sequence[str],
        ssim_kernel: int = 11,
        ssim_sigma: float = 1.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not layers:
            raise ValueError("layers is empty; pass the randomised layer names")
        self.layers = list(layers)
        self.ssim_kernel, self.ssim_sigma = int(ssim_kernel), float(ssim_sigma)
        self._add_values("spearman")
        self._add_values("ssim")
        self.add_state(
            "constant_maps",
            default=torch.zeros(len(self.layers), dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        original: Tensor,
        randomized: Mapping[str, Tensor],
        keep: Tensor | None = None,
        *,
        ids: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            original: ``(B, H, W)`` maps of the trained model.
            randomized: Layer -> ``(B, H, W)`` maps after randomising down to that layer; keys
                must be exactly ``layers``.
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        if list(randomized) != self.layers:
            raise ValueError(
                f"randomized maps are for layers {list(randomized)[:5]}...; expected "
                f"{self.layers[:5]}... in that order"
            )
        finite = MF.check_maps(original, name="original")
        b, h, w = original.shape
        stack = torch.stack([randomized[n] for n in self.layers], dim=1)  # (B, Lyr, H, W)
        for n in self.layers:
            finite = finite & MF.check_maps(randomized[n], b, (h, w), f"randomized['{n}']")
        checks = [("excluded", keep_mask(keep, original)), ("non_finite", finite)]
        valid = self._filter(torch.ones_like(finite), checks)
        o, r = original[valid].float(), stack[valid].float()
        n_img, n_lyr = r.shape[:2]
        o_rep = o[:, None].expand_as(r).reshape(-1, h, w)
        r_flat = r.reshape(-1, h, w)
        rho = MF.spearman(o_rep, r_flat).view(n_img, n_lyr)
        undefined = ~torch.isfinite(rho)
        self.constant_maps += undefined.sum(0).to(self.constant_maps.device)
        self._append_valid(
            ids,
            valid,
            spearman=torch.where(undefined, torch.zeros_like(rho), rho),
            ssim=MF.ssim(o_rep, r_flat, self.ssim_kernel, self.ssim_sigma).view(n_img, n_lyr),
        )

    def _columns(self) -> dict[str, Tensor]:
        n_lyr = len(self.layers)
        rho = self.values("spearman").reshape(-1, n_lyr)
        s = self.values("ssim").reshape(-1, n_lyr)
        out: dict[str, Tensor] = {}
        for j, name in enumerate(self.layers):
            out[f"spearman@{name}"] = rho[:, j]
            out[f"ssim@{name}"] = s[:, j]
        return out

    def compute(self) -> dict[str, MetricResult]:
        """``spearman@<layer>`` and ``ssim@<layer>`` for every layer, in cascading order."""
        out = self._summaries()
        if int(self.constant_maps.sum()):
            log.warning(
                "sanity check: constant maps (correlation taken as 0) per layer: %s",
                self.constant_map_counts(),
            )
        return out

    def constant_map_counts(self) -> dict[str, int]:
        """Number of images whose map was constant (correlation undefined), per layer."""
        return dict(zip(self.layers, self.constant_maps.tolist(), strict=True))


def run_sanity_check(
    model: nn.Module,
    explain_fn: ExplainFn,
    images: Tensor,
    targets: Tensor,
    layers: Sequence[str] | None = None,
    metric: SanityCheck | None = None,
    seed: int = 0,
    *,
    recursive: bool = False,
    **metric_kwargs: Any,
) -> SanityCheck:
    """Run the cascading randomisation on one batch and feed a ``SanityCheck`` metric.

    Args:
        model: The trained network (left unchanged).
        explain_fn: ``explain_fn(model, images, targets) -> (B, H, W)``.
        images: ``(B, 3, H, W)``.
        targets: ``(B,)`` target classes.
        layers: Layers, top first; default ``randomizable_layers(model)``.
        metric: Metric to update (created when None; its layers must match).
        seed: Base seed of the re-initialisations.
        recursive: Re-initialise whole blocks (see ``cascading_randomization``).
        **metric_kwargs: Passed to ``SanityCheck`` when it is created.

    Returns:
        The updated metric.
    """
    names = list(layers) if layers is not None else randomizable_layers(model)
    original = explain_fn(model, images, targets)
    randomized = dict(
        cascading_randomization(
            model, explain_fn, images, targets, names, seed, recursive=recursive
        )
    )
    metric = metric or SanityCheck(names, **metric_kwargs)
    metric.update(original, randomized)
    return metric
