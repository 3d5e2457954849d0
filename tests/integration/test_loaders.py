"""Every on-disk loader on a tiny tree in its dataset's real layout, and the bad-input cases."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attncam.data import folders
from attncam.data.datamodule import (
    CUB200DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    ImagenetteDataModule,
)

SIZE = 32
COMMON = {"image_size": SIZE, "batch_size": 4, "num_workers": 0, "crop_pct": 1.0}


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> None:
    """A small random image (size is width, height) in the given mode, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None)


def write_bad_files(folder: Path) -> list[Path]:
    """A text file named .jpg, a truncated JPEG and a stray .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "fake.jpg"
    fake.write_text("this is not an image")
    good = folder / "_source.jpg"
    write_image(good, 99, (64, 64))
    truncated = folder / "truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixel data cut
    good.unlink()
    note = folder / "notes.txt"
    note.write_text("annotations")
    return [fake, truncated, note]


# ----------------------------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------------------------


def make_split_tree(root: Path) -> None:
    for split, count in (("train", 5), ("val", 2), ("test", 2)):
        for c, name in enumerate(("cat", "dog", "fox")):
            for k in range(count):
                mode = ("RGB", "L", "RGBA")[k % 3]
                suffix = ".png" if mode == "RGBA" else ".jpg"
                write_image(root / split / name / f"{k}{suffix}", 100 * c + k, mode=mode)


def test_imagefolder_with_split_folders(tmp_path: Path) -> None:
    make_split_tree(tmp_path)
    dm = ImageFolderDataModule(root=tmp_path, **COMMON)
    assert dm.class_names == ["cat", "dog", "fox"] and dm.num_classes == 3
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0.0 <= float(images.min()) <= float(images.max()) <= 1
    assert len(dm.explain_dataset("test")) == 6
    images, labels, masks = next(iter(dm.explain_dataloader("val")))
    assert masks.shape == (4, SIZE, SIZE) and masks.dtype == torch.bool
    assert not masks.any(), "no annotation -> all-False masks"


def test_imagefolder_random_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    for c in range(2):
        for k in range(10):
            write_image(tmp_path / f"class{c}" / f"{k}.jpg", 10 * c + k)
    a = ImageFolderDataModule(root=tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1, **COMMON)
    b = ImageFolderDataModule(root=tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1, **COMMON)
    c = ImageFolderDataModule(root=tmp_path, val_fraction=0.2, test_fraction=0.2, seed=2, **COMMON)
    sa, sb, sc = a.index()[0], b.index()[0], c.index()[0]
    assert [len(sa[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sa == sb and sa["val"] != sc["val"]
    paths = {s: {x.path for x in sa[s]} for s in sa}
    assert not paths["train"] & paths["val"] and not paths["val"] & paths["test"]
    assert sorted(x.label for x in sa["val"]) == [0, 0, 1, 1]


def test_imagefolder_skips_corrupt_files_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_split_tree(tmp_path)
    bad = write_bad_files(tmp_path / "train" / "dog")
    dm = ImageFolderDataModule(root=tmp_path, verify="full", **COMMON)
    with caplog.at_level(logging.WARNING, logger="attncam.data.folders"):
        dataset = dm.explain_dataset("train")
        dm._dataset("train", True, False)
    train = dm._dataset("train", True, False)
    assert train.skipped == 3  # type: ignore[attr-defined]
    assert set(train.skipped_paths) == {str(p) for p in bad}  # type: ignore[attr-defined]
    assert "skipped 3 file(s)" in caplog.text and "fake.jpg" in caplog.text
    assert len(dataset) == 15
    # A cheap header check lets the truncated JPEG through; it is skipped when loaded.
    dm = ImageFolderDataModule(root=tmp_path, verify="header", **COMMON)
    train = dm._dataset("train", False, False)
    assert train.skipped == 2  # type: ignore[attr-defined]
    truncated = next(i for i, s in enumerate(train.samples) if s.path.name == "truncated.jpg")  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attncam.data.folders"):
        image, label = train[truncated]
    assert image.shape == (3, SIZE, SIZE)
    assert train.skipped == 3 and "truncated.jpg" in caplog.text  # type: ignore[attr-defined]


def test_imagefolder_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.root"):
        _ = ImageFolderDataModule(root=missing, **COMMON).class_names
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    dm = ImageFolderDataModule(root=tmp_path / "empty", **COMMON)
    with pytest.raises(ValueError, match="empty dataset"):
        dm.setup("fit")
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        _ = ImageFolderDataModule(root=tmp_path / "noclasses", **COMMON).num_classes


def test_imagefolder_val_class_unknown_is_out_of_range(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "a" / "0.jpg", 0)
    write_image(tmp_path / "val" / "zebra" / "0.jpg", 1)
    with pytest.raises(ValueError, match=r"zebra.*out of range"):
        ImageFolderDataModule(root=tmp_path, **COMMON).index()


def test_label_out_of_range_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "x.jpg", 0)
    sample = folders.Sample(tmp_path / "x.jpg", label=5)
    with pytest.raises(ValueError, match=r"out of range: 5; valid labels are 0..2"):
        folders.ImageFileDataset([sample], ["a", "b", "c"], transform=lambda i, m: (i, m))


# ----------------------------------------------------------------------------------------------
# Imagenette
# ----------------------------------------------------------------------------------------------

IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n03000684")


def make_imagenette(root: Path, size_dir: str = "imagenette2-160") -> None:
    for split, count in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(IMAGENETTE_WNIDS):
            for k in range(count):
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{c}{k}.JPEG"
                write_image(root / size_dir / split / wnid / name, 10 * c + k, (60, 45))


def test_imagenette_loader(tmp_path: Path) -> None:
    make_imagenette(tmp_path)
    dm = ImagenetteDataModule(root=tmp_path, size="160px", **COMMON)
    dm.prepare_data()
    assert dm.class_names == ["tench", "English springer", "chain saw"]
    dm.setup()
    assert dm.wnids == list(IMAGENETTE_WNIDS)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, SIZE, SIZE)
    assert len(dm.explain_dataset("test")) == 6, "the test split is the val split"


def test_imagenette_missing_offline_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = ImagenetteDataModule(root=tmp_path, size="320px", download=False, **COMMON)
    with pytest.raises(FileNotFoundError) as info:
        _ = dm.class_names
    message = str(info.value)
    assert str(tmp_path / "imagenette2-320") in message and "data.download=true" in message
    assert "imagenette2-320.tgz" in message

    def offline(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(folders.socket, "create_connection", offline)
    dm = ImagenetteDataModule(root=tmp_path, size="160px", download=True, **COMMON)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz" in message
    assert str(tmp_path / "imagenette2-160") in message and "data.download=false" in message
    with pytest.raises(ValueError, match="unknown Imagenette size '80px'; choose one of"):
        ImagenetteDataModule(root=tmp_path, size="80px")


# ----------------------------------------------------------------------------------------------
# ImageNet
# ----------------------------------------------------------------------------------------------

IMAGENET_WNIDS = ("n01440764", "n01443537")

XML_TEMPLATE = """<annotation>
  <folder>val</folder>
  <filename>{stem}</filename>
  <source><database>ILSVRC_2012</database></source>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  <segmented>0</segmented>
  {objects}
