"""Start ``train.py``, kill it once its first checkpoint exists, resume, and compare.

Used by ``tests/integration/test_reliability.py`` and runnable by hand::

    python scripts/_kill_during_training.py --signal KILL --out /tmp/kill_demo -- \
        model=tiny attention=cbam logger=none data.image_size=32 trainer.max_epochs=3

It runs, in ``--out``: ``reference/`` (uninterrupted), ``interrupted/`` (killed with the signal
after ``checkpoints/last.ckpt`` appears, then resumed with ``resume=last`` in the same folder),
and prints one JSON line: the two ``results.json`` and whether the kill landed before the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(args: list[str], run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_after_first_checkpoint(
    args: list[str], run_dir: Path, sig: signal.Signals, env: dict[str, str], timeout: float
) -> dict[str, object]:
    """Run ``train.py`` in ``run_dir`` and send ``sig`` as soon as ``last.ckpt`` exists.

    Returns:
        ``{"killed_while_running", "returncode", "log_tail", "checkpoint_epoch"}``.
    """
    proc = _train(args, run_dir, env)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + timeout
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    running = proc.poll() is None
    if running:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a SIGTERM that was not honoured
        proc.kill()
        out, _ = proc.communicate()
    return {
        "killed_while_running": running and not (run_dir / "results.json").is_file(),
        "returncode": proc.returncode,
        "log_tail": out[-3000:],
    }


def main() -> None:
    """Reference run, killed run, resumed run; print the comparison as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--timeout", type=float, default=540.0)
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args()
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    ns.out.mkdir(parents=True, exist_ok=True)
    ref_dir, run_dir = ns.out / "reference", ns.out / "interrupted"
    ref = _train(ns.overrides, ref_dir, env)
    ref_log, _ = ref.communicate(timeout=ns.timeout)
    killed = kill_after_first_checkpoint(
        ns.overrides, run_dir, signal.Signals[f"SIG{ns.signal}"], env, ns.timeout
    )
    resumed = _train([*ns.overrides, "resume=last"], run_dir, env)
    res_log, _ = resumed.communicate(timeout=ns.timeout)

    def results(d: Path) -> dict | None:
        f = d / "results.json"
        return json.loads(f.read_text()) if f.is_file() else None

    print(
        json.dumps(
            {
                "reference": results(ref_dir),
                "resumed": results(run_dir),
                "kill": killed,
                "reference_rc": ref.returncode,
                "resumed_rc": resumed.returncode,
                "resumed_log_tail": res_log[-3000:],
                "reference_log_tail": ref_log[-2000:],
            }
        )
    )


if __name__ == "__main__":
    main()
