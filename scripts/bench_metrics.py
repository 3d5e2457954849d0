"""Benchmark attncam's batched metrics against torchcam's, side by side in one run.

Writes ``benchmarks/metrics.md``. Both libraries get the same random-weights ResNet-50 at 224 px,
the same images and the same maps (a fixed-map extractor stands in for a CAM method, so only
metric cost is timed), and the protocol on which they agree: ``mask_space=normalized``, softmax,
predicted class. Timings are medians over ``--reps`` repetitions, the two libraries alternating
within each repetition so machine load affects both alike.

    python scripts/bench_metrics.py                      # a few minutes on 2 CPU cores
    python scripts/bench_metrics.py --n-images 8 --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from attncam.metrics import AverageDrop, IncreaseInConfidence, Perturber, Protocol

log = logging.getLogger("bench_metrics")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PixelResNet(nn.Module):
    """The project's model contract: pixel-space input, normalises internally."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.input_mean, self.input_std = MEAN, STD
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


class Counting(nn.Module):
    """Counts images passed through the wrapped model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        return self.net(x)


class FixedCAM:
    """torchcam extractor interface returning precomputed maps (same maps for both libraries)."""

    def __init__(self, model: nn.Module, maps: Tensor) -> None:
        self.model, self.maps = model, maps

    def __call__(
        self, class_idx: object = None, scores: object = None, **_: object
    ) -> list[Tensor]:
        return [self.maps]

    def fuse_cams(self, cams: list[Tensor]) -> Tensor:
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        yield


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of one call and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_confidence(
    net: Counting, pixel: nn.Module, images: Tensor, maps: list[Tensor], reps: int, chunk: int
) -> dict[str, object]:
    """Average Drop + Increase in Confidence for len(maps) methods on the same images."""
    import torchcam.metrics as tm

    normalized = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    softmax = partial(torch.softmax, dim=-1)
    eng = Perturber(
        pixel, Protocol(mask_space="normalized", score="softmax"), chunk_size=chunk, optimize=True
    )

    def run_torchcam() -> list[dict[str, float]]:
        out = []
        for m in maps:
            metric = tm.ClassificationMetric(FixedCAM(net, m), softmax)
            metric.update(normalized)
            out.append(metric.summary())
        return out

    def run_ours() -> list[tuple[float, float]]:
        base = eng.base_scores(images)
        table = eng.confidence_table(
            images, {f"m{k}": m for k, m in enumerate(maps)}, base=base, percentages=()
        )
        out = []
        for k in range(len(maps)):
            ad, ic = AverageDrop(num_resamples=1000), IncreaseInConfidence(num_resamples=1000)
            ad.update(base.scores, table.masked[f"m{k}"])
            ic.update(base.scores, table.masked[f"m{k}"])
            out.append((ad.compute().value, ic.compute().value))
        return out

    run_torchcam(), run_ours()  # warm-up: allocator, oneDNN primitives, the optimised copy
    t_ref, t_ours, n_ref, n_ours = [], [], 0, 0
    for _ in range(reps):
        net.images = 0
        t, ref = timed(run_torchcam)
        t_ref.append(t)
        n_ref = net.images
        eng.images_forwarded = 0
        t, ours = timed(run_ours)
        t_ours.append(t)
        n_ours = eng.images_forwarded
    max_diff = max(abs(100 * r["avg_drop"] - o[0]) for r, o in zip(ref, ours, strict=True))
    n_img = images.shape[0] * len(maps)
    return {
        "torchcam_s": statistics.median(t_ref) / n_img,
        "ours_s": statistics.median(t_ours) / n_img,
        "torchcam_fwd": n_ref / images.shape[0],
        "ours_fwd": n_ours / images.shape[0],
        "max_ad_diff": max_diff,
    }


def bench_curves(
    net: Counting,
    pixel: nn.Module,
    images: Tensor,
    maps: list[Tensor],
    reps: int,
    chunk: int,
    steps: int,
) -> dict[str, object]:
    """Deletion + insertion curves at equal steps for len(maps) methods."""
    import torchcam.metrics as tm

    normalized = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    softmax = partial(torch.softmax, dim=-1)
    # attncam's protocol (docs/METHODS.md, "Metrics"): insertion into a blurred copy (kernel 11, sigma 5); torchcam: zero baseline.
    eng = Perturber(
        pixel, Protocol(mask_space="normalized", steps=steps), chunk_size=chunk, optimize=True
    )

    def run_torchcam() -> None:
        for m in maps:
            metric = tm.DeletionInsertionMetric(
                FixedCAM(net, m), softmax, steps=steps, batch_size=chunk
            )
            metric.update(normalized)
            metric.summary()

    def run_ours() -> None:
        base = eng.base_scores(images)
        eng.deletion_insertion(images, {f"m{k}": m for k, m in enumerate(maps)}, base=base)

    run_torchcam(), run_ours()  # warm-up
    t_ref, t_ours, n_ref, n_ours = [], [], 0, 0
    for _ in range(reps):
        net.images = 0
        t_ref.append(timed(run_torchcam)[0])
        n_ref = net.images
        eng.images_forwarded = 0
        t_ours.append(timed(run_ours)[0])
        n_ours = eng.images_forwarded
    n_img = images.shape[0] * len(maps)
    return {
        "torchcam_s": statistics.median(t_ref) / n_img,
        "ours_s": statistics.median(t_ours) / n_img,
        "torchcam_fwd": n_ref / images.shape[0],
        "ours_fwd": n_ours / images.shape[0],
    }


def main() -> None:
    """Run the benchmarks and write the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--methods", type=int, default=5, help="methods sharing the images (table)")
    ap.add_argument("--curve-images", type=int, default=2)
    ap.add_argument("--curve-methods", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/metrics.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    torch.manual_seed(0)

    resnet = torchvision.models.resnet50(weights=None).eval()
    net = Counting(resnet)  # torchcam's model (normalised input), counts images
    pixel = PixelResNet(resnet).eval()  # attncam's model contract; the engine counts its images
    s = args.size
    images = torch.rand(args.n_images, 3, s, s)
    maps = [torch.rand(args.n_images, s, s) for _ in range(args.methods)]
    rows = []
    for label, m in (("1 method", maps[:1]), (f"{args.methods} methods (paper table)", maps)):
        log.info("Average Drop + Increase: %s", label)
        r = bench_confidence(net, pixel, images, m, args.reps, args.chunk_size)
        log.info("  %s", r)
        rows.append(("Average Drop + Increase in Confidence", label, r, 1.5))
    c_images = images[: args.curve_images]
    c_maps = [m[: args.curve_images] for m in maps[: args.curve_methods]]
    for label, m in (("1 method", c_maps[:1]), (f"{args.curve_methods} methods", c_maps)):
        log.info("Deletion + insertion: %s", label)
        r = bench_curves(net, pixel, c_images, m, args.reps, args.chunk_size, args.steps)
        log.info("  %s", r)
        rows.append((f"Deletion + insertion, {args.steps} steps", label, r, 1.0))

    lines = [
        "# Metrics benchmark: attncam vs torchcam",
        "",
        f"Written by `scripts/bench_metrics.py` on {dt.date.today().isoformat()}: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, CPU. Random-weights ResNet-50 at {s} px, "
        f"{args.n_images} images ({args.curve_images} for curves), median of {args.reps} reps, "
        f"chunks of {args.chunk_size} images; the two libraries alternate within each rep.",
        "",
        "Same images, same maps (a fixed-map extractor for torchcam), `mask_space=normalized`, "
        "softmax, predicted class. attncam runs with `Perturber(optimize=True)`: an inference copy "
        "with conv+BatchNorm folded (torch.fx) in channels-last format (logits agree to ~1e-5). Time is per (image, method) pair; forward passes are images "
        "through the network per input image, all methods together.",
        "",
        "| metric | setting | torchcam s | attncam s | speed-up | fwd/img torchcam | "
        "fwd/img attncam | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label, r, target in rows:
        ratio = r["torchcam_s"] / r["ours_s"]
        ok = "met" if ratio >= target else "not met"
        lines.append(
            f"| {name} | {label} | {r['torchcam_s']:.3f} | {r['ours_s']:.3f} | {ratio:.2f}x | "
            f"{r['torchcam_fwd']:g} | {r['ours_fwd']:g} | >= {target}x ({ok}) |"
        )
    diffs = [r["max_ad_diff"] for _, _, r, _ in rows if "max_ad_diff" in r]
    lines += [
        "",
        "Where the speed comes from: `Y` is computed once per image and shared by every method "
        "(torchcam's `ClassificationMetric` recomputes it, with autograd on, per method); all "
        "perturbed images of a batch go through the network in chunks under `inference_mode`. "
        "For deletion/insertion the all-deleted image is one constant image (one forward per "
        "call) and the blurred insertion start is shared by all methods. With one method both "
        "libraries do about the same number of forward passes; the remaining gain is the "
        "optimised inference copy (conv+BN folding, channels-last).",
        "",
        "attncam's insertion starts from a Gaussian-blurred copy (docs/METHODS.md, kernel 11, "
        "sigma 5), torchcam's from its zero baseline; the blur costs one extra forward per image. "
        "With `blur_kernel=0` attncam reproduces torchcam's AUCs (tested in "
        "`tests/unit/test_metrics_confidence.py`).",
        "",
        f"Agreement check: largest |Average Drop| difference vs torchcam "
        f"{max(diffs):.2e} percentage points (torchcam divides by `Y + 1e-7`).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
