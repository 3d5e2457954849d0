"""attncam.stages.reproduce without running it: settings, per-image pairing, the report.

The committed ``docs/REPRODUCTION_TABLE2.md`` must re-render from the committed
``docs/reproduction/table2/*.json`` (every heading, table and sentence), so the report code, its template
and ``conf/reproduce/paper.yaml`` cannot drift from what the run wrote.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from omegaconf import OmegaConf

from attncam.stages.reproduce import main
from attncam.stages.reproduce.experiments import (
    load_per_image,
    paired_values,
    significance,
    with_lerf_minus_morf,
)
from attncam.stages.reproduce.geometry import cam_geometry, control_name, same_tensor
from attncam.stages.reproduce.names import AG_VARIANTS
from attncam.stages.reproduce.report import (
    SECTIONS,
    TABLES_DIR,
    ReportInputs,
    block,
    fragment,
    imagenet_commands,
    render_report,
    section_header,
    section_methods,
    split_by_accuracy,
    verdict_rows,
)
from attncam.stages.reproduce.settings import (
    check_part,
    load_paper,
    load_settings,
    scale_commands,
    scales,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def committed() -> tuple[str, str]:
    """The committed report and the same report re-rendered from the committed tables."""
    text = (DOCS / "REPRODUCTION_TABLE2.md").read_text()
    return text, render_report(ReportInputs.from_tables(DOCS))


def test_committed_report_rerenders_headings_and_tables(committed: tuple[str, str]) -> None:
    text, again = committed
    for prefix in ("#", "|"):
        ours = [line for line in again.splitlines() if line.startswith(prefix)]
        assert ours == [line for line in text.splitlines() if line.startswith(prefix)], prefix
    assert ours, "the report has tables"


def test_committed_report_rerenders_byte_for_byte(committed: tuple[str, str]) -> None:
    text, again = committed
    assert again == text


def test_committed_report_says_which_run_and_what_it_can_say(committed: tuple[str, str]) -> None:
    """The header names the run (commit and date of the manifest) and the primary report; the
    grids are the model code's; weak networks are excluded; no directional verdict."""
    text, _ = committed
    head = text.split("## What this run is")[0]
    man = json.loads((DOCS / TABLES_DIR / "manifest.json").read_text())
    assert f"commit `{man['git_commit'][:7]}`" in head and f"written on {man['written']}" in head
    assert "[docs/REPRODUCTION.md](REPRODUCTION.md)" in head
    assert "resnet50 3x3" in text and "googlenet 2x2" in text and "vgg19 4x4" in text
    assert "excluded: googlenet (78.9%), vgg19 (22.7%)" in head
    assert "this part is **inconclusive**" in head
    assert "**Verdict of this part: inconclusive.**" in text
    for claim in ("does **not** help", "significantly worse", "more often a loss"):
        assert claim not in text, claim
    # The mean columns average ResNet-50 alone (the only network >= 85%).
    assert (
        "| gradcam | 29.03 [19.33, 39.57] | 57.32 [43.92, 70.41] | 6.28 [0.14, 13.17] | 29.03 |"
        in text
    )


def test_verdict_rows_apply_the_checks() -> None:
    r = ReportInputs.from_tables(DOCS)
    rows = {(x["family"], x["a"], x["metric"]): x for x in verdict_rows(r)}
    assert {f for f, _, _ in rows} == {"resnet50"}  # GoogLeNet 78.9%, VGG-19 22.7%: excluded
    ag = rows["resnet50", "attention_guided", "average_drop"]
    assert ag["reading"] == "different tensors"  # CBAM in every bottleneck: the residual branch
    assert ag["mde_approx"] and ag["mde"] == pytest.approx(18.8, abs=0.1)  # the issue's ~19
    pg = rows["resnet50", "attention_guided[multi_stage]", "pointing_game"]
    assert pg["reading"] == "not testable at this grid (3x3)"
    assert rows["resnet50", "attention_guided[multi_stage]", "average_drop"]["reading"] == (
        "inconclusive"
    )
    # With every network let in, GoogLeNet's comparisons (same tensor, 2x2 grid) are read too.
    r.settings.table2.verdict_min_accuracy = 0
    rows = {(x["family"], x["a"], x["metric"]): x for x in verdict_rows(r)}
    assert rows["googlenet", "attention_guided", "pointing_game"]["reading"] == (
        "not testable at this grid (2x2)"
    )
    ms = rows["googlenet", "attention_guided[multi_stage]", "average_drop"]
    assert ms["reading"] == "worse (Holm)"
    assert "**inconclusive**" in section_header(r)[-2]  # a resolved difference is no verdict
    mean = [x for x in section_methods(r) if x.startswith("| gradcam |")][0]
    assert mean.split(" | ")[-2] == "30.88"  # the mean of all three networks


