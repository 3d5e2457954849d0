"""Issue 16's speed targets, side by side in one run: the card's explain command and the allocator.

    python scripts/bench_speed.py                     # card + allocator (about 10 min idle)
    python scripts/bench_speed.py --parts card        # one part: card, profile, full, allocator
    python scripts/bench_speed.py --ckpt PATH         # the demo checkpoint to explain

1. **card**: ``python explain.py ckpt=<demo best.ckpt> limit=N`` (the default methods and
   metrics) with the code before issue 16 (``--baseline``, exported with ``git archive``) and
   with this checkout (its default ``metrics.protocol.precision=auto``), in alternation on the
   same images, plus this checkout with ``precision=float32`` and ``precision=bf16``: images per
   second of the stage (its manifest's ``images_per_second``), CPU user/system seconds and peak
   RSS of each process.
2. **profile**: one *after* run under cProfile: the cumulative seconds of the maps, each
   perturbation kind, the forwards, the convolutions and the figures.
   **full**: the card's command on the whole 400-image test split with this checkout, once: the
   wall time the README quotes.
3. **allocator**: glibc's default thresholds vs :func:`attncam.runtime.tune_allocator`, in
   alternating child processes, for training (the demo recipe's model and batch) and for the
   metrics' perturbation forwards: time per step, system time, peak RSS, and the RSS after
   every step of a longer run (memory growth).

The demo checkpoint: ``--ckpt``, else the newest ``outputs/demo/*/train/checkpoints/best.ckpt``,
else one is trained with ``train.py experiment=demo`` (about 4 minutes) into a temporary folder.
Writes ``benchmarks/speed.md`` and ``benchmarks/speed.json`` (targets for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: The last commit before issue 16's speed work: "today's code" of the issue.
BASELINE = "34fb0cb"
CARD_GOAL = 8.0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def demo_checkpoint(given: str | None, work: Path) -> tuple[Path, str]:
    """``(path, where it came from)`` of a demo checkpoint (see the module docstring)."""
    if given:
        return Path(given), "given (--ckpt)"
    found = sorted(ROOT.glob("outputs/demo/*/train/checkpoints/best.ckpt"), key=os.path.getmtime)
    if found:
        return found[-1], "the newest make demo run"
    out = work / "demo_train"
    cmd = [sys.executable, "train.py", "experiment=demo", "logger=none", f"hydra.run.dir={out}"]
    print("training a demo model:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=_env(ROOT / "src"))
    return out / "checkpoints" / "best.ckpt", "trained by this script (make demo's recipe)"


def _env(src: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATTNCAM_ALLOCATOR"}
    env.update(PYTHONPATH=str(src), WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def export_baseline(rev: str, work: Path) -> Path:
    """The tree of ``rev`` (sources, configs, entry points) in ``work/baseline``."""
    dest = work / "baseline"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_child(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; its wall seconds, CPU user/system seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode()[-3000:]}")
    return {
        "wall_s": time.perf_counter() - start,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stdout": out.decode(errors="replace")[-4000:],
    }


def card_arms(ckpt: Path, base: Path, limit: int) -> dict[str, tuple[list[str], Path, dict]]:
    """The compared explain commands: ``{arm: (argv, cwd, env)}``."""
    args = [f"ckpt={ckpt}", f"limit={limit}", "logger=none"]
    new = _env(ROOT / "src")
    return {
        "before (baseline)": (args, base, _env(base / "src")),
        "after": (args, ROOT, new),
        "after, precision=float32": ([*args, "metrics.protocol.precision=float32"], ROOT, new),
        "after, precision=bf16": ([*args, "metrics.protocol.precision=bf16"], ROOT, new),
    }


def bench_card(args: argparse.Namespace, ckpt: Path, work: Path) -> dict[str, Any]:
    """Part 1: the arms of :func:`card_arms` in alternation, ``--reps`` times each."""
    base = export_baseline(args.baseline, work)
    arms = card_arms(ckpt, base, args.limit)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for rep in range(args.reps):
        for i, (arm, (argv, cwd, env)) in enumerate(arms.items()):
            folder = work / f"card_{rep}_{i}"
            cmd = [sys.executable, "explain.py", *argv, f"hydra.run.dir={folder}"]
            res = run_child(cmd, cwd, env)
            manifest = json.loads((folder / "manifest.json").read_text())
            res.update(img_s=manifest["images_per_second"], stage_s=manifest["seconds"])
            res["precision"] = manifest.get("precision")
            res.pop("stdout")
            runs[arm].append(res)
            print(f"  {arm}: {res['img_s']:.3f} img/s (rep {rep})", flush=True)
    rows = {a: _median_row(r) for a, r in runs.items()}
    before = rows["before (baseline)"]["img_s"]
    for row in rows.values():
        row["ratio"] = row["img_s"] / before
    return {"limit": args.limit, "reps": args.reps, "baseline": args.baseline, "rows": rows}


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("img_s", "stage_s", "wall_s", "user_s", "sys_s", "peak_rss_mib")
    row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["precision"] = runs[0].get("precision")
    return row


def bench_full(ckpt: Path, work: Path) -> dict[str, Any]:
    """Part 2: the card's command on the whole test split, this checkout, once."""
    folder = work / "full"
    cmd = [sys.executable, "explain.py", f"ckpt={ckpt}", "logger=none", f"hydra.run.dir={folder}"]
    res = run_child(cmd, ROOT, _env(ROOT / "src"))
    manifest = json.loads((folder / "manifest.json").read_text())
    res.pop("stdout")
    res.update(images=manifest["n_images"], img_s=manifest["images_per_second"],
               stage_s=manifest["seconds"])  # fmt: skip
    return res


