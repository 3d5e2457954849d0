"""The explain stage end to end on model=tiny: checkpoint, data split, image files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from attncam.explain import available_methods
from attncam.models.lit_module import CheckpointError
from attncam.stages import explain as explain_stage
from tests.integration.helpers import CONF, FAST_METRICS, compose, run_cli, train_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """A tiny CBAM model trained for one epoch on the small synthetic set."""
    out = tmp_path_factory.mktemp("train")
    return Path(train_tiny(out, cache_dir)["best_checkpoint"])


def _explain_cfg(out: Path, overrides: list[str]) -> DictConfig:
    cfg = compose("explain", ["logger=csv", *FAST_METRICS, *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_checkpoint_on_its_training_data_with_paper_methods(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res = explain_stage.run(_explain_cfg(out, [f"ckpt={checkpoint}", "limit=12", "batch_size=8"]))
    assert res["n_images"] == 12
    assert res["methods"][:5] == [
        "gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "attention_guided",
    ]  # fmt: skip
    for name in ("metrics.json", "metrics.csv", "metrics.md", "manifest.json", "COMPLETE",
                 "predictions.json", "figures/grid.png", "figures/curves.png",
                 "figures/metrics.png"):  # fmt: skip
        assert (out / name).is_file(), name
    table = json.loads((out / "metrics.json").read_text())
    assert table["protocol"]["mask_space"] == "pixel"
    gradcam = table["methods"]["gradcam"]
    for key in ("average_drop", "increase_in_confidence", "pointing_game", "deletion"):
        r = gradcam[key]
        assert r["n"] >= 1 and r["low"] <= r["value"] <= r["high"], key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] and manifest["layer"] == ["features.layer2"]
    assert manifest["versions"]["torch"] == torch.__version__
    assert "average drop" in (out / "metrics.md").read_text()


def test_all_methods_run_and_every_applicable_one_is_reported(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "all"
    cfg = _explain_cfg(
        out,
        [f"ckpt={checkpoint}", "method=all", "limit=4", "batch_size=4", "metrics.enabled=[average_drop]",
         "save_maps=true"],
    )  # fmt: skip
    res = explain_stage.run(cfg)
    # tiny+CBAM supports every method; with CBAM in its residual blocks, the attention-guided
    # methods also get Grad-CAM on their own tensor as control rows.
    controls = set(res["controls"])
    assert controls and all(c.startswith("gradcam[layer=") for c in controls)
    assert set(res["methods"]) - controls == set(available_methods())
    assert res["skipped_methods"] == []
    maps = __import__("numpy").load(out / "maps.npz")
    baselines = json.loads((out / "metrics.json").read_text())["baselines"]
    meta = ["ids", "targets", "labels", "predictions", "files"]  # issue 17 item 9
    assert len(maps.files) == len(res["methods"]) + len(baselines) + len(meta)


def test_inapplicable_methods_are_skipped_and_reported_or_strict(
    tmp_path: Path, cache_dir: str
) -> None:
    # A plain VGG has no CBAM and no GAP -> FC head.
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(images / f"{i}.png")
    ckpt_free = [
        f"images={images}",
        "image_size=32",
        "model=tiny",
        "model.weights=" + _tiny_weights(tmp_path),
    ]
    res = explain_stage.run(
        _explain_cfg(tmp_path / "a", [*ckpt_free, "method=[gradcam,attention_guided]"])
    )
    assert res["methods"] == ["gradcam"]
    assert [s["method"] for s in res["skipped_methods"]] == ["attention_guided"]
    assert "attention_guided" in (tmp_path / "a" / "metrics.md").read_text()
    with pytest.raises(ValueError, match="CBAM|attention"):
        explain_stage.run(
            _explain_cfg(
                tmp_path / "b", [*ckpt_free, "method=[attention_guided]", "strict_methods=true"]
            )
        )


def _tiny_weights(tmp_path: Path) -> str:
    """A local weights file for model=tiny (ImageNet-sized head), as model.weights=PATH takes."""
    from attncam.models import AttentionNet

    path = tmp_path / "tiny.pth"
    torch.save(AttentionNet("tiny", 1000).state_dict(), path)
    return str(path)


def test_image_folder_skips_non_images_and_reports_them(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        Image.new(mode, (50, 40), 120).save(images / f"img{i}.png")
    (images / "notes.txt").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    cfg = _explain_cfg(
        out,
        [f"images={images}", "image_size=32", "model=tiny", "model.weights=" + _tiny_weights(tmp_path),
         "method=gradcam"],
    )  # fmt: skip
    res = explain_stage.run(cfg)
    assert res["n_images"] == 3
    assert sorted(Path(p).name for p, _ in res["skipped_files"]) == ["broken.jpg", "notes.txt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["skipped_files"]) == 2
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 3 and len(preds[0]["top5_names"]) == 5


def test_bad_inputs_fail_clearly_and_leave_nothing_claiming_completion(
    checkpoint: Path, tmp_path: Path
) -> None:
    tiny = "model.weights=" + _tiny_weights(tmp_path)
    cases = [
        ([f"ckpt={tmp_path / 'missing.ckpt'}"], CheckpointError, "does not exist"),
        (["images=" + str(tmp_path / "nothing_here" / "*.jpg"), "model=tiny", tiny], ValueError,
         "matches no file"),
        ([f"ckpt={checkpoint}", "method=[gradcam]", "data=synthetic", "data.num_classes=5",
          "data.image_size=32"], ValueError, "classes"),
        ([], ValueError, "nothing to explain"),
    ]  # fmt: skip
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    cases.append(([f"ckpt={corrupt}"], CheckpointError, "not a readable torch checkpoint"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([f"images={empty}", "model=tiny", tiny], ValueError, "holds no files"))
    for i, (overrides, err, match) in enumerate(cases):
        out = tmp_path / f"case{i}"
        with pytest.raises(err, match=match):
            explain_stage.run(_explain_cfg(out, overrides))
        assert not (out / "COMPLETE").exists() and not (out / "metrics.json").exists()


def test_unknown_method_lists_the_choices(checkpoint: Path, tmp_path: Path) -> None:
    cfg = _explain_cfg(tmp_path / "x", [f"ckpt={checkpoint}"])
    with open_dict(cfg):
        cfg.method = {"gradcam+": {"key": "gradcam+", "options": {}}}
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+'; choose one of: .*gradcam"):
        explain_stage.run(cfg)


def test_class_index_out_of_range(checkpoint: Path) -> None:
    from attncam.explain import Explainer
    from attncam.models.lit_module import load_classifier

    net = load_classifier(str(checkpoint)).net
    with pytest.raises(ValueError, match=r"out of range .*valid: 0\.\.7"):
        Explainer(net, ["gradcam"])(torch.rand(2, 3, 32, 32), torch.tensor([1, 9]))


def test_checkpoint_of_another_architecture(tmp_path: Path, checkpoint: Path) -> None:
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["attention"] = "se"  # the weights are CBAM's
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(CheckpointError, match="does not rebuild"):
        explain_stage.run(_explain_cfg(tmp_path / "o", [f"ckpt={other}"]))


def test_never_overwrites_a_finished_run(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "once"
    cfg = _explain_cfg(out, [f"ckpt={checkpoint}", "limit=2", "method=gradcam"])
    explain_stage.run(cfg)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        explain_stage.run(cfg)
    assert (out / "metrics.json").read_bytes() == before


# Slow (two gloo processes, ~20-45 s): the default suite keeps DDP covered by
# tests/integration/test_metrics_ddp.py (synced metrics and per-image values equal one process).
@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_table(checkpoint: Path, tmp_path: Path) -> None:
    common = [f"ckpt={checkpoint}", "method=[gradcam,attention_guided]", "limit=8", "batch_size=2",
              "logger=csv", *FAST_METRICS]  # fmt: skip
    one = run_cli("explain.py", [*common, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(
        "explain.py",
        [*common, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
         f"hydra.run.dir={tmp_path / 'two'}"],
        tmp_path,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())["methods"]
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())["methods"]
    assert a.keys() == b.keys()
    for method in a:
        for key, r in a[method].items():
            if r["value"] is None:
                assert b[method][key]["value"] is None
                continue
            assert b[method][key]["n"] == r["n"], (method, key)
            assert b[method][key]["value"] == pytest.approx(r["value"], abs=1e-4), (method, key)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2


@pytest.mark.parametrize(
    "override",
    [f"method={p.stem}" for p in sorted((CONF / "method").glob("*.yaml"))]
    + [f"metrics={p.stem}" for p in sorted((CONF / "metrics").glob("*.yaml"))]
    + ["experiment=demo_explain", "model=efficientnet_lite0", "data=imagenet", "trainer=ddp",
       "method=[gradcam,xgradcam]"],
)  # fmt: skip
def test_every_explain_option_composes(override: str) -> None:
    from omegaconf import OmegaConf

    from attncam.explain import methods_from_config
    from attncam.metrics import build_metrics

    cfg = compose("explain", [override])
    specs = methods_from_config(OmegaConf.to_container(cfg.method, resolve=True))
    assert specs and all(k in available_methods() for k, _ in specs)
    protocol, metrics = build_metrics(OmegaConf.to_container(cfg.metrics, resolve=True))
    assert metrics and protocol.to_dict()["mask_space"] in ("pixel", "normalized")


def test_sanity_check_runs_when_enabled(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "sanity"
    cfg = _explain_cfg(
        out,
        [f"ckpt={checkpoint}", "method=[gradcam,guided_backprop]", "limit=4", "batch_size=4",
         "metrics.enabled=[average_drop]", "metrics.sanity.enabled=true",
         "metrics.sanity.num_images=4", "metrics.sanity.layers=[head.fc,features.layer2.0.conv2]"],
    )  # fmt: skip
    explain_stage.run(cfg)
    sanity = json.loads((out / "sanity.json").read_text())
    assert set(sanity) == {"gradcam", "guided_backprop"}
    for method in sanity.values():
        assert set(method) == {
            "spearman@head.fc", "ssim@head.fc",
            "spearman@features.layer2.0.conv2", "ssim@features.layer2.0.conv2",
        }  # fmt: skip
        assert all(r["n"] == 4 for r in method.values())
    # Grad-CAM depends on the classifier's weights; randomising them changes its maps.
    assert sanity["gradcam"]["spearman@head.fc"]["value"] < 0.99
    assert "sanity.json" in json.loads((out / "manifest.json").read_text())["files"]


def test_baselines_controls_subset_and_comparison(checkpoint: Path, tmp_path: Path) -> None:
    """Baseline rows, a seeded stratified subset with its ids, the paired comparison file."""
    out = tmp_path / "run"
    res = explain_stage.run(
        _explain_cfg(
            out,
            [
                f"ckpt={checkpoint}",
                "method=[gradcam,xgradcam]",
                "limit=12",
                "batch_size=8",
                "compare=gradcam",
                "compare_resamples=20000",
            ],
        )  # fmt: skip
    )
    table = json.loads((out / "metrics.json").read_text())
    assert table["baselines"] == ["baseline_centre", "baseline_random", "baseline_oracle"]
    for b in table["baselines"]:
        assert table["methods"][b]["pointing_game"]["n"] >= 1
    assert "win_vs_baseline_centre" not in table["methods"]["gradcam"]  # baselines never paired
    md = (out / "metrics.md").read_text()
    assert "| baseline_centre *(baseline)* |" in md and "Baselines know nothing" in md
    ids = json.loads((out / "image_ids.json").read_text())
    assert len(ids) == res["n_images"] == 12 and ids == sorted(ids) and ids != list(range(12))
    labels = {json.loads((out / "predictions.json").read_text())[i]["label"] for i in range(12)}
    assert len(labels) > 1  # stratified: more than the first class of the split
    per_image = json.loads((out / "per_image.json").read_text())
    assert per_image["image_ids"] == ids
    assert set(per_image["methods"]["gradcam"]["average_drop"]) <= {str(i) for i in ids}
    rows = json.loads((out / "comparison.json").read_text())
    assert {r["method"] for r in rows} == {"xgradcam", *table["baselines"]}
    assert all(r["verdict"] in ("better", "worse", "equivalent", "inconclusive") for r in rows)
    assert "gradcam" in (out / "comparison.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["baselines"] == table["baselines"] and "commit" in manifest["git"]
    assert (
        manifest["layers"]["per_method"]["gradcam"]["sizes"][0]
        == manifest["layers"]["sites"][manifest["layers"]["per_method"]["gradcam"]["layers"][0]]
    )


def test_calibrated_scores_and_correct_only_localisation(checkpoint: Path, tmp_path: Path) -> None:
    """score=calibrated fits T on the validation split; localisation skips misclassified images."""
    out = tmp_path / "cal"
    explain_stage.run(
        _explain_cfg(
            out,
            [
                f"ckpt={checkpoint}",
                "method=[gradcam]",
                "limit=16",
                "batch_size=8",
                "metrics.protocol.score=calibrated",
                "metrics.protocol.insertion_baseline=mean",
            ],
        )  # fmt: skip
    )
    table = json.loads((out / "metrics.json").read_text())
    cal = table["calibration"]
    assert cal["n"] == 32 and cal["temperature"] > 0  # the small split's 32 validation images
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert table["protocol"]["temperature"] == cal["temperature"]
    row = table["methods"]["gradcam"]
    assert "insertion_start" in row and "kept_fraction@5" in row
    preds = json.loads((out / "predictions.json").read_text())
    wrong = sum(p["predicted"] != p["label"] for p in preds)
    pg = row["pointing_game"]
    assert pg["skipped"].get("excluded", 0) == wrong  # misclassified: left out and counted
    assert pg["n"] + sum(pg["skipped"].values()) == 16


def test_grid_pointing_game_pass(checkpoint: Path, tmp_path: Path) -> None:
    """A second pass over 2 x 2 grids: the centre prior scores 25% there by construction."""
    out = tmp_path / "grid"
    explain_stage.run(
        _explain_cfg(
            out,
            [
                f"ckpt={checkpoint}",
                "method=[gradcam]",
                "limit=8",
                "batch_size=8",
                "metrics.grid_pointing.enabled=true",
                "metrics.grid_pointing.num_grids=6",
            ],
        )  # fmt: skip
    )
    table = json.loads((out / "metrics.json").read_text())["methods"]
    centre = table["baseline_centre"]["grid_pointing_game"]
    assert centre["n"] >= 1 and abs(centre["value"] - 25.0) < 1e-3
    gc = table["gradcam"]["grid_pointing_game"]
    assert gc["n"] + sum(gc["skipped"].values()) == 24  # 6 grids x 4 classes, each accounted for
    assert "grid pointing game" in (out / "metrics.md").read_text()


# --------------------------------------------------------------------- issue 17: target=, maps


def _predictions(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


def _methods(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["methods"]


_TARGET_RUN = ["limit=6", "batch_size=4", "method=[gradcam,gradcampp]",
               "metrics.enabled=[average_drop,increase_in_confidence,deletion_insertion]"]  # fmt: skip


@pytest.fixture(scope="module")
def default_target_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run with the protocol's target (the prediction), the reference of the target tests."""
    out = tmp_path_factory.mktemp("target") / "default"
    explain_stage.run(_explain_cfg(out, [f"ckpt={checkpoint}", *_TARGET_RUN]))
    return out


