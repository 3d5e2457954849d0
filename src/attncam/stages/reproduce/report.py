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
from scipy import special

from attncam.io import write_text_atomic
from attncam.stages.design import MIN_GRID
from attncam.stages.outputs import fmt
from attncam.stages.reproduce.geometry import GRADCAM, cam_geometry, control_name, same_tensor
from attncam.stages.reproduce.names import (
    AG,
    AG_VARIANTS,
    BEYOND_METRICS,
    PAPER_METHODS,
    PERCENTAGES,
    SCACAM_METHODS,
    TORCHCAM_COMPARISON,
    is_grid_bound,
)
from attncam.stages.reproduce.settings import load_settings

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


def split_by_accuracy(
    trained: Mapping[str, Mapping[str, Any]], families: Sequence[str], min_accuracy: float
) -> tuple[dict[str, float], dict[str, float | None]]:
    """The explained networks that enter a verdict and those excluded, with their accuracy.

    A network enters only if its explained model (``<family>/cbam``) has a test top-1 of at
    least ``min_accuracy`` percent; one without a recorded accuracy is excluded.

    Returns:
        ``(entering, excluded)``: ``{family: test top-1 %}`` each, in the order of ``families``.
    """
    entering: dict[str, float] = {}
    excluded: dict[str, float | None] = {}
    for fam in families:
        acc = trained.get(f"{fam}/cbam", {}).get("test/acc")
        pct = None if acc is None else 100.0 * float(acc)
        if pct is not None and pct >= min_accuracy:
            entering[fam] = pct
        else:
            excluded[fam] = pct
    return entering, excluded


def _subset(run_manifest: Mapping[str, Any]) -> str:
    """``stratified`` (a seeded class-stratified subset) or ``first`` (the first N images)."""
    if "subset" in run_manifest:
        return str(run_manifest["subset"])
    return "stratified" if "image_ids_file" in run_manifest else "first"


