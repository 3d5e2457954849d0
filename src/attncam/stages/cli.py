"""The command line's side of a run: user errors, pre-flight checks, the job's log and folder.

``train.py`` and ``explain.py`` hand their task to :func:`run_entry`, which checks the config
before anything heavy is imported (unknown top-level keys, ``limit``, a folder that already holds
results), runs the stage, and turns a *user error* (:data:`USER_ERRORS`) into one line
``error: ...`` on stderr and exit status 2, leaving no run folder behind
(``HYDRA_FULL_ERROR=1`` prints the traceback first). In a Hydra multirun a failing job is left to
Hydra (the other jobs run; the job is marked ``FAILED`` by :mod:`attncam.stages.sweep`) and a job
with nothing to do (:class:`JobSkipped`) is ``SKIPPED``, not a failure.

Nothing is written into a run folder before the run is accepted (:func:`accept_run`): the job's
log file is a :class:`DeferredFileHandler` that holds its records until then, Hydra's
``.hydra/*.yaml`` are switched off (``hydra.output_subdir: null``) and written here instead, so a
refused command leaves the folder it refused byte for byte as it was.

This module imports only the standard library, OmegaConf and Hydra's core: its checks answer in
about a second, before torch and Lightning are loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

#: Exit status of a command refused for a user error (as argparse and most CLIs use).
USER_ERROR_EXIT = 2

#: The exceptions that are the user's to fix: a bad setting or input, said in one line. Named
#: as ``module.Class`` so this list imports nothing; subclasses count too. ``ValueError`` covers
#: :class:`ConfigError`, ``attncam.stages.inputs.ExplainInputError`` and every config value
#: check ("unknown attention 'cbm'; choose one of: ...").
USER_ERRORS: tuple[str, ...] = (
    "builtins.ValueError",
    "builtins.FileExistsError",
    "attncam.models.checkpoint.CheckpointError",
    "attncam.models.backbones.PretrainedWeightsUnavailable",
    "hydra.errors.InstantiationException",
    "omegaconf.errors.OmegaConfBaseException",
)

#: Files that mark a folder as holding a run's results: no command writes into such a folder
#: except a training that resumes it.
FINISHED_MARKERS = (
    "results.json",
    "checkpoints/last.ckpt",
    "checkpoints/best.ckpt",
    "COMPLETE",
    "metrics.json",
    "manifest.json",
)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the valid values or what to pass."""


class FolderTakenError(FileExistsError):
    """The run folder already holds results; the command was refused and wrote nothing."""


class JobSkipped(Exception):
    """A job that has nothing to do (e.g. no requested method applies): skipped in a sweep.

    Stages raise a subclass that is also a user error (``NoApplicableMethodError``): a single
    run reports it as an error, a multirun job records ``SKIPPED`` and the sweep goes on.
    """


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`USER_ERRORS` (or a subclass of one)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__}
    return bool(names & set(USER_ERRORS))


# --------------------------------------------------------------------------- config checks


def check_limit(value: Any) -> int | None:
    """``limit`` as a positive number of images, or None for all of them.

    Raises:
        ConfigError: ``limit`` is 0, negative, fractional, a boolean or not a number.
    """
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or number < 1:
        raise ConfigError(
            f"invalid limit={value!r}; choose a positive integer (explain at most that many "
            "images) or null (all images)"
        )
    return number


def check_model_weights(cfg: DictConfig) -> None:
    """Refuse ``model=NAME`` without trained weights, unless ``allow_random_weights=true``.

    Raises:
        ConfigError: the backbone would be explained with random weights, naming what to pass.
    """
    model = cfg.get("model")
    if cfg.get("ckpt") or not isinstance(model, DictConfig) or "backbone" not in model:
        return
    pretrained = bool(model.get("pretrained", True))
    if not pretrained and model.get("weights") is None and not cfg.get("allow_random_weights"):
        raise ConfigError(
            f"model={model.backbone} has no trained weights here (model.pretrained=false and no "
            "model.weights): its explanations would describe a random network. Pass "
            "ckpt=PATH (a checkpoint written by train.py), model.weights=PATH (a state dict), "
            "a backbone with published weights (e.g. model=efficientnet_lite0), or "
            "allow_random_weights=true to explain the random network on purpose"
        )


