"""``make bench``: run every benchmark script, then rewrite ``benchmarks/RESULTS.md``.

    python scripts/bench_all.py                 # explain, metrics, training and bf16 benchmarks
    python scripts/bench_all.py --only train    # one script; the others' last reports are reused
    python scripts/bench_all.py --report-only   # rewrite RESULTS.md from the existing reports

Each script writes its own report (``benchmarks/explain.md``, ``metrics.md``, ``train.md``,
``speed.md``, ``bf16_agreement.md``); the demo checkpoint the speed and bf16 scripts explain is
found or trained once (``--ckpt``);
RESULTS.md collects their tables with the machine, the library versions and the exact commands.
The budget is 30 minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

SCRIPTS: dict[str, tuple[list[str], str]] = {
    "explain": (["scripts/bench_explain.py"], "explain.md"),
    "metrics": (["scripts/bench_metrics.py"], "metrics.md"),
    "train": (["scripts/bench_train.py"], "train.md"),
    "speed": (["scripts/bench_speed.py"], "speed.md"),
    "bf16": (["scripts/bench_bf16.py"], "bf16_agreement.md"),
}
#: Scripts whose RESULTS.md section is built from their JSON, not copied from their tables.
OWN_SECTION = ("train", "speed", "bf16")

#: Scripts that explain the demo model (``--ckpt``): bench_all finds or trains it once for both.
DEMO_SCRIPTS = {"speed", "bf16"}

#: Reports whose JSON lists targets: ``(json file, section title, details file)``.
TARGET_REPORTS: tuple[tuple[str, str, str], ...] = (
    ("train.json", "Training targets (issue 8)", "Details, the CBAM profile and the growth table"),
    ("speed.json", "Speed targets (issue 16)", "Details: the arms, CPU times, peak RSS, growth"),
)


# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"pytorch_grad_cam": "grad-cam"}


def cpu_name() -> str:
    """The CPU's model name (``lscpu``), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _machine() -> list[str]:
    import torch

    cpu = cpu_name()
    libs = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in (
        "torchvision",
        "lightning",
        "torchmetrics",
        "timm",
        "torchcam",
        "pytorch_grad_cam",
    ):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        version = getattr(mod, "__version__", None)
        if version is None:  # pytorch_grad_cam has no __version__: ask its distribution
            try:
                version = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
            except importlib.metadata.PackageNotFoundError:
                version = "?"
        libs.append(f"{name} {version}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; GPU: {gpu}",
        f"- OS: {platform.platform()}",
        f"- Libraries: {', '.join(libs)}",
    ]


def _tables(md: str) -> list[str]:
    """The markdown tables of a report, with the headings above them."""
    out, last_heading = [], ""
    for line in md.splitlines():
        if line.startswith("#"):
            last_heading = line
        elif line.startswith("|"):
            if last_heading:
                out += ["", "#" + last_heading.lstrip().replace("# ", "## ", 1)]
                last_heading = ""
            out.append(line)
    return out


