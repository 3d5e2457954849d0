"""Which run ``resume=`` continues, in which folder, with which config.

- ``resume=last`` continues ``checkpoints/last.ckpt`` of the run folder when it has one: the
  folder Hydra was given (``hydra.run.dir=<old folder>``) or ``output_dir``. When the folder was
  chosen by the user and holds no checkpoint yet, training starts there from scratch (so the
  same command can be submitted again and again to a scheduler).
- ``resume=last`` in a fresh time-stamped folder (no ``hydra.run.dir``) looks for the latest
  run under the stage's ``outputs/`` and ``multirun/`` folders whose overrides
  (``.hydra/overrides.yaml``) are this command's, ``resume`` aside, and continues *in that
  folder* (the fresh one is removed); none found is an error that says what to pass.
- ``resume=PATH`` continues in the checkpoint's run folder (the parent of its ``checkpoints/``),
  or, for a checkpoint outside a run folder, in this run's folder.

The model and data settings of a resumed run are the checkpoint's own (stored in it, or the
``config.json`` beside it); settings given on the command line are applied on top, and a
command-line choice that describes another network is a ``CheckpointError``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from attncam.models.checkpoint import (
    ARCHITECTURE_HPARAMS,
    CheckpointError,
    check_hparams,
    checkpoint_metadata,
    read_checkpoint,
)
from attncam.stages.cli import FINISHED_MARKERS, ConfigError, current_job, refuse_finished

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"
#: Config groups a resumed run takes from its checkpoint, and the overrides that choose them.
RESUMED_GROUPS: dict[str, tuple[str, ...]] = {"model": ("model", "attention"), "data": ("data",)}


def override_key(text: str) -> str:
    """The key of a command-line override: ``+model.x=1`` -> ``model.x``."""
    return text.lstrip("+~").split("=", 1)[0].strip()


def same_overrides(a: list[str], b: list[str]) -> bool:
    """Whether two override lists are the same command, ``resume=...`` aside."""

    def norm(items: list[str]) -> list[str]:
        return sorted(o.strip() for o in items if override_key(o) != "resume")

    return norm(a) == norm(b)


def _run_overrides(folder: Path) -> list[str] | None:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # an unreadable file is not a run to continue
        return None
    return [str(o) for o in loaded] if isinstance(loaded, list) else None


def search_roots(task_name: str) -> list[Path]:
    """Where earlier runs of the stage live: the parents of Hydra's run and sweep folders."""
    from hydra.core.hydra_config import HydraConfig

    roots = []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        for pattern in (str(hc.run.dir), str(hc.sweep.dir)):
            # outputs/train/<date>/<time> -> outputs/train: the folder above the dated ones
            path = Path(pattern)
            roots.append(path.parents[1] if len(path.parts) > 2 else path.parent)
    else:
        roots = [Path("outputs") / task_name, Path("multirun") / task_name]
    return list(dict.fromkeys(roots))


def find_run_to_resume(roots: list[Path], overrides: list[str]) -> tuple[Path | None, list[Path]]:
    """The latest run folder under ``roots`` with ``checkpoints/last.ckpt`` and ``overrides``.

    Returns:
        ``(folder or None, every run folder with a last.ckpt, latest first)``.
    """
    runs = []
    for root in roots:
        if root.is_dir():
            runs += [ckpt.parent.parent for ckpt in root.rglob(str(LAST))]
    runs.sort(key=lambda f: (f / LAST).stat().st_mtime, reverse=True)
    for folder in runs:
        saved = _run_overrides(folder)
        if saved is not None and same_overrides(saved, overrides):
            return folder, runs
    return None, runs


def _not_found(roots: list[Path], overrides: list[str], runs: list[Path]) -> ConfigError:
    shown = [o for o in overrides if override_key(o) != "resume"]
    closest = "; ".join(f"{f.resolve()} ({' '.join(_run_overrides(f) or [])})" for f in runs[:3])
    return ConfigError(
        f"resume=last: no run under {', '.join(map(str, roots))} with the overrides "
        f"[{' '.join(shown)}] has {LAST}"
        + (f" (latest runs with one: {closest})" if closest else "")
        + "; pass resume=PATH (a checkpoint), or resume=last hydra.run.dir=<run folder>"
    )


