"""``docs/REPRODUCTION_TABLE2.md``: one function per report section, the fixed prose from a template.

The report of the table-2 part of the reproduction (``part=table2``). Every number in it comes
from :class:`ReportInputs`, which is exactly what the run writes into
``docs/reproduction/table2/*.json``; :meth:`ReportInputs.from_tables` reads it back, so the report
can be re-rendered without re-running anything. The prose lives in ``report_template.md`` (one
block per section, Python format fields); the published numbers in ``conf/reproduce/paper.yaml``.

To add a section: write a ``section_<name>(r: ReportInputs) -> list[str]`` here, its prose as a
block in the template, and add it to :data:`SECTIONS`.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from attncam.io import write_text_atomic
from attncam.stages.outputs import fmt
from attncam.stages.reproduce.names import (
    AG,
    AG_VARIANTS,
    BEYOND_METRICS,
    PAPER_BASELINES,
    PAPER_METHODS,
    PERCENTAGES,
    SCACAM_METHODS,
    TORCHCAM_COMPARISON,
)

_BLOCK = re.compile(r"^<!-- block: (\w+) -->$")

#: The report of the table-2 part, in the docs folder.
REPORT_NAME = "REPRODUCTION_TABLE2.md"
#: Its tables and manifest, relative to the docs folder.
TABLES_DIR = Path("reproduction") / "table2"


# --------------------------------------------------------------------------- template


@functools.cache
def template_blocks() -> dict[str, list[str]]:
    """The template's blocks, ``{name: raw lines}`` (leading and trailing blank lines dropped)."""
    text = importlib.resources.files(__package__).joinpath("report_template.md").read_text("utf-8")
    blocks: dict[str, list[str]] = {}
    name: str | None = None
    for line in text.splitlines():
        m = _BLOCK.match(line)
        if m:
            name = m.group(1)
            blocks[name] = []
        elif name is not None:
            blocks[name].append(line.rstrip())
    for lines in blocks.values():
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
    return blocks


def _unwrap(paragraph: list[str]) -> list[str]:
    """A template paragraph as report lines: fenced code as is, one line per list item, else one
    line (the paragraph's lines joined with a space)."""
    if paragraph[0].startswith("```"):
        return paragraph
    if paragraph[0].startswith("- "):
        items: list[str] = []
        for line in paragraph:
            if line.startswith("- "):
                items.append(line)
            else:
                items[-1] += " " + line.strip()
        return items
    return [" ".join(line.strip() for line in paragraph)]


def block(name: str, **fields: Any) -> list[str]:
    """A template block as report lines, fields filled, each paragraph followed by a blank line.

    Raises:
        KeyError: no block ``name`` (the message lists the blocks) or a field is missing.
    """
    blocks = template_blocks()
    if name not in blocks:
        raise KeyError(f"unknown template block '{name}'; choose one of: {', '.join(blocks)}")
    raw = blocks[name]
    if name.endswith("_raw"):
        return list(raw)
    out: list[str] = []
    paragraph: list[str] = []
    for line in [*raw, ""]:
        if line:
            paragraph.append(line)
        elif paragraph:
            out += [text.format_map(fields) for text in _unwrap(paragraph)] + [""]
            paragraph = []
    return out


def fragment(name: str, **fields: Any) -> str:
    """A one-paragraph template block as one string (no blank line), fields filled."""
    return " ".join(line for line in block(name, **fields) if line)


def imagenet_commands() -> list[str]:
    """The published protocol as CLI commands (what ``scale=imagenet`` runs)."""
    return block("imagenet_commands_raw")


# --------------------------------------------------------------------------- formatting


def digits_of(metric: str) -> int:
    """Three decimals for AUCs and scores in [0, 1], two for percentages."""
    return 3 if metric.startswith(("deletion", "insertion", "morf", "lerf")) else 2


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def signed(x: float) -> str:
    """A signed difference with 3 significant digits (deletion AUCs differ in the 3rd decimal)."""
    return f"{x:+.3g}"


def _pct(x: float | None, scale: float = 100.0) -> str:
    return f"{scale * x:.1f}" if x is not None else "n/a"


# --------------------------------------------------------------------------- inputs