def test_target_top1_and_a_list_of_the_predictions_reproduce_the_default(
    checkpoint: Path, default_target_run: Path, tmp_path: Path
) -> None:
    ref = _predictions(default_target_run)
    assert [r["target"] for r in ref] == [r["predicted"] for r in ref]
    assert (
        "Explained class: the protocol's target" in (default_target_run / "metrics.md").read_text()
    )
    predicted = "[" + ",".join(str(r["predicted"]) for r in ref) + "]"
    for name, value in (("top1", "top1"), ("list", predicted)):
        out = tmp_path / name
        explain_stage.run(
            _explain_cfg(out, [f"ckpt={checkpoint}", f"target={value}", *_TARGET_RUN])
        )
        assert _methods(out) == _methods(default_target_run), name  # identity: same class
        assert [r["target"] for r in _predictions(out)] == [r["predicted"] for r in ref]


def test_target_by_index_name_and_rank_drives_maps_metrics_and_tables(
    checkpoint: Path, default_target_run: Path, tmp_path: Path
) -> None:
    ref = _predictions(default_target_run)
    out = tmp_path / "index"
    explain_stage.run(_explain_cfg(out, [f"ckpt={checkpoint}", "target=3", *_TARGET_RUN]))
    rows = _predictions(out)
    from attncam.data.synthetic import class_names

    assert {r["target"] for r in rows} == {3}
    assert {r["target_name"] for r in rows} == {class_names(8)[3]}
    md = (out / "metrics.md").read_text()
    assert "Explained class: " in md and "(class 3)" in md
    # The metrics score class 3, not the prediction: images predicted as 3 are unchanged, the
    # others change (Average Drop of a non-predicted class differs).
    assert not all(r["predicted"] == 3 for r in ref)
    ad = _methods(out)["gradcam"]["average_drop"]["value"]
    assert ad != _methods(default_target_run)["gradcam"]["average_drop"]["value"]
    name = rows[0]["target_name"]
    by_name = tmp_path / "name"
    explain_stage.run(
        _explain_cfg(by_name, [f"ckpt={checkpoint}", f"target={name.upper()}", *_TARGET_RUN])
    )
    assert _methods(by_name) == _methods(out)  # the name is class 3, case-blind
    top2 = tmp_path / "top2"
    explain_stage.run(_explain_cfg(top2, [f"ckpt={checkpoint}", "target=top2", *_TARGET_RUN]))
    rows2 = _predictions(top2)
    assert all(r["target"] == r["top5"][1][0] != r["predicted"] for r in rows2)
    assert (
        "Explained class: the model's prediction ranked 2 (top2)"
        in (top2 / "metrics.md").read_text()
    )