def check_paths_exist(cfg: DictConfig, keys: Iterable[str] = ("ckpt",)) -> None:
    """Refuse a file setting (``ckpt=PATH``) that names no file, before anything is loaded.

    Raises:
        ConfigError: naming the setting and the path.
    """
    for key in keys:
        value = cfg.get(key)
        if value and not Path(str(value)).expanduser().is_file():
            raise ConfigError(f"{key}={value}: checkpoint {str(value)!r} does not exist")


def _added_keys(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """``(key, override)`` for each ``+key=...`` / ``++key=...`` override of a value."""
    out = []
    for text in overrides:
        if not text.startswith("+") or "=" not in text:
            continue
        key = text.lstrip("+").split("=", 1)[0].strip()
        if key and "/" not in key and "@" not in key:
            out.append((key, text))
    return out


def check_top_level_keys(cfg: DictConfig, overrides: Iterable[str], groups: Iterable[str]) -> None:
    """Refuse ``+key=...`` overrides that add a top-level key the stage does not read.

    Hydra refuses an unknown ``key=value`` and suggests ``+key=value``, which adds the key and
    would then be silently ignored (and recorded as if it had been used). Keys below a group
    (``+trainer.gradient_clip_val=1``) are left to the code that reads the group.

    Args:
        cfg: the composed config.
        overrides: the command line's overrides (``hydra.overrides.task``).
        groups: the config groups, which ``+group=option`` may add.

    Raises:
        ConfigError: naming the key, the override and the valid top-level keys.
    """
    groups = set(groups)
    added = [(k, o) for k, o in _added_keys(overrides) if "." not in k and k not in groups]
    if not added:
        return
    unknown = {k for k, _ in added}
    valid = sorted(str(k) for k in cfg if str(k) not in unknown)
    key, text = added[0]
    raise ConfigError(
        f"unknown key {key!r} (from {text}): this stage reads no such setting; valid top-level "
        f"keys: {', '.join(valid)}"
    )


def refuse_finished(out: Path, resuming: bool = False, can_resume: bool = False) -> None:
    """Raise when ``out`` already holds a run's results (unless a training resumes it).

    Args:
        out: the run folder.
        resuming: the command resumes the run in ``out`` (a training with ``resume=``).
        can_resume: the stage can resume (training): the message says how.

    Raises:
        FolderTakenError: naming the folder, what it holds and what to pass instead.
    """
    found = [m for m in FINISHED_MARKERS if (out / m).exists()]
    if found and not resuming:
        hint = f", or continue the training there with resume=last hydra.run.dir={out}"
        raise FolderTakenError(
            f"{out} already holds a run ({', '.join(found)}); results are never overwritten. "
            f"Run into a new folder (leave out hydra.run.dir){hint if can_resume else ''}"
        )


# --------------------------------------------------------------------------- the job's log file


class DeferredFileHandler(logging.FileHandler):
    """A log file that is created only once the run is accepted (:func:`accept_run`).

    Until then records are kept in memory: a command refused before it starts (a user error, a
    folder that already holds results) leaves no log file behind, and a resumed run can send
    its log to the folder it continues (:meth:`start_writing` with a path). A handler closed
    before either :meth:`start_writing` or :meth:`discard` writes what it holds (a crash keeps
    its log).

    Args:
        filename: the log file (Hydra's ``<run folder>/<job name>.log``).
        mode: file mode; ``"a"`` appends to the log of a resumed run.
        encoding: text encoding.
        delay: ignored: the file is always opened on the first write.
        errors: encoding error handling.
    """

    MAX_PENDING = 100_000

    def __init__(
        self,
        filename: str,
        mode: str = "a",
        encoding: str | None = None,
        delay: bool = True,
        errors: str | None = None,
    ) -> None:
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self.pending: list[logging.LogRecord] | None = []
        self.discarded = False

    def emit(self, record: logging.LogRecord) -> None:
        """Hold the record until the run is accepted, then write it; nothing once discarded."""
        if self.discarded:
            return
        if self.pending is None:
            super().emit(record)
        elif len(self.pending) < self.MAX_PENDING:
            record.msg, record.args = record.getMessage(), None
            self.pending.append(record)

    def start_writing(self, path: str | os.PathLike[str] | None = None) -> None:
        """Write the held records (to ``path`` when given) and every later one."""
        self.acquire()
        try:
            if path is not None and self.stream is None:
                self.baseFilename = os.path.abspath(path)
            held, self.pending = self.pending, None
            for record in held or []:
                super().emit(record)
        finally:
            self.release()

    def discard(self) -> None:
        """Drop the held records, close the file and write nothing more, ever."""
        self.acquire()
        try:
            self.pending, self.discarded = None, True
            if self.stream is not None:
                self.stream.close()
                self.stream = None  # type: ignore[assignment]
        finally:
            self.release()

    def close(self) -> None:
        """Write what is held, unless discarded, then close the file."""
        if self.pending:
            self.start_writing()
        super().close()


class _DropAdvert(logging.Filter):
    """Drops Lightning's advertising line ("💡 Tip: ... try installing litlogger")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def one_line_per_record() -> None:
    """Each log record printed once: Lightning's own console handler goes when Hydra logs.

    ``import lightning`` gives the ``lightning`` logger a ``StreamHandler`` that also
    propagates to the root logger, where Hydra's console handler prints the record again.
    Lightning's own deprecation notice about torch's ``LeafSpec`` (not the user's to fix) is
    silenced.
    Call after ``lightning`` is imported; a no-op when the root logger has no handler (outside
    Hydra, Lightning's handler is the only one). Lightning's advertising line is dropped.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if not logging.getLogger().handlers:
        return
    lightning_log = logging.getLogger("lightning")
    for handler in list(lightning_log.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_log.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvert())


def _deferred_handlers() -> list[DeferredFileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, DeferredFileHandler)]


# --------------------------------------------------------------------------- the current job


@dataclass
class Job:
    """What the entry point and the sweep callback know about the job running in this process.

    Attributes:
        hydra_dir: the folder Hydra made for the job (None outside Hydra).
        out: the run folder the stage works in (a resumed run may continue another one).
        multirun: whether the job is part of a Hydra multirun.
        overrides: the job's command-line overrides.
        num: the job's number in its sweep.
        fixed_dir: whether the user chose the folder (``hydra.run.dir`` / ``hydra.sweep.dir``).
        result: what the stage returned.
        skipped: the reason a multirun job was skipped.
        refused: the folder was refused: nothing may be written into it.
        accepted: the stage accepted ``out`` (:func:`accept_run`) and may have written there.
        fresh: ``out`` was empty when accepted (not a resumed run's folder).
        started: when the job started (``time.time()``).
    """

    hydra_dir: Path | None = None
    out: Path | None = None
    multirun: bool = False
    overrides: list[str] = field(default_factory=list)
    num: int = 0
    fixed_dir: bool = False
    result: dict[str, Any] | None = None
    skipped: str | None = None
    refused: bool = False
    accepted: bool = False
    fresh: bool = False
    started: float = 0.0


_JOB = Job()


def current_job() -> Job:
    """The job running in this process (jobs of a sweep run one after another)."""
    return _JOB


def _hydra_job() -> Job:
    """A :class:`Job` describing the Hydra job of this process (an empty one outside Hydra)."""
    import time

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return Job(started=time.time())
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    dir_key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    return Job(
        hydra_dir=Path(hc.runtime.output_dir),
        out=Path(hc.runtime.output_dir),
        multirun=multirun,
        overrides=[str(o) for o in hc.overrides.task],
        num=int(hc.job.get("num") or 0),
        fixed_dir=any(str(o).startswith(dir_key) for o in hc.overrides.hydra),
        started=time.time(),
    )


def _write_provenance(cfg: DictConfig, out: Path, job: Job) -> None:
    """``.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml``, as Hydra writes them.

    A resumed run keeps the first run's files and writes its own under ``.hydra/resume-<n>/``.
    """
    from hydra.core.hydra_config import HydraConfig

    from attncam.io import write_text_atomic

    folder = out / ".hydra"
    if (folder / "config.yaml").exists():
        n = 1
        while (folder / f"resume-{n}").exists():
            n += 1
        folder = folder / f"resume-{n}"
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(job.overrides)))
    hydra_cfg = OmegaConf.create({"hydra": HydraConfig.get()})
    write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))