@dataclass
class ReportInputs:
    """Everything the report prints; what the run writes into ``docs/reproduction/table2/*.json``.

    Attributes:
        settings: The reproduction settings (``conf/reproduce/<scale>.yaml`` with overrides).
        paper: The published numbers (``conf/reproduce/paper.yaml``).
        trained: ``{"family/attention": train results}``.
        runs: ``{family: {"results", "output_dir", "manifest": {"n_images", ...}}}``, CBAM runs.
        pvar: ``{family: Percentage-in variants}``.
        caw: SCA-CAM's class-activation-weight ratio.
        scagrid: The SCA-CAM map comparison.
        sanity: The cascading-randomisation results.
        sig: ``{family: paired test rows}``.
        figures: Figure file names in ``docs/figures``.
        stages: Seconds per stage.
        stage_total: Sum of the stage times (reused stages at their recorded time).
        total: Seconds of the invocation.
        written: When the report was written (``%Y-%m-%d %H:%M``).
        host: The machine's name.
        torch_threads: torch's intra-op threads.
        cpus: CPUs of the machine.
    """

    settings: DictConfig
    paper: dict[str, Any]
    trained: dict[str, dict[str, Any]]
    runs: dict[str, dict[str, Any]]
    pvar: dict[str, Any]
    caw: dict[str, Any]
    scagrid: dict[str, Any]
    sanity: dict[str, Any]
    sig: dict[str, list[dict[str, Any]]]
    figures: list[str]
    stages: dict[str, float] = field(default_factory=dict)
    stage_total: float = 0.0
    total: float = 0.0
    written: str = "?"
    host: str = "host"
    torch_threads: int = 1
    cpus: int | None = None

    @classmethod
    def from_tables(cls, docs: Path, written: str = "?") -> ReportInputs:
        """The inputs of the report a run wrote into ``docs`` (``docs/reproduction/table2``)."""
        tables = docs / TABLES_DIR

        def load(name: str) -> Any:
            return json.loads((tables / f"{name}.json").read_text())

        man, methods, scacam = load("manifest"), load("methods"), load("scacam")
        runs = {
            f: {"results": v["results"], "output_dir": v["run"], "manifest": man["explain_runs"][f]}
            for f, v in methods["backbones"].items()
        }
        beyond = load("beyond")["paper"]
        paper = {"an_joe": methods["paper"], "cbam_resnet50": load("finetune")["paper"], **beyond}
        return cls(
            settings=OmegaConf.create(man["settings"]), paper=paper,
            trained=load("finetune")["runs"], runs=runs,
            pvar=load("percentage_in_variants")["backbones"], caw=scacam["caw"],
            scagrid=scacam["maps"], sanity=load("sanity"), sig=load("significance"),
            figures=man["figures"], stages=man["stages_seconds"],
            stage_total=man["stage_seconds_total"], total=man["wall_seconds"], written=written,
            host=man["host"]["node"], torch_threads=man["host"]["torch_threads"],
            cpus=man["host"]["cpus"],
        )  # fmt: skip


# --------------------------------------------------------------------------- header


def section_header(r: ReportInputs) -> list[str]:
    """Title, what wrote the report, the run's wall time."""
    s = r.settings
    reuse = fragment("header_reuse", minutes=r.total / 60) if s.reuse else ""
    return block(
        "header", scale=s.scale, written=r.written, host=r.host or "host",
        threads=r.torch_threads, minutes=r.stage_total / 60, reuse_clause=reuse,
    )  # fmt: skip


def section_scope(r: ReportInputs) -> list[str]:
    """What a reduced-scale run is and is not (nothing for ``scale=imagenet``)."""
    s = r.settings
    if s.scale == "imagenet":
        return []
    d, e, caw = s.data, s.explain, r.caw
    return block(
        "scope", num_classes=d.num_classes, image_size=d.image_size, num_train=d.num_train,
        num_val=d.num_val, num_test=d.num_test, feature_h=caw["feature_size"][0],
        feature_w=caw["feature_size"][1], caw_family=caw["family"],
        tolerance=e.pointing_tolerance, limit=e.limit, steps=e.steps,
        road=list(e.road_percentages),
    )  # fmt: skip


# --------------------------------------------------------------------------- a


def _finetune_row(key: str, res: Mapping[str, Any], paper: Mapping[str, Any]) -> list[Any]:
    fam, att = key.split("/")
    pub = paper["cbam_resnet50"].get(att) if fam == "resnet50" else None
    an2 = paper["an_joe"]["finetune"].get(fam) if att == "cbam" else None
    return [
        fam, att, _pct(res.get("test/acc")), _pct(res.get("test/top5_err")),
        _pct(res.get("val/acc")), res.get("epochs", "?"), f"{res.get('fit_seconds', 0):.0f}",
        f"{an2[0]:.2f} / {an2[1]:.2f}" if an2 else "-",
        f"{100 - pub[0]:.2f} / {pub[1]:.2f}" if pub else "-",
    ]  # fmt: skip


