"""Issue 15, items 1 and 7: one W&B run per sweep job; per-job status and the sweep's summary.

The W&B runs are offline; their run records (id, name, group, job type, config) are read back
from the ``.wandb`` files W&B writes (LevelDB log format with W&B's 7-byte header).
"""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from attncam.stages import sweep
from attncam.stages import train as train_stage
from attncam.stages.cli import Job
from attncam.stages.common import WANDB_ID_FILE, wandb_run_settings
from tests.integration.helpers import FAST_METRICS, SMALL_DATA, compose, run_cli


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file (W&B header, then LevelDB log blocks of 32 KiB)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind in (2, 3):  # FIRST, MIDDLE
            parts = chunk if kind == 2 else parts + chunk
        elif kind == 4:  # LAST
            yield parts + chunk


def wandb_run_record(path: Path) -> Any:
    """The run record (id, display name, group, job type, config) of a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise AssertionError(f"no run record in {path}")


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- item 1


@pytest.mark.slow
def test_a_train_sweep_makes_one_wandb_run_per_job(tmp_path: Path, cache_dir: str) -> None:
    args = ["-m", "model=tiny", "attention=none,cbam", "trainer.max_epochs=1", "test=false",
            "logger=wandb", f"data.cache_dir={cache_dir}", *SMALL_DATA]  # fmt: skip
    proc = run_cli("train.py", args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("multirun/train/*/*")
    ids = set()
    for job, attention in (("0", "none"), ("1", "cbam")):
        files = list((sweep_dir / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files  # its own run, and only one
        run = wandb_run_record(files[0])
        assert run.run_id == (sweep_dir / job / WANDB_ID_FILE).read_text().strip()
        assert run.display_name.startswith(f"attention={attention}")  # the swept value first
        assert "model=tiny" in run.display_name
        assert run.run_group == str(sweep_dir.relative_to(tmp_path)) and run.job_type == "train"
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["model"]["attention"] == attention  # its own config, not the last job's
        ids.add(run.run_id)
        assert json.loads((sweep_dir / job / "status.json").read_text())["status"] == "COMPLETE"
    assert len(ids) == 2
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE")]
    assert all(0.0 <= float(r["val/acc"]) <= 1.0 for r in rows)


def test_wandb_run_settings_keep_the_run_id_in_the_run_folder(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"task_name": "explain"})
    first = wandb_run_settings(cfg, tmp_path, {"name": None, "group": None})
    assert first["job_type"] == "explain" and first["resume"] == "allow"
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first["id"]
    again = wandb_run_settings(cfg, tmp_path, {"name": None})
    assert again["id"] == first["id"]  # a resumed run continues the same W&B run
    other = wandb_run_settings(cfg, tmp_path / "other", {})
    assert other["id"] != first["id"]
    mine = wandb_run_settings(cfg, tmp_path, {"id": "abc", "job_type": "mine", "name": "n"})
    assert mine["id"] == "abc" and "job_type" not in mine and "name" not in mine


# --------------------------------------------------------------------------- item 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> dict[str, Path]:
    """best.ckpt of tiny with CBAM and of tiny without attention."""
    out = {}
    for attention in ("cbam", "none"):
        cfg = compose(
            "train",
            ["model=tiny", f"attention={attention}", "logger=none", "trainer.max_epochs=1",
             "test=false", f"data.cache_dir={cache_dir}", *SMALL_DATA],
        )  # fmt: skip
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path_factory.mktemp(attention) / "run")
        out[attention] = Path(train_stage.run(cfg)["best_checkpoint"])
    return out


@pytest.mark.slow
def test_an_explain_sweep_skips_a_job_no_method_applies_to(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    args = ["-m", f"ckpt={checkpoints['cbam']},{checkpoints['none']}", "method=attention_guided",
            "limit=4", "batch_size=4", "logger=none", *FAST_METRICS]  # fmt: skip
    proc = run_cli("explain.py", args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]  # strict_methods=false: not a failure
    (sweep_dir,) = tmp_path.glob("multirun/explain/*/*")
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "COMPLETE"), ("1", "SKIPPED")]
    assert float(rows[0]["attention_guided/average_drop"]) >= 0.0
    assert "no requested method applies" in rows[1]["error"]
    skipped = json.loads((sweep_dir / "1" / "status.json").read_text())
    assert skipped["status"] == "SKIPPED" and skipped["overrides"][0].startswith("ckpt=")
    assert not (sweep_dir / "1" / "COMPLETE").exists()


def test_status_and_summary_from_job_returns(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    outcomes: list[tuple[Any, JobStatus]] = [
        ({"val/acc": 0.5, "test/acc": 0.25, "epochs": 3}, JobStatus.COMPLETED),
        (ValueError("unknown attention 'cbm'; choose one of: none, se"), JobStatus.FAILED),
        ({"results": {"gradcam": {"average_drop": {"value": 12.5}, "n_skip": {}}}},
         JobStatus.COMPLETED),
    ]  # fmt: skip
    for num, (value, status) in enumerate(outcomes):
        folder = sweep_dir / str(num)
        folder.mkdir(parents=True)
        job = Job(hydra_dir=folder, out=folder, multirun=True, overrides=[f"x={num}"], num=num)
        job.result = value if isinstance(value, dict) else None
        ret = JobReturn(status=status, _return_value=value)
        state, error = sweep.job_status(job, ret)
        sweep.record_job_end(job, state, error)
    sweep.write_summary(sweep_dir)
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "COMPLETE", "x=0"), ("1", "FAILED", "x=1"), ("2", "COMPLETE", "x=2")]  # fmt: skip
    assert rows[0]["val/acc"] == "0.5" and rows[0]["test/acc"] == "0.25" and "epochs" not in rows[0]
    assert rows[1]["error"] == "ValueError: unknown attention 'cbm'; choose one of: none, se"
    assert rows[2]["gradcam/average_drop"] == "12.5" and rows[1]["val/acc"] == ""
    refused = Job(hydra_dir=tmp_path / "r", out=tmp_path / "r", refused=True)
    (tmp_path / "r").mkdir()
    assert sweep.record_job_end(refused, "FAILED", "x") == [] and not any(
        (tmp_path / "r").iterdir()
    )
