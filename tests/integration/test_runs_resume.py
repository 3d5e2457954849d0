"""Issue 15, item 2: ``resume=last`` / ``resume=PATH`` continue the run they name, in its folder.

The run's CSV history is appended to (not replaced), the same W&B run is continued by its id,
and the model and data settings come from the checkpoint. See ``attncam.stages.resume``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf, open_dict

from attncam.stages import resume as resume_mod
from attncam.stages import train as train_stage
from attncam.stages.cli import ConfigError
from attncam.stages.common import WANDB_ID_FILE, ResumableCSVLogger
from tests.integration.helpers import ROOT, SMALL_DATA, compose, run_cli


class SigtermAtEpochEnd(Callback):
    """Send this process SIGTERM at the end of training epoch ``epoch`` (a killed job)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """SIGTERM once ``epoch`` has finished: Lightning stops at the next batch."""
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def val_rows(rows: list[dict[str, str]]) -> dict[str, str]:
    """``{epoch: val/acc}`` of the validation rows."""
    return {r["epoch"]: r["val/acc"] for r in rows if r.get("val/acc")}


# --------------------------------------------------------------------------- the commands


@pytest.mark.slow
def test_resume_last_finds_the_run_and_continues_it_there(tmp_path: Path, cache_dir: str) -> None:
    common = ["model=tiny", "attention=cbam", "logger=wandb", "trainer.max_epochs=2",
              f"data.cache_dir={cache_dir}", *SMALL_DATA,
              f"+callbacks.stop._target_={__name__}.SigtermAtEpochEnd"]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    killed = run_cli("train.py", common, tmp_path, env_extra=env, timeout=900)
    assert killed.returncode == 143, killed.stderr[-3000:]
    (run,) = tmp_path.glob("outputs/train/*/*")
    assert json.loads((run / "status.json").read_text())["status"] == "INTERRUPTED"
    first = val_rows(csv_rows(run))
    assert list(first) == ["0"]

    # The same command with resume=last: a new time-stamped folder would be made; it is not.
    resumed = run_cli("train.py", [*common, "resume=last"], tmp_path, env_extra=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(tmp_path.glob("outputs/train/*/*")) == [run]
    assert json.loads((run / "results.json").read_text())["epochs"] == 2
    rows = csv_rows(run)
    assert val_rows(rows) == {"0": first["0"], "1": val_rows(rows)["1"]}  # epoch 0 kept
    assert len([r for r in rows if r.get("val/acc")]) == 2  # and not logged twice
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    wandb_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.endswith("-" + run_id) for p in wandb_runs)
    log = (run / "train.log").read_text()
    assert "Received SIGTERM" in log and "resume=last: continuing" in log
    assert "resume=last" in (run / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert "resume=" not in (run / ".hydra" / "overrides.yaml").read_text()

    # resume=PATH with no model or data settings: the checkpoint's own config, in its folder.
    more = ["resume=" + str(run / "checkpoints" / "last.ckpt"), "trainer.max_epochs=3",
            "logger=csv", f"data.cache_dir={cache_dir}"]  # fmt: skip
    again = run_cli("train.py", more, tmp_path, env_extra=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(tmp_path.glob("outputs/train/*/*")) == [run]
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 3 and results["model"] == "tiny" and results["attention"] == "cbam"
    assert list(val_rows(csv_rows(run))) == ["0", "1", "2"]
    assert json.loads((run / "config.json").read_text())["data"]["image_size"] == 32

    # Nothing with these overrides to continue: an error that says what to pass.
    none = run_cli("train.py", ["model=tiny", "attention=se", "resume=last"], tmp_path,
                   env_extra={"HYDRA_FULL_ERROR": "0"}, timeout=900)  # fmt: skip
    assert none.returncode == 2
    assert "resume=last: no run under outputs/train" in none.stderr
    assert str(run) in none.stderr and "pass resume=PATH" in none.stderr
    assert list(tmp_path.glob("outputs/train/*/*")) == [run]


# --------------------------------------------------------------------------- in process


def _train_cfg(out: Path, cache_dir: str, extra: list[str]) -> Any:
    cfg = compose("train", ["model=tiny", "attention=cbam", "logger=csv", "threads=1",
                            f"data.cache_dir={cache_dir}", *SMALL_DATA, *extra])  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_a_resumed_run_appends_to_its_csv_history(
    tmp_path: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = train_stage.build_callbacks
    monkeypatch.setattr(
        train_stage, "build_callbacks", lambda *a: [*build(*a), SigtermAtEpochEnd()]
    )
    cfg = _train_cfg(tmp_path / "run", cache_dir, ["trainer.max_epochs=2", "test=false"])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            train_stage.run(cfg)
        first = csv_rows(tmp_path / "run")
        monkeypatch.setattr(train_stage, "build_callbacks", build)
        with open_dict(cfg):
            cfg.resume = "last"
        train_stage.run(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = csv_rows(tmp_path / "run")
    assert rows[: len([r for r in first if float(r["step"]) < 4])] == [
        r for r in first if float(r["step"]) < 4
    ]  # every row of epoch 0 (steps 0..3), as it was
    assert val_rows(rows).keys() == {"0", "1"} and val_rows(rows)["0"] == val_rows(first)["0"]


def test_resumable_csv_logger_keeps_the_rows_before_the_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "csv"
    folder.mkdir()
    old = "epoch,lr,step,val/acc\n,0.01,0,\n0,,3,0.5\n,0.005,4,\n1,,7,0.6\n"
    (folder / "metrics.csv").write_text(old)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="",
                                keep_rows_before_step=4)  # fmt: skip
    logger.log_metrics({"epoch": 1, "val/acc": 0.7, "train/loss": 2.0}, step=7)
    logger.save()
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["val/acc"]) for r in rows] == [("0", ""), ("3", "0.5"), ("7", "0.7")]
    assert rows[-1]["train/loss"] == "2.0" and rows[0]["lr"] == "0.01"
    # What Lightning's own logger does with the same file: the history is gone.
    (folder / "metrics.csv").write_text(old)
    plain = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    plain.log_metrics({"epoch": 1, "val/acc": 0.7}, step=7)
    plain.save()
    assert "0.5" not in (folder / "metrics.csv").read_text()


def _fake_run(root: Path, name: str, overrides: list[str], mtime: float) -> Path:
    run = root / "2026-01-01" / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    last = run / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    os.utime(last, (mtime, mtime))
    return run


def test_the_latest_run_with_the_same_overrides_is_found(tmp_path: Path) -> None:
    root = tmp_path / "outputs" / "train"
    older = _fake_run(root, "10-00", ["model=tiny", "attention=cbam"], 1000)
    newer = _fake_run(root, "11-00", ["attention=cbam", "model=tiny"], 2000)
    other = _fake_run(root, "12-00", ["model=tiny", "attention=se"], 3000)
    found, runs = resume_mod.find_run_to_resume([root], ["model=tiny", "attention=cbam",
                                                         "resume=last"])  # fmt: skip
    assert found == newer and runs == [other, newer, older]
    assert resume_mod.find_run_to_resume([root], ["model=tiny"])[0] is None
    assert resume_mod.same_overrides(["a=1", "resume=last"], ["a=1"])
    assert not resume_mod.same_overrides(["a=1"], ["a=2"])


def test_where_resume_continues(tmp_path: Path) -> None:
    loose = tmp_path / "elsewhere" / "copy.ckpt"
    loose.parent.mkdir()
    loose.write_bytes(b"x")
    out = tmp_path / "new"
    cfg = OmegaConf.create({"resume": str(loose), "task_name": "train"})
    assert resume_mod.locate(cfg, out) == (loose.resolve(), out)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg.resume = str(run / "checkpoints" / "last.ckpt")
    assert resume_mod.locate(cfg, out) == ((run / "checkpoints" / "last.ckpt").resolve(), run)
    cfg.resume = "last"
    assert resume_mod.locate(cfg, run)[1] == run
    assert resume_mod.locate(cfg, out) == (None, out)  # a folder of its own: from scratch
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds results.json but no checkpoints/last.ckpt"):
        resume_mod.locate(cfg, run)
    cfg.resume = str(tmp_path / "missing.ckpt")
    with pytest.raises(Exception, match="does not exist"):
        resume_mod.locate(cfg, out)


def test_a_resumed_run_takes_model_and_data_from_the_checkpoint() -> None:
    cfg = compose("train", ["data.cache_dir=/cache"])  # defaults: efficientnet_lite0, 128 px
    saved = {"model": {"backbone": "tiny", "attention": "se", "placement": "blocks"},
             "data": {"_target_": "attncam.data.datamodule.SyntheticDataModule",
                      "image_size": 32, "cache_dir": "/old"}}  # fmt: skip
    merged = resume_mod.merge_resumed_config(cfg, saved, ["resume=x", "data.cache_dir=/cache"])
    assert merged.model.backbone == "tiny" and merged.model.attention == "se"
    assert merged.data.image_size == 32 and merged.data.cache_dir == "/cache"  # yours on top
    chosen = resume_mod.merge_resumed_config(cfg, saved, ["model=resnet18"])
    assert chosen.model.backbone == cfg.model.backbone  # chosen: kept, checked against the ckpt
    assert resume_mod.merge_resumed_config(cfg, saved, None) is cfg  # outside Hydra: as given
    assert cfg.model.backbone == "efficientnet_lite0"  # the input is not modified
