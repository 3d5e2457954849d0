"""Issue 15, items 4, 5, 6 and 9: self-describing checkpoints and what explain takes from them,
``model=NAME`` without trained weights, training images for every logger, files and the umask.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import open_dict
from PIL import Image

from attncam.data.datamodule import SyntheticDataModule
from attncam.models import AttentionNet
from attncam.models.checkpoint import METADATA_KEY, checkpoint_metadata, load_classifier
from attncam.models.lit_module import ClassifierModule
from attncam.stages.inputs import ExplainInputError, load_data, load_model
from tests.integration.helpers import compose, train_tiny


def _train(out: Path, cache_dir: str, extra: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return train_tiny(out, cache_dir, extra, logger="csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """best.ckpt of one epoch of tiny CBAM at 32 px, trained under umask 002."""
    previous = os.umask(0o002)
    try:
        result = _train(tmp_path_factory.mktemp("trained") / "run", cache_dir)
    finally:
        os.umask(previous)
    return Path(result["best_checkpoint"])


def _explain_cfg(overrides: list[str]) -> Any:
    return compose("explain", ["logger=none", "method=gradcam", *overrides])


# --------------------------------------------------------------------------- item 5


def test_a_checkpoint_describes_the_run_that_wrote_it(trained: Path, cache_dir: str) -> None:
    meta = checkpoint_metadata(torch.load(trained, map_location="cpu", weights_only=True))
    names = SyntheticDataModule(num_classes=8, image_size=32, cache_dir=cache_dir).class_names
    assert meta["class_names"] == list(names) and len(set(names)) == 8
    assert meta["image_size"] == 32
    net = AttentionNet("tiny", 8)
    assert meta["mean"] == pytest.approx(list(net.input_mean))
    assert meta["std"] == pytest.approx(list(net.input_std))
    assert meta["data"]["_target_"].endswith("SyntheticDataModule")
    assert meta["data"]["image_size"] == 32 and meta["config"]["model"]["backbone"] == "tiny"
    module = load_classifier(str(trained))
    assert module.net.class_names == list(names) and module.run_metadata == meta


def test_a_checkpoint_without_metadata_still_loads(trained: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    del ckpt[METADATA_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    module = load_classifier(str(old))
    assert module.run_metadata == {} and module.net.class_names is None
    lit = ClassifierModule.load_from_checkpoint(str(old), pretrained=False, map_location="cpu")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(lit.eval()(x), module(x))


def test_a_checkpoint_copied_out_of_its_run_folder_explains_its_own_data(
    trained: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "model.ckpt"
    copy.parent.mkdir()
    shutil.copy(trained, copy)
    model = load_model(_explain_cfg([f"ckpt={copy}"]))
    assert model.image_size == 32 and model.data_config["image_size"] == 32
    data = load_data(_explain_cfg([f"ckpt={copy}"]), model)
    assert data.class_names == model.class_names and len(data.class_names) == 8
    assert data.dataset[0][0].shape[-1] == 32

    # An older checkpoint, copied away from its config.json: the error says where it looked.
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    del ckpt[METADATA_KEY]
    torch.save(ckpt, copy)
    model = load_model(_explain_cfg([f"ckpt={copy}"]))
    with pytest.raises(ExplainInputError, match=r"no images: pass data=NAME .*looked for the "
                       r"training config in .*model.ckpt.* and .*config.json"):  # fmt: skip
        load_data(_explain_cfg([f"ckpt={copy}"]), model)


def test_images_are_explained_at_the_checkpoints_size_with_its_class_names(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (50, 40), (40 * i, 90, 120)).save(folder / f"p{i}.png")
    cfg = _explain_cfg([f"ckpt={trained}", f"images={folder}", "image_size=null"])
    model = load_model(cfg)
    data = load_data(cfg, model)
    assert data.dataset[0][0].shape[-2:] == (32, 32)
    assert data.class_names == model.class_names and data.class_names[0] != "0"
    with caplog.at_level(logging.WARNING, logger="attncam.stages.inputs"):
        data = load_data(_explain_cfg([f"ckpt={trained}", f"images={folder}", "image_size=64"]),
                         model)  # fmt: skip
    assert data.dataset[0][0].shape[-2:] == (64, 64)
    assert "explaining at image_size=64 a model trained at 32 px" in caplog.text


# --------------------------------------------------------------------------- item 4


def test_a_backbone_without_trained_weights_needs_allow_random_weights(tmp_path: Path) -> None:
    with pytest.raises(ExplainInputError, match="model=tiny has no trained weights.*"
                                                "allow_random_weights=true"):  # fmt: skip
        load_model(_explain_cfg(["model=tiny"]))
    cfg = _explain_cfg(["model=tiny"])
    with open_dict(cfg):
        cfg.allow_random_weights = True
    assert load_model(cfg).source == "random"
    weights = tmp_path / "tiny.pth"
    torch.save(AttentionNet("tiny", 1000).state_dict(), weights)
    model = load_model(_explain_cfg(["model=tiny", f"model.weights={weights}"]))
    assert model.source == "pretrained" and model.hparams["weights"] == str(weights)


# --------------------------------------------------------------------------- item 6


class ImageRecorder(Logger):
    """A logger that draws images (like W&B's): records what ``log_image`` gets."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing to record."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Nothing to record."""

    def log_image(self, key: str, images: list[torch.Tensor], **kwargs: Any) -> None:
        """Record the call."""
        self.images.append({"key": key, "images": images, **kwargs})


def test_training_images_reach_every_logger_that_draws(tmp_path: Path, cache_dir: str) -> None:
    dm = SyntheticDataModule(image_size=32, num_train=32, num_val=16, num_test=16, batch_size=16,
                             cache_dir=cache_dir)  # fmt: skip
    module = ClassifierModule(backbone="tiny", num_classes=8, attention="none", log_images=4)
    recorder = ImageRecorder()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                        logger=[CSVLogger(str(tmp_path)), recorder], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    (call,) = recorder.images  # the CSV logger, first in the list, cannot draw: no matter
    assert call["key"] == "train/samples" and len(call["images"]) == 4
    assert call["images"][0].shape == (3, 32, 32)
    assert set(call["caption"]) <= set(dm.class_names)


# --------------------------------------------------------------------------- item 9


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_and_run_files_follow_the_umask(trained: Path) -> None:
    run = trained.parent.parent  # trained under umask 002: group-writable, world-readable
    for path in [*run.glob("checkpoints/*.ckpt"), run / "results.json", run / "config.json",
                 run / "csv" / "metrics.csv"]:  # fmt: skip
        assert _mode(path) == 0o664, (path, oct(_mode(path)))


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o002, 0o664)])
def test_figures_and_checkpoints_follow_the_umask(
    tmp_path: Path, umask: int, expected: int
) -> None:
    from matplotlib.figure import Figure

    from attncam.stages.common import AtomicCheckpointIO
    from attncam.viz.figures import save_figure

    previous = os.umask(umask)
    try:
        fig = Figure(figsize=(1, 1))
        fig.add_subplot().plot([0, 1])
        figure = save_figure(fig, tmp_path / "figures" / "grid.png")
        ckpt = tmp_path / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir()
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, ckpt)
    finally:
        os.umask(previous)
    assert _mode(figure) == expected and _mode(ckpt) == expected