def section_finetune(r: ReportInputs) -> list[str]:
    """a. Fine-tuning: accuracy and top-5 error of every network, the papers' beside."""
    cbam = r.paper["cbam_resnet50"]
    lines = block(
        "finetune", none_top1=cbam["none"][0], none_top5=cbam["none"][1],
        cbam_top1=cbam["cbam"][0], cbam_top5=cbam["cbam"][1],
    )  # fmt: skip
    rows = [_finetune_row(key, res, r.paper) for key, res in r.trained.items()]
    lines += md_table(
        ["backbone", "attention", "test top-1 acc %", "test top-5 err %", "val top-1 %",
         "epochs", "fit s", "An & Joe table 2: acc / top-5 err %",
         "CBAM paper (ImageNet): top-1 acc / top-5 err %"],
        rows,
    ) + [""]  # fmt: skip
    if r.settings.get("data"):
        k = int(r.settings.data.num_classes)
        lines += block("finetune_chance", top1=100.0 / k, top5=100 * min(5, k) / k, k=k)
    return lines


# --------------------------------------------------------------------------- b


def _confidence_table(r: ReportInputs, metric: str) -> list[str]:
    """One of An & Joe's tables 3 and 4: every paper method on every backbone, mean, paper."""
    an = r.paper["an_joe"]
    rows = []
    for m in PAPER_METHODS:
        cells, vals = [m], []
        for f in r.runs:
            res = r.runs[f]["results"].get(m, {}).get(metric)
            cells.append(fmt(res))
            if res and res.get("value") is not None:
                vals.append(res["value"])
        cells.append(f"{np.mean(vals):.2f}" if vals else "n/a")
        pm = an["methods"].index(m) if m in an["methods"] else None
        cells.append(f"{an[metric][pm]:.2f}" if pm is not None else "-")
        rows.append(cells)
    heading = [f"### {metric.replace('_', ' ')}", ""]
    return heading + md_table(["method", *r.runs, "mean", "paper"], rows) + [""]


def section_methods(r: ReportInputs) -> list[str]:
    """b. Average Drop and Increase in Confidence (An & Joe tables 3 and 4)."""
    lines = block("methods")
    for metric in ("average_drop", "increase_in_confidence"):
        lines += _confidence_table(r, metric)
    return lines


def closest_variant(pvar: Mapping[str, Any], paper: Mapping[str, Any]) -> dict[str, Any]:
    """The Percentage-in variant whose Grad-CAM row is closest to the published one."""
    pub = paper["an_joe"]["percentage_in_gradcam"]
    out = {}
    for variant in ("binary", "soft", "gain"):
        errs = []
        for fam in pvar:
            row = pvar[fam]["methods"].get("gradcam", {}).get(variant)
            if row:
                errs += [
                    abs(row[f"{p:g}"]["value"] - q) for p, q in zip(PERCENTAGES, pub, strict=True)
                ]
        if errs:
            out[variant] = float(np.mean(errs))
    best = min(out, key=out.get) if out else None  # type: ignore[arg-type]
    return {"mean_abs_error": out, "closest": best}


def section_percentage_in(r: ReportInputs) -> list[str]:
    """b. Percentage-in: the three variants, which is closest to the paper, every method."""
    an, levels = r.paper["an_joe"], [f"@{p}%" for p in PERCENTAGES]
    lines = block("percentage_in", methods=list(r.settings.percentage_variants.methods))
    rows = [
        [f, m, variant, *[fmt(mr[variant][f"{p:g}"]) for p in PERCENTAGES]]
        for f in r.runs
        for m, mr in r.pvar[f]["methods"].items()
        for variant in r.settings.percentage_variants.variants
    ]
    rows.append(["paper (ImageNet)", "gradcam", "?",
                 *[f"{v:.2f}" for v in an["percentage_in_gradcam"]]])  # fmt: skip
    lines += md_table(["backbone", "method", "variant", *levels], rows) + [""]
    close = closest_variant(r.pvar, r.paper)
    checks = {
        f"{f}/{m}": mr["binary_matches_explain_stage"]
        for f in r.runs
        for m, mr in r.pvar[f]["methods"].items()
    }
    pub = an["percentage_in_gradcam"]
    lines += block(
        "percentage_in_closest", closest=close["closest"], checks=checks,
        errors=", ".join(f"{k} {v:.2f}" for k, v in close["mean_abs_error"].items()),
        first=pub[0], last=pub[-1], full=an["increase_in_confidence"][0],
    )  # fmt: skip
    rows = [
        [f, m, *[fmt(res.get(f"percentage_in@{p}")) for p in PERCENTAGES]]
        for f in r.runs
        for m in PAPER_METHODS
        if (res := r.runs[f]["results"].get(m))
    ]
    rows += [["paper (ImageNet)", m, *[f"{v:.2f}" for v in vals]]
             for m, vals in an["percentage_in"].items()]  # fmt: skip
    return lines + md_table(["backbone", "method", *levels], rows) + [""]