#: ``(label, file suffix, function name)`` of the profile's rows (cumulative seconds).
PROFILE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("whole stage (explain run)", "stages/explain.py", "run"),
    ("test loop: maps + metrics", "stages/explain_module.py", "test_step"),
    ("maps (the methods, float32)", "explain/explainer.py", "explain"),
    ("metrics: all perturbation work", "metrics/suite.py", "update"),
    ("  deletion + insertion curves", "metrics/perturb.py", "deletion_insertion"),
    ("  Average Drop / IC / Percentage-in", "metrics/perturb.py", "confidence_table"),
    ("  base scores", "metrics/perturb.py", "base_scores"),
    ("  every perturbation forward", "metrics/perturb.py", "_forward"),
    ("    of which convolutions", "~", "<built-in method torch.conv2d>"),
    ("    of which the inference copy (built once)", "inference.py", "inference_copy"),
    ("figures", "stages/outputs.py", "write_figures"),
)


def bench_profile(args: argparse.Namespace, ckpt: Path, work: Path) -> dict[str, Any]:
    """Where an *after* run's time goes: cProfile cumulative seconds of the main functions."""
    import pstats

    folder, prof = work / "profiled", work / "explain.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "explain.py", f"ckpt={ckpt}",
           f"limit={args.limit}", "logger=none", f"hydra.run.dir={folder}"]  # fmt: skip
    run_child(cmd, ROOT, _env(ROOT / "src"))
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    rows = []
    for label, suffix, name in PROFILE_ROWS:
        hits = [(v[1], v[3]) for (f, _l, n), v in stats.items() if n == name and f.endswith(suffix)]
        rows.append({"what": label, "calls": sum(c for c, _ in hits),
                     "seconds": sum(t for _, t in hits)})  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    forwards = next(r["calls"] for r in rows if r["what"].strip() == "every perturbation forward")
    return {"rows": rows, "images": manifest["n_images"], "chunk_forwards": forwards,
            "precision": manifest.get("precision"), "ops": bench_ops(ckpt)}  # fmt: skip


# ------------------------------------------------------------------ 3. allocator (child mode)


