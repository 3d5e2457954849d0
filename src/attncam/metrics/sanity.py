"""Model-parameter randomisation sanity check (Adebayo et al. 2018, sec. 3.1, cascading).

The layers of a copy of the model are re-initialised one by one from the top (output) down,
keeping earlier layers randomised; after each step the maps are recomputed with a caller-supplied
``explain_fn(model, images, targets) -> (B, H, W)`` and compared with the original maps by the
Spearman rank correlation and SSIM. A method that passes produces maps that decorrelate as the
weights are destroyed. The metric never imports ``attncam.explain``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attncam.metrics import functional as MF
from attncam.metrics.stats import MetricResult, PerImageMetric, keep_mask

log = logging.getLogger(__name__)

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


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


def cascading_randomization(
    model: nn.Module,
    explain_fn: ExplainFn,
    images: Tensor,
    targets: Tensor,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(layer, maps)`` after re-initialising each layer of a copy, cascading top-down.

    The original model is never modified (``copy.deepcopy``); the global RNG state is restored
    after every re-initialisation (each layer uses ``seed + index``).

    Args:
        model: The trained network.
        explain_fn: ``explain_fn(model, images, targets) -> (B, H, W)`` maps in [0, 1].
        images: ``(B, 3, H, W)``.
        targets: ``(B,)`` target classes, fixed to the original model's targets.
        layers: Dotted layer names, top first; default ``randomizable_layers(model)``.
        seed: Base seed of the re-initialisations.

    Yields:
        ``(layer name, maps (B, H, W))`` with that layer and every layer above it randomised.
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
        if not hasattr(module, "reset_parameters"):
            raise ValueError(f"layer '{name}' ({type(module).__name__}) has no reset_parameters")
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + j)
            module.reset_parameters()
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
        self, original: Tensor, randomized: Mapping[str, Tensor], keep: Tensor | None = None
    ) -> None:
        """Add a batch.

        Args:
            original: ``(B, H, W)`` maps of the trained model.
            randomized: Layer -> ``(B, H, W)`` maps after randomising down to that layer; keys
                must be exactly ``layers``.
            keep: ``(B,)`` bool, False for excluded images.
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
        self.spearman.append(torch.where(undefined, torch.zeros_like(rho), rho))
        self.ssim.append(
            MF.ssim(o_rep, r_flat, self.ssim_kernel, self.ssim_sigma).view(n_img, n_lyr)
        )

    def compute(self) -> dict[str, MetricResult]:
        """``spearman@<layer>`` and ``ssim@<layer>`` for every layer, in cascading order."""
        n_lyr = len(self.layers)
        rho = self._cat("spearman").reshape(-1, n_lyr)
        s = self._cat("ssim").reshape(-1, n_lyr)
        out: dict[str, MetricResult] = {}
        for j, name in enumerate(self.layers):
            out[f"spearman@{name}"] = self._summary(f"spearman@{name}", rho[:, j])
            out[f"ssim@{name}"] = self._summary(f"ssim@{name}", s[:, j])
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
        **metric_kwargs: Passed to ``SanityCheck`` when it is created.

    Returns:
        The updated metric.
    """
    names = list(layers) if layers is not None else randomizable_layers(model)
    original = explain_fn(model, images, targets)
    randomized = dict(cascading_randomization(model, explain_fn, images, targets, names, seed))
    metric = metric or SanityCheck(names, **metric_kwargs)
    metric.update(original, randomized)
    return metric