def _mean_delta(r: ReportInputs, method: str, metric: str) -> str:
    """Mean over the backbones of ``method``'s ``metric`` minus Grad-CAM's."""
    deltas = []
    for f in r.runs:
        res, ref = r.runs[f]["results"].get(method), r.runs[f]["results"].get("gradcam")
        if res and ref:
            deltas.append(res[metric]["value"] - ref[metric]["value"])
    return f"{np.mean(deltas):+.2f}" if deltas else "n/a"


def section_torchcam(r: ReportInputs) -> list[str]:
    """b. Which Grad-CAM++ / Smooth Grad-CAM++ variant behaves like the paper's baselines."""
    an = r.paper["an_joe"]
    ad, ic = an["average_drop"], an["increase_in_confidence"]
    pub = {m: (ad[i] - ad[0], ic[i] - ic[0]) for i, m in enumerate(an["methods"])}
    rows = []
    for m in TORCHCAM_COMPARISON:
        pa, pi = pub[m.split("[")[0]]
        rows.append([m, _mean_delta(r, m, "average_drop"),
                     _mean_delta(r, m, "increase_in_confidence"), f"{pa:+.2f}", f"{pi:+.2f}"])  # fmt: skip
    lines = block("torchcam")
    lines += md_table(["method", "AD - Grad-CAM AD (ours, mean)", "IC - Grad-CAM IC (ours, mean)",
                       "AD diff (paper)", "IC diff (paper)"], rows)  # fmt: skip
    return lines + [""] + block("torchcam_after")


# --------------------------------------------------------------------------- c


def beyond_table(results: Mapping[str, Any], methods: Sequence[str] | None = None) -> list[str]:
    """Every metric of ``methods`` (default: every method of ``results``, in its order)."""
    names = [m for m in methods if m in results] if methods is not None else list(results)
    rows = [[m] + [fmt(results[m].get(k), digits_of(k)) for k in BEYOND_METRICS] for m in names]
    return md_table(["method", *BEYOND_METRICS], rows)


def section_scacam(r: ReportInputs) -> list[str]:
    """c. SCA-CAM: the CAW ratio ``W_fc / mean gradient = Z``, CAM == Grad-CAM, the comparison."""
    caw, grid = r.caw, r.scagrid
    fields = {k: v for k, v in caw.items() if k != "feature_size"}
    lines = block("scacam", feature_h=caw["feature_size"][0], feature_w=caw["feature_size"][1],
                  **fields)  # fmt: skip
    if "cam_vs_gradcam_max_abs_diff" in grid:
        fc = grid.get("scacam_grad_vs_fc_max_abs_diff", float("nan"))
        lines += block("scacam_equal", cam=grid["cam_vs_gradcam_max_abs_diff"], fc=fc)
    results = r.runs[r.settings.explain.beyond_family]["results"]
    lines += block("scacam_grid") + beyond_table(results, SCACAM_METHODS) + [""]
    return lines + block("scacam_grid_after")


# --------------------------------------------------------------------------- d


