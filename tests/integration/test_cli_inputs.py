"""The explain command line's inputs (issue 17): layers, images, selection, noise, progress.

Each test runs ``explain.py`` in a subprocess with ``model=tiny`` and random weights, as a user
would, and reads what it prints and writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.integration.helpers import run_cli

TINY = ["model=tiny", "allow_random_weights=true", "logger=none"]


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_list_layers_prints_sizes_marks_the_cam_layer_and_writes_nothing(tmp_path: Path) -> None:
    proc = run_cli("explain.py", [*TINY, "list_layers=true", "image_size=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    lines = out[out.index("29 layers; output sizes (C x H x W) at 64 px:") :]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    # tiny: conv1 /2, layer1 /4, layer2 /8: 64 px -> 32, 16 and 8 px
    assert rows["features.conv1"].split()[1:4] == ["16", "x", "32"]
    assert rows["features.layer2"].split()[1:] == [
        "32",
        "x",
        "8",
        "x",
        "8",
        "default",
        "CAM",
        "layer",
    ]
    assert rows["head.fc"].split()[1] == "1000"
    assert sum("default CAM layer" in line for line in lines) == 1
    assert list(tmp_path.iterdir()) == []  # no run folder, no outputs/ at all


def test_list_layers_marks_attention_modules(tmp_path: Path) -> None:
    args = [*TINY, "list_layers=true", "image_size=32", "+model.attention=cbam"]
    proc = run_cli("explain.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marked = [line.split()[0] for line in proc.stdout.splitlines() if line.endswith("attention")]
    assert marked == ["features.layer1.0.attention", "features.layer2.0.attention"], marked


def test_a_layer_typo_names_the_closest_layers_and_list_layers(tmp_path: Path) -> None:
    image = _png(tmp_path / "in" / "a.png", 0)
    args = [*TINY, f"images={image}", "method=gradcam", "layer=features.layer2.O"]
    proc = run_cli("explain.py", args, tmp_path)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: unknown layer 'features.layer2.O' in AttentionNet")
    assert "closest: features.layer2.0, features.layer2," in error
    assert "list_layers=true" in error and "no requested method applies" not in error
    assert not (tmp_path / "outputs").exists()


def class_tree(root: Path) -> dict[str, Path]:
    """``root/cats/{a,b}.png``, ``root/dogs/{a,b}.png``, ``root/other/c.png``, ``root/top.png``."""
    files = {}
    for i, rel in enumerate(["cats/a.png", "cats/b.png", "dogs/a.png", "dogs/b.png",
                             "other/c.png", "top.png"]):  # fmt: skip
        files[rel] = _png(root / rel, i)
    return files


def test_images_folder_is_read_recursively_and_select_chooses_images(tmp_path: Path) -> None:
    import json

    class_tree(tmp_path / "photos")
    args = [*TINY, f"images={tmp_path / 'photos'}", "method=gradcam", "image_size=32",
            "batch_size=2", "select=[4,dogs/a.png,0]", "metrics=fast",
            "metrics.num_resamples=20", "metrics.protocol.steps=2",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = run_cli("explain.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # sorted recursive order: cats/a, cats/b, dogs/a, dogs/b, other/c, top
    assert json.loads((tmp_path / "run" / "image_ids.json").read_text()) == [4, 2, 0]
    # model=tiny has no class names: every image is unlabelled, and that is said once
    printed = proc.stdout + proc.stderr
    assert "6 unlabelled (subfolders that name no class of the model: cats, dogs, other)" in printed
    # issue 17 item 8: each line once, no advert, localisation dropped in one INFO line
    assert printed.count("Seed set to 0") == 1 and printed.count("GPU available") == 1
    assert "Tip:" not in printed and "LeafSpec" not in printed
    assert printed.count("localisation metrics left out") == 1
    assert "has no valid image" not in printed
    # issue 17 item 5: the estimate comes before the first image is explained, the bar counts
    # images under "Explaining" (not Lightning's "Testing DataLoader 0" batches)
    estimate = printed.index("about to explain 3 image(s) with 1 method(s): about ")
    assert estimate < printed.index("Explaining:   0%|          | 0/3")
    assert "Explaining: 100%|██████████| 3/3" in printed and "Testing" not in printed
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    columns = set().union(*(row for row in metrics["methods"].values()))
    assert "average_drop" in columns and "pointing_game" not in columns


def test_the_estimate_counts_forwards_as_the_methods_and_metrics_define_them() -> None:
    from attncam.stages.progress import forwards_per_image, metric_forwards

    specs = [("gradcam", {}), ("scorecam", {}), ("sscam", {"n": 35}),
             ("occlusion", {"window": 32, "stride": 16})]  # fmt: skip
    metrics = {"enabled": ["average_drop", "percentage_in", "deletion_insertion"],
               "protocol": {"steps": 20, "percentages": [5, 10, 20, 25, 50]}}  # fmt: skip
    # forward + backward = 3; K + 1 = 33; n K + 1 = 1121; 3 x 3 windows + 1 = 10
    assert forwards_per_image(specs, metrics, channels=32, image_size=64) == (1167, 4 * 48)
    # one masked image, 5 levels, 2 x (20 + 1) curve points
    assert metric_forwards(metrics, 64) == 1 + 5 + 42
    road = {"enabled": ["road"], "protocol": {"road_percentages": [10, 50]}}
    assert metric_forwards(road, 64) == 4


def test_help_is_a_usage_block_naming_only_the_groups_explain_uses(tmp_path: Path) -> None:
    from tests.integration.helpers import compose

    proc = run_cli("explain.py", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Explain a model's decisions and score the maps:")
    assert "list_layers=true" in proc.stdout and "select=[3,17]" in proc.stdout
    # Hydra's generic page listed every group, including attention, which explain.py refuses
    assert not any(f"attention{c}" in proc.stdout for c in ":=,")
    assert "powered by Hydra" not in proc.stdout
    assert list(tmp_path.iterdir()) == []
    assert compose("explain", ["model=tiny"]).model.backbone == "tiny"  # still composes


def test_the_explaining_bar_moves_image_by_image_within_a_batch(monkeypatch) -> None:
    import io
    import types

    import torch

    from attncam.stages import progress

    printed = io.StringIO()
    monkeypatch.setattr(progress.sys, "stdout", printed)
    bar = progress.ExplainingBar(8, forwards_per_image=20)  # the estimate: 20 per image
    bar.REFRESH_S = 0.0
    forwards = [0]
    module = types.SimpleNamespace(on_forward=None, forwards_done=lambda: forwards[0])
    trainer = types.SimpleNamespace(progress_bar_callback=bar)
    monkeypatch.setattr(type(bar), "is_disabled", property(lambda self: False))
    bar.on_test_start(trainer, module)
    assert module.on_forward == bar._during_batch
    seen = []
    batch = [torch.zeros(6, 3, 4, 4)]
    bar.on_test_batch_start(trainer, module, batch, 0)
    for _ in range(60):  # the batch really costs 10 forwards per image
        forwards[0] += 1
        module.on_forward()
        seen.append(bar.test_progress_bar.n)
    # it ticks per image inside the batch and never claims the batch's last image early
    assert sorted(set(seen)) == [0, 1, 2, 3]  # at the estimate's 20 forwards per image
    bar.on_test_batch_end(trainer, module, None, batch, 0)
    assert bar.test_progress_bar.n == 6
    # the batch end shows 6 images and learns the measured cost: 60 forwards for 6 images
    assert bar.forwards_per_image == 10
    batch = [torch.zeros(2, 3, 4, 4)]  # the second batch: 15 forwards in all
    bar.on_test_batch_start(trainer, module, batch, 1)
    forwards[0] += 15
    module.on_forward()
    assert bar.test_progress_bar.n == 7
    bar.on_test_batch_end(trainer, module, None, batch, 1)
    assert bar.test_progress_bar.n == 8 and bar.forwards_per_image == 7.5
    assert "Explaining" in printed.getvalue()
