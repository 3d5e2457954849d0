"""Figures readable at their natural size (issue 17, item 7).

A wide method set splits into grid files of at most ``max_columns`` method columns, each no wider
than ~2,000 px; every piece of text is at least 12 px high at the default 100 dpi; one overlay per
image and method with a colour bar; the sanity-check figure keeps the cascade order of the layers.
Figures are captured at save time (``save_figure`` wrapped) to read their artists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

import attncam.viz.figures as figures_mod
import attncam.viz.grid as grid_mod
import attncam.viz.per_image as per_image_mod
import attncam.viz.sanity as sanity_mod
from attncam.explain.naming import slug
from attncam.viz import (
    curves_plot,
    explanation_grid,
    file_slug,
    grid_paths,
    metric_bars,
    overlay,
    per_image_overlays,
    sanity_figure,
    split_columns,
)
from attncam.viz.common import wrap_name

#: The ``method=all`` result names of the demo model (20 columns; today's grid: 4,000 px wide).
ALL_METHODS = [
    "featuremap", "cam", "gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam",
    "hirescam", "scacam", "scorecam", "ablationcam", "eigencam", "attention", "attention_guided",
    "guided_backprop", "guided_gradcam", "attention_guided[spatial_product]",
    "attention_guided[variant=multi_stage,combine=product]", "gradcampp[torchcam020]",
    "smoothgradcampp[torchcam020]",
]  # fmt: skip
MIN_TEXT_PX = 12.0
MAX_WIDTH_PX = 2000


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _capture(
    monkeypatch: pytest.MonkeyPatch, module: object
) -> list[tuple[Figure, Path, dict[str, object]]]:
    """Wraps ``module.save_figure``: records each figure, its path and a snapshot taken then."""
    seen: list[tuple[Figure, Path, dict[str, object]]] = []
    real: Callable[..., Path] = module.save_figure  # type: ignore[attr-defined]

    def spy(fig: Figure, path: Path, **kwargs: object) -> Path:
        out = real(fig, path, **kwargs)  # draws the figure: text extents are final
        snap: dict[str, object] = {
            "titles": [ax.get_title() or ax.get_title(loc="left") for ax in fig.axes]
        }
        if fig.axes and fig.axes[0].images:
            snap["pixels"] = np.array(fig.axes[0].images[0].get_array(), copy=True)
        seen.append((fig, Path(path), snap))
        return out

    monkeypatch.setattr(module, "save_figure", spy)
    return seen


def _small_texts(fig: Figure, dpi: float = 100) -> list[tuple[str, float]]:
    """Visible non-empty texts smaller than ``MIN_TEXT_PX`` at ``dpi``: ``(text, px)``."""
    small = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip():
            px = t.get_fontsize() * dpi / 72
            if px < MIN_TEXT_PX:
                small.append((t.get_text(), px))
    return small


# ------------------------------------------------------------------------------ splitting


@pytest.mark.parametrize(
    ("n", "max_columns", "sizes"),
    [(20, 6, [5, 5, 5, 5]), (8, 6, [4, 4]), (7, 6, [4, 3]), (6, 6, [6]), (13, 6, [5, 4, 4]),
     (3, 1, [1, 1, 1])],
)  # fmt: skip
def test_split_columns_fewest_and_even(n: int, max_columns: int, sizes: list[int]) -> None:
    names = [f"m{i}" for i in range(n)]
    groups = split_columns(names, max_columns)
    assert [len(g) for g in groups] == sizes
    assert [x for g in groups for x in g] == names  # order kept, nothing lost


def test_split_columns_edges() -> None:
    assert split_columns([], 6) == [[]]
    with pytest.raises(ValueError, match="max_columns must be at least 1; got 0"):
        split_columns(["a"], 0)


def test_grid_paths_names() -> None:
    assert grid_paths(Path("f/grid.png"), 3) == [
        Path("f/grid.png"),
        Path("f/grid_2.png"),
        Path("f/grid_3.png"),
    ]


@pytest.mark.parametrize(
    ("name", "width", "expected"),
    [
        ("gradcam", 10, "gradcam"),
        ("attention_guided[spatial_product]", 24, "attention_guided\n[spatial_product]"),
        ("gradcampp[torchcam020]", 12, "gradcampp\n[torchcam020]"),
        ("a\nb", 1, "a\nb"),
    ],
)
def test_wrap_name(name: str, width: int, expected: str) -> None:
    assert wrap_name(name, width) == expected
    if "\n" not in name:
        assert wrap_name(name, width).replace("\n", "") == name


@pytest.mark.parametrize("name", [*ALL_METHODS, "scacam[channel_weight=fc]", "a.b[c=d,e=f]"])
def test_file_slug_matches_maps_npz_names(name: str) -> None:
    assert file_slug(name) == slug(name)


def test_file_slug_makes_any_name_a_file_name() -> None:
    assert file_slug("my method/v2 x") == "my-method-v2-x"


# ------------------------------------------------------------------------------ the grid


def test_all_methods_grid_splits_into_readable_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, grid_mod)
    n = 2
    images = torch.rand(n, 3, 32, 32)
    maps = {name: torch.rand(n, 4, 4) for name in ALL_METHODS}
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    masks[0, 8:20, 8:20] = True
    titles = ["tiger cat 0.38\nEgyptian cat 0.37\n(true: tabby)", "b 0.9"]
    paths = explanation_grid(images, maps, tmp_path / "grid.png", row_titles=titles, masks=masks)
    assert paths == grid_paths(tmp_path / "grid.png", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    columns = []
    for fig, path, snap in seen:
        width, _ = _size(path)
        assert width <= MAX_WIDTH_PX, (path.name, width)
        assert not _small_texts(fig)
        titles_drawn = [t.replace("\n", "") for t in snap["titles"] if t]  # type: ignore[attr-defined]
        assert titles_drawn[0] == "image"  # every part repeats the image column
        columns += titles_drawn[1:]
        texts = [t.get_text() for t in fig.findobj(Text)]
        assert any(t.startswith("part ") for t in texts)  # names its part
        assert "tiger cat 0.38\nEgyptian cat 0.37\n(true: tabby)" in texts  # row titles kept
    assert columns == ALL_METHODS  # every method once, in order


def test_grid_has_colorbar_and_one_file_for_few_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, grid_mod)
    maps = {name: torch.rand(3, 8, 8) for name in ALL_METHODS[:6]}
    paths = explanation_grid(torch.rand(3, 3, 16, 16), maps, tmp_path / "g.png")
    assert paths == [tmp_path / "g.png"]
    [(fig, _, _)] = seen
    # 3 x 7 image panels and one colour bar spanning 0..1.
    assert len(fig.axes) == 3 * 7 + 1
    assert fig.axes[-1].get_ylim() == pytest.approx((0.0, 1.0))
    assert not any(t.get_text().startswith("part ") for t in fig.findobj(Text))


def test_grid_removes_parts_of_an_earlier_wider_grid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("grid_2.png", "grid_3.png", "grid_5.png", "other.png"):
        (tmp_path / name).write_bytes(b"old")
    with caplog.at_level(logging.INFO, logger="attncam.viz.grid"):
        explanation_grid(torch.rand(1, 3, 8, 8), {"a": torch.rand(1, 2, 2)}, tmp_path / "grid.png")
    # grid_5 is not contiguous with the parts written, so it is not ours to remove.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "grid_5.png", "other.png"]
    assert sum("grid_2.png" in r.message or "grid_3.png" in r.message for r in caplog.records) == 2


# ------------------------------------------------------------------------- per-image overlays


def test_per_image_overlays_one_file_per_image_and_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, per_image_mod)
    images = torch.rand(2, 3, 24, 24)
    maps = {"gradcam": torch.rand(2, 6, 6), "gradcampp[torchcam020]": torch.rand(2, 24, 24)}
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[1, 4:10, 4:10] = True
    titles = ["explains: tiger cat (281), p = 0.38; true: tabby cat", "explains: lynx (287)"]
    paths = per_image_overlays(images, maps, tmp_path / "per_image", [17, 3], titles, masks)
    expected = ["17_gradcam.png", "17_gradcampp__torchcam020.png", "3_gradcam.png",
                "3_gradcampp__torchcam020.png"]  # fmt: skip
    assert [p.name for p in paths] == expected
    assert sorted(p.name for p in (tmp_path / "per_image").iterdir()) == sorted(expected)
    for (fig, path, snap), (i, name) in zip(
        seen, [(0, "gradcam"), (0, "gradcampp[torchcam020]"), (1, "gradcam"),
               (1, "gradcampp[torchcam020]")], strict=True
    ):  # fmt: skip
        assert len(fig.axes) == 2  # the overlay and its colour bar
        assert fig.axes[1].get_ylim() == pytest.approx((0.0, 1.0))
        title = snap["titles"][0]  # type: ignore[index]
        assert title.splitlines()[0] == name and "explains:" in title
        # The right map of the right image is in the file.
        torch.testing.assert_close(
            torch.from_numpy(snap["pixels"]),  # type: ignore[arg-type]
            overlay(images[i], maps[name][i]).permute(1, 2, 0),
        )
        assert not _small_texts(fig)
        width, height = _size(path)
        assert 380 <= width <= 700 and 380 <= height <= 650, (width, height)


def test_per_image_overlays_checks(tmp_path: Path) -> None:
    images, maps = torch.rand(2, 3, 8, 8), {"a": torch.rand(2, 8, 8)}
    with pytest.raises(ValueError, match="ids has 1 entries for 2 images"):
        per_image_overlays(images, maps, tmp_path, [0])
    with pytest.raises(ValueError, match="ids must be distinct"):
        per_image_overlays(images, maps, tmp_path, [4, 4])
    with pytest.raises(ValueError, match="titles has 3 entries"):
        per_image_overlays(images, maps, tmp_path, [0, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"maps\['b'\]"):
        per_image_overlays(images, {"b": torch.rand(3, 8, 8)}, tmp_path, [0, 1])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- sanity figure


def _result(value: float | None, half: float = 0.1) -> dict[str, float | None]:
    if value is None:
        return {"value": None, "low": None, "high": None, "n": 0}
    return {"value": value, "low": value - half, "high": value + half, "n": 4}


def _sanity_results(layers: list[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Spearman falls along the cascade for gradcam, stays high for guided_backprop; the keys
    are sorted, as ``sanity.json`` has them (written with ``sort_keys=True``)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for method, start, slope in (("gradcam", 0.9, 0.3), ("guided_backprop", 1.0, 0.05)):
        row = {}
        for k, layer in enumerate(layers):
            row[f"spearman@{layer}"] = _result(start - slope * k)
            row[f"ssim@{layer}"] = _result(start - slope * k / 2)
        out[method] = dict(sorted(row.items()))
    return out


def test_sanity_figure_keeps_cascade_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture(monkeypatch, sanity_mod)
    layers = ["head.fc", "features.7", "features.10", "features.2"]  # not alphabetical
    assert sorted(layers) != layers
    path = sanity_figure(_sanity_results(layers), layers, tmp_path / "sanity.png")
    [(fig, _, _)] = seen
    top, bottom = fig.axes[:2]
    assert [t.get_text() for t in bottom.get_xticklabels()] == layers
    assert list(bottom.get_xticks()) == [1, 2, 3, 4]
    spearman = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()[::1]}
    assert spearman["gradcam"] == pytest.approx([0.9, 0.6, 0.3, 0.0], abs=1e-12)
    assert spearman["guided_backprop"] == pytest.approx([1.0, 0.95, 0.9, 0.85])
    ssim = {line.get_label(): list(line.get_ydata()) for line in bottom.get_lines()}
    assert ssim["gradcam"] == pytest.approx([0.9, 0.75, 0.6, 0.45])
    # One interval band per method and measure, spanning [low, high] at each step.
    band = top.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(1.0) and band[:, 1].min() == pytest.approx(-0.1)
    assert "Spearman" in top.get_ylabel() and "SSIM" in bottom.get_ylabel()
    assert not _small_texts(fig)
    width, height = _size(path)
    assert 600 <= width <= MAX_WIDTH_PX and 500 <= height <= 1000


def test_sanity_figure_gaps_and_unknown_layers_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _capture(monkeypatch, sanity_mod)
    layers = ["c", "b", "a"]
    results = _sanity_results([*layers, "z"])
    results["gradcam"]["spearman@b"] = _result(None)
    with caplog.at_level(logging.WARNING, logger="attncam.viz.sanity"):
        sanity_figure(results, layers, tmp_path / "s.png")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 layer(s) not in the cascade order, not drawn: ['z']" in messages
    assert "gradcam has no spearman at 1 of 3 layers" in messages
    [(fig, _, _)] = seen
    ys = fig.axes[0].get_lines()[0].get_ydata()
    assert math.isnan(ys[1]) and ys[0] == pytest.approx(0.9)


def test_sanity_figure_many_layers_thins_labels_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, sanity_mod)
    layers = [f"features.{i}.conv" for i in range(99, -1, -1)]  # 100 layers, top first
    path = sanity_figure(_sanity_results(layers), layers, tmp_path / "s.png")
    [(fig, _, _)] = seen
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert 20 <= len(labels) <= 40 and labels == layers[:: math.ceil(100 / 40)]
    assert _size(path)[0] <= MAX_WIDTH_PX


def test_sanity_figure_errors(tmp_path: Path) -> None:
    results = _sanity_results(["a", "b"])
    with pytest.raises(ValueError, match="repeats a layer"):
        sanity_figure(results, ["a", "a"], tmp_path / "s.png")
    with pytest.raises(ValueError, match="needs results"):
        sanity_figure(results, [], tmp_path / "s.png")
    with pytest.raises(ValueError, match=r"no spearman@/ssim@ result matches.*\['a', 'b'\]"):
        sanity_figure(results, ["x", "y"], tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- the other figures' text


def test_curves_and_bars_readable_for_all_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, figures_mod)
    f = torch.linspace(0, 1, 11)
    curves_plot({m: (f, 1 - f, f) for m in ALL_METHODS}, tmp_path / "curves.png")
    metrics = ["average_drop", "increase_in_confidence", "pointing_game",
               "energy_pointing_game", "deletion", "insertion"]  # fmt: skip
    table = {m: {k: (0.5, 0.4, 0.6) for k in metrics} for m in ALL_METHODS}
    metric_bars(table, metrics, tmp_path / "metrics.png", lower_is_better={"deletion"})
    for fig, path, _ in seen:
        assert not _small_texts(fig), path.name
        assert _size(path)[0] <= MAX_WIDTH_PX, path.name


def test_scatter_ratio_line_has_least_squares_slope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, figures_mod)
    x = torch.tensor([1.0, 2.0, -1.0, 3.0])
    y = torch.tensor([2.0, 5.0, -2.0, 5.0])  # sum(xy) / sum(x^2) = 29 / 15
    figures_mod.scatter_ratio_plot(x, y, tmp_path / "s.png", xlabel="w", ylabel="g", title="Z")
    [(fig, _, _)] = seen
    line = fig.axes[0].get_lines()[0]
    xs, ys = line.get_xdata(), line.get_ydata()
    assert (ys[1] - ys[0]) / (xs[1] - xs[0]) == pytest.approx(29 / 15)
    assert list(xs) == [-1.0, 3.0] and "slope = 1.933" in line.get_label()
    assert not _small_texts(fig)