def accept_run(cfg: DictConfig, out: Path) -> None:
    """The stage has accepted ``out`` as its run folder: start writing into it.

    The job's held log records go to ``out`` (the folder a resumed run continues, when that is
    not the one Hydra made), and Hydra's provenance files are written under ``out/.hydra``.
    """
    job = current_job()
    job.out = out
    job.fresh = not out.is_dir() or not any(out.iterdir())
    job.accepted = True
    out.mkdir(parents=True, exist_ok=True)
    if job.hydra_dir is None:
        return
    moved = out.resolve() != job.hydra_dir.resolve()
    for handler in _deferred_handlers():
        handler.start_writing(out / Path(handler.baseFilename).name if moved else None)
    if moved:
        # Processes Lightning starts (DDP) rerun the command in Hydra's output folder: this one.
        from hydra.core.hydra_config import HydraConfig

        runtime = HydraConfig.get().runtime
        with read_write(runtime), open_dict(runtime):
            runtime.output_dir = str(out.resolve())
    if process_rank() == 0:
        _write_provenance(cfg, out, job)
    if moved and not job.multirun:
        remove_empty_dirs(job.hydra_dir)


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def remove_empty_dirs(folder: Path, keep: Path | None = None) -> None:
    """Remove ``folder`` if empty, then its parents while empty and inside ``keep`` (the cwd).

    Only empty folders go (``rmdir``), so another run's files are always safe; ``keep`` and the
    folders above it are never removed.
    """
    keep = (keep or Path.cwd()).resolve()
    current = folder.resolve()
    while current != keep and current not in keep.parents:
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent
        if keep not in current.parents:
            return


