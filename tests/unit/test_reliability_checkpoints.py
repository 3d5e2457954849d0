"""Checkpoints: atomic writes, explicit trust, version and hyperparameter mismatches explained.

The weights-only refusal of a code-carrying pickle, corrupt and missing files and a checkpoint of
another architecture are tested in ``tests/integration/test_train.py`` and
``tests/integration/test_explain_stage.py``; this file covers the rest of issue 7, point 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from attncam import __version__
from attncam.models.lit_module import (
    CheckpointError,
    ClassifierModule,
    check_hparams,
    load_classifier,
    read_checkpoint,
)
from attncam.stages.common import AtomicCheckpointIO


class Note:
    """A harmless class: pickled by reference, so the weights-only loader refuses it."""

    def __init__(self, text: str) -> None:
        self.text = text


def _module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(backbone="tiny", num_classes=3, attention="cbam", log_images=0)


def _checkpoint(module: ClassifierModule, **extra: Any) -> dict[str, Any]:
    return {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "attncam_version": __version__,
        **extra,
    }


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt, _Boom])
def test_a_save_failing_mid_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1), "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save({"step": torch.tensor(2), "w": torch.zeros(1000)}, f)
        f.truncate(f.tell() // 2)  # half a zip archive on disk, then the "kill"
        raise error("killed while saving")

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(error):
        io.save_checkpoint({"step": torch.tensor(2), "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert int(torch.load(path, weights_only=True)["step"]) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "partial file left"


def test_trust_checkpoint_is_the_explicit_way_past_the_weights_only_loader(
    tmp_path: Path,
) -> None:
    module = _module()
    path = tmp_path / "noted.ckpt"
    torch.save(_checkpoint(module, note=Note("from a colleague")), path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        load_classifier(str(path))
    loaded = load_classifier(str(path), trust_checkpoint=True)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), module.eval()(x))
    assert isinstance(read_checkpoint(str(path), trust_checkpoint=True)["note"], Note)


def test_checkpoint_of_another_attncam_version_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.ckpt"
    torch.save(_checkpoint(_module(), attncam_version="0.0.1"), path)
    with caplog.at_level(logging.WARNING, logger="attncam.models.checkpoint"):
        load_classifier(str(path))
    assert any("attncam 0.0.1" in r.getMessage() and __version__ in r.getMessage()
               for r in caplog.records)  # fmt: skip
    caplog.clear()
    path2 = tmp_path / "current.ckpt"
    torch.save(_checkpoint(_module()), path2)
    with caplog.at_level(logging.WARNING, logger="attncam.models.checkpoint"):
        load_classifier(str(path2))
    assert not caplog.records


def test_checkpoint_carries_hparams_and_a_mismatch_names_every_key() -> None:
    saved = dict(_module().hparams)
    expected = {**saved, "attention": "se", "num_classes": 5, "lr": 0.5}
    with pytest.raises(CheckpointError) as err:
        check_hparams(saved, expected, "run/last.ckpt")
    msg = str(err.value)
    assert "attention: checkpoint 'cbam', config 'se'" in msg
    assert "num_classes: checkpoint 3, config 5" in msg
    assert "lr" not in msg  # optimiser settings may change on resume
    check_hparams(saved, {**saved, "lr": 0.5, "max_epochs": 99}, "run/last.ckpt")


def test_hparams_that_do_not_rebuild_their_state_dict_are_explained(tmp_path: Path) -> None:
    ckpt = _checkpoint(_module())
    ckpt["hyper_parameters"]["attention"] = "se"  # state_dict is CBAM's
    path = tmp_path / "mixed.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"attention 'se'\) does not rebuild"):
        load_classifier(str(path))