</annotation>
"""
OBJECT_TEMPLATE = """<object>
    <name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>
  </object>"""


def make_imagenet(root: Path, flat_val: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Train/val tree; returns val stem -> (wnid, box) with box inclusive (VOC style)."""
    truth: dict[str, tuple[str, tuple[int, ...]]] = {}
    for c, wnid in enumerate(IMAGENET_WNIDS):
        for k in range(3):
            write_image(root / "train" / wnid / f"{wnid}_{k}.JPEG", 10 * c + k, (64, 48))
        for k in range(2):
            stem = f"ILSVRC2012_val_{c * 2 + k + 1:08d}"
            folder = root / "val" if flat_val else root / "val" / wnid
            write_image(folder / f"{stem}.JPEG", 100 + 10 * c + k, (64, 64))
            truth[stem] = (wnid, (8, 16, 31, 47))
    return truth


def write_xml_boxes(folder: Path, truth: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (wnid, (x0, y0, x1, y1)) in truth.items():
        obj = OBJECT_TEMPLATE.format(wnid=wnid, x0=x0, y0=y0, x1=x1, y1=y1)
        (folder / f"{stem}.xml").write_text(
            XML_TEMPLATE.format(stem=stem, width=64, height=64, objects=obj)
        )


def write_loc_csv(path: Path, truth: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    lines = ["ImageId,PredictionString"]
    for stem, (wnid, box) in truth.items():
        lines.append(f"{stem},{wnid} {' '.join(str(v) for v in box)} ")
    path.write_text("\n".join(lines) + "\n")


def expected_mask(scale: float = SIZE / 64) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[round(16 * scale) : round(48 * scale), round(8 * scale) : round(32 * scale)] = True
    return mask


def test_imagenet_with_ilsvrc_xml_boxes(tmp_path: Path) -> None:
    truth = make_imagenet(tmp_path)
    write_xml_boxes(tmp_path / "ILSVRC2012_bbox_val_v3" / "val", truth)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    )
    dm = ImageNetDataModule(root=tmp_path, **COMMON)
    assert dm.class_names == ["tench", "goldfish"]
    images, labels, masks = next(iter(dm.explain_dataloader("test")))
    assert images.shape == (4, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 1, 1]
    for mask in masks:
        assert (mask == expected_mask()).float().mean() > 0.97
    train_images, train_labels = next(iter(dm.train_dataloader()))
    assert train_images.shape == (4, 3, SIZE, SIZE)


def test_imagenet_boxes_rescaled_to_the_decoded_size(tmp_path: Path) -> None:
    truth = make_imagenet(tmp_path)
    write_xml_boxes(tmp_path / "val_annotations", truth)
    # The val images were downscaled after annotation (e.g. a 32 px copy): boxes follow.
    for path in (tmp_path / "val").rglob("*.JPEG"):
        with Image.open(path) as image:
            image.resize((32, 32)).save(path, format="JPEG")
    dm = ImageNetDataModule(root=tmp_path, **COMMON)
    _, _, masks = next(iter(dm.explain_dataloader("val")))
    assert (masks[0] == expected_mask()).float().mean() > 0.97


def test_imagenet_flat_val_with_loc_solution_csv(tmp_path: Path) -> None:
    truth = make_imagenet(tmp_path, flat_val=True)
    write_loc_csv(tmp_path / "LOC_val_solution.csv", truth)
    dm = ImageNetDataModule(root=tmp_path, **COMMON)
    images, labels, masks = next(iter(dm.explain_dataloader("val")))
    assert labels.tolist() == [0, 0, 1, 1]
    assert (masks[3] == expected_mask()).float().mean() > 0.97


def test_imagenet_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        _ = ImageNetDataModule(root=tmp_path / "missing", **COMMON).class_names
    truth = make_imagenet(tmp_path, flat_val=True)
    truth["ILSVRC2012_val_00000001"] = ("n99999999", (1, 1, 5, 5))
    write_loc_csv(tmp_path / "LOC_val_solution.csv", truth)
    with pytest.raises(ValueError, match=r"n99999999.*out of range"):
        ImageNetDataModule(root=tmp_path, **COMMON).index()
    with pytest.raises(FileNotFoundError, match=r"data\.val_boxes"):
        ImageNetDataModule(root=tmp_path, val_boxes=tmp_path / "nope.csv", **COMMON).index()


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------

CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")


def make_cub(root: Path, bad_label: int | None = None) -> None:
    base = root / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for c, cls in enumerate(CUB_CLASSES, start=1):
        for k in range(4):
            image_id += 1
            rel = f"{cls}/{cls.split('.')[1]}_{k:04d}_{image_id}.jpg"
            write_image(base / "images" / rel, image_id, (64, 64))
            images.append(f"{image_id} {rel}")
            label = bad_label if (bad_label is not None and image_id == 1) else c
            labels.append(f"{image_id} {label}")
            split.append(f"{image_id} {1 if k < 3 else 0}")
            boxes.append(f"{image_id} 8.0 16.0 24.0 32.0")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (base / "classes.txt").write_text(
        "\n".join(f"{i} {c}" for i, c in enumerate(CUB_CLASSES, start=1)) + "\n"
    )


def test_cub200_loader_with_boxes(tmp_path: Path) -> None:
    make_cub(tmp_path)
    dm = CUB200DataModule(root=tmp_path, val_fraction=0.34, **COMMON)
    assert dm.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    splits = dm.index()[0]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    images, labels, masks = next(iter(dm.explain_dataloader("test")))
    assert images.shape == (3, 3, SIZE, SIZE) and labels.tolist() == [0, 1, 2]
    assert (masks[0] == expected_mask()).float().mean() > 0.97
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, SIZE, SIZE)
    # The CUB_200_2011 directory itself works as the root too.
    assert CUB200DataModule(root=tmp_path / "CUB_200_2011", **COMMON).num_classes == 3


