"""The explain stage's sanity check: cascading weight randomisation (``metrics=full``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attncam.explain import Explainer
from attncam.metrics.sanity import randomizable_layers, run_sanity_check


def sanity_check(
    net: nn.Module,
    specs: list[tuple[str, dict[str, Any]]],
    layer: Any,
    dataset: Dataset,
    collate: Any,
    sanity_cfg: Mapping[str, Any],
    common: Mapping[str, Any],
    explained: Sequence[tuple[int, int]] | None = None,
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Cascading weight randomisation (Adebayo et al. 2018) for every method.

    The first ``num_images`` explained images are explained for the run's target class of each
    (``target=``; the predicted class by default) by the trained model, then by copies whose
    layers are re-initialised from the top down; Spearman rank correlation and SSIM to the
    original map per layer (``attncam.metrics.sanity``).

    Args:
        explained: ``[(image id, target class)]`` of the run's explained images, in order; None:
            the dataset's first images, each for the trained model's predicted class.

    Returns:
        ``({method: {"spearman@<layer>": result, "ssim@<layer>": result}}, layers in cascade
        order)``.
    """
    wanted = int(sanity_cfg.get("num_images") or 8)
    if explained is None:
        ids = list(range(min(wanted, len(dataset))))  # type: ignore[arg-type]
    else:
        ids = [int(i) for i, _ in explained[:wanted]]
    subset = torch.utils.data.Subset(dataset, ids)
    images = next(iter(DataLoader(subset, batch_size=len(ids), collate_fn=collate)))[0]
    if explained is None:
        with torch.no_grad():
            targets = net.eval()(images).argmax(1)
    else:
        targets = torch.tensor([int(t) for _, t in explained[: len(ids)]], dtype=torch.long)
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
    return out, layers
