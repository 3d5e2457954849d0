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
from attncam.stages.reproduce.report import (
    SECTIONS,
    ReportInputs,
    block,
    fragment,
    imagenet_commands,
    render_report,
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
    written = re.search(r" on (\d{4}-\d\d-\d\d \d\d:\d\d) \(", text)
    assert written, "the report's header names when it was written"
    return text, render_report(ReportInputs.from_tables(DOCS, written=written.group(1)))


def test_committed_report_rerenders_headings_and_tables(committed: tuple[str, str]) -> None:
    text, again = committed
    for prefix in ("#", "|"):
        ours = [line for line in again.splitlines() if line.startswith(prefix)]
        assert ours == [line for line in text.splitlines() if line.startswith(prefix)], prefix
    assert ours, "the report has tables"


def test_committed_report_rerenders_byte_for_byte(committed: tuple[str, str]) -> None:
    text, again = committed
    assert again == text


def test_every_section_fills_its_fields() -> None:
    inputs = ReportInputs.from_tables(DOCS)
    for section in SECTIONS:
        lines = section(inputs)
        assert isinstance(lines, list) and all(isinstance(x, str) for x in lines), section
        unfilled = [x for x in lines if re.search(r"\{[a-z_]+(:[^}]*)?\}", x)]
        assert not unfilled, (section.__name__, unfilled)


def test_template_blocks() -> None:
    assert block("verdict_none") == ["No paired comparison was possible.", ""]
    line = fragment("significance_family", family="f", n_significant=1, n_paired=2)
    assert line == "**f**: 1 of 2 paired comparisons significant after Holm adjustment."
    with pytest.raises(KeyError, match="choose one of: header"):
        block("no_such_block")
    assert imagenet_commands()[-1] == "python scripts/reproduce.py scale=imagenet"


def test_print_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """--print-commands prints the commands of the scale asked for (the ImageNet ones for it)."""
    assert main(["scale=imagenet", "--print-commands"]) == {}
    assert capsys.readouterr().out.splitlines() == scale_commands(load_settings(["scale=imagenet"]))


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
    assert ad["significant"] and ad["a_better"] is True  # lower Average Drop is better
    assert ad["p_holm"] == pytest.approx(min(1.0, ad["p"]))  # one paired test in the family
    assert not pg["paired"] and "too few images in common (1" in pg["reason"]
