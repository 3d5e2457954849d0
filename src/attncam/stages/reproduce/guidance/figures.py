"""The guidance report's figures: maps of the compared methods and controls, and the effects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from attncam.explain import Explainer  # noqa: E402
from attncam.metrics.baselines import oracle_map  # noqa: E402
from attncam.stages.reproduce.guidance.data import Data, as_float  # noqa: E402
from attncam.stages.reproduce.guidance.heads import Arm  # noqa: E402
from attncam.stages.reproduce.guidance.scoring import (  # noqa: E402
    derangement,
    maps_with_controls,
    method_specs,
    raw_gates,
)

COLUMNS = [("gradcam", "Grad-CAM (F)"), ("attention_guided", "attention-guided (F'')"),
           ("attention", "M_s alone"), ("ag_shuffled_gate", "AG, another image's M_s"),
           ("gradcam_x_centre", "Grad-CAM x centre"), ("baseline_oracle", "oracle")]  # fmt: skip


def _maps(arm: Arm, net: Any, data: Data, rows: int, seed: int) -> tuple[torch.Tensor, dict]:
    """The first ``rows`` test images' maps, controls included, as the scoring computes them."""
    layer, specs = method_specs(arm, net, paper=False)
    x = as_float(data.test.images[:rows])
    gates = raw_gates(net, data.test.images, 32)
    shuffled = (
        Explainer(net, ["attention_guided"], layer=layer),
        gates[derangement(len(gates), seed)],
    )
    with torch.no_grad():
        targets = net(x).argmax(1)
    maps = maps_with_controls(Explainer(net, specs, layer=layer), net, x, targets,
                              torch.arange(rows), shuffled)  # fmt: skip
    maps["baseline_oracle"] = oracle_map(data.test.masks[:rows], tuple(gates.shape[-2:]))  # type: ignore[arg-type]
    return x, {k: v.detach() for k, v in maps.items()}


def maps_figure(arm: Arm, net: Any, data: Data, rows: int, seed: int, path: Path) -> str:
    """Rows of test images: the image with its object outlined, then each map as an overlay."""
    x, maps = _maps(arm, net, data, rows, seed)
    fig, axes = plt.subplots(rows, len(COLUMNS) + 1, figsize=(2.0 * (len(COLUMNS) + 1), 2.0 * rows))
    for r in range(rows):
        img = x[r].permute(1, 2, 0).numpy()
        mask = data.test.masks[r].numpy()
        axes[r, 0].imshow(img)
        axes[r, 0].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        for c, (key, title) in enumerate(COLUMNS, start=1):
            axes[r, c].imshow(img)
            axes[r, c].imshow(maps[key][r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[r, c].contour(mask, levels=[0.5], colors="white", linewidths=0.6)
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image (object outlined)", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def effects_figure(primary: dict[str, Any], path: Path) -> str:
    """Per primary endpoint: each seed's effect, the pooled interval and the +-SESOI band."""
    comps = [c for c in primary["comparisons"] if not c.get("missing")]
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 3.2), squeeze=False)
    for ax, c in zip(axes[0], comps, strict=True):
        ax.axvspan(-c["sesoi"], c["sesoi"], color="0.9", label="+-SESOI")
        ax.axvline(0, color="0.5", lw=0.8)
        seeds = np.arange(len(c["per_seed"]))
        ax.scatter(c["per_seed"], seeds, color="tab:blue", s=18, label="seed mean")
        lo, hi = c["ci"]
        ax.errorbar([c["estimate"]], [-1], xerr=[[c["estimate"] - lo], [hi - c["estimate"]]],
                    fmt="o", color="k", capsize=3, label=f"pooled, {c['ci_level']:.1%} CI")  # fmt: skip
        ax.set_yticks([-1, *seeds], ["pooled", *[f"seed {i}" for i in seeds]], fontsize=7)
        ax.set_title(f"{c['metric']}: AG - Grad-CAM\n(> 0: attention-guided better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


__all__ = ["effects_figure", "maps_figure"]