def child_workload(kind: str, ckpt: str, steps: int) -> None:
    """In a child process: ``steps`` training steps or perturbation batches; prints JSON."""
    import resource

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from attncam.runtime import tune_allocator

    info = tune_allocator()
    torch.manual_seed(0)
    if kind == "ops":
        print(json.dumps(_forward_ops(ckpt)))
        return
    step = _train_step(ckpt) if kind == "train" else _perturb_step(ckpt)
    step()  # warm-up
    times, rss = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        rss.append(_rss_mib())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"allocator": info, "step_s": statistics.median(times), "rss_mib": rss,
                      "sys_s": usage.ru_stime, "user_s": usage.ru_utime,
                      "peak_rss_mib": usage.ru_maxrss / 1024}))  # fmt: skip


#: Images per chunk forward of the op profile (the engine's ``DEFAULT_CHUNK_SIZE``) and its size.
OPS_CHUNK, OPS_SIZE = 32, 128


def _forward_ops(ckpt: str, reps: int = 3, top: int = 8) -> dict[str, Any]:
    """Self CPU ms per op of one perturbation chunk forward (the engine's inference copy, 32
    images at 128 px, the demo's size), in float32 and under bf16 autocast (``torch.profiler``,
    ``reps`` profiled forwards after a warm-up, divided by ``reps``)."""
    import torch

    from attncam.inference import autocast, inference_copy
    from attncam.models.checkpoint import load_classifier

    net = load_classifier(ckpt).net.eval()
    x = torch.rand(OPS_CHUNK, 3, OPS_SIZE, OPS_SIZE).contiguous(memory_format=torch.channels_last)
    fast, _ = inference_copy(net, x[:2])
    out: dict[str, Any] = {}
    for precision in ("float32", "bf16"):
        with torch.inference_mode(), autocast(precision):
            fast(x)  # warm-up
            with torch.profiler.profile() as prof:
                for _ in range(reps):
                    fast(x)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1000 / reps
        ops = [{"op": e.key, "ms": e.self_cpu_time_total / 1000 / reps, "calls": e.count // reps}
               for e in events[:top]]  # fmt: skip
        out[precision] = {"total_ms": total, "ops": ops}
    return out


def bench_ops(ckpt: Path) -> dict[str, Any]:
    """The op profile of :func:`_forward_ops`, in a child process (tuned allocator)."""
    cmd = [sys.executable, __file__, "--child", "ops", "--ckpt", str(ckpt)]
    res = run_child(cmd, ROOT, _env(ROOT / "src"))
    return json.loads(res["stdout"].strip().splitlines()[-1])


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _train_step(ckpt: str) -> Any:
    """One SGD step of the demo model on a batch of 64 images at 128 px (the demo recipe)."""
    import torch

    from attncam.models.checkpoint import load_classifier

    net = load_classifier(ckpt).net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(64, 3, 128, 128), torch.randint(0, 8, (64,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def _perturb_step(ckpt: str) -> Any:
    """Average Drop + deletion/insertion of 8 images and 2 maps (the metrics' forwards)."""
    import torch

    from attncam.metrics.perturb import Perturber
    from attncam.models.checkpoint import load_classifier

    net = load_classifier(ckpt).net.eval()
    eng = Perturber(net, chunk_size=64, optimize=True)
    x = torch.rand(8, 3, 128, 128)
    maps = {f"m{i}": torch.rand(8, 128, 128) for i in range(2)}

    def step() -> None:
        base = eng.base_scores(x)
        eng.confidence_table(x, maps, base=base, percentages=())
        eng.deletion_insertion(x, maps, base=base)

    return step


def bench_allocator(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """Part 3: default vs tuned thresholds, alternating child processes per workload."""
    out: dict[str, Any] = {}
    for kind, steps in (("train", args.train_steps), ("perturb", args.perturb_steps)):
        runs: dict[str, list[dict[str, Any]]] = {"glibc defaults": [], "tuned": []}
        for _ in range(args.alloc_reps):
            for arm in runs:
                extra = {"ATTNCAM_ALLOCATOR": "system"} if arm == "glibc defaults" else {}
                cmd = [sys.executable, __file__, "--child", kind, "--ckpt", str(ckpt),
                       "--steps", str(steps)]  # fmt: skip
                res = run_child(cmd, ROOT, _env(ROOT / "src", **extra))
                runs[arm].append(json.loads(res["stdout"].strip().splitlines()[-1]))
        out[kind] = {arm: _alloc_row(r) for arm, r in runs.items()}
        out[kind]["speedup"] = out[kind]["glibc defaults"]["step_s"] / out[kind]["tuned"]["step_s"]
        print(f"  allocator {kind}: {out[kind]['speedup']:.2f}x", flush=True)
    return out


def _alloc_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rss = runs[0]["rss_mib"]
    return {
        "step_s": statistics.median(r["step_s"] for r in runs),
        "sys_s": statistics.median(r["sys_s"] for r in runs),
        "user_s": statistics.median(r["user_s"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_first_mid_last": [rss[0], rss[len(rss) // 2], rss[-1]],
    }


# ------------------------------------------------------------------ report


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's speed targets with their measured values and status."""
    out = []
    card = res.get("card")
    if card:
        ratio = card["rows"]["after"]["ratio"]
        out.append({"target": "card explain command, images/s after / before (same 16 images)",
                    "goal": ">= 8x", "value": ratio,
                    "status": "met" if ratio >= CARD_GOAL else "NOT met"})  # fmt: skip
        full = res.get("full")
        if full:
            whole = full["img_s"] / card["rows"]["before (baseline)"]["img_s"]
            out.append({"target": "card explain command, whole split after / 16 images before "
                        "(images/s)", "goal": ">= 8x", "value": whole,
                        "status": "met" if whole >= CARD_GOAL else "NOT met"})  # fmt: skip
    alloc = res.get("allocator")
    if alloc:
        for kind in ("train", "perturb"):
            v = alloc[kind]["speedup"]
            out.append({"target": f"tuned allocator, {kind} step speed-up", "goal": ">= 1x",
                        "value": v, "status": "met" if v >= 1.0 else "NOT met"})  # fmt: skip
    return out


def _card_lines(card: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. The card's explain command, before and after",
        "",
        f"`python explain.py ckpt=<demo best.ckpt> limit={card['limit']} logger=none` (the "
        "default methods and metrics), the arms alternating, median of "
        f"{card['reps']} runs each. *before* is commit `{card['baseline']}` (the code issue 16 "
        "was measured on); images/s is the stage's own (its manifest's `images_per_second`).",
        "",
        "| arm | images/s | ratio to before | stage s | CPU user s | CPU system s | peak RSS MiB "
        "| metric forwards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in card["rows"].items():
        prec = _precision_text(r.get("precision") or {})
        lines.append(
            f"| {arm} | {r['img_s']:.3f} | {r['ratio']:.2f}x | {r['stage_s']:.1f} | "
            f"{r['user_s']:.1f} | {r['sys_s']:.1f} | {r['peak_rss_mib']:.0f} | {prec} |"
        )
    return [*lines, ""]


def _precision_text(precision: dict[str, str]) -> str:
    """``float32``, ``bf16``, or for ``precision=auto`` on a bf16 CPU the split per family."""
    overall = precision.get("metric_forwards", "float32")
    if overall != "mixed":
        return overall
    return f"curves {precision['curves']}, the rest {precision['scores']}"


def _full_lines(full: dict[str, Any]) -> list[str]:
    return [
        "## 2. The card's command on the whole test split (this checkout)",
        "",
        f"`python explain.py ckpt=<demo best.ckpt>`: {full['images']} images in "
        f"{full['stage_s']:.0f} s of stage time ({full['img_s']:.2f} images/s), "
        f"{full['wall_s'] / 60:.1f} min wall time for the whole command; peak RSS "
        f"{full['peak_rss_mib']:.0f} MiB.",
        "",
    ]


def _profile_lines(prof: dict[str, Any]) -> list[str]:
    total = prof["rows"][0]["seconds"] or 1.0
    lines = [
        "## Where the time goes (one *after* run under cProfile)",
        "",
        f"{prof['images']} images; cumulative seconds (nested rows are part of the row above; "
        "cProfile adds some overhead of its own).",
        "",
        "| what | calls | seconds | share of the stage |",
        "|---|---|---|---|",
    ]
    for r in prof["rows"]:
        lines.append(
            f"| {r['what']} | {r['calls']} | {r['seconds']:.1f} | {r['seconds'] / total:.0%} |"
        )
    if prof.get("precision"):
        lines += ["", f"Metric forwards of this run: {_precision_text(prof['precision'])}."]
    return [*lines, "", *_ops_lines(prof.get("ops")), *LEVERS]


def _ops_lines(ops: dict[str, Any] | None) -> list[str]:
    """Inside one chunk forward: the ops with the most self time, per precision."""
    if not ops:
        return []
    lines = [
        f"Inside one perturbation forward ({OPS_CHUNK} images at {OPS_SIZE} px through the "
        "engine's inference copy; `torch.profiler` self time per forward, largest ops first):",
        "",
        "| precision | forward ms | op | ms | share | calls |",
        "|---|---|---|---|---|---|",
    ]
    for precision, r in ops.items():
        for i, op in enumerate(r["ops"]):
            head = f"| {precision} | {r['total_ms']:.1f} |" if i == 0 else "| | |"
            lines.append(
                f"{head} `{op['op']}` | {op['ms']:.1f} | {op['ms'] / r['total_ms']:.0%} | "
                f"{op['calls']} |"
            )
    return [*lines, ""]


#: Levers measured by hand for the card command (not re-run by this script), with their figures.
LEVERS: list[str] = [
    "Levers measured by hand (2026-12-01 23:10, this machine idle, the demo model's inference "
    "copy, 32 images at 128 px per forward, the variants alternating, median of 8 forwards; not "
    "re-run by this script):",
    "",
    "| lever | ms per forward | adopted |",
    "|---|---|---|",
    "| eager, float32 (the reference) | 67.1 | - |",
    "| bf16 autocast | 43.4 (1.55x) | for the deletion/insertion curves only (`precision=auto`, "
    "the default on CPUs with bf16 units): their bf16 agreement holds on both models, Average "
    "Drop's and Increase in Confidence's does not (`bf16_agreement.md`) |",
    "| `torch.compile` (inductor, `freezing=True`), float32 | 55.8; compiling 7.5 s per input "
    "shape | no |",
    "| `torch.compile`, bf16 autocast | 33.0 (1.32x over eager autocast); compiling 5.4 s per "
    "input shape | no: at most about 1.25x on a whole split (the curves' share), a loss on short "
    "runs, one compile per chunk shape, and a C++ compiler at run time |",
    "| `torch.jit.freeze` / + `optimize_for_inference`, float32 | 64.1 / 80.4 | no |",
    "| the copy's weights in bf16 instead of autocast | 46.3 | no |",
    "| in-place activations | already in place in timm's blocks (`ReLU6(inplace=True)`) | - |",
    "",
    "What stays: about 530 model forwards per image (12 maps x 2 curves x 19 interior steps, "
    "plus Average Drop, Increase in Confidence and 5 Percentage-in levels per map), each a full "
    "EfficientNet-Lite0 forward; reaching 8x would take fewer forwards, i.e. a different "
    "protocol (fewer curve steps, fewer methods), which the card command does not change.",
    "",
]


def _allocator_lines(alloc: dict[str, Any]) -> list[str]:
    lines = [
        "## 3. Allocator: glibc's defaults vs the tuned thresholds",
        "",
        "Child processes alternate (`ATTNCAM_ALLOCATOR=system` keeps glibc's defaults; "
        "`attncam.runtime.tune_allocator` raises the mmap and trim thresholds to 2 GiB). "
        "*train*: SGD steps of the demo model, batch 64 at 128 px; *perturb*: Average Drop and "
        "deletion/insertion of 8 images x 2 maps. RSS is read after every step: first / middle / "
        "last shows whether memory grows.",
        "",
        "| workload | allocator | s/step | speed-up | CPU system s | peak RSS MiB | RSS first / "
        "mid / last MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("train", "perturb"):
        for arm in ("glibc defaults", "tuned"):
            r = alloc[kind][arm]
            up = f"{alloc[kind]['speedup']:.2f}x" if arm == "tuned" else "1.00x"
            rss = " / ".join(f"{v:.0f}" for v in r["rss_first_mid_last"])
            lines.append(
                f"| {kind} | {arm} | {r['step_s']:.3f} | {up} | {r['sys_s']:.1f} | "
                f"{r['peak_rss_mib']:.0f} | {rss} |"
            )
    return [*lines, ""]


def render(res: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [
        "# Speed (issue 16): the card's command, precision and the allocator",
        "",
        f"`{res['command']}` on {res['date']}; load average before / after: "
        f"{res['load_before']} / {res['load_after']}; {res['seconds'] / 60:.1f} min. "
        f"Checkpoint: {res['checkpoint']['source']}.",
        "",
        "| target | goal | measured | status |",
        "|---|---|---|---|",
        *[f"| {t['target']} | {t['goal']} | {t['value']:.2f}x | {t['status']} |"
          for t in res["targets"]],
        "",
    ]  # fmt: skip
    if "card" in res:
        lines += _card_lines(res["card"])
    if "profile" in res:
        lines += _profile_lines(res["profile"])
    if "full" in res:
        lines += _full_lines(res["full"])
    if "allocator" in res:
        lines += _allocator_lines(res["allocator"])
    return "\n".join(lines)


def write_report(res: dict[str, Any]) -> None:
    """``benchmarks/speed.md`` and ``benchmarks/speed.json``."""
    BENCH.mkdir(exist_ok=True)
    res["targets"] = targets(res)
    (BENCH / "speed.json").write_text(json.dumps(res, indent=2) + "\n")
    (BENCH / "speed.md").write_text(render(res))


def main() -> None:
    """Run the chosen parts and write the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["card", "profile", "full", "allocator"],
                    choices=["card", "profile", "full", "allocator"])  # fmt: skip
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--baseline", default=BASELINE, help="the commit of 'before' (git rev)")
    ap.add_argument("--limit", type=int, default=16, help="images per card run")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--alloc-reps", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--perturb-steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer images and steps")
    ap.add_argument("--child", choices=["train", "perturb", "ops"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_workload(args.child, args.ckpt, args.steps)
        return
    if args.quick:
        args.limit, args.reps, args.alloc_reps, args.train_steps, args.perturb_steps = 8, 1, 1, 3, 4
        args.parts = [p for p in args.parts if p != "full"]
    res: dict[str, Any] = {
        "command": "python scripts/bench_speed.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": load_average(),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, source = demo_checkpoint(args.ckpt, work)
        res["checkpoint"] = {"path": str(ckpt), "source": source}
        ckpt = ckpt.resolve()  # the "before" arm runs in another folder
        if "card" in args.parts:
            res["card"] = bench_card(args, ckpt, work)
        if "profile" in args.parts:
            res["profile"] = bench_profile(args, ckpt, work)
        if "full" in args.parts:
            res["full"] = bench_full(ckpt, work)
        if "allocator" in args.parts:
            res["allocator"] = bench_allocator(args, ckpt)
    res.update(load_after=load_average(), seconds=time.perf_counter() - t0)
    write_report(res)
    print(f"wrote {BENCH / 'speed.md'} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
