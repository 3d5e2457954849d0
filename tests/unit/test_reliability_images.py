"""Bad image files through the ImageFolder data module: decoded, or skipped, counted, reported.

The explain stage's ``images=`` path is tested with the same files in
``tests/integration/test_reliability.py``; non-images and empty folders there are covered in
``tests/integration/test_explain_stage.py``.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from attncam.data.datamodule import ImageFolderDataModule

GOOD = ("rgb.png", "gray.png", "rgba.png", "gray16.png", "one_by_one.png", "palette.gif")
BAD = ("corrupt.png", "truncated.jpg", "empty.png")


def write_bad_images(folder: Path, big: bool = False) -> dict[str, Path]:
    """One file per case of issue 7 (``big``: also a 10000 x 10000 PNG, 1e8 pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    files = {name: folder / name for name in (*GOOD, *BAD)}
    Image.fromarray(rgb).save(files["rgb.png"])
    Image.fromarray(rgb[..., 0]).save(files["gray.png"])
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(files["rgba.png"])
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(files["gray16.png"])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(files["one_by_one.png"])
    Image.fromarray(rgb).convert("P").save(files["palette.gif"])
    files["corrupt.png"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    files["truncated.jpg"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["empty.png"].write_bytes(b"")
    if big:
        files["huge.png"] = folder / "huge.png"
        Image.new("L", (10_000, 10_000), 90).save(files["huge.png"])
    return files


def _tree(root: Path) -> None:
    for split in ("train", "val"):
        for cls in ("cats", "dogs"):
            write_bad_images(root / split / cls)


def test_image_folder_decodes_odd_modes_and_skips_broken_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Image.open(write_bad_images(tmp_path / "probe")["gray16.png"]) as im:
        assert im.mode.startswith("I")
    _tree(tmp_path / "tree")
    dm = ImageFolderDataModule(
        root=tmp_path / "tree", image_size=32, batch_size=4, num_workers=0, verify="full"
    )
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            n = 0
            for images, labels in loader:
                assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
                assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
                assert ((labels >= 0) & (labels < 2)).all()
                n += len(labels)
            assert n >= len(loader.dataset) - 4  # train drops its last partial batch
    train = dm._dataset("train", True, False)
    assert len(train) == 2 * len(GOOD)
    assert train.skipped == 2 * len(BAD)
    assert sorted({Path(p).name for p in train.skipped_paths}) == sorted(BAD)
    assert "skipped 6 file(s) that are not readable images" in caplog.text


def test_truncated_files_found_only_when_decoded_are_skipped_and_counted(tmp_path: Path) -> None:
    _tree(tmp_path / "tree")
    dm = ImageFolderDataModule(
        root=tmp_path / "tree", image_size=32, batch_size=4, num_workers=0, verify="header"
    )
    dm.setup("fit")
    val = dm._dataset("val", False, False)
    seen = [val[i] for i in range(len(val))]  # 'header' lets the truncated JPEG through
    assert all(img.shape == (3, 32, 32) for img, _ in seen)
    assert any(Path(p).name == "truncated.jpg" for p in val.skipped_paths)


def test_decompression_bomb_is_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path / "tree")
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (default 89.5 M, so 179 M pixels): lower the
    # limit so the 48 x 40 images stand in for a bomb without allocating one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    dm = ImageFolderDataModule(
        root=tmp_path / "tree", image_size=32, batch_size=4, num_workers=0, verify="full"
    )
    dm.setup("fit")
    train = dm._dataset("train", True, False)
    assert len(train) == 2  # only the 1 x 1 images are under the lowered limit
    assert {Path(p).name for p in train.skipped_paths} == {*GOOD, *BAD} - {"one_by_one.png"}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow
def test_a_10000_by_10000_image_is_decoded_and_resized(tmp_path: Path) -> None:
    """1e8 pixels: over PIL's warning limit (89.5 M), under its error limit (179 M)."""
    import warnings

    from attncam.data.transforms import EvalTransform, load_image

    path = write_bad_images(tmp_path, big=True)["huge.png"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    out, _ = EvalTransform(32)(image)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- images= folders


def _explain_cfg(**values: object) -> DictConfig:
    base = {"images": None, "image_size": 32, "limit": None, "select": None}
    return OmegaConf.create({**base, **values})


def _photo_tree(root: Path) -> None:
    """``cats/{a,b}.png``, ``Dogs/a.png``, ``other/c.png``, ``top.png`` and a hidden file."""
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for rel in ("cats/a.png", "cats/b.png", "Dogs/a.png", "other/c.png", "top.png", ".x/h.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / rel)


def test_a_folder_is_read_recursively_with_class_subfolders_as_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from attncam.stages.inputs import ModelInfo, load_data

    _photo_tree(tmp_path)
    model = ModelInfo(net=torch.nn.Identity(), source="checkpoint", class_names=["dog", "cats"])
    with caplog.at_level(logging.INFO, logger="attncam.stages.inputs"):
        data = load_data(_explain_cfg(images=str(tmp_path)), model)
    names = [str(Path(p).relative_to(tmp_path)) for p in data.paths or []]
    assert names == ["Dogs/a.png", "cats/a.png", "cats/b.png", "other/c.png", "top.png"]
    # "Dogs" matches "dog"? No: only case, "_" and "-" are ignored, so it is unlabelled.
    assert [data.dataset[i][1] for i in range(5)] == [-1, 1, 1, -1, -1]
    (line,) = [r.getMessage() for r in caplog.records if "labelled by their subfolder" in r.message]
    assert "2 of 5 images labelled" in line and "3 unlabelled" in line
    assert "name no class of the model: Dogs, other" in line


def test_imagenet_style_names_match_any_comma_separated_part(tmp_path: Path) -> None:
    from attncam.data.files import image_paths, subfolder_labels

    _photo_tree(tmp_path)
    paths = image_paths(str(tmp_path))
    labels, unknown = subfolder_labels(str(tmp_path), paths, ["tabby, cats", "Dogs_"])
    assert labels == [1, 0, 0, -1, -1] and unknown == ["other"]
    # files given one by one or by a glob are never labelled by their folder
    assert subfolder_labels([str(p) for p in paths], paths, ["cats"])[0] == [-1] * 5


def test_select_by_index_and_file_and_its_errors(tmp_path: Path) -> None:
    from attncam.stages.inputs import ExplainInputError, ModelInfo, load_data, selected_ids

    _photo_tree(tmp_path)
    model = ModelInfo(net=torch.nn.Identity(), source="pretrained", class_names=None)
    data = load_data(_explain_cfg(images=str(tmp_path)), model)
    pick = _explain_cfg(select=[4, "cats/b.png", str(tmp_path / "Dogs" / "a.png")])
    assert selected_ids(pick, data) == [4, 2, 0]
    assert selected_ids(_explain_cfg(select=3), data) == [3]
    assert selected_ids(_explain_cfg(), data) is None
    errors = {
        "select index 9 is out of range; choose 0..4": [9],
        "select='a.png' matches 2 files": ["a.png"],
        "select='zzz.png' matches no explained file": ["zzz.png"],
        "must name at least one image, each once": [1, 1],
    }
    for message, select in errors.items():
        with pytest.raises(ExplainInputError, match=re.escape(message)):
            selected_ids(_explain_cfg(select=select), data)
    assert selected_ids(_explain_cfg(select=[1], limit=2), data) == [1]  # select wins
    split = type(data)(dataset=data.dataset, class_names=None, source="split")
    with pytest.raises(ExplainInputError, match="a data split has no file names"):
        selected_ids(_explain_cfg(select=["top.png"]), split)


def test_localisation_metrics_are_dropped_only_without_masks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from attncam.metrics import METRIC_KEYS
    from attncam.stages.inputs import (
        LOCALISATION_METRICS,
        DataInfo,
        ExplainInputError,
        drop_localisation,
    )

    assert set(LOCALISATION_METRICS) <= set(METRIC_KEYS)
    image = torch.zeros(3, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    masked = mask.clone()
    masked[2:4, 2:4] = True
    # a split whose third image has a mask keeps them; files (paths) never have masks
    split = DataInfo([(image, 0, mask), (image, 1, mask), (image, 0, masked)], None, "split")
    cfg = {"enabled": ["average_drop", "pointing_game"]}
    assert drop_localisation(cfg, split, [0, 1, 2]) == [] and cfg["enabled"][1] == "pointing_game"
    files = DataInfo([(image, -1, mask)], None, "images=x", paths=["x.png"])
    every: dict[str, object] = {"enabled": None}
    with caplog.at_level(logging.INFO, logger="attncam.stages.inputs"):
        assert drop_localisation(every, files, [0]) == list(LOCALISATION_METRICS)
    assert every["enabled"] == [
        k for k in METRIC_KEYS if k not in LOCALISATION_METRICS and k != "grid_pointing_game"
    ]
    assert sum("localisation metrics left out" in r.message for r in caplog.records) == 1
    with pytest.raises(ExplainInputError, match="only localisation metrics are enabled"):
        drop_localisation({"enabled": ["mask_iou"]}, files, [0])