# --------------------------------------------------------------------------- the entry point


#: What :func:`accept_run` and the loggers' set-up write before a stage has produced anything.
BOOKKEEPING = (".hydra", "wandb_run_id.txt")


def _only_bookkeeping(out: Path) -> bool:
    """Whether ``out`` holds nothing but :data:`BOOKKEEPING` and the job's log files."""
    return all(p.name in BOOKKEEPING or p.suffix == ".log" for p in out.iterdir())


def _leave_no_folder(job: Job, message: str) -> None:
    """After a user error: remove the run's folder if it holds no results, else mark it FAILED.

    Before the run was accepted nothing of it is in the folder: only an empty folder goes. After,
    a folder that was empty then and holds only bookkeeping (provenance, the log) is removed; any
    other gets ``status.json`` saying FAILED and why. A refused folder is never touched.
    """
    if job.refused or job.hydra_dir is None:
        return
    if not job.accepted or job.out is None:
        remove_empty_dirs(job.hydra_dir)
        return
    out = job.out
    if job.fresh and out.is_dir() and _only_bookkeeping(out):
        import shutil

        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        remove_empty_dirs(out)
    elif out.is_dir():
        from attncam.stages.sweep import record_job_end

        record_job_end(job, "FAILED", message)
    if job.hydra_dir.is_dir():
        remove_empty_dirs(job.hydra_dir)


def _log_to_job_files(err: BaseException) -> None:
    """The error and its traceback into the job's log file (Hydra prints them on the console)."""
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "job failed: %s: %s",
        (type(err).__name__, err), (type(err), err, err.__traceback__),
    )  # fmt: skip
    for handler in _deferred_handlers():
        handler.handle(record)


def _report_user_error(err: BaseException, job: Job) -> None:
    """One line on stderr (after the traceback with ``HYDRA_FULL_ERROR=1``); no folder left."""
    for handler in _deferred_handlers():
        handler.discard()
    message = " ".join(str(err).split()) or type(err).__name__
    _leave_no_folder(job, message)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(err)
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _preflight(
    cfg: DictConfig, job: Job, checks: Iterable[Callable[[DictConfig], Any]], groups: Iterable[str]
) -> None:
    """The checks that need no heavy import: keys, the stage's own checks, a finished folder."""
    check_top_level_keys(cfg, job.overrides, groups)
    for check in checks:
        check(cfg)
    if job.hydra_dir is not None:
        try:
            resume = cfg.get("resume")
            refuse_finished(job.hydra_dir, resuming=bool(resume), can_resume="resume" in cfg)
        except FolderTakenError:
            job.refused = True
            raise


