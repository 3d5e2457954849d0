"""Training end to end: config composition, fast_dev_run, checkpoints, sweeps, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from attncam.models.lit_module import CheckpointError, ClassifierModule, load_classifier
from attncam.stages import train as train_stage
from tests.integration.helpers import CONF, SMALL_DATA, compose, run_cli


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in ("data", "model", "attention", "trainer", "logger", "callbacks")
     for o in _options(g)]
    + ["experiment=an2022", "experiment=demo"],
)  # fmt: skip
def test_every_config_option_composes_and_instantiates(override: str) -> None:
    # model=by_name is a template: its backbone (timm:<name> or tv:<name>) is mandatory.
    extra = (
        ["model.backbone=tv:resnet18", "model.pretrained=false"] if "by_name" in override else []
    )
    cfg = compose("train", [override, *extra])
    assert cfg.model.backbone and cfg.model.attention
    dm = instantiate(cfg.data)  # constructing touches no disk
    assert hasattr(dm, "train_dataloader")
    if override.startswith(("model=", "attention=")):
        module = train_stage.build_module(cfg.copy(), num_classes=5) if _cheap(cfg) else None
        if module is not None:
            assert module.net.num_classes == 5


def _cheap(cfg: DictConfig) -> bool:
    return cfg.model.backbone in ("tiny", "resnet18", "squeezenet1_1", "efficientnet_lite0") and (
        cfg.model.backbone == "efficientnet_lite0" or not cfg.model.pretrained
    )


def _train_cfg(tmp_path: Path, cache_dir: str, extra: list[str]) -> DictConfig:
    cfg = compose(
        "train", ["model=tiny", "logger=csv", f"data.cache_dir={cache_dir}", *SMALL_DATA, *extra]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    return cfg


def test_fast_dev_run_then_checkpoint_round_trip(tmp_path: Path, cache_dir: str) -> None:
    cfg = _train_cfg(tmp_path, cache_dir, ["trainer.max_epochs=1", "attention=cbam"])
    results = train_stage.run(cfg)
    out = Path(results["output_dir"])
    assert (out / "results.json").is_file() and (out / "config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    for key in ("val/acc", "val/top5_err", "test/acc", "test/top5_err"):
        assert 0.0 <= saved[key] <= 1.0, key
    best = Path(results["best_checkpoint"])
    assert best.is_file() and Path(results["last_checkpoint"]).is_file()
    assert not list(best.parent.glob("*.tmp"))

    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "tiny"
    assert "attncam_version" in ckpt
    module = load_classifier(str(best))
    x = torch.rand(2, 3, 32, 32)
    ref = ClassifierModule(**{**ckpt["hyper_parameters"], "pretrained": False})
    ref.load_state_dict(ckpt["state_dict"])
    ref.eval()
    assert torch.equal(module(x), ref(x))
    # Lightning's own loader rebuilds it too, with no Hydra and no download.
    lit = ClassifierModule.load_from_checkpoint(str(best), pretrained=False, map_location="cpu")
    assert torch.equal(lit.eval()(x), module(x))


def test_resume_from_last(tmp_path: Path, cache_dir: str) -> None:
    cfg = _train_cfg(tmp_path, cache_dir, ["trainer.max_epochs=1", "attention=se"])
    first = train_stage.run(cfg)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
        cfg.resume = first["last_checkpoint"]
        cfg.output_dir = str(tmp_path / "resumed")
    second = train_stage.run(cfg)
    assert second["epochs"] == 2
    # resume=PATH continues in the checkpoint's own run folder (issue 15), not a new one.
    assert second["output_dir"] == first["output_dir"] and not (tmp_path / "resumed").exists()


def test_last_checkpoint_is_rewritten_every_epoch(tmp_path: Path, cache_dir: str) -> None:
    # lr 0: val/acc never improves after epoch 0, so the best checkpoint stays at epoch 0 while
    # last.ckpt must follow every epoch (Lightning 2.6's save_last=True would leave it at 0).
    cfg = _train_cfg(
        tmp_path,
        cache_dir,
        ["trainer.max_epochs=3", "optim.lr=0", "optim.scheduler=none", "data.augment=false"],
    )
    results = train_stage.run(cfg)
    best = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    last = torch.load(results["last_checkpoint"], map_location="cpu", weights_only=True)
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 3 * 4  # 64 images / batch 16
    assert sorted(p.name for p in Path(results["best_checkpoint"]).parent.iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(str(tmp_path / "nope.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_classifier(str(bad))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not an attncam training checkpoint"):
        load_classifier(str(other))


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_code_carrying_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        load_classifier(str(path))


def test_labels_out_of_range_are_a_clear_error() -> None:
    module = ClassifierModule(backbone="tiny", num_classes=3, attention="none")
    with pytest.raises(ValueError, match=r"labels \[7\] are out of range for num_classes=3"):
        module.training_step((torch.rand(2, 3, 32, 32), torch.tensor([0, 7])), 0)


def test_bad_override_values_name_the_choices(tmp_path: Path, cache_dir: str) -> None:
    cfg = _train_cfg(tmp_path, cache_dir, ["model.attention=cbm"])
    with pytest.raises(ValueError, match="unknown attention 'cbm'; choose one of"):
        train_stage.build_module(cfg, 3)
    cfg = _train_cfg(tmp_path, cache_dir, ["optim.optimizer=adagrad"])
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'; choose one of: sgd, adam"):
        train_stage.build_module(cfg, 3)


def test_multirun_sweep_makes_one_folder_per_job(tmp_path: Path, cache_dir: str) -> None:
    args = [
        "-m",
        "model=tiny",
        "attention=none,se,cbam,bam",
        "trainer.fast_dev_run=true",
        "logger=csv",
        f"data.cache_dir={cache_dir}",
        *SMALL_DATA,
    ]
    proc = run_cli("train.py", args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("multirun/train/**/results.json"))
    assert len(runs) == 4, proc.stderr[-2000:]
    kinds = {json.loads(r.read_text())["attention"] for r in runs}
    assert kinds == {"none", "se", "cbam", "bam"}


def test_typo_override_fails_with_hydra_message(tmp_path: Path) -> None:
    proc = run_cli("train.py", ["model=resnet5"], tmp_path, timeout=600)
    assert proc.returncode != 0
    assert "resnet5" in proc.stderr and "Available options" in proc.stderr
