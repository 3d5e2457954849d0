"""scripts/reproduce.py scale=tiny part=guidance end to end: arms, controls, analysis, report.

At 64 px with 96 training images the tails are near chance, so this checks the pipeline and the
report's invariants, not the result; the committed report of the real run is checked against its
JSON in ``tests/unit/test_reproduce_guidance_report.py``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from attncam.stages.reproduce.guidance import rerender

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = [f"## {i}. " for i in range(1, 12)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    out = tmp_path_factory.mktemp("guidance")
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["scale=tiny", "part=guidance", f"work_dir={out / 'work'}",
                 f"docs_dir={out / 'docs'}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    return out / "docs"


def test_report_sections_and_rerender(run: Path) -> None:
    report = (run / "REPRODUCTION.md").read_text()
    positions = [report.index(s) for s in SECTIONS]
    assert positions == sorted(positions)  # pre-registration before any result
    assert report.index("## 1. Pre-registration") < report.index("## 3. Testability gate")
    assert report.index("## 3. Testability gate") < report.index("## 4. Verdict")
    assert rerender(run / "reproduction" / "guidance") == report
    for fig in ("guidance_maps.png", "guidance_effects.png"):
        assert (run / "figures" / fig).stat().st_size > 10_000
        assert f"figures/{fig}" in report


def test_the_analysis_covers_the_design(run: Path) -> None:
    res = json.loads((run / "reproduction" / "guidance" / "results.json").read_text())
    prim = res["primary"]
    assert [c["metric"] for c in prim["comparisons"]] == [
        "average_drop", "deletion", "grid_pointing_game"]  # fmt: skip
    for c in prim["comparisons"]:
        assert c["a"] == "attention_guided" and c["b"] == "gradcam"
        assert c["n_seeds"] == 2 and c["ci"][0] <= c["estimate"] <= c["ci"][1] and c["mde"] > 0
    for metric, comps in prim["controls"].items():
        assert {c["b"] for c in comps} == {"ag_shuffled_gate", "gradcam_x_centre"}, metric
    assert prim["decision"]["verdict"] in ("helps", "does not help", "inconclusive")
    levels = res["levels"]["primary"]
    for name in ("baseline_centre", "baseline_random", "baseline_oracle", "attention",
                 "gradcampp", "smoothgradcampp[torchcam020]", "xgradcam"):  # fmt: skip
        assert name in levels, name
    assert levels["baseline_centre"]["grid_pointing_game"]["estimate"] == pytest.approx(25.0)
    assert set(res["recipes"]) == {"primary", "early"}
    assert set(res["controls"]) == {"plain", "frozen_gate"}
    assert {c["metric"] for c in res["testability"]["comparisons"]} == {
        "pointing_game", "energy_pointing_game", "pixel_auc"}  # fmt: skip
    sanity = res["sanity"]
    assert sanity["attention_layers"] == ["features.attention"]
    assert set(sanity["methods"]) == {"gradcam", "attention_guided"}
    assert set(sanity["methods"]["gradcam"]) == {"cascade", "cbam_only"}
    assert {"gradcam", "attention_guided"} <= set(sanity["data_randomisation"])


def test_manifest_and_per_image_values(run: Path) -> None:
    tables = run / "reproduction" / "guidance"
    man = json.loads((tables / "manifest.json").read_text())
    assert len(man["git_commit"]) == 40 and isinstance(man["git_dirty"], bool)
    assert set(man["load_average"]) == {"before", "after"}
    assert {"data and trunk features", "train tails", "score", "sanity"} <= set(
        man["stages_seconds"])  # fmt: skip
    assert man["design"]["layer"] == "features.bn2"
    scores = json.loads(gzip.decompress((tables / "per_image.json.gz").read_bytes()))
    per = scores["primary"]["0"]["per_image"]
    assert len(per["gradcam"]["average_drop"]) == 16  # every test image, by id
    assert len(per["ag_shuffled_gate"]["grid_pointing_game"]) > 0