def section_sanity(r: ReportInputs) -> list[str]:
    """d. Guided Grad-CAM figures and the cascading-randomisation sanity check."""
    sanity, groups = r.sanity, r.sanity["groups"]
    lines = block("sanity", n_images=sanity["n_images"], family=r.settings.explain.beyond_family)
    pick = sorted({0, 1, 2, len(groups) // 2, len(groups) - 1})
    rows = [
        [m, key, *[fmt(res[key][j]) for j in pick]]
        for m, res in sanity["methods"].items()
        for key in ("spearman", "ssim")
    ]
    lines += md_table(["method", "statistic", *[f"{j + 1}: {groups[j]}" for j in pick]], rows)
    lines += [""] + block("sanity_after")
    gb, gc = sanity["methods"].get("guided_backprop"), sanity["methods"].get("gradcam")
    if gb and gc:
        j = len(groups) // 2
        lines += block(
            "sanity_summary", step=j + 1, n_groups=len(groups),
            gb_spearman=gb["spearman"][j]["value"], gb_ssim=gb["ssim"][j]["value"],
            gc_spearman=gc["spearman"][j]["value"], gc_ssim=gc["ssim"][j]["value"],
            gb_top=gb["spearman"][0]["value"], gc_top=gc["spearman"][0]["value"],
        )  # fmt: skip
    return lines


# --------------------------------------------------------------------------- e


def section_beyond(r: ReportInputs) -> list[str]:
    """e. Every method with every metric on the beyond family, other papers' numbers beside."""
    fam = r.settings.explain.beyond_family
    p = r.paper
    lines = block("beyond", family=fam, n_images=r.runs[fam]["manifest"]["n_images"])
    lines += beyond_table(r.runs[fam]["results"]) + [""]
    gpp, sc = p["gradcampp_vgg16"], p["scorecam_vgg16"]
    return lines + block(
        "beyond_after", family=fam,
        rise_deletion=p["rise_resnet50"]["gradcam"][0],
        rise_insertion=p["rise_resnet50"]["gradcam"][1],
        gpp_ad_gradcam=gpp["gradcam"][0], gpp_ad_gradcampp=gpp["gradcampp"][0],
        gpp_ic_gradcam=gpp["gradcam"][1], gpp_ic_gradcampp=gpp["gradcampp"][1],
        sc_ad_gradcam=sc["gradcam"][0], sc_ad_gradcampp=sc["gradcampp"][0],
        sc_ad_scorecam=sc["scorecam"][0], sc_ic_gradcam=sc["gradcam"][1],
        sc_ic_gradcampp=sc["gradcampp"][1], sc_ic_scorecam=sc["scorecam"][1],
    )  # fmt: skip


def _holm_significant(row: Mapping[str, Any]) -> bool:
    return bool(row.get("paired") and row.get("significant") and row.get("p_holm", 1) < 0.05)


def _significance_row(row: Mapping[str, Any]) -> list[str]:
    verdict = "n.s."
    if row["significant"]:
        verdict = ("a better" if row["a_better"] else "b better") + (
            "" if row.get("p_holm", 1) < 0.05 else " (not after Holm)"
        )
    return [row["a"], row["b"], row["metric"],
            f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]",
            f"{row['p']:.3f}", f"{row.get('p_holm', float('nan')):.3f}", verdict]  # fmt: skip


def section_significance(r: ReportInputs) -> list[str]:
    """e. Paired tests: per backbone, the attention-guided variants and every method vs the
    reference, with Holm-adjusted p-values."""
    ref = r.settings.significance.reference
    lines = block("significance", num_resamples=r.settings.significance.num_resamples)
    header = ["a", "b", "metric", "a - b [95% CI]", "p", "p Holm", "verdict"]
    for f, rows in r.sig.items():
        paired = [row for row in rows if row.get("paired")]
        n_sig = sum(1 for row in paired if row.get("p_holm", 1) < 0.05)
        lines += block("significance_family", family=f, n_significant=n_sig, n_paired=len(paired))
        shown = [row for row in paired if row["a"] in AG_VARIANTS or row["b"] == ref]
        lines += md_table(header, [_significance_row(row) for row in shown]) + [""]
    return lines


def _pair_word(row: Mapping[str, Any]) -> str:
    word = "n.s."
    if row["significant"]:
        word = "better" if row["a_better"] else "worse"
        if row.get("p_holm", 1) >= 0.05:
            word += " (not after Holm)"
    return word


def _pair_lines(sig: Mapping[str, list[dict[str, Any]]], ref: str) -> list[str]:
    """Per backbone and variant: every metric's difference to the reference and its verdict."""
    lines = []
    for f, rows in sig.items():
        for v in AG_VARIANTS:
            parts = [
                f"{row['metric']} {signed(row['diff'])} ({_pair_word(row)})"
                for row in rows
                if row["a"] == v and row["b"] == ref and row.get("paired")
            ]
            if parts:
                lines.append(fragment("verdict_pair", family=f, variant=v, reference=ref,
                                      parts="; ".join(parts)))  # fmt: skip
    return lines


def _variant_verdict(
    sig: Mapping[str, list[dict[str, Any]]], variant: str, ref: str
) -> tuple[str, int, int] | None:
    """One variant's line of the verdict and its counts of Holm-significant gains and losses."""
    mine = [(f, row) for f, rows in sig.items() for row in rows
            if row["a"] == variant and row["b"] == ref]  # fmt: skip
    if not mine:
        return None
    better = [(f, row) for f, row in mine if _holm_significant(row) and row.get("a_better")]
    worse = [(f, row) for f, row in mine if _holm_significant(row) and not row.get("a_better")]

    def listing(rs: list[tuple[str, dict[str, Any]]]) -> str:
        return " (" + ", ".join(f"{f} {row['metric']} {signed(row['diff'])}" for f, row in rs) + ")"

    paper = "; ".join(
        f"{f} {row['metric']} {signed(row['diff'])} "
        + ("(significant)" if _holm_significant(row) else "(not significant)")
        for f, row in mine
        if row["metric"] in ("average_drop", "increase_in_confidence")
    )
    line = fragment(
        "verdict_variant", variant=variant, n_better=len(better), n=len(mine),
        better=listing(better) if better else "", n_worse=len(worse),
        worse=listing(worse) if worse else "", paper=paper,
    )  # fmt: skip
    return line, len(better), len(worse)


def section_verdict(r: ReportInputs) -> list[str]:
    """e. Does attention guidance help? Plain statements, then a verdict per variant counting the
    differences that survive the Holm adjustment."""
    ref = r.settings.significance.reference
    lines = block("verdict")
    pairs = _pair_lines(r.sig, ref)
    if not pairs:
        return lines + block("verdict_none")
    verdict = block("verdict_title")
    total_better = total_worse = 0
    for v in AG_VARIANTS:
        got = _variant_verdict(r.sig, v, ref)
        if got is not None:
            verdict.append(got[0])
            total_better, total_worse = total_better + got[1], total_worse + got[2]
    head = "verdict_even"
    if total_worse > total_better:
        head = "verdict_worse"
    elif total_better > total_worse:
        head = "verdict_better"
    an = r.paper["an_joe"]
    ag, gc = an["methods"].index(AG), an["methods"].index(PAPER_BASELINES[0])
    ad, ic = an["average_drop"], an["increase_in_confidence"]
    caveat = fragment("verdict_caveat", ad=ad[ag] - ad[gc], ic=ic[ag] - ic[gc])
    return [*lines, *pairs, "", *verdict, "", fragment(head) + " " + caveat, ""]


# --------------------------------------------------------------------------- run, commands


def section_run(r: ReportInputs) -> list[str]:
    """The run: the sum of the stage times and each stage's."""
    lines = block(
        "run", seconds=r.stage_total, minutes=r.stage_total / 60, total=r.total,
        reuse=bool(r.settings.reuse), cpus=r.cpus,
    )  # fmt: skip
    return (
        lines
        + md_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in r.stages.items()])
        + [""]
    )


