"""Bad image files through the ImageFolder data module: decoded, or skipped, counted, reported.

The explain stage's ``images=`` path is tested with the same files in
``tests/integration/test_reliability.py``; non-images and empty folders there are covered in
``tests/integration/test_explain_stage.py``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
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
