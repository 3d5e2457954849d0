"""attncam.viz: overlay maths, mask outlines, and every figure written atomically as a valid PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from attncam.viz import (
    colorize,
    curves_plot,
    explanation_grid,
    mask_outline,
    metric_bars,
    overlay,
    scatter_ratio_plot,
)


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _only(folder: Path, *names: str) -> None:
    """The folder holds exactly ``names``: no temporary files left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# ------------------------------------------------------------------------------------ overlay


def test_colorize_shape_range_and_endpoints() -> None:
    m = torch.linspace(0, 1, 12).reshape(3, 4)
    rgb = colorize(m, "gray")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    torch.testing.assert_close(rgb[0, 0], torch.zeros(3))
    torch.testing.assert_close(rgb[-1, -1], torch.ones(3))


def test_colorize_unknown_cmap_names_it() -> None:
    with pytest.raises(ValueError, match="nope"):
        colorize(torch.zeros(2, 2), "nope")


def test_overlay_shape_range_and_resize() -> None:
    image = torch.rand(3, 20, 24)
    out = overlay(image, torch.rand(5, 6) * 3 - 1, alpha=0.4)  # out of range and smaller
    assert out.shape == (3, 20, 24) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_overlay_alpha_endpoints() -> None:
    image, m = torch.rand(3, 8, 8), torch.rand(8, 8)
    torch.testing.assert_close(overlay(image, m, alpha=0.0), image)
    torch.testing.assert_close(overlay(image, m, alpha=1.0), colorize(m).permute(2, 0, 1))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, m, alpha=1.5)


def test_mask_outline_of_square_is_its_border() -> None:
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:7, 3:8] = True
    expected = mask.clone()
    expected[3:6, 4:7] = False
    assert torch.equal(mask_outline(mask), expected)


def test_mask_outline_edges() -> None:
    full = torch.ones(4, 5, dtype=torch.bool)
    border = full.clone()
    border[1:-1, 1:-1] = False
    assert torch.equal(mask_outline(full), border)  # the image edge counts as outside
    assert not mask_outline(torch.zeros(4, 5, dtype=torch.bool)).any()


# ------------------------------------------------------------------------------------ figures


def _grid_inputs(n: int = 3, h: int = 16, w: int = 16) -> tuple[torch.Tensor, dict, torch.Tensor]:
    images = torch.rand(n, 3, h, w)
    maps = {"gradcam": torch.rand(n, 4, 4), "scorecam": torch.rand(n, h, w)}
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True  # row 1 stays empty: no outline drawn
    masks[2, :8, :] = True
    return images, maps, masks


def test_explanation_grid_writes_png(tmp_path: Path) -> None:
    images, maps, masks = _grid_inputs()
    [out] = explanation_grid(
        images,
        maps,
        tmp_path / "sub" / "grid.png",
        row_titles=["espresso 0.88", "1. a 0.5\n2. b 0.3", ""],
        masks=masks,
        cell_size=1.0,
        dpi=50,
    )
    assert out == tmp_path / "sub" / "grid.png"
    width, height = _png_size(out)
    # 3 columns x 3 rows of 50-pixel cells, plus titles, minus the tight crop.
    assert 130 <= width <= 260 and 130 <= height <= 200
    _only(out.parent, "grid.png")