def section_imagenet(r: ReportInputs) -> list[str]:
    """The published protocol as commands (``scale=imagenet``)."""
    return block("imagenet") + ["```", *imagenet_commands(), "```", ""]


def section_figures(r: ReportInputs) -> list[str]:
    """Every figure the report refers to."""
    return block("figures", figures=", ".join(f"`figures/{p}`" for p in r.figures))


#: The report, section by section.
SECTIONS: tuple[Callable[[ReportInputs], list[str]], ...] = (
    section_header,
    section_scope,
    section_finetune,
    section_methods,
    section_percentage_in,
    section_torchcam,
    section_scacam,
    section_sanity,
    section_beyond,
    section_significance,
    section_verdict,
    section_run,
    section_imagenet,
    section_figures,
)


def render_report(r: ReportInputs) -> str:
    """``REPRODUCTION_TABLE2.md`` as text: every section in order."""
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(r)
    return "\n".join(lines) + "\n"


def write_report(r: ReportInputs, docs: Path) -> Path:
    """Write ``docs/REPRODUCTION_TABLE2.md`` atomically; returns its path."""
    return write_text_atomic(docs / REPORT_NAME, render_report(r))


__all__ = [
    "REPORT_NAME",
    "SECTIONS",
    "TABLES_DIR",
    "ReportInputs",
    "block",
    "closest_variant",
    "digits_of",
    "fmt",
    "fragment",
    "imagenet_commands",
    "md_table",
    "render_report",
    "write_report",
]
