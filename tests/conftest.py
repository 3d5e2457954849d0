"""Shared test set-up: offline W&B, deterministic seeds, small thread counts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Test this checkout's code, also in subprocesses (train.py / explain.py / DDP workers), whatever
# another clone's editable install points at.
_SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, _SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One on-disk cache for generated data, shared by the whole session."""
    return str(tmp_path_factory.mktemp("attncam_cache"))