def test_cub200_segmentations(tmp_path: Path) -> None:
    make_cub(tmp_path)
    for path in (tmp_path / "CUB_200_2011" / "images").rglob("*.jpg"):
        rel = path.relative_to(tmp_path / "CUB_200_2011" / "images").with_suffix(".png")
        seg = np.zeros((64, 64), dtype=np.uint8)
        seg[16:48, 8:32] = 255
        (tmp_path / "segmentations" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(seg).save(tmp_path / "segmentations" / rel)
    dm = CUB200DataModule(root=tmp_path, masks="segmentations", val_fraction=0.0, **COMMON)
    _, _, masks = next(iter(dm.explain_dataloader("val")))
    assert (masks[0] == expected_mask()).float().mean() > 0.97


def test_cub200_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CUB-200-2011.*data\.root"):
        _ = CUB200DataModule(root=tmp_path / "missing", **COMMON).class_names
    make_cub(tmp_path, bad_label=7)
    with pytest.raises(ValueError, match=r"class id 7 .*out of range"):
        _ = CUB200DataModule(root=tmp_path, **COMMON).class_names
    with pytest.raises(ValueError, match="unknown CUB mask source 'polygons'"):
        CUB200DataModule(root=tmp_path, masks="polygons")  # type: ignore[arg-type]
