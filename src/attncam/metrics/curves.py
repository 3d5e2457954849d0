"""Curve metrics: deletion/insertion AUC (Petsiuk et al. 2018), ROAD (Rong et al. 2022) and
faithfulness against occlusion (Selvaraju et al., Grad-CAM sec. 5.3).

Fed with the scores of ``attncam.metrics.perturb.Perturber``; curves are kept for plotting.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attncam.metrics import functional as MF
from attncam.metrics.perturb import Curves, RoadScores
from attncam.metrics.stats import MetricResult, PerImageMetric, keep_mask


class DeletionInsertion(PerImageMetric):
    """Deletion and insertion AUC (Petsiuk et al. 2018, RISE, sec. 4.1).

    The AUC is the trapezoid rule over the perturbed fraction (0 to 1), so it lies in [0, 1] for
    probabilities. Deletion: lower is better; insertion: higher is better. The per-image curves are
    kept (``cat`` states) and ``mean_curves()`` returns them averaged for plotting.

    Args:
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve"):
            self._add_values(name)
        self.fractions: Tensor | None = None

    def update(
        self, curves: Curves, keep: Tensor | None = None, *, ids: Tensor | None = None
    ) -> None:
        """Add a batch of curves.

        Args:
            curves: ``Curves`` with ``fractions (S+1,)``, ``deletion (B, S+1)``,
                ``insertion (B, S+1)`` (NaN rows for skipped maps).
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        d, i, f = curves.deletion, curves.insertion, curves.fractions
        if d.ndim != 2 or d.shape != i.shape or f.shape != (d.shape[1],):
            raise ValueError(
                f"curves need deletion/insertion (B, S+1) and fractions (S+1,); got "
                f"{tuple(d.shape)}, {tuple(i.shape)}, {tuple(f.shape)}"
            )
        if self.fractions is None:
            self.fractions = f.detach().clone()
        elif self.fractions.shape != f.shape or not torch.allclose(
            self.fractions, f.to(self.fractions)
        ):
            raise ValueError(
                f"fractions changed between updates ({self.fractions.shape[0]} vs {f.shape[0]} "
                "points): use one resolution and one number of steps per metric"
            )
        finite = MF.check_scores(d, name="deletion") & MF.check_scores(i, name="insertion")
        checks = [("excluded", keep_mask(keep, d)), ("non_finite", finite)]
        valid = self._filter(torch.ones_like(finite), checks)
        d, i = d[valid].float(), i[valid].float()
        self._append_valid(
            ids,
            valid,
            deletion_curve=d,
            insertion_curve=i,
            deletion_auc=MF.curve_auc(d, f),
            insertion_auc=MF.curve_auc(i, f),
        )

    def _columns(self) -> dict[str, Tensor]:
        ins = self.values("insertion_curve")
        n = 1 if self.fractions is None else self.fractions.shape[0]
        return {
            "deletion": self.values("deletion_auc"),
            "insertion": self.values("insertion_auc"),
            "insertion_start": ins.reshape(-1, n)[:, 0],
        }

    def compute(self) -> dict[str, MetricResult]:
        """``{"deletion", "insertion", "insertion_start"}``: the AUCs and the mean score of the
        insertion baseline (``Curves.insertion_start``, the insertion curve at 0)."""
        return self._summaries()

    def mean_curves(self) -> dict[str, Tensor]:
        """Mean curves for plotting: ``fractions``, ``deletion``, ``insertion``, each ``(S+1,)``.

        Under DDP the states are synced for the call (every process must call it).
        """
        if self.fractions is None:
            raise ValueError("no curves yet: call update() first")
        n = self.fractions.shape[0]
        with self.sync_context(
            should_sync=self._to_sync, distributed_available=self.distributed_available_fn
        ):
            d = self.values("deletion_curve").reshape(-1, n)
            i = self.values("insertion_curve").reshape(-1, n)
        if d.shape[0] == 0:
            raise ValueError(f"no valid curve to average (skipped: {self.skipped_counts()})")
        return {"fractions": self.fractions, "deletion": d.mean(0), "insertion": i.mean(0)}


class ROAD(PerImageMetric):
    """ROAD: RemOve And Debias (Rong et al. 2022), noisy linear imputation.

    Reports the mean target score after removing p% of pixels most-relevant-first (MoRF, lower is
    better) and least-relevant-first (LeRF, higher is better) at each level, the per-image means
    over levels (``morf``, ``lerf``) and their difference ``lerf - morf`` (higher is better).

    Args:
        percentages: Removal levels, matching the columns of the scores.
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = None

    def __init__(
        self, percentages: tuple[float, ...] = (10, 30, 50, 70, 90), **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not percentages:
            raise ValueError("percentages is empty; give at least one removal level")
        self.percentages = tuple(float(p) for p in percentages)
        self._add_values("morf")
        self._add_values("lerf")

    def update(
        self, road: RoadScores, keep: Tensor | None = None, *, ids: Tensor | None = None
    ) -> None:
        """Add a batch.

        Args:
            road: ``RoadScores`` with ``morf`` and ``lerf`` of shape ``(B, P)``.
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        m, le = road.morf, road.lerf
        if tuple(float(p) for p in road.percentages) != self.percentages:
            raise ValueError(
                f"ROAD scores are for percentages {road.percentages}; this metric "
                f"was built for {self.percentages}"
            )
        if m.ndim != 2 or m.shape != le.shape or m.shape[1] != len(self.percentages):
            raise ValueError(
                f"morf/lerf must be (B, {len(self.percentages)}); got "
                f"{tuple(m.shape)}, {tuple(le.shape)}"
            )
        finite = MF.check_scores(m, name="morf") & MF.check_scores(le, name="lerf")
        checks = [("excluded", keep_mask(keep, m)), ("non_finite", finite)]
        valid = self._filter(torch.ones_like(finite), checks)
        self._append_valid(ids, valid, morf=m[valid].float(), lerf=le[valid].float())

    def _columns(self) -> dict[str, Tensor]:
        p_n = len(self.percentages)
        m = self.values("morf").reshape(-1, p_n)
        le = self.values("lerf").reshape(-1, p_n)
        out: dict[str, Tensor] = {}
        for j, p in enumerate(self.percentages):
            out[f"morf@{p:g}"] = m[:, j]
            out[f"lerf@{p:g}"] = le[:, j]
        out["morf"] = m.mean(1)
        out["lerf"] = le.mean(1)
        out["lerf_minus_morf"] = le.mean(1) - m.mean(1)
        return out

    def compute(self) -> dict[str, MetricResult]:
        """``morf@p``, ``lerf@p`` per level, ``morf``, ``lerf`` and ``lerf_minus_morf``."""
        return self._summaries()


class OcclusionFaithfulness(PerImageMetric):
    """Faithfulness: Spearman rank correlation between a map and occlusion sensitivity.

    Selvaraju et al. (Grad-CAM), sec. 5.3. The map is average-pooled with the occlusion window
    and stride so both live on the occlusion grid. Images where either is constant (undefined
    correlation) are skipped and counted as ``non_finite``. Higher is better.

    Args:
        window: Occlusion patch size used by ``Perturber.occlusion_sensitivity``.
        stride: Occlusion stride.
        **kwargs: ``num_resamples``, ``confidence``, ``seed`` and ``torchmetrics.Metric`` options.
    """

    higher_is_better = True

    def __init__(self, window: int = 32, stride: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window, self.stride = int(window), int(stride)
        self._add_values("values")

    def update(
        self,
        maps: Tensor,
        occlusion: Tensor,
        keep: Tensor | None = None,
        *,
        ids: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            maps: ``(B, H, W)`` saliency maps.
            occlusion: ``(B, gh, gw)`` score drops from ``Perturber.occlusion_sensitivity``.
            keep: ``(B,)`` bool, False for excluded images.
            ids: ``(B,)`` image ids; default the metric's running image counter.
        """
        finite = MF.check_maps(maps)
        pooled = F.avg_pool2d(maps[:, None], self.window, self.stride)[:, 0]
        if occlusion.shape != pooled.shape:
            raise ValueError(
                f"occlusion has shape {tuple(occlusion.shape)}; the maps pooled with "
                f"window {self.window}, stride {self.stride} give {tuple(pooled.shape)}"
            )
        finite = finite & MF.check_scores(occlusion.flatten(1), maps.shape[0], "occlusion")
        rho = MF.spearman(torch.nan_to_num(pooled), torch.nan_to_num(occlusion))
        checks = [("excluded", keep_mask(keep, maps)), ("non_finite", finite & torch.isfinite(rho))]
        valid = self._filter(torch.ones_like(finite), checks)
        self._append_valid(ids, valid, values=rho[valid])

    def _columns(self) -> dict[str, Tensor]:
        return {"occlusion_faithfulness": self.values()}

    def compute(self) -> MetricResult:
        """Mean Spearman correlation with N and bootstrap interval."""
        return self._summary("occlusion_faithfulness", self.values())
