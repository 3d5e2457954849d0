"""Issue 17 items 1 and 9 from the command line: ``target=`` and ``save_maps=true``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attncam.data.synthetic import class_names
from tests.integration.helpers import FAST_METRICS, run_cli, train_tiny

ONE_LINE = {"HYDRA_FULL_ERROR": "0"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """A tiny CBAM model trained for one epoch on the small synthetic set (8 classes)."""
    out = tmp_path_factory.mktemp("train")
    return Path(train_tiny(out, cache_dir)["best_checkpoint"])


@pytest.mark.slow  # two explain.py processes: about 20 s
def test_cli_target_by_class_name_with_saved_maps(checkpoint: Path, tmp_path: Path) -> None:
    name = class_names(8)[5]
    run = tmp_path / "run"
    args = [f"ckpt={checkpoint}", f"target={name}", "save_maps=true", "method=gradcam", "limit=4",
            "logger=none", *FAST_METRICS, "metrics.enabled=[average_drop]",
            f"hydra.run.dir={run}"]  # fmt: skip
    proc = run_cli("explain.py", args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = json.loads((run / "predictions.json").read_text())
    assert [(r["target"], r["target_name"]) for r in preds] == [(5, name)] * 4
    assert f"Explained class: {name} (class 5)" in (run / "metrics.md").read_text()
    z = np.load(run / "maps.npz")
    assert z["gradcam"].dtype == np.float32 and z["targets"].tolist() == [5] * 4
    assert z["ids"].tolist() == json.loads((run / "image_ids.json").read_text())

    typo = name[:-1]  # e.g. a missing last letter
    bad = run_cli(
        "explain.py", [*args[:1], f"target={typo}", f"hydra.run.dir={tmp_path / 'bad'}"],
        tmp_path, env_extra=ONE_LINE, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0
    assert f"unknown class name '{typo}'; close matches: {name}" in bad.stderr
