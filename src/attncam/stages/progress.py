"""What an explain run says before and while it works: a rough estimate, and a bar in images.

Before the first batch, :func:`log_estimate` logs one line: the images, the methods, the model
forwards each image costs (the methods' own, then the metrics' perturbation forwards) and a
rough time from one timed forward at the run's image size. The counts follow the methods'
definitions (``docs/METHODS.md``): a gradient method is one forward and one backward (counted
as 3 forwards), Score-CAM and Ablation-CAM one forward per channel ``K`` of the CAM layer,
SS-CAM and IS-CAM ``n * K``, occlusion one per window, Integrated Gradients and SmoothGrad one
forward and backward per sample; Average Drop / Increase in Confidence / Win % one, Percentage-in
one per level, deletion and insertion ``steps + 1`` each, ROAD two per level. It is an order of
magnitude, not a promise: batching, ``chunk_size`` and the CPU's other work change it.

:class:`ExplainingBar` replaces Lightning's "Testing DataLoader 0" bar (which counts batches) by
an "Explaining" bar that counts images and moves image by image within a batch.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import nn
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

__all__ = [
    "ExplainingBar",
    "estimate_run",
    "forwards_per_image",
    "log_estimate",
    "metric_forwards",
]

#: A forward and a backward, in forwards (the backward costs about two forwards).
GRADIENT = 3


def _method_forwards(key: str, opts: Mapping[str, Any], channels: int, image_size: int) -> int:
    """Forwards one image costs method ``key`` (see the module docstring)."""
    if key in ("scorecam", "ablationcam"):
        return channels + 1
    if key in ("sscam", "iscam"):
        return int(opts.get("n") or 10) * channels + 1
    if key == "occlusion":
        window, stride = int(opts.get("window", 32)), int(opts.get("stride", 16))
        side = max((image_size - window) // max(stride, 1) + 1, 1)
        return side * side + 1
    if key == "integrated_gradients":
        return GRADIENT * int(opts.get("n_steps") or 50)
    if key in ("smoothgrad", "smoothgradcampp"):
        return GRADIENT * int(opts.get("n") or 25)
    if key in ("eigencam", "featuremap", "attention", "cam"):
        return 1
    return GRADIENT


def metric_forwards(metrics_cfg: Mapping[str, Any], image_size: int) -> int:
    """Perturbation forwards the enabled metrics cost per image and method."""
    protocol = metrics_cfg.get("protocol") or {}
    enabled = metrics_cfg.get("enabled")
    enabled = set(enabled) if enabled is not None else None

    def on(key: str) -> bool:
        return enabled is None or key in enabled

    steps = int(protocol.get("steps", 20))
    total = 1 if on("average_drop") or on("increase_in_confidence") else 0
    total += len(protocol.get("percentages", [5, 10, 20, 25, 50])) if on("percentage_in") else 0
    total += 2 * (steps + 1) if on("deletion_insertion") else 0
    total += 2 * len(protocol.get("road_percentages", [10, 30, 50, 70, 90])) if on("road") else 0
    if on("occlusion_faithfulness"):
        occ = metrics_cfg.get("occlusion") or {}
        window, stride = int(occ.get("window", 32)), int(occ.get("stride", 16))
        side = max((image_size - window) // max(stride, 1) + 1, 1)
        total += side * side
    return total


def forwards_per_image(
    specs: Sequence[tuple[str, Mapping[str, Any]]],
    metrics_cfg: Mapping[str, Any],
    channels: int,
    image_size: int,
) -> tuple[int, int]:
    """``(the methods' forwards, the metrics' forwards)`` one image costs, over all methods.

    Args:
        specs: ``[(method key, options)]``.
        metrics_cfg: the ``metrics`` config (``enabled``, ``protocol``, ``occlusion``).
        channels: ``K``, the channels of the CAM layer.
        image_size: the side of the images.
    """
    methods = sum(_method_forwards(k, o, channels, image_size) for k, o in specs)
    return methods, len(specs) * metric_forwards(metrics_cfg, image_size)


def _timed_forward(net: nn.Module, image_size: int, layer: str | None) -> tuple[float, int]:
    """Seconds of one forward of one image, and the channels of ``layer`` (0 if unknown)."""
    channels: list[int] = []
    hook = None
    if layer:
        module = net.get_submodule(layer)
        hook = module.register_forward_hook(
            lambda _m, _i, out: channels.append(int(out.shape[1])) if out.dim() == 4 else None
        )
    x = torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device)
    try:
        with torch.no_grad():
            net(x)  # warm-up: first-call allocations
            seconds = float("inf")
            for _ in range(3):  # the fastest of three: the least disturbed by other work
                start = time.perf_counter()
                net(x)
                seconds = min(seconds, time.perf_counter() - start)
    finally:
        if hook is not None:
            hook.remove()
    return seconds, channels[0] if channels else 0


def log_estimate(
    net: nn.Module,
    specs: Sequence[tuple[str, Mapping[str, Any]]],
    metrics_cfg: Mapping[str, Any],
    n_images: int,
    image_size: int,
    layer: str | None,
) -> dict[str, Any]:
    """Log (INFO) what the run will do and roughly how long it takes, before it starts.

    Args:
        net: the network, in eval mode.
        specs: ``[(method key, options)]`` (control rows included).
        metrics_cfg: the ``metrics`` config.
        n_images: the images to explain.
        image_size: their side.
        layer: the CAM layer (dotted name) whose channels Score-CAM-like methods iterate.

    Returns:
        ``{"images", "methods", "method_forwards", "metric_forwards", "forward_s", "seconds"}``.
    """
    forward_s, channels = _timed_forward(net, image_size, layer)
    by_methods, by_metrics = forwards_per_image(specs, metrics_cfg, channels, image_size)
    seconds = n_images * (by_methods + by_metrics) * forward_s
    log.info(
        "about to explain %d image(s) with %d method(s): about %d model forwards per image "
        "(%d for the methods, %d for the metrics); one forward takes %.1f ms here, so roughly "
        "%s in all (an order of magnitude, not a promise)",
        n_images, len(specs), by_methods + by_metrics, by_methods, by_metrics,
        1000 * forward_s, _duration(seconds),
    )  # fmt: skip
    return {
        "images": n_images, "methods": len(specs), "method_forwards": by_methods,
        "metric_forwards": by_metrics, "forward_s": forward_s, "seconds": seconds,
    }  # fmt: skip


def estimate_run(
    net: nn.Module,
    specs: Sequence[tuple[str, Mapping[str, Any]]],
    metrics_cfg: Mapping[str, Any],
    dataset: Dataset,
    ids: Sequence[int],
    layer: Any,
) -> dict[str, Any]:
    """:func:`log_estimate` for the explain stage's ``ids`` of ``dataset`` and its ``layer``.

    Args:
        net: the network.
        specs: ``[(method key, options)]``.
        metrics_cfg: the ``metrics`` config.
        dataset: the explained dataset (items ``(image (3, S, S), ...)``).
        ids: the explained image ids.
        layer: ``layer=`` (None: the model's default CAM layer; a list: its first name).
    """
    from attncam.explain import model_api

    first = layer[0] if isinstance(layer, list) else layer
    first = str(first).split(":", 1)[0] if first else model_api.cam_layer(net)
    size = int(dataset[ids[0]][0].shape[-1]) if ids else 224
    return log_estimate(net, specs, metrics_cfg, len(ids), size, first)


def _duration(seconds: float) -> str:
    """``"under 1 s"``, ``"42 s"``, ``"7 min"`` or ``"1 h 18 min"``."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class ExplainingBar(TQDMProgressBar):
    """An "Explaining" bar whose total and position count images, not batches.

    Within a batch it moves image by image: the perturbation engine reports every forward
    (``ExplainModule.on_forward``) and the bar converts forwards into images with the forwards
    one image costs (the estimate's count for the first batch, the measured count afterwards).
    Batch ends set it to the exact count; the postfix shows images per second.

    Args:
        total_images: the images the run explains.
        forwards_per_image: the perturbation forwards one image is expected to cost (all
            methods); None or 0: the bar moves at batch ends only until one batch is measured.
    """

    #: Seconds between two in-batch refreshes.
    REFRESH_S = 0.5

    def __init__(self, total_images: int, forwards_per_image: float | None = None) -> None:
        super().__init__(refresh_rate=1)
        self.total_images = int(total_images)
        self.forwards_per_image = float(forwards_per_image or 0.0)
        self._images, self._start, self._last = 0, 0.0, 0.0
        self._batch, self._fwd0 = 0, 0
        self._module: Any = None

    def init_test_tqdm(self) -> Tqdm:
        """Lightning's test bar, labelled "Explaining" and counting images from the start."""
        return Tqdm(
            desc=self.test_description,
            total=self.total_images,
            unit="img",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    @property
    def test_description(self) -> str:
        """The bar's label."""
        return "Explaining"

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the counters and listen to the module's perturbation forwards."""
        super().on_test_start(trainer, pl_module)
        self._images, self._start = 0, time.perf_counter()
        self._module = pl_module
        if hasattr(pl_module, "on_forward"):
            pl_module.on_forward = self._during_batch

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        """Note the batch's size and the forwards so far; set the bar up on the first batch."""
        self._batch, self._fwd0 = int(batch[0].shape[0]), self._forwards()
        if not self.has_dataloader_changed(dataloader_idx) or self._test_progress_bar is None:
            return
        bar = self.test_progress_bar
        bar.reset()
        bar.total, bar.initial, bar.unit = self.total_images, 0, "img"
        bar.set_description(self.test_description)

    def _forwards(self) -> int:
        counter = getattr(self._module, "forwards_done", None)
        return int(counter()) if callable(counter) else 0

    def _during_batch(self) -> None:
        """Move the bar by the images the batch's forwards so far amount to (throttled)."""
        now = time.perf_counter()
        if self._test_progress_bar is None or self.forwards_per_image <= 0:
            return
        if now - self._last < self.REFRESH_S:
            return
        self._last = now
        done = (self._forwards() - self._fwd0) / self.forwards_per_image
        self._show(self._images + min(int(done), max(self._batch - 1, 0)))

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        """Set the bar to the images done; learn the forwards one image costs."""
        self._images += self._batch
        if self._batch and self._forwards() > self._fwd0:
            self.forwards_per_image = (self._forwards() - self._fwd0) / self._batch
        self._show(self._images)

    def _show(self, images: int) -> None:
        bar = self._test_progress_bar
        if bar is None:
            return
        rate = images / max(time.perf_counter() - self._start, 1e-9)
        bar.n = images
        bar.set_postfix(img_s=f"{rate:.2f}", refresh=False)
        bar.refresh()