def locate(cfg: DictConfig, out: Path) -> tuple[Path | None, Path]:
    """``(checkpoint to resume or None, run folder)`` for ``cfg.resume`` (see the module).

    Raises:
        ConfigError: ``resume=last`` found nothing to continue.
        CheckpointError: ``resume=PATH`` does not exist.
    """
    resume = str(cfg.resume)
    if resume != "last":
        path = Path(resume).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {resume!r} does not exist")
        path = path.resolve()
        return path, path.parent.parent if path.parent.name == "checkpoints" else out
    if (out / LAST).is_file():
        return (out / LAST).resolve(), out
    job = current_job()
    if job.hydra_dir is None or job.fixed_dir:
        found = [m for m in FINISHED_MARKERS if (out / m).exists()]
        if found:
            raise ConfigError(
                f"resume=last: {out} holds {', '.join(found)} but no {LAST} to continue from; "
                "pass resume=PATH, or train into a new folder (leave out hydra.run.dir)"
            )
        log.info("resume=last: no %s yet, starting from scratch in %s", out / LAST, out)
        return None, out
    roots = search_roots(str(cfg.get("task_name") or "train"))
    folder, runs = find_run_to_resume(roots, job.overrides)
    if folder is None:
        raise _not_found(roots, job.overrides, runs)
    log.info("resume=last: continuing %s (the latest run with the same overrides)", folder)
    return (folder / LAST).resolve(), folder.resolve()


def saved_config(ckpt: Mapping[str, Any], run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The training config of a checkpoint: stored in it, else ``config.json`` of its run."""
    meta = checkpoint_metadata(ckpt)
    if isinstance(meta.get("config"), Mapping):
        return dict(meta["config"]), "the checkpoint"
    path = run_dir / "config.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    return None, "nowhere"


def merge_resumed_config(
    cfg: DictConfig, saved: Mapping[str, Any] | None, explicit: list[str] | None
) -> DictConfig:
    """``cfg`` with the ``model`` and ``data`` groups of the resumed run's config.

    Args:
        cfg: the composed config of this command.
        saved: the resumed run's config (None: nothing to take).
        explicit: this command's overrides; None (outside Hydra) keeps ``cfg`` as it is.

    Returns:
        A copy of ``cfg``: each group is the saved one with this command's ``group.key=value``
        overrides applied on top, unless the command chose the group (``model=...``,
        ``attention=...``, ``data=...``), which keeps the composed group (checked later
        against the checkpoint).
    """
    if saved is None or explicit is None:
        return cfg
    cfg = cfg.copy()
    keys = [override_key(o) for o in explicit]
    with open_dict(cfg):
        for group, choosers in RESUMED_GROUPS.items():
            if group not in saved or any(k in choosers for k in keys):
                continue
            merged = OmegaConf.create(dict(saved[group]))
            for key in keys:
                if key.startswith(group + "."):
                    sub = key[len(group) + 1 :]
                    OmegaConf.update(merged, sub, OmegaConf.select(cfg, key), force_add=True)
            cfg[group] = merged
    return cfg


def check_architecture(ckpt: Mapping[str, Any], cfg: DictConfig, path: Path) -> None:
    """The checkpoint's network against ``cfg.model`` (what is known before building it)."""
    expected = {k: cfg.model[k] for k in ARCHITECTURE_HPARAMS if k in cfg.model}
    check_hparams(ckpt.get("hyper_parameters") or {}, expected, str(path))


def prepare_training(cfg: DictConfig, out: Path) -> tuple[DictConfig, Path]:
    """The train stage's ``prepare``: resolve ``resume`` and refuse a finished folder.

    Returns:
        ``(cfg, run folder)``; ``cfg.resume`` is then the absolute checkpoint path, or None.

    Raises:
        FolderTakenError: the folder holds results and the command does not resume.
        ConfigError, CheckpointError: what to resume cannot be found, read or matched.
    """
    if not cfg.get("resume"):
        refuse_finished(out, can_resume=True)
        return cfg, out
    path, run_dir = locate(cfg, out)
    if path is None:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.resume = None
        return cfg, run_dir
    ckpt = read_checkpoint(str(path), trust_checkpoint=bool(cfg.get("trust_checkpoint")))
    saved, source = saved_config(ckpt, run_dir)
    job = current_job()
    cfg = merge_resumed_config(cfg, saved, job.overrides if job.hydra_dir is not None else None)
    check_architecture(ckpt, cfg, path)
    with open_dict(cfg):
        cfg.resume = str(path)
    log.info("resuming %s (saved after epoch %s) in %s; model and data settings from %s", path,
             ckpt.get("epoch"), run_dir, source)  # fmt: skip
    return cfg, run_dir


__all__ = [
    "RESUMED_GROUPS",
    "check_architecture",
    "find_run_to_resume",
    "locate",
    "merge_resumed_config",
    "override_key",
    "prepare_training",
    "same_overrides",
    "saved_config",
    "search_roots",
]