def run_entry(
    cfg: DictConfig,
    runner: Callable[[DictConfig], dict[str, Any]],
    checks: Iterable[Callable[[DictConfig], Any]] = (),
    groups: Iterable[str] = (),
) -> dict[str, Any]:
    """Run a stage from its command line: check, run, and report what went wrong.

    Args:
        cfg: the composed config.
        runner: the stage's ``run(cfg)`` (imported inside, so the checks come first).
        checks: extra pre-flight checks of ``cfg`` (e.g. ``limit``); each raises a user error.
        groups: the stage's config groups (``+group=option`` is not an unknown key).

    Returns:
        What ``runner`` returned, or ``{"status": "SKIPPED", "reason": ...}`` for a skipped job
        of a multirun.

    Raises:
        SystemExit: status 2 after a user error in a single run.
    """
    global _JOB
    _JOB = job = _hydra_job()
    try:
        _preflight(cfg, job, checks, groups)
        job.result = runner(cfg)
        return job.result
    except JobSkipped as err:
        if not job.multirun:
            _report_user_error(err, job)
            raise SystemExit(USER_ERROR_EXIT) from None
        job.skipped = str(err)  # the sweep callback reports it
        return {"status": "SKIPPED", "reason": str(err)}
    except Exception as err:
        if isinstance(err, FolderTakenError):
            job.refused = True
        if is_user_error(err) and not job.multirun:
            _report_user_error(err, job)
            raise SystemExit(USER_ERROR_EXIT) from None
        if job.refused:
            for handler in _deferred_handlers():
                handler.discard()
        else:
            _log_to_job_files(err)
        raise
    except SystemExit as stop:  # SIGTERM (status 143): no Hydra callback runs after this
        if stop.code not in (0, None) and not job.refused:
            from attncam.stages.sweep import record_job_end

            record_job_end(job, "INTERRUPTED", f"stopped with exit status {stop.code}")
        raise


def run_info(
    cfg: DictConfig,
    producer: Callable[[DictConfig], str],
    checks: Iterable[Callable[[DictConfig], Any]] = (),
    groups: Iterable[str] = (),
) -> dict[str, Any]:
    """Answer a question about the config (e.g. ``list_layers=true``) on stdout; no run folder.

    The same pre-flight checks and user-error handling as :func:`run_entry`, but nothing is
    written: the job's held log records are dropped and the folder Hydra made is removed if
    it is empty.

    Args:
        cfg: the composed config.
        producer: returns the text to print (imported inside, so the checks come first).
        checks: extra pre-flight checks of ``cfg``.
        groups: the stage's config groups.

    Returns:
        ``{"status": "INFO", "text": ...}``.

    Raises:
        SystemExit: status 2 after a user error.
    """
    global _JOB
    _JOB = job = _hydra_job()
    job.refused = True  # nothing may be written into the folder Hydra made
    try:
        check_top_level_keys(cfg, job.overrides, groups)
        for check in checks:
            check(cfg)
        text = producer(cfg)
    except Exception as err:
        if is_user_error(err):
            job.refused = False
            _report_user_error(err, job)
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
    finally:
        for handler in _deferred_handlers():
            handler.discard()
        if job.hydra_dir is not None:
            remove_empty_dirs(job.hydra_dir)
    sys.stdout.write(text)
    sys.stdout.flush()
    return {"status": "INFO", "text": text}


__all__ = [
    "FINISHED_MARKERS",
    "USER_ERRORS",
    "USER_ERROR_EXIT",
    "ConfigError",
    "DeferredFileHandler",
    "FolderTakenError",
    "Job",
    "JobSkipped",
    "accept_run",
    "check_limit",
    "check_model_weights",
    "check_paths_exist",
    "check_top_level_keys",
    "current_job",
    "is_user_error",
    "process_rank",
    "refuse_finished",
    "one_line_per_record",
    "remove_empty_dirs",
    "run_entry",
    "run_info",
]
