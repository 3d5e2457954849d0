"""Settings of a reproduction: the scale's YAML, ``key=value`` overrides, stage configs.

``conf/reproduce/<scale>.yaml`` (optionally on top of the scale it names in ``defaults_from``)
holds the sizes of every stage; ``conf/reproduce/paper.yaml`` the published numbers. The train and
explain configs of each stage are composed from ``conf/`` with Hydra's compose API, exactly as the
command lines that ``--print-commands`` shows would compose them.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

#: The checkout: ``conf/`` lives here, and relative ``work_dir`` / ``docs_dir`` resolve against it.
ROOT = Path(__file__).resolve().parents[4]
CONF = ROOT / "conf"

#: Files in ``conf/reproduce`` that are not a scale.
NOT_A_SCALE = frozenset({"paper"})

#: The parts of the reproduction (setting ``part``): the primary experiment, the paper's table-2
#: analogue, or both (guidance first).
PARTS: tuple[str, ...] = ("guidance", "table2", "all")


def scales(conf_dir: Path = CONF) -> list[str]:
    """The scales in ``conf_dir/reproduce`` (``cpu``, ``imagenet``, ``tiny``, ...), sorted."""
    found = (p.stem for p in (conf_dir / "reproduce").glob("*.yaml"))
    return sorted(s for s in found if s not in NOT_A_SCALE)


def load_settings(argv: Sequence[str], conf_dir: Path = CONF) -> DictConfig:
    """``conf/reproduce/<scale>.yaml`` (with its ``defaults_from`` base) plus ``key=value``.

    Args:
        argv: Command-line words; those with ``=`` are OmegaConf dot-list overrides, and
            ``scale=NAME`` picks the file (default ``cpu``).
        conf_dir: The ``conf/`` folder.

    Returns:
        The merged settings.

    Raises:
        SystemExit: the scale has no file (the message lists the valid scales), ``part`` is not
            one of :data:`PARTS`, or there is no ``conf_dir/reproduce`` (not a checkout).
    """
    if not (conf_dir / "reproduce").is_dir():
        raise SystemExit(f"no {conf_dir / 'reproduce'}: run from a checkout of attncam")
    dots = [a for a in argv if "=" in a]
    scale = next((a.split("=", 1)[1] for a in dots if a.startswith("scale=")), "cpu")
    path = conf_dir / "reproduce" / f"{scale}.yaml"
    if scale in NOT_A_SCALE or not path.is_file():
        raise SystemExit(f"unknown scale '{scale}'; choose one of: {', '.join(scales(conf_dir))}")
    cfg = OmegaConf.load(path)
    base = cfg.pop("defaults_from", None)
    if base:
        merged = OmegaConf.load(conf_dir / "reproduce" / f"{base}.yaml")
        # A list or null in the scale file replaces the base's value (OmegaConf merges dicts).
        cfg = OmegaConf.merge(merged, cfg)
    cfg = OmegaConf.merge(
        cfg, OmegaConf.from_dotlist([a for a in dots if not a.startswith("scale=")])
    )
    assert isinstance(cfg, DictConfig)
    try:
        check_part(cfg)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return cfg


def check_part(s: DictConfig) -> str:
    """The settings' ``part`` (``guidance``, ``table2`` or ``all``).

    Raises:
        ValueError: ``part`` is missing or not one of :data:`PARTS` (the message names both).
    """
    part = s.get("part")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of: {', '.join(PARTS)}")
    return str(part)


def load_paper(conf_dir: Path = CONF) -> dict[str, Any]:
    """The published numbers, ``conf/reproduce/paper.yaml`` as plain containers."""
    paper = OmegaConf.to_container(
        OmegaConf.load(conf_dir / "reproduce" / "paper.yaml"), resolve=True
    )
    assert isinstance(paper, dict)
    return paper  # type: ignore[return-value]


def resolve_dir(path: str, root: Path = ROOT) -> Path:
    """``path`` itself when absolute, else relative to the checkout."""
    return Path(path) if Path(path).is_absolute() else root / path


def table2_work_dir(s: DictConfig) -> Path:
    """The stage folders of the table-2 part: ``<work_dir>/table2`` (train/, explain/, timings)."""
    return resolve_dir(str(s.work_dir)) / "table2"


def compose_cfg(name: str, overrides: list[str], conf_dir: Path = CONF) -> DictConfig:
    """A ``train`` or ``explain`` config composed with Hydra's compose API."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def data_overrides(s: DictConfig) -> list[str]:
    """``data.<key>=<value>`` for the synthetic data settings of the scale."""
    if not s.get("data"):
        return []
    out = ["data=synthetic"]
    for k, v in s.data.items():
        out.append(f"data.{k}={'null' if v is None else v}")
    return out


def train_overrides(s: DictConfig, family: str, attention: str) -> list[str]:
    """The ``train.py`` overrides of one fine-tuning run."""
    t = s.train
    ov = [f"experiment={t.experiment}"] if t.get("experiment") else []
    ov += [f"model={family}", f"attention={attention}", "logger=none", f"seed={s.seed}"]
    ov += data_overrides(s) + list(t.get("overrides") or [])
    ov += list((t.get("family_overrides") or {}).get(family) or [])
    if s.get("threads"):
        ov.append(f"threads={s.threads}")
    return ov