def test_target_errors_name_the_bad_value(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown class name 'disc_stripe'; close matches: disc_"):
        explain_stage.run(
            _explain_cfg(tmp_path / "a", [f"ckpt={checkpoint}", "target=disc_stripe", *_TARGET_RUN])
        )
    with pytest.raises(ValueError, match="target lists 2 classes but 6 images are explained"):
        explain_stage.run(
            _explain_cfg(tmp_path / "b", [f"ckpt={checkpoint}", "target=[1,2]", *_TARGET_RUN])
        )
    with pytest.raises(ValueError, match=r"target class\(es\) \[99\] out of range; choose 0\.\.7"):
        explain_stage.run(
            _explain_cfg(tmp_path / "c", [f"ckpt={checkpoint}", "target=99", *_TARGET_RUN])
        )


def test_explained_target_rescores_the_base_scores() -> None:
    from attncam.metrics.perturb import BaseScores
    from attncam.stages.explain_module import TargetChoice, target_choice

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    base = BaseScores(
        torch.tensor([0.0, 0.0]), logits.argmax(1), torch.ones(2, dtype=torch.bool),
        logits.argmax(1), logits,
    )  # fmt: skip
    ids = torch.tensor([10, 11])
    assert TargetChoice(kind="rank", rank=2).targets(ids, base).tolist() == [2, 2]
    assert TargetChoice(kind="rank", rank=3).targets(ids, base).tolist() == [1, 0]
    choice = target_choice(["b", 0], ["a", "b", "c"], [10, 11])
    assert choice.targets(ids, base).tolist() == [1, 0]
    assert target_choice("C", ["a", "b", "c"], [10, 11]).cls == 2
    assert target_choice(None, None, []).kind == "protocol"


def test_saved_maps_carry_ids_targets_labels_predictions_and_files(
    checkpoint: Path, tmp_path: Path
) -> None:
    import numpy as np

    out = tmp_path / "split"
    explain_stage.run(
        _explain_cfg(out, [f"ckpt={checkpoint}", "save_maps=true", "target=top2", *_TARGET_RUN])
    )
    z = np.load(out / "maps.npz")
    preds = _predictions(out)
    assert z["gradcam"].dtype == np.float32 and z["gradcam"].shape[0] == 6
    assert z["ids"].tolist() == [r["id"] for r in preds]
    assert z["ids"].tolist() == json.loads((out / "image_ids.json").read_text())
    assert z["targets"].tolist() == [r["target"] for r in preds]
    assert z["targets"].tolist() != z["predictions"].tolist()  # top2 is not the prediction
    assert z["predictions"].tolist() == [r["predicted"] for r in preds]
    assert z["labels"].tolist() == [r["label"] for r in preds] and min(z["labels"]) >= 0
    assert z["files"].tolist() == [""] * 6  # a dataset split has no files
    assert z["files"].dtype.kind == "U"  # loads without allow_pickle

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), 60 * i).save(images / f"img{i}.png")
    half = tmp_path / "half"
    explain_stage.run(
        _explain_cfg(
            half,
            [
                f"ckpt={checkpoint}",
                f"images={images}",
                "method=gradcam",
                "save_maps=true",
                "save_maps_dtype=float16",
                "metrics.enabled=[average_drop]",
            ],
        )  # fmt: skip
    )
    z = np.load(half / "maps.npz")
    assert z["gradcam"].dtype == np.float16
    assert sorted(Path(f).name for f in z["files"]) == ["img0.png", "img1.png", "img2.png"]
    assert z["labels"].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="unknown save_maps_dtype 'int8'; choose one of: float32"):
        explain_stage.run(
            _explain_cfg(tmp_path / "bad", [f"ckpt={checkpoint}", "save_maps_dtype=int8"])
        )