def run_info(info: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What the header says about the run: command, commit, dirty flag, date, image subset."""
    subsets = {_subset(r["manifest"]) for r in runs.values()}
    return {
        **{k: info.get(k) for k in ("command", "git_commit", "git_dirty", "written")},
        "subset": "stratified" if subsets == {"stratified"} else "first",
    }


def _with_rules(settings: DictConfig) -> DictConfig:
    """The run's settings; a run that predates the ``table2`` rules gets today's defaults."""
    if "table2" not in settings:
        settings.table2 = load_settings([]).table2
    return settings


def _cams(
    s: DictConfig, man: Mapping[str, Any], trained: Mapping[str, Any], families: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each explained family's CAM geometry: as the run recorded it, else from the model code
    (the placement it was trained with, at the run's image size)."""
    size = int(s.data.image_size) if s.get("data") else 224
    out = {}
    for f in families:
        rec = man["explain_runs"][f].get("cam")
        placement = trained.get(f"{f}/cbam", {}).get("placement", "blocks")
        out[f] = rec or cam_geometry(f, placement, size)
    return out


@dataclass
class ReportInputs:
    """Everything the report prints; what the run writes into ``docs/reproduction/table2/*.json``.

    Attributes:
        settings: The reproduction settings (``conf/reproduce/<scale>.yaml`` with overrides).
        paper: The published numbers (``conf/reproduce/paper.yaml``).
        trained: ``{"family/attention": train results}``.
        runs: ``{family: {"results", "output_dir", "manifest": {"n_images", ...}}}``, CBAM runs.
        cams: ``{family: {"layer", "grid", "tensors"}}``: the CAM layer, its grid and the tensor
            each attention-guided variant explains (:mod:`~attncam.stages.reproduce.geometry`).
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
        run_info: :func:`run_info`: command, commit, dirty flag, date, image subset.
    """

    settings: DictConfig
    paper: dict[str, Any]
    trained: dict[str, dict[str, Any]]
    runs: dict[str, dict[str, Any]]
    cams: dict[str, dict[str, Any]]
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
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def min_accuracy(self) -> float:
        """``table2.verdict_min_accuracy``: % test top-1 a network needs to enter a verdict."""
        return float(self.settings.table2.verdict_min_accuracy)

    def split(self) -> tuple[dict[str, float], dict[str, float | None]]:
        """:func:`split_by_accuracy` of the explained networks."""
        return split_by_accuracy(self.trained, list(self.runs), self.min_accuracy)

    @classmethod
    def from_tables(cls, docs: Path, written: str = "?") -> ReportInputs:
        """The inputs of the report a run wrote into ``docs`` (``docs/reproduction/table2``).

        ``written`` is used only when the manifest does not record when the report was written.
        """
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
        settings, trained = _with_rules(OmegaConf.create(man["settings"])), load("finetune")["runs"]
        info = {**man, "written": man.get("written", written)}
        return cls(
            settings=settings, paper=paper, trained=trained, runs=runs,
            cams=_cams(settings, man, trained, list(runs)),
            pvar=load("percentage_in_variants")["backbones"], caw=scacam["caw"],
            scagrid=scacam["maps"], sanity=load("sanity"), sig=load("significance"),
            figures=man["figures"], stages=man["stages_seconds"],
            stage_total=man["stage_seconds_total"], total=man["wall_seconds"],
            written=info["written"], host=man["host"]["node"],
            torch_threads=man["host"]["torch_threads"], cpus=man["host"]["cpus"],
            run_info=run_info(info, runs),
        )  # fmt: skip


# --------------------------------------------------------------------------- header


def _commit_text(info: Mapping[str, Any]) -> str:
    """``the commit`` and whether the checkout was dirty (or that it was not recorded)."""
    commit = info.get("git_commit")
    text = f"`{str(commit)[:7]}`" if commit else "an unrecorded commit"
    dirty = info.get("git_dirty")
    if dirty:
        return text + " with uncommitted changes"
    if dirty is None:
        return text + " (whether the checkout had uncommitted changes was not recorded)"
    return text


def _acc_list(nets: Mapping[str, float | None]) -> str:
    """``resnet50 (100.0%), vgg19 (22.7%)``, or ``none``."""
    parts = [f"{f} ({'n/a' if a is None else f'{a:.1f}%'})" for f, a in nets.items()]
    return ", ".join(parts) or "none"


def section_header(r: ReportInputs) -> list[str]:
    """Title, the primary report, which run wrote this one, the run's wall time, the summary."""
    s, info = r.settings, r.run_info
    reuse = fragment("header_reuse", minutes=r.total / 60) if s.reuse else ""
    command = info.get("command") or f"reproduce.py scale={s.scale}"
    return block(
        "header", commit=_commit_text(info), written=r.written, command=command,
        host=r.host or "host", threads=r.torch_threads, minutes=r.stage_total / 60,
        reuse_clause=reuse, summary=_summary(r),
    )  # fmt: skip


def _grids(r: ReportInputs) -> str:
    """``resnet50 3x3 (`features.layer4`), ...``: each explained network's CAM grid."""
    return ", ".join(
        f"{f} {c['grid'][0]}x{c['grid'][1]} (`{c['layer']}`)" for f, c in r.cams.items()
    )


def section_scope(r: ReportInputs) -> list[str]:
    """What a reduced-scale run is and is not (nothing for ``scale=imagenet``)."""
    s = r.settings
    if s.scale == "imagenet":
        return []
    d, e = s.data, s.explain
    if e.limit is None:
        subset = fragment("scope_subset_all")
    else:
        subset = fragment(f"scope_subset_{r.run_info.get('subset', 'first')}", limit=e.limit)
    from_code = any(c.get("source") == "model code" for c in r.cams.values())
    return block(
        "scope", num_classes=d.num_classes, image_size=d.image_size, num_train=d.num_train,
        num_val=d.num_val, num_test=d.num_test, grids=_grids(r),
        grid_source=" " + fragment("scope_grid_source") if from_code else "", min_grid=MIN_GRID,
        tolerance=e.pointing_tolerance, subset=subset, steps=e.steps,
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
    """a. Fine-tuning: accuracy and top-5 error of every network, the papers' beside; which
    networks enter a verdict."""
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
    entering, excluded = r.split()
    return lines + block(
        "finetune_gate", min_acc=r.min_accuracy, entering=_acc_list(entering),
        excluded=_acc_list(excluded),
    )  # fmt: skip


# --------------------------------------------------------------------------- b


def _network_header(r: ReportInputs) -> list[str]:
    """The explained networks as column names, an excluded one marked."""
    entering, _ = r.split()
    return [f if f in entering else f"{f} (excluded)" for f in r.runs]


def _confidence_table(r: ReportInputs, metric: str) -> list[str]:
    """One of An & Joe's tables 3 and 4: every paper method on every backbone, the mean of the
    networks that enter verdicts, the paper."""
    an = r.paper["an_joe"]
    entering, _ = r.split()
    rows = []
    for m in PAPER_METHODS:
        cells, vals = [m], []
        for f in r.runs:
            res = r.runs[f]["results"].get(m, {}).get(metric)
            cells.append(fmt(res))
            if f in entering and res and res.get("value") is not None:
                vals.append(res["value"])
        cells.append(f"{np.mean(vals):.2f}" if vals else "n/a")
        pm = an["methods"].index(m) if m in an["methods"] else None
        cells.append(f"{an[metric][pm]:.2f}" if pm is not None else "-")
        rows.append(cells)
    heading = [f"### {metric.replace('_', ' ')}", ""]
    mean = f"mean (nets >= {r.min_accuracy:g}%)"
    return heading + md_table(["method", *_network_header(r), mean, "paper"], rows) + [""]


def section_methods(r: ReportInputs) -> list[str]:
    """b. Average Drop and Increase in Confidence (An & Joe tables 3 and 4)."""
    lines = block("methods", min_acc=r.min_accuracy)
    for metric in ("average_drop", "increase_in_confidence"):
        lines += _confidence_table(r, metric)
    return lines


def closest_variant(
    pvar: Mapping[str, Any], paper: Mapping[str, Any], families: Sequence[str] | None = None
) -> dict[str, Any]:
    """The Percentage-in variant whose Grad-CAM row is closest to the published one, over
    ``families`` (default: every family of ``pvar``)."""
    pub = paper["an_joe"]["percentage_in_gradcam"]
    out = {}
    fams = [f for f in pvar if families is None or f in families]
    for variant in ("binary", "soft", "gain"):
        errs = []
        for fam in fams:
            row = pvar[fam]["methods"].get("gradcam", {}).get(variant)
            if row:
                errs += [
                    abs(row[f"{p:g}"]["value"] - q) for p, q in zip(PERCENTAGES, pub, strict=True)
                ]
        if errs:
            out[variant] = float(np.mean(errs))
    best = min(out, key=out.get) if out else None  # type: ignore[arg-type]
    return {"mean_abs_error": out, "closest": best, "families": fams}


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
    entering, _ = r.split()
    close = closest_variant(r.pvar, r.paper, list(entering))
    checks = {
        f"{f}/{m}": mr["binary_matches_explain_stage"]
        for f in r.runs
        for m, mr in r.pvar[f]["methods"].items()
    }
    pub = an["percentage_in_gradcam"]
    lines += block(
        "percentage_in_closest", closest=close["closest"] or "n/a", checks=checks,
        errors=", ".join(f"{k} {v:.2f}" for k, v in close["mean_abs_error"].items()) or "n/a",
        first=pub[0], last=pub[-1], full=an["increase_in_confidence"][0],
        min_acc=r.min_accuracy, entering=", ".join(entering) or "none",
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
    """Mean over the networks that enter verdicts of ``method``'s ``metric`` minus Grad-CAM's."""
    deltas = []
    entering, _ = r.split()
    for f in entering:
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
    lines = block("torchcam", min_acc=r.min_accuracy)
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
    h, w = r.cams[fam]["grid"]
    lines = block(
        "beyond", family=fam, n_images=r.runs[fam]["manifest"]["n_images"], grid=f"{h}x{w}"
    )
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
    reference, with Holm-adjusted p-values; excluded networks marked."""
    ref = r.settings.significance.reference
    lines = block("significance", num_resamples=r.settings.significance.num_resamples)
    header = ["a", "b", "metric", "a - b [95% CI]", "p", "p Holm", "interval"]
    _, excluded = r.split()
    for f, rows in r.sig.items():
        paired = [row for row in rows if row.get("paired")]
        n_sig = sum(1 for row in paired if row.get("p_holm", 1) < 0.05)
        acc = excluded.get(f)
        note = "" if f not in excluded else " " + fragment(
            "significance_excluded", accuracy="n/a" if acc is None else f"{acc:.1f}%",
            min_acc=r.min_accuracy,
        )  # fmt: skip
        lines += block(
            "significance_family", family=f, excluded=note, n_significant=n_sig,
            n_paired=len(paired),
        )  # fmt: skip
        shown = [row for row in paired if row["a"] in AG_VARIANTS or row["b"] == ref]
        lines += md_table(header, [_significance_row(row) for row in shown]) + [""]
    return lines


# --------------------------------------------------------------------------- e: the verdict


def _mde(row: Mapping[str, Any], confidence: float) -> tuple[float, bool]:
    """The row's minimum detectable effect (two-sided test at 1 - ``confidence``, 80% power) and
    whether it is approximated: without the per-image values, from the interval's width
    (``sd / sqrt(n) ~ width / (2 z)``)."""
    if row.get("mde") is not None:
        return float(row["mde"]), False
    z = float(special.ndtri(1.0 - (1.0 - confidence) / 2.0))
    factor = (z + float(special.ndtri(0.8))) / (2.0 * z)
    return factor * (float(row["high"]) - float(row["low"])), True


def _reference(r: ReportInputs, fam: str, variant: str) -> str:
    """Grad-CAM, or, when the variant explains another tensor than the CAM layer and the run has
    it, the explain stage's control row: Grad-CAM on the input of the variant's attention module
    (which differs from the default variant's tensor only by the gating)."""
    cam = r.cams[fam]
    if not same_tensor(cam, variant) and variant in cam["tensors"]:
        control = control_name(cam, variant)
        if control in r.runs[fam]["results"]:
            return control
    return str(r.settings.significance.reference)


def _reading(r: ReportInputs, fam: str, variant: str, ref: str, row: Mapping[str, Any]) -> str:
    """What a comparison can say: the checks it fails, else resolved / identical / inconclusive."""
    cam = r.cams[fam]
    h, w = cam["grid"]
    gates = []
    if is_grid_bound(row["metric"]) and min(h, w) < MIN_GRID:
        gates.append(f"not testable at this grid ({h}x{w})")
    if ref == r.settings.significance.reference and not same_tensor(cam, variant):
        gates.append("different tensors")
    if gates:
        return "; ".join(gates)
    if _holm_significant(row):
        return ("better" if row["a_better"] else "worse") + " (Holm)"
    if row["low"] == row["high"] == 0:
        return "identical on these images"
    return "inconclusive"


def verdict_rows(r: ReportInputs) -> list[dict[str, Any]]:
    """Each attention-guided variant vs its reference on every paired metric, on the networks
    that enter verdicts: the test row plus ``family``, ``reading``, ``mde`` and ``mde_approx``."""
    entering, _ = r.split()
    conf = float(r.settings.significance.confidence)
    out = []
    for fam in entering:
        for v in AG_VARIANTS:
            ref = _reference(r, fam, v)
            for row in r.sig.get(fam, []):
                if row["a"] == v and row["b"] == ref and row.get("paired"):
                    mde, approx = _mde(row, conf)
                    reading = _reading(r, fam, v, ref, row)
                    out.append({**row, "family": fam, "reading": reading, "mde": mde,
                                "mde_approx": approx})  # fmt: skip
    return out


def _passes(row: Mapping[str, Any]) -> bool:
    """Whether a verdict row passes the grid and same-tensor checks."""
    return not row["reading"].startswith(("not testable", "different tensors"))


def _counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many comparisons fail each check, pass both, and are resolved after Holm."""
    passing = [x for x in rows if _passes(x)]
    resolved = [x for x in passing if x["reading"].endswith("(Holm)")]
    return {
        "n_rows": len(rows),
        "n_grid": sum(1 for x in rows if "not testable" in x["reading"]),
        "n_tensor": sum(1 for x in rows if "different tensors" in x["reading"]),
        "n_pass": len(passing),
        "n_resolved": len(resolved),
        "resolved": "; ".join(
            f"{x['family']} `{x['a']}` {x['metric']} {signed(x['diff'])} ({x['reading']})"
            for x in resolved
        ),
        "word": "not testable" if not passing else "inconclusive",
    }


def _summary(r: ReportInputs) -> str:
    """The report's summary line: which networks enter, what this part can say."""
    entering, excluded = r.split()
    if not entering:
        return fragment("summary_none", min_acc=r.min_accuracy, excluded=_acc_list(excluded))
    return fragment(
        "summary", min_acc=r.min_accuracy, entering=_acc_list(entering),
        excluded=_acc_list(excluded), **_counts(verdict_rows(r)),
    )  # fmt: skip


def _verdict_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The verdict rows as a table."""
    body = [
        [x["family"], f"`{x['a']}`", f"`{x['b']}`", x["metric"],
         f"{x['diff']:+.3g} [{x['low']:+.3g}, {x['high']:+.3g}]",
         f"{x.get('p_holm', float('nan')):.3f}",
         ("≈" if x["mde_approx"] else "") + f"{x['mde']:.3g}", x["reading"]]
        for x in rows
    ]  # fmt: skip
    header = ["network", "variant", "compared with", "metric", "difference [95% CI]", "p Holm",
              "MDE", "reading"]  # fmt: skip
    return md_table(header, body) + [""]


def _power(r: ReportInputs, rows: Sequence[Mapping[str, Any]]) -> str:
    """Where the realised MDE on the paper's two metrics exceeds the paper's effect."""
    an = r.paper["an_joe"]
    ag, gc = an["methods"].index(AG), an["methods"].index(GRADCAM)
    effect = {m: abs(an[m][ag] - an[m][gc]) for m in ("average_drop", "increase_in_confidence")}
    low = [
        f"{x['family']} `{x['a']}` {x['metric'].replace('_', ' ')} (MDE "
        f"{'≈' if x['mde_approx'] else ''}{x['mde']:.3g} > {effect[x['metric']]:.2f})"
        for x in rows
        if x["metric"] in effect and x["mde"] > effect[x["metric"]]
    ]
    if low:
        return fragment("verdict_power_low", rows="; ".join(low))
    return fragment("verdict_power_ok")


def section_verdict(r: ReportInputs) -> list[str]:
    """e. Does attention guidance help? The checks each comparison must pass, every comparison
    with its reading, and what this part can and cannot say."""
    entering, excluded = r.split()
    rows = verdict_rows(r)
    approx = any(x["mde_approx"] for x in rows)
    lines = block(
        "verdict", min_grid=MIN_GRID, min_acc=r.min_accuracy, entering=_acc_list(entering),
        excluded=_acc_list(excluded),
        mde_note=" " + fragment("verdict_mde_approx") if approx else "",
    )  # fmt: skip
    if not rows:
        return lines + block("verdict_none")
    counts = _counts(rows)
    lines += _verdict_table(rows)
    found = fragment("verdict_resolved", **counts) if counts["n_resolved"] else fragment(
        "verdict_unresolved"
    )  # fmt: skip
    lines += block("verdict_result", found=found, **counts)
    an = r.paper["an_joe"]
    ag, gc = an["methods"].index(AG), an["methods"].index(GRADCAM)
    ad, ic = an["average_drop"], an["increase_in_confidence"]
    return lines + block(
        "verdict_caveat", ad=ad[ag] - ad[gc], ic=ic[ag] - ic[gc], power=_power(r, rows),
        n_images=", ".join(str(r.runs[f]["manifest"]["n_images"]) for f in entering),
    )  # fmt: skip


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
    "run_info",
    "split_by_accuracy",
    "verdict_rows",
    "write_report",
]
