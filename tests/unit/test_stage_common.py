"""Loggers and callbacks come from their _target_ configs, in one loop, for the default groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf

from attncam.stages.common import QuietWandbLogger, build_callbacks_from_config, build_loggers
from attncam.stages.train import build_callbacks
from tests.integration.helpers import compose


def test_default_loggers_are_wandb_then_csv_with_the_run_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose("train", ["model=tiny", "seed=7"])
    loggers = build_loggers(cfg, tmp_path)
    assert [type(lg) for lg in loggers] == [QuietWandbLogger, CSVLogger]
    wandb_logger = loggers[0]
    assert isinstance(wandb_logger, WandbLogger)
    # Lightning passes anonymous=None, which makes wandb 0.31 warn on every run
    assert "anonymous" not in wandb_logger._wandb_init  # noqa: SLF001
    assert Path(wandb_logger.save_dir) == tmp_path  # type: ignore[arg-type]
    assert wandb_logger._wandb_init["config"]["seed"] == 7  # noqa: SLF001
    assert Path(loggers[1].log_dir) == tmp_path / "csv"


def test_the_wandb_run_starts_without_the_anonymous_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "false")
    (logger,) = build_loggers(compose("train", ["model=tiny", "logger=wandb",
                                                "logger.csv=null"]), tmp_path)  # fmt: skip
    try:
        logger.experiment  # noqa: B018 (starts the run)
    finally:
        wandb.finish()
    printed = capsys.readouterr()
    assert "offline" in printed.out + printed.err  # wandb did speak, and
    assert "anonymous setting" not in printed.out + printed.err


def test_logger_none_and_a_disabled_entry(tmp_path: Path) -> None:
    assert build_loggers(compose("train", ["logger=none"]), tmp_path) == []
    cfg = compose("train", ["logger=wandb", "logger.wandb=null"])
    assert [type(lg) for lg in build_loggers(cfg, tmp_path)] == [CSVLogger]


def test_an_entry_without_target_is_an_error(tmp_path: Path) -> None:
    group = OmegaConf.create({"csv": {"name": "csv"}})
    with pytest.raises(ValueError, match="callbacks.csv has no _target_"):
        build_callbacks_from_config(group, tmp_path, has_logger=False)


def test_training_callbacks_follow_the_overrides(tmp_path: Path) -> None:
    cfg = compose("train", ["logger=none", "callbacks.monitor=val/loss", "callbacks.mode=min"])
    cbs = build_callbacks(cfg, tmp_path)
    best, last = (c for c in cbs if isinstance(c, ModelCheckpoint))
    assert (best.monitor, best.mode, best.dirpath) == ("val/loss", "min", str(tmp_path))
    assert last.monitor is None and last.every_n_epochs == 1
    names = [type(c).__name__ for c in cbs]
    assert "LearningRateMonitor" not in names  # no logger: Lightning would refuse it
    assert "FreezePretrained" not in names  # freeze_epochs=0
    cfg = compose("train", ["logger=csv", "callbacks.freeze_epochs=2"])
    names = [type(c).__name__ for c in build_callbacks(cfg, tmp_path)]
    assert "LearningRateMonitor" in names and "FreezePretrained" in names
    assert any(isinstance(c, TQDMProgressBar) for c in build_callbacks(cfg, tmp_path))
