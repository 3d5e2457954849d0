"""What the integration tests share: config composition, small data settings, the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
# A synthetic set small enough for seconds-long runs of model=tiny.
SMALL_DATA = [
    "data.image_size=32",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=16",
]
FAST_METRICS = ["metrics=fast", "metrics.num_resamples=50", "metrics.protocol.steps=4"]


def compose(name: str, overrides: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` with ``overrides``, as the CLI would compose it (no Hydra run dir)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


def train_tiny(
    out: Path, cache_dir: str, extra: Sequence[str] = (), logger: str = "none"
) -> dict[str, Any]:
    """One epoch of tiny CBAM on the small synthetic set into ``out`` (no test split).

    Returns the train stage's results (``best_checkpoint``, ...); torch's thread count is
    restored afterwards (the stage may change it).
    """
    import torch
    from omegaconf import open_dict

    from attncam.stages import train as train_stage

    cfg = compose(
        "train",
        ["model=tiny", "attention=cbam", f"logger={logger}", "trainer.max_epochs=1", "test=false",
         f"data.cache_dir={cache_dir}", *SMALL_DATA, *extra],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(out)
    threads = torch.get_num_threads()
    try:
        return train_stage.run(cfg)
    finally:
        torch.set_num_threads(threads)


def run_cli(
    script: str, args: list[str], cwd: Path, env_extra: dict[str, str] | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``train.py`` or ``explain.py`` in a subprocess with W&B offline."""
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