def test_cam_geometry_from_the_model_code() -> None:
    grids = {f: cam_geometry(f, "blocks", 72) for f in ("resnet50", "googlenet", "vgg19")}
    assert {f: c["grid"] for f, c in grids.items()} == {
        "resnet50": [3, 3], "googlenet": [2, 2], "vgg19": [4, 4],
    }  # fmt: skip
    res = grids["resnet50"]
    assert res["tensors"]["attention_guided"] == "features.layer4.2.attention"
    assert not same_tensor(res, "attention_guided")
    assert not same_tensor(res, "attention_guided[spatial_product]")
    assert same_tensor(res, "attention_guided[multi_stage]")
    # the control of both variants: Grad-CAM on the CBAM's input (only the gating differs)
    control = "gradcam[layer=features.layer4.2.attention:input]"
    assert control_name(res, "attention_guided") == control
    assert control_name(res, "attention_guided[spatial_product]") == control
    assert all(same_tensor(grids["googlenet"], v) for v in AG_VARIANTS)  # gates the CAM layer
    last = cam_geometry("resnet50", "last", 224)
    assert last["grid"] == [7, 7] and all(same_tensor(last, v) for v in AG_VARIANTS)


def test_split_by_accuracy() -> None:
    trained = {"a/cbam": {"test/acc": 0.85}, "b/cbam": {"test/acc": 0.8499}, "c/none": {}}
    assert split_by_accuracy(trained, ["a", "b", "c"], 85) == (
        {"a": 85.0}, {"b": pytest.approx(84.99), "c": None},
    )  # fmt: skip


def test_every_section_fills_its_fields() -> None:
    inputs = ReportInputs.from_tables(DOCS)
    for section in SECTIONS:
        lines = section(inputs)
        assert isinstance(lines, list) and all(isinstance(x, str) for x in lines), section
        unfilled = [x for x in lines if re.search(r"\{[a-z_]+(:[^}]*)?\}", x)]
        assert not unfilled, (section.__name__, unfilled)


def test_template_blocks() -> None:
    assert block("scope_subset_all") == ["every test image", ""]
    line = fragment("significance_family", family="f", excluded="", n_significant=1, n_paired=2)
    assert line == "**f**: 1 of 2 paired comparisons significant after Holm adjustment."
    with pytest.raises(KeyError, match="choose one of: header"):
        block("no_such_block")
    assert imagenet_commands()[-1] == "python scripts/reproduce.py scale=imagenet part=table2"


def test_print_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """--print-commands prints the commands of the scale asked for (the ImageNet ones for it)."""
    assert main(["scale=imagenet", "--print-commands"]) == {}
    assert capsys.readouterr().out.splitlines() == scale_commands(load_settings(["scale=imagenet"]))


def test_imagenet_commands_pin_the_weights_placement_and_anchors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """scale=imagenet: V1 weights, placement=last, a seeded stratified subset, the anchors."""
    import shlex

    from torchvision.models import GoogLeNet_Weights, ResNet50_Weights, VGG19_Weights

    from attncam.models.backbones import weights_enum_member
    from attncam.stages.reproduce.settings import compose_cfg

    main(["scale=imagenet", "--print-commands"])
    out = capsys.readouterr().out
    an = load_paper()["an_joe"]
    i = an["methods"].index("gradcam")
    anchors = (f"Average Drop {an['average_drop'][i]:.2f}",
               f"Confidence {an['increase_in_confidence'][i]:.2f}")  # fmt: skip
    assert anchors == ("Average Drop 45.27", "Confidence 23.06")
    commands = [shlex.split(x) for x in out.splitlines() if x.startswith("python ")]
    train = [c for c in commands if c[1] == "train.py"]
    explain = [c for c in commands if c[1] == "explain.py"]
    assert len(train) == 6 and len(explain) == 3
    for c in train:
        assert "model.weights=IMAGENET1K_V1" in c and "model.placement=last" in c, c
        assert not any(o.startswith(("threads=", "optim.lr=")) for o in c), c  # not cpu.yaml's
    cfg = compose_cfg("train", [o for o in train[1][2:] if not o.startswith("hydra.")])
    assert (cfg.model.weights, cfg.model.placement, cfg.model.attention) == (
        "IMAGENET1K_V1", "last", "cbam",
    )  # fmt: skip
    for enum_cls in (ResNet50_Weights, GoogLeNet_Weights, VGG19_Weights):
        weights_enum_member(enum_cls, "IMAGENET1K_V1", enum_cls.__name__)  # exists, no download
    assert all("limit=2000" in c and "seed=42" in c and "data=imagenet" in c for c in explain)
    assert "class-stratified subset of 2000 images drawn with seed=42" in out
    assert all(a in out for a in anchors) and "means the protocol differs" in out
    # the report's scale=imagenet section says the same
    raw = "\n".join(imagenet_commands())
    for word in ("model.weights=IMAGENET1K_V1", "model.placement=last", "class-stratified",
                 "seed=42", *anchors, "means the protocol differs"):  # fmt: skip
        assert word in raw, word