def _targets_section(path: Path, title: str, details: str) -> list[str]:
    """A report's targets table (goal, measured ratio, status), or nothing without its JSON."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    lines = [
        "",
        f"## {title}",
        "",
        f"From `{res['command']}` ({res['date']}, load average before/after "
        f"{res['load_before']} / {res['load_after']}).",
        *(
            f"Part `{part}` reused from `{v['command']}` ({v['date']}, {v['cpu']})."
            for part in res.get("reused", [])
            for v in [res["provenance"][part]]
        ),
        "",
        "| target | goal | measured | status |",
        "|---|---|---|---|",
    ]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['value']:.3f}x | {t['status']} |")
    md = path.with_suffix(".md").name
    return [*lines, "", f"{details}: `benchmarks/{md}`."]


def _bf16_section() -> list[str]:
    """Verdict and largest differences of ``benchmarks/bf16_agreement.json``, if present."""
    path = BENCH / "bf16_agreement.json"
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    lines = [
        "",
        "## bf16 metric forwards vs float32 (issue 16)",
        "",
        f"From `{res['command'].strip()}` ({res['date']}, load average before/after "
        f"{res['load_before']} / {res['machine']['load']}). Rule: {res['rule']}.",
        "",
        "| model | metric | largest \\|diff of means\\| (method) | its float32 CI half-width | "
        "max \\|diff\\| / half-width over methods | swaps outside noise | within the rule |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in res["models"].values():
        for key, m in r["metrics"].items():
            big = m["largest"]
            real = sum(not s["tie"] for s in m["swaps"])
            ok = "yes" if m.get("within_rule") else "**no**"
            lines.append(
                f"| {r['short']} | {key} | {abs(big['diff']):.3g} ({big['method']}) | "
                f"{big['half_width']:.3g} | {m['max_ratio']:.3f} | {real} | {ok} |"
            )
        verdicts.append(
            f"- {r['short']}: every forward in bf16: **{r['verdict']}**"
            + "".join(f"; {x}" for x in r["reasons"])
        )
        if r.get("auto"):
            verdicts.append(
                f"  - `precision=auto` (the default: {', '.join(r['auto']['bf16_metrics'])} in bf16, "
                f"the rest in float32): **{r['auto']['verdict']}**"
                + "".join(f"; {x}" for x in r["auto"]["reasons"])
            )
    lines += ["", *verdicts]
    training = res.get("training")
    if training:
        acc = {
            p: ", ".join(f"{r['test/acc']:.4f}" for r in training["runs"] if r["precision"] == p)
            for p in ("32-true", "bf16-mixed")
        }
        lines += [
            "",
            f"Training in bf16-mixed (demo recipe): test/acc {acc['32-true']} (32-true) vs "
            f"{acc['bf16-mixed']} (bf16-mixed); fit time bf16-mixed / 32-true "
            f"{training['fit_ratio']:.2f}x (median over {len(training['runs']) // 2} pairs).",
        ]
    lines += ["", "Details: `benchmarks/bf16_agreement.md`."]
    return lines


def write_results(ran: dict[str, dict[str, object]]) -> Path:
    """Rewrite ``benchmarks/RESULTS.md`` from the scripts' reports."""
    lines = [
        "# Benchmark results",
        "",
        f"Rewritten by `make bench` (`python scripts/bench_all.py`) on "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Every figure is a ratio measured side by side in "
        "one run (the compared things alternate), each the median of several repetitions; the "
        "per-script reports hold the details and profiles.",
        "",
        "## Machine",
        "",
        *_machine(),
        "",
        "## Commands",
        "",
    ]
    if ran:
        total = sum(float(r["seconds"]) for r in ran.values())  # type: ignore[arg-type]
        lines += [f"Wall time of the scripts run this time: {total / 60:.1f} min.", ""]
    for key, (cmd, report) in SCRIPTS.items():
        info = ran.get(key)
        note = (
            f"ran in {info['seconds']:.0f} s, exit {info['rc']}"
            if info
            else "not run this time: last report reused"
        )
        lines.append(f"- `python {' '.join(cmd)}` -> `benchmarks/{report}` ({note})")
    for name, title, details in TARGET_REPORTS:
        lines += _targets_section(BENCH / name, title, details)
    lines += _bf16_section()
    for key, (_cmd, report) in SCRIPTS.items():
        path = BENCH / report
        if key in OWN_SECTION or not path.is_file():
            continue
        lines += ["", f"## {key.capitalize()} (from `benchmarks/{report}`)"]
        lines += _tables(path.read_text())
    out = BENCH / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _run_scripts(args: argparse.Namespace, work: Path) -> dict[str, dict[str, object]]:
    """Run the chosen scripts in sequence; the demo checkpoint is found or trained once."""
    ran: dict[str, dict[str, object]] = {}
    ckpt: list[str] = []
    if DEMO_SCRIPTS & set(args.only):
        from bench_speed import demo_checkpoint  # scripts/ is sys.path[0]

        t0 = time.perf_counter()
        path, source = demo_checkpoint(args.ckpt, work)
        print(f"== demo checkpoint: {path} ({source}, {time.perf_counter() - t0:.0f} s)")
        # Inside the checkout (outputs/demo/...) the path is given relative to it (the scripts
        # run there), so that no machine's folder layout lands in the committed reports.
        inside = Path(path).resolve().is_relative_to(ROOT.resolve())
        ckpt = ["--ckpt", str(Path(path).resolve().relative_to(ROOT.resolve()) if inside else path)]
    for key in args.only:
        extra = ckpt if key in DEMO_SCRIPTS else []
        cmd = [sys.executable, *SCRIPTS[key][0], *extra, *(["--quick"] if args.quick else [])]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        ran[key] = {"seconds": time.perf_counter() - t0, "rc": rc}
        if rc != 0:
            print(f"!! {key} benchmark failed with exit {rc}", flush=True)
    return ran


def main() -> None:
    """Run the selected scripts in sequence and rewrite RESULTS.md."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(SCRIPTS), default=list(SCRIPTS))
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--ckpt", default=None, help="the demo checkpoint of the speed/bf16 scripts")
    args = ap.parse_args()
    ran: dict[str, dict[str, object]] = {}
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            ran = _run_scripts(args, Path(tmp))
    print(f"wrote {write_results(ran)}")
    if any(r["rc"] for r in ran.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