def explain_overrides(s: DictConfig, ckpt: Path, metrics: Sequence[str]) -> list[str]:
    """The ``explain.py`` overrides of one explain run (methods are set on the config).

    The run keeps its maps (``maps.npz``, re-scored by the Percentage-in variants) and its
    per-image metric values (``per_image.json``, paired by the significance tests); ``limit=N``
    explains a class-stratified subset drawn with the reproduction's ``seed``.
    """
    e = s.explain
    ov = [f"ckpt={ckpt}", "method=paper", "metrics=default", "logger=none", "save_maps=true"]
    ov += ["save_per_image=true", f"seed={s.seed}"]
    ov += [f"limit={e.limit if e.limit is not None else 'null'}", f"batch_size={e.batch_size}"]
    ov += [f"figure_rows={e.figure_rows}", f"metrics.num_resamples={e.num_resamples}"]
    ov += [
        f"metrics.protocol.steps={e.steps}",
        "metrics.protocol.precision=float32",  # a publication run: no bf16 forwards
        f"metrics.pointing_tolerance={e.pointing_tolerance}",
    ]
    ov += [f"metrics.protocol.road_percentages=[{','.join(str(p) for p in e.road_percentages)}]"]
    ov += [f"metrics.enabled=[{','.join(metrics)}]", "metrics.win=false"]
    if e.get("data"):
        ov += [f"data={e.data}", f"split={e.get('split', 'test')}"]
    if e.get("trainer"):
        ov.append(f"trainer={e.trainer}")
    if s.get("threads"):
        ov.append(f"threads={s.threads}")
    return ov


def _quote(arg: str) -> str:
    """A shell-safe override (lists and brackets quoted)."""
    return shlex.quote(arg)


def grad_cam_anchors(paper: dict[str, Any] | None = None) -> list[str]:
    """Comment lines: An & Joe's Grad-CAM row, which an ImageNet run should land near."""
    an = (paper or load_paper())["an_joe"]
    i = an["methods"].index("gradcam")
    return [
        f"# Expected Grad-CAM anchors (An & Joe 2022, ImageNet; conf/reproduce/paper.yaml): "
        f"Average Drop {an['average_drop'][i]:.2f}, Increase in Confidence "
        f"{an['increase_in_confidence'][i]:.2f}.",
        "# A Grad-CAM row far from them means the protocol differs (weights, images, "
        "preprocessing, score or masking), not that another method is better.",
    ]


def _explain_lines(s: DictConfig, work: Path) -> list[str]:
    """Step 2 of :func:`scale_commands`: one ``explain.py`` line per CBAM checkpoint."""
    e = s.explain
    subset = "every image" if e.limit is None else (
        f"a class-stratified subset of {e.limit} images drawn with seed={s.seed} (limit=N draws it)"
    )  # fmt: skip
    out = [f"# 2. Explain each attention checkpoint on {subset}: the paper's methods and metrics."]
    if e.get("data") == "imagenet":
        out += grad_cam_anchors()
    for family in [f for f in s.train.families if "cbam" in s.train.attentions]:
        beyond = family == e.get("beyond_family")
        ckpt = work / "train" / f"{family}_cbam" / "checkpoints" / "best.ckpt"
        metrics = list(e.beyond_metrics if beyond else e.paper_metrics)
        ov = explain_overrides(s, ckpt, metrics)
        if beyond:
            methods = ",".join(["paper", *e.beyond_methods])
            ov = [f"method=[{methods}]" if o == "method=paper" else o for o in ov]
        ov.append(f"hydra.run.dir={work}/explain/{family}_cbam")
        out.append("python explain.py " + " ".join(_quote(o) for o in ov))
    return out


def scale_commands(s: DictConfig) -> list[str]:
    """The ``train.py`` and ``explain.py`` command lines of the table-2 part at ``s``.

    Built from the same overrides the in-process stages compose (``train_overrides``,
    ``explain_overrides``), so they match the scale asked for. On ImageNet the expected Grad-CAM
    anchors (:func:`grad_cam_anchors`) are written beside the explain commands. Stages with no
    CLI (the Percentage-in variants, the CAW ratio, the sanity figures, the report) are named in
    a closing comment.

    Args:
        s: The reproduction settings (``load_settings``).

    Returns:
        Lines: ``#`` comments and one command per line.
    """
    work = Path(str(s.work_dir)) / "table2"
    run = f"scripts/reproduce.py scale={s.scale} part=table2"
    out = [f"# scale={s.scale} part=table2: the commands of {run}",
           "# 1. Fine-tune every family with and without attention:"]  # fmt: skip
    if s.get("part") in ("guidance", "all"):
        out[:0] = [f"# scale={s.scale} part=guidance runs in one process (trunk features cached, "
                   f"tails trained per arm and seed): python scripts/reproduce.py scale={s.scale} "
                   "part=guidance"]  # fmt: skip
    for family in s.train.families:
        for att in s.train.attentions:
            ov = [*train_overrides(s, family, att), f"hydra.run.dir={work}/train/{family}_{att}"]
            out.append("python train.py " + " ".join(_quote(o) for o in ov))
    out += _explain_lines(s, work)
    out += [
        "# 3. The Percentage-in variants, SCA-CAM's scacam_fc row and CAW ratio, the sanity",
        "#    check and the report in one go (reuse=true picks up finished stages):",
        f"python {run} reuse=true",
    ]
    return out


__all__ = [
    "CONF",
    "PARTS",
    "ROOT",
    "check_part",
    "compose_cfg",
    "data_overrides",
    "explain_overrides",
    "grad_cam_anchors",
    "load_paper",
    "load_settings",
    "resolve_dir",
    "scale_commands",
    "scales",
    "table2_work_dir",
    "train_overrides",
]