def test_settings_and_paper() -> None:
    s = load_settings(["scale=tiny", "explain.limit=3"])
    assert s.scale == "tiny" and s.explain.limit == 3
    assert s.train.attentions == ["none", "cbam"]  # from cpu.yaml (defaults_from)
    assert "paper" not in scales() and {"cpu", "tiny", "imagenet"} <= set(scales())
    with pytest.raises(SystemExit, match="unknown scale 'paper'; choose one of: cpu"):
        load_settings(["scale=paper"])
    paper = load_paper()
    # The published numbers of conf/reproduce/paper.yaml are the ones the committed report prints.
    assert paper == ReportInputs.from_tables(DOCS).paper
    an = paper["an_joe"]
    assert an["percentage_in_gradcam"] == an["percentage_in"]["gradcam"]
    assert len(an["methods"]) == len(an["average_drop"]) == len(an["increase_in_confidence"])


def test_part_setting_defaults_and_errors() -> None:
    assert load_settings([]).part == "guidance"
    assert load_settings(["scale=tiny"]).part == "guidance"  # inherited from cpu.yaml
    assert load_settings(["scale=imagenet", "part=all"]).part == "all"
    with pytest.raises(
        SystemExit, match="unknown part 'tabel2'; choose one of: guidance, table2, all"
    ):
        load_settings(["part=tabel2"])
    with pytest.raises(ValueError, match="unknown part None; choose one of: guidance, table2"):
        check_part(OmegaConf.create({"scale": "cpu"}))


def test_run_dispatches_on_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """table2 runs the table-2 stages, guidance the guidance package, all both (guidance first)."""
    import attncam.stages.reproduce as reproduce

    calls: list[str] = []
    guidance = ModuleType("attncam.stages.reproduce.guidance")
    guidance.run = lambda s, command: calls.append(f"guidance {command}") or {"report": "g"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, guidance.__name__, guidance)
    monkeypatch.setattr(
        reproduce,
        "run_table2",
        lambda s, command: calls.append(f"table2 {command}") or {"report": "t"},
    )
    for part, expected in (("table2", ["table2 c"]), ("guidance", ["guidance c"]),
                           ("all", ["guidance c", "table2 c"])):  # fmt: skip
        calls.clear()
        out = reproduce.run(load_settings([f"part={part}"]), "c")
        assert calls == expected and out["part"] == part, part
    assert out == {"part": "all", "guidance": {"report": "g"}, "table2": {"report": "t"}}
    with pytest.raises(ValueError, match="unknown part 'both'"):
        reproduce.run(OmegaConf.create({"part": "both"}), "c")


def _write_per_image(run_dir: Path, methods: dict[str, dict[str, dict[int, float]]]) -> None:
    ids = sorted({i for row in methods.values() for v in row.values() for i in v})
    raw = {m: {k: {str(i): x for i, x in v.items()} for k, v in row.items()}
           for m, row in methods.items()}  # fmt: skip
    (run_dir / "per_image.json").write_text(json.dumps({"image_ids": ids, "methods": raw}))


def test_per_image_pairs_on_image_id(tmp_path: Path) -> None:
    # Image 1 is skipped by method b; ids are listed out of order.
    _write_per_image(tmp_path, {
        "a": {"average_drop": {2: 30.0, 0: 10.0, 1: 20.0},
              "morf": {1: 0.25, 0: 0.5}, "lerf": {0: 0.75, 1: 0.5}},
        "b": {"average_drop": {2: 3.0, 0: 1.0}},
    })  # fmt: skip
    values = with_lerf_minus_morf(load_per_image(tmp_path))
    assert values["a"]["average_drop"] == {0: 10.0, 1: 20.0, 2: 30.0}
    assert list(values["a"]["lerf_minus_morf"]) == [0, 1]
    assert values["a"]["lerf_minus_morf"] == {0: 0.25, 1: 0.25}
    va, vb = paired_values(values["a"]["average_drop"], values["b"]["average_drop"])
    assert va.tolist() == [10.0, 30.0] and vb.tolist() == [1.0, 3.0]
    assert va.dtype == torch.float64


def test_load_per_image_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_per_image=true"):
        load_per_image(tmp_path)


def test_significance_rows() -> None:
    s = OmegaConf.create(
        {"seed": 0, "significance": {"reference": "b", "num_resamples": 200, "confidence": 0.95}}
    )
    values = {
        "a": {"average_drop": {i: 10.0 + i for i in range(8)}, "pointing_game": {0: 100.0}},
        "b": {"average_drop": {i: 20.0 + i for i in range(1, 9)}, "pointing_game": {0: 0.0}},
    }
    rows = significance(values, [("a", "b")], ["average_drop", "pointing_game"], s)
    ad, pg = rows
    assert ad["paired"] and ad["n"] == 7 and ad["diff"] == pytest.approx(-10.0)
    assert ad["mde"] == 0.0  # every paired difference is -10: no spread
    assert ad["significant"] and ad["a_better"] is True  # lower Average Drop is better
    assert ad["p_holm"] == pytest.approx(min(1.0, ad["p"]))  # one paired test in the family
    assert not pg["paired"] and "too few images in common (1" in pg["reason"]