def test_explanation_grid_max_rows_and_checks(tmp_path: Path) -> None:
    images, maps, _ = _grid_inputs(n=4)
    [out] = explanation_grid(images, maps, tmp_path / "g.png", cell_size=1.0, dpi=50, max_rows=1)
    assert _png_size(out)[1] < 80  # one row
    with pytest.raises(ValueError, match="scorecam"):
        explanation_grid(images, {"scorecam": torch.rand(3, 16, 16)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="row_titles"):
        explanation_grid(images, maps, tmp_path / "bad.png", row_titles=["x"])
    _only(tmp_path, "g.png")


def test_curves_plot_writes_png(tmp_path: Path) -> None:
    f = torch.linspace(0, 1, 11)
    curves = {"a": (f, 1 - f, f), "b": (f, (1 - f) ** 2, f.sqrt())}
    out = curves_plot(curves, tmp_path / "curves.png", aucs={"a": (0.5, 0.5), "b": (0.33, 0.67)})
    width, height = _png_size(out)
    assert 700 <= width <= 1100 and 250 <= height <= 450
    with pytest.raises(ValueError, match="equal length"):
        curves_plot({"c": (f, f[:3], f)}, tmp_path / "bad.png")
    _only(tmp_path, "curves.png")


def test_metric_bars_writes_png(tmp_path: Path) -> None:
    table = {
        "gradcam": {"drop": (30.0, 25.0, 35.0), "inc": (12.0, None, None)},
        "scorecam": {"drop": (10.0, 11.0, 12.0), "inc": (None, None, None)},
        "paper": {"drop": (float("nan"), None, None)},  # NaN and a missing metric: n/a
    }
    out = metric_bars(
        table,
        ["drop", "inc"],
        tmp_path / "bars.png",
        titles={"drop": "Average Drop %"},
        lower_is_better={"drop"},
    )
    width, height = _png_size(out)
    assert 400 <= width <= 800 and 200 <= height <= 400
    with pytest.raises(ValueError, match="metrics"):
        metric_bars(table, [], tmp_path / "bad.png")
    _only(tmp_path, "bars.png")


def test_scatter_ratio_plot_writes_png(tmp_path: Path) -> None:
    x = torch.randn(64)
    out = scatter_ratio_plot(
        x, 2.0 * x, tmp_path / "s.png", xlabel="FC weight", ylabel="mean gradient", title="Z"
    )
    width, height = _png_size(out)
    assert 350 <= width <= 600 and 300 <= height <= 550
    zero = scatter_ratio_plot(  # sum(x^2) == 0: no line, still a figure
        torch.zeros(3), torch.ones(3), tmp_path / "z.png", xlabel="x", ylabel="y", title="t"
    )
    _png_size(zero)
    with pytest.raises(ValueError, match="same length"):
        scatter_ratio_plot(x, x[:3], tmp_path / "bad.png", xlabel="x", ylabel="y", title="t")
    _only(tmp_path, "s.png", "z.png")


def test_failed_save_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(8)
    target = tmp_path / "s.png"
    scatter_ratio_plot(x, x, target, xlabel="x", ylabel="y", title="t")
    before = target.read_bytes()

    def broken_savefig(self: Figure, fname: object, **kwargs: object) -> None:
        fname.write(b"\x89PNG partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        scatter_ratio_plot(x, -x, target, xlabel="x", ylabel="y", title="t")
    with pytest.raises(OSError, match="disk full"):
        scatter_ratio_plot(x, -x, tmp_path / "new.png", xlabel="x", ylabel="y", title="t")
    assert target.read_bytes() == before  # the old figure survives intact
    _only(tmp_path, "s.png")


def test_accepts_non_contiguous_and_half_inputs(tmp_path: Path) -> None:
    images = torch.rand(2, 16, 16, 3).permute(0, 3, 1, 2)  # channels-last view
    maps = {"m": torch.rand(2, 16, 16).half()}
    _png_size(explanation_grid(images, maps, tmp_path / "g.png", cell_size=0.8, dpi=40)[0])


def test_overlay_blend_golden() -> None:
    """``(1 - alpha) * image + alpha * colour``: grey 0.4 under a full-scale grey map at 0.25."""
    image = torch.full((3, 4, 4), 0.4)
    image[0, 0, 0] = float("nan")  # NaN pixels are drawn as 0
    out = overlay(image, torch.ones(2, 2), alpha=0.25, cmap="gray")
    expected = torch.full((3, 4, 4), 0.75 * 0.4 + 0.25)
    expected[0, 0, 0] = 0.25
    torch.testing.assert_close(out, expected)
    grey = overlay(torch.full((1, 4, 4), 2.0), torch.zeros(4, 4), alpha=0.5, cmap="gray")
    torch.testing.assert_close(grey, torch.full((3, 4, 4), 0.5))  # clamped to 1, then blended
