"""scripts/reproduce.py scale=tiny end to end: every stage runs and the report has every section."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

SECTIONS = (
    "## a. Fine-tuning",
    "## b. Methods (An & Joe tables 3 and 4)",
    "### Percentage-in",
    "### Which Grad-CAM++ / Smooth Grad-CAM++ matches",
    "## c. SCA-CAM",
    "### Class activation weights",
    "### featuremap vs CAM vs Grad-CAM vs SCA-CAM",
    "## d. Grad-CAM paper",
    "## e. Beyond the papers",
    "### Which differences are significant",
    "### Does attention guidance help?",
    "## scale=imagenet",
)
FIGURES = (
    "tiny_grid.png",
    "tiny_curves.png",
    "tiny_metrics.png",
    "scacam_caw_ratio.png",
    "scacam_grid.png",
    "guided_gradcam.png",
    "sanity_cascade.png",
    "sanity_curves.png",
)
TABLES = (
    "manifest.json",
    "finetune.json",
    "methods.json",
    "percentage_in_variants.json",
    "scacam.json",
    "sanity.json",
    "significance.json",
    "beyond.json",
)


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    _script().main(
        ["scale=tiny", f"work_dir={out / 'work'}", f"docs_dir={out / 'docs'}",
         f"data.cache_dir={cache_dir}"]
    )  # fmt: skip
    return out / "docs"


def test_report_has_every_section_table_and_figure(tiny_run: Path) -> None:
    report = (tiny_run / "REPRODUCTION.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for name in FIGURES:
        assert (tiny_run / "figures" / name).is_file(), name
        assert f"figures/{name}" in report or name.startswith("tiny_"), name
    manifest = json.loads((tiny_run / "reproduction" / "manifest.json").read_text())
    assert sorted(manifest["tables"]) == sorted(t for t in TABLES if t != "manifest.json")
    assert manifest["scale"] == "tiny" and manifest["wall_seconds"] > 0
    for name in TABLES:
        assert (tiny_run / "reproduction" / name).is_file(), name
    assert "n/a" not in report.split("## a.")[1].split("## b.")[0]  # both models tested


def test_numbers_are_consistent(tiny_run: Path) -> None:
    tables = tiny_run / "reproduction"
    caw = json.loads((tables / "scacam.json").read_text())["caw"]
    assert caw["Z"] == caw["feature_size"][0] * caw["feature_size"][1]
    assert caw["max_relative_deviation"] < 1e-3  # FC weight / mean gradient = Z (SCA-CAM eq. 6)
    methods = json.loads((tables / "methods.json").read_text())["backbones"]["tiny"]["results"]
    for name in ("gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "attention_guided",
                 "attention_guided[spatial_product]", "attention_guided[multi_stage]",
                 "gradcampp[torchcam020]", "smoothgradcampp[torchcam020]", "cam", "scacam"):  # fmt: skip
        r = methods[name]["average_drop"]
        assert r["n"] >= 1 and r["low"] <= r["value"] <= r["high"], name
    pv = json.loads((tables / "percentage_in_variants.json").read_text())
    assert pv["closest"]["closest"] in ("binary", "soft", "gain")
    for row in pv["backbones"]["tiny"]["methods"].values():
        assert row["binary_matches_explain_stage"] is True
        assert set(row) >= {"binary", "soft", "gain"}
    sanity = json.loads((tables / "sanity.json").read_text())
    assert {"gradcam", "guided_backprop"} <= set(sanity["methods"])
    assert len(sanity["methods"]["gradcam"]["spearman"]) == len(sanity["groups"])
    sig = json.loads((tables / "significance.json").read_text())["tiny"]
    paired = [r for r in sig if r["paired"]]
    assert paired and all(r["low"] <= r["diff"] <= r["high"] and 0 <= r["p"] <= 1 for r in paired)
    assert any(r["a"] == "attention_guided" and r["b"] == "gradcam" for r in paired)