def _r(value: float, low: float, high: float, n: int = 10) -> dict:
    return {"value": value, "low": low, "high": high, "n": n}


def test_metrics_md_units_square_win_matrix_and_one_skip_line_per_reason(tmp_path: Path) -> None:
    from attncam.stages.outputs import write_tables

    results = {
        "gradcam": {"average_drop": _r(10.0, 8.0, 12.0), "deletion": _r(0.2, 0.1, 0.3),
                    "win_vs_gradcampp": _r(70.0, 60.0, 80.0), "win_vs_layercam": _r(40.0, 30.0, 50.0)},
        "gradcampp": {"average_drop": _r(20.0, 18.0, 22.0), "deletion": _r(0.3, 0.2, 0.4),
                      "win_vs_layercam": _r(55.0, 45.0, 65.0)},
        "layercam": {"average_drop": _r(5.0, 4.0, 6.0), "deletion": _r(0.1, 0.0, 0.2)},
    }  # fmt: skip
    reason = "the model has no CBAM module"
    skipped = [{"method": "attention_guided", "options": o, "reason": reason} for o in "abc"]
    skipped.append({"method": "cam", "options": "{}", "reason": "no GAP -> FC head"})
    extra = {"model": "tiny", "images": 10, "skipped_methods": skipped, "explained_class": "top2"}
    write_tables(tmp_path, results, {"score": "softmax"}, extra)
    md = (tmp_path / "metrics.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header == "| method | average drop (%, lower better) | deletion (AUC, lower better) |"
    assert "win vs" not in md and "n/a" not in md  # no triangular n/a-padded win columns
    assert "Row beats column on Average Drop, % of images; ties count half" in md
    assert "drop of the explained class's score, Y - O" in md  # which per-image score decides
    assert "| row beats column | gradcam | gradcampp | layercam |" in md
    # the stored order, and its complement 100 - v with the interval flipped
    assert "| gradcam | - | 70.0 [60.0, 80.0] | 40.0 [30.0, 50.0] |" in md
    assert "| gradcampp | 30.0 [20.0, 40.0] | - | 55.0 [45.0, 65.0] |" in md
    assert "| layercam | 60.0 [50.0, 70.0] | 45.0 [35.0, 55.0] | - |" in md
    assert md.count(reason) == 1 and f"- attention_guided (3 variants): {reason}" in md
    assert "- cam: no GAP -> FC head" in md
    assert "Explained class: top2" in md
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert table["methods"]["gradcam"]["win_vs_gradcampp"]["value"] == 70.0  # json keeps win_vs
    assert "win_vs_gradcampp" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
