"""Image decoding to RGB and the joint image/mask transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attncam.data.transforms import (
    EvalTransform,
    TrainTransform,
    boxes_to_mask,
    load_image,
    mask_to_box,
    pil_to_rgb,
)


def test_grayscale_and_bilevel_to_rgb() -> None:
    gray = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L")
    rgb = np.asarray(pil_to_rgb(gray))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb[1, 0, 1] == 200
    assert np.asarray(pil_to_rgb(gray.convert("1"))).max() == 255


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    out = load_image(path)
    assert out.shape == (3, 2, 3) and out.dtype == torch.uint8
    expected = torch.from_numpy((values.astype(np.int64) + 128) // 257)
    assert torch.equal(out[0].long(), expected)
    # 32-bit integer images holding 8-bit data keep their values.
    small = Image.fromarray(np.array([[3, 250]], dtype=np.int32), mode="I")
    assert np.asarray(pil_to_rgb(small))[0, :, 0].tolist() == [3, 250]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(pil_to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_and_palette(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue
    out = np.asarray(pil_to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255], "transparent pixels go on white"
    la = Image.new("LA", (1, 1), (10, 255))
    assert np.asarray(pil_to_rgb(la))[0, 0].tolist() == [10, 10, 10]
    palette = rgba.convert("P")
    path = tmp_path / "palette.png"
    palette.save(path)
    decoded = load_image(path)
    assert decoded.shape == (3, 1, 2) and decoded[:, 0, 0].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(pil_to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_boxes_mask_round_trip() -> None:
    mask = boxes_to_mask([(2, 1, 5, 4), (4, 3, 7, 6)], height=8, width=10)
    assert mask.sum() == 9 + 9 - 1
    assert mask_to_box(mask).tolist() == [2, 1, 7, 6]
    assert not boxes_to_mask([], 4, 4).any()
    clipped = boxes_to_mask([(-5, -5, 2, 100)], 4, 4)
    assert clipped[:, :2].all() and not clipped[:, 2:].any()
    assert mask_to_box(torch.zeros(3, 3, dtype=torch.bool)).tolist() == [0, 0, 0, 0]


def _image_with_square(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[height // 4 : height // 2, width // 3 : width // 2] = True
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, mask] = 255
    return image, mask


@pytest.mark.parametrize(("height", "width"), [(90, 160), (160, 90), (64, 64)])
def test_eval_transform_keeps_mask_aligned(height: int, width: int) -> None:
    image, mask = _image_with_square(height, width)
    out, out_mask = EvalTransform(48, crop_pct=0.875)(image, mask)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert out_mask is not None and out_mask.shape == (48, 48) and out_mask.dtype == torch.bool
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    agreement = ((out[0] > 0.5) == out_mask).float().mean()
    assert agreement > 0.97
    # Without a mask: same pixels.
    alone, none = EvalTransform(48, crop_pct=0.875)(image)
    assert none is None and torch.equal(alone, out)


def test_eval_transform_identity_at_size() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out, _ = EvalTransform(32, crop_pct=1.0)(image)
    assert torch.equal(out, image.float() / 255)


def test_train_transform_single_and_batch() -> None:
    image, mask = _image_with_square(80, 120)
    transform = TrainTransform(40, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        out, out_mask = transform(image, mask)
        assert out.shape == (3, 40, 40) and out_mask is not None
        assert ((out[0] > 0.5) == out_mask).float().mean() > 0.95
    images = image[None].repeat(6, 1, 1, 1)
    masks = mask[None].repeat(6, 1, 1)
    out, out_masks = transform.batch(images, masks)
    assert out.shape == (6, 3, 40, 40) and out_masks is not None and out_masks.shape == (6, 40, 40)
    assert ((out[:, 0] > 0.5) == out_masks).float().mean() > 0.95
    # Different crops per image.
    assert not all(torch.equal(out[0], out[k]) for k in range(1, 6))


def test_transform_options_are_checked() -> None:
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(32, crop_pct=1.5)
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(32, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="mask shape"):
        EvalTransform(32)(torch.zeros(3, 10, 10), torch.zeros(5, 5, dtype=torch.bool))
