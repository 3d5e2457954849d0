"""What both stages share: the task wrapper, loggers and callbacks from config, Trainer plugins.

``task_wrapper`` is the one place that resolves the run's output folder, refuses a folder that
already holds results (before writing anything into it), turns a SIGTERM into exit status 143
and closes W&B (lightning-hydra-template's convention). Loggers and callbacks are the
``_target_`` entries of ``cfg.logger`` / ``cfg.callbacks``, instantiated in one loop. Each job
of a sweep gets its own W&B run, named by the job's overrides, grouped by the sweep folder, with
``job_type`` the stage; the run id is kept in the run folder, so a resumed training continues
the same W&B run, and :class:`ResumableCSVLogger` keeps the CSV rows of the epochs it does not
redo.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import signal
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from attncam.io import atomic_torch_save, write_json_atomic, write_text_atomic
from attncam.models.syncbn import DistributedBatchNormPlugin
from attncam.runtime import tune_allocator
from attncam.stages.cli import accept_run, refuse_finished

log = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM (128 + 15): a scheduler sees a killed job, not success.
SIGTERM_EXIT = 128 + signal.SIGTERM

#: The file in a run folder that holds its W&B run id (a resumed training continues that run).
WANDB_ID_FILE = "wandb_run_id.txt"

__all__ = [
    "SIGTERM_EXIT",
    "WANDB_ID_FILE",
    "AtomicCheckpointIO",
    "QuietWandbLogger",
    "ResumableCSVLogger",
    "build_callbacks_from_config",
    "build_loggers",
    "finish_wandb",
    "output_dir",
    "task_wrapper",
    "wandb_run_settings",
    "trainer_plugins",
    "wandb_offline_by_default",
    "write_json_atomic",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file in the same folder, then ``os.replace`` it.

    A run killed while saving leaves the previous checkpoint intact and no half-written file
    under the final name.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        atomic_torch_save(checkpoint, path)


def trainer_plugins(trainer_kwargs: dict[str, Any]) -> list[TorchCheckpointIO | LayerSync]:
    """The Trainer plugins for ``trainer_kwargs`` (from ``cfg.trainer``), popping ``sync_batchnorm``.

    ``trainer.sync_batchnorm=true`` gives :class:`~attncam.models.syncbn.DistributedBatchNormPlugin`
    instead of Lightning's ``sync_batchnorm=True`` (``torch.nn.SyncBatchNorm``), on every device:
    torch's layer refuses CPU tensors, so under ``trainer=ddp`` on CPU (gloo) each process would
    normalise with its own shard of the batch. One implementation everywhere also means the
    layer that runs on GPUs is the one the CPU tests check (at the cost of torch's fused CUDA
    kernel: a few more elementwise kernels and saved activations per BatchNorm).

    Raises:
        ValueError: ``sync_batchnorm`` is not a boolean.
    """
    sync = trainer_kwargs.pop("sync_batchnorm", False)
    if sync is None:
        sync = False
    if not isinstance(sync, bool):
        raise ValueError(
            f"unknown trainer.sync_batchnorm {sync!r}; choose one of: true (BatchNorm statistics "
            "of the global batch across DDP processes, CPU and GPU), false"
        )
    plugins: list[TorchCheckpointIO | LayerSync] = [AtomicCheckpointIO()]
    if sync:
        plugins.append(DistributedBatchNormPlugin())
    return plugins


def wandb_offline_by_default() -> None:
    """Run W&B offline unless a mode or an API key is set, so it never prompts or hangs."""
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def _entries(group: Any, kind: str) -> list[tuple[str, DictConfig]]:
    """The ``_target_`` entries of a config group, in order; null/false entries are disabled."""
    out = []
    for name, conf in (group or {}).items():
        if conf is None or conf is False or not isinstance(conf, DictConfig | Mapping):
            continue
        if "_target_" not in conf:
            raise ValueError(
                f"{kind}.{name} has no _target_; give a config with _target_ (see conf/{kind}/) "
                f"or null to disable it"
            )
        out.append((str(name), conf))
    return out


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the rows logged before ``keep_before_step``.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts; a resumed run keeps
    the rows of the epochs it does not redo (``step`` below the checkpoint's global step) and
    appends its own, under the union of both headers.
    """

    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.keep_before_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if _step(r) < self.keep_before_step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.metrics_file_path, buf.getvalue())
        self.metrics_keys = header
        log.info("%s: kept %d rows logged before step %d", self.metrics_file_path, len(rows),
                 self.keep_before_step)  # fmt: skip


def _step(row: Mapping[str, Any]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class QuietWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` without its ``anonymous=None`` argument.

    Lightning always passes ``anonymous`` to ``wandb.init``; wandb >= 0.19 ignores it and prints
    "The anonymous setting has no effect" on every run. ``build_loggers`` uses this class for
    ``lightning.pytorch.loggers.WandbLogger`` entries; every other argument is unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that can continue a resumed run's ``metrics.csv``.

    Args:
        *args: as ``CSVLogger``.
        keep_rows_before_step: keep the existing file's rows with ``step`` below this (the
            resumed checkpoint's global step); None: start a new file, as ``CSVLogger`` does.
        **kwargs: as ``CSVLogger``.
    """

    def __init__(self, *args: Any, keep_rows_before_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_rows_before_step = keep_rows_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer, created on first use (keeping the earlier rows when resuming)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.keep_rows_before_step)
        return self._experiment


def _swept_first(overrides: list[str], sweep_dir: Path) -> str:
    """The job's overrides as a run name: the swept ones first, then the others.

    An override of the job that is not, as written, in the sweep's own override list
    (``multirun.yaml``) is one the sweep varies (``attention=cbam`` of ``attention=none,cbam``).
    """
    try:
        swept = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        given = {str(o) for o in swept}
    except Exception:  # no readable multirun.yaml: keep Hydra's order
        given = set()
    varying = [o for o in overrides if o not in given]
    rest = [o for o in overrides if o in given]
    return ",".join(varying) + (" | " + ",".join(rest) if varying and rest else ",".join(rest))


def _hydra_job_info() -> dict[str, Any]:
    """The Hydra job's run name, sweep folder and mode (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    name = str(hc.job.get("override_dirname") or "")
    if multirun:
        excluded = set(hc.job.config.override_dirname.exclude_keys or [])
        shown = [str(o) for o in hc.overrides.task if str(o).split("=")[0] not in excluded]
        name = _swept_first(shown, Path(str(hc.sweep.dir))) or name
    return {"name": name, "multirun": multirun, "sweep_dir": str(hc.sweep.dir)}


def wandb_run_settings(cfg: DictConfig, out: Path, conf: Mapping[str, Any]) -> dict[str, Any]:
    """``name``, ``group``, ``job_type``, ``id`` and ``resume`` of a run's W&B run.

    The name is the job's overrides (Hydra's ``override_dirname``; in a multirun the swept ones
    first), the group the sweep's folder (multirun jobs only), the job type the stage
    (``cfg.task_name``); values set in the logger's config win. The id is read from ``out/wandb_run_id.txt`` or made and written there, and
    ``resume="allow"``, so a run resumed in its folder continues the same W&B run.
    """
    job = _hydra_job_info()
    settings: dict[str, Any] = {}
    if not conf.get("name") and job.get("name"):
        settings["name"] = job["name"][:128]
    if not conf.get("group") and job.get("multirun"):
        settings["group"] = job["sweep_dir"][-128:]
    if not conf.get("job_type") and cfg.get("task_name"):
        settings["job_type"] = str(cfg.task_name)
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        write_text_atomic(id_file, run_id + "\n")
    settings.update(id=conf.get("id") or run_id, resume="allow")
    return settings


def _is_wandb(name: str, conf: Mapping[str, Any]) -> bool:
    return name == "wandb" or str(conf["_target_"]).endswith("WandbLogger")


def build_loggers(cfg: DictConfig, out: Path, resume_step: int | None = None) -> list[Logger]:
    """The loggers of ``cfg.logger`` (``_target_`` entries), each saving under ``out``.

    Args:
        cfg: the run's config.
        out: the run folder.
        resume_step: the global step of the checkpoint a training resumes from: a CSV logger
            is then a :class:`ResumableCSVLogger` that keeps the rows logged before it
            (Lightning's ``CSVLogger`` would delete them).
    """
    loggers: list[Logger] = []
    for name, conf in _entries(cfg.get("logger"), "logger"):
        extra: dict[str, Any] = {"save_dir": str(out)}
        if _is_wandb(name, conf):
            wandb_offline_by_default()
            extra["offline"] = os.environ.get("WANDB_MODE") == "offline"
            extra["config"] = OmegaConf.to_container(cfg, resolve=True)
            extra.update(wandb_run_settings(cfg, out, conf))
        # As a partial: WandbLogger's own `config` argument would clash with instantiate's.
        factory = instantiate(conf, _partial_=True)
        if isinstance(factory, functools.partial) and factory.func is WandbLogger:
            factory = functools.partial(QuietWandbLogger, *factory.args, **factory.keywords)
        if resume_step is not None and isinstance(factory, functools.partial):
            cls = factory.func
            if cls is CSVLogger:
                cls = ResumableCSVLogger
            if isinstance(cls, type) and issubclass(cls, ResumableCSVLogger):
                extra["keep_rows_before_step"] = resume_step
                factory = functools.partial(cls, *factory.args, **factory.keywords)
        loggers.append(factory(**extra))
    return loggers


def build_callbacks_from_config(
    group: Any, ckpt_dir: Path, has_logger: bool, skip: Callable[[str, Any], bool] | None = None
) -> list[Callback]:
    """The callbacks of a ``cfg.callbacks`` group (its ``_target_`` entries), in order.

    Checkpoint callbacks get ``dirpath=ckpt_dir``; a ``LearningRateMonitor`` is left out when the
    run has no logger (Lightning refuses it then); ``skip(name, conf)`` leaves out others.
    """
    callbacks: list[Callback] = []
    for name, conf in _entries(group, "callbacks"):
        target = str(conf._target_)
        if target.endswith("LearningRateMonitor") and not has_logger:
            continue
        if skip is not None and skip(name, conf):
            continue
        extra = {"dirpath": str(ckpt_dir)} if target.endswith("ModelCheckpoint") else {}
        callbacks.append(instantiate(conf, **extra))
    return callbacks


def finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run of this process, if one is open (a sweep's next job gets its own)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish(exit_code=exit_code)
    except Exception as err:  # closing a logger must never hide the run's own outcome
        log.warning("closing the W&B run failed: %s", err)


def output_dir(cfg: DictConfig) -> Path:
    """The run's own folder: Hydra's when running under Hydra, else ``cfg.output_dir``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ImportError:
        pass
    out = cfg.get("output_dir")
    if not out:
        raise ValueError("no output folder: run under Hydra or set output_dir=PATH")
    return Path(out)


TaskFn = Callable[[DictConfig, Path], dict[str, Any]]
Prepare = Callable[[DictConfig, Path], tuple[DictConfig, Path]]


def refuse_finished_folder(cfg: DictConfig, out: Path) -> tuple[DictConfig, Path]:
    """The default ``prepare`` of :func:`task_wrapper`: refuse a folder holding results.

    Raises:
        attncam.stages.cli.FolderTakenError: ``out`` holds a finished run (a ``FileExistsError``).
    """
    refuse_finished(out)
    return cfg, out


def task_wrapper(
    stopped_hint: str, prepare: Prepare | None = None
) -> Callable[[TaskFn], Callable[[DictConfig], dict[str, Any]]]:
    """Wrap a stage's ``run(cfg, out)`` into ``run(cfg)``: output folder, refusal, SIGTERM, W&B.

    ``prepare(cfg, out) -> (cfg, out)`` runs first and may refuse the run (raising) or choose
    another folder (a resumed training continues its own); by default a folder that already
    holds results is refused. Nothing is written before it returns: then the folder is created,
    the job's log and Hydra's provenance files are written into it
    (:func:`attncam.stages.cli.accept_run`) and the stage runs. An interrupted run exits with
    status 143 after logging ``stopped_hint`` (formatted with ``out``), and the W&B run is
    finished in a ``finally`` whatever happens, so the next job of a sweep starts its own.

    Args:
        stopped_hint: what the user should know after a SIGTERM, with ``{out}`` for the folder.
        prepare: checks the run and picks its folder before anything is written.
    """

    def decorate(fn: TaskFn) -> Callable[[DictConfig], dict[str, Any]]:
        @functools.wraps(fn)
        def run(cfg: DictConfig) -> dict[str, Any]:
            cfg, out = (prepare or refuse_finished_folder)(cfg, output_dir(cfg))
            accept_run(cfg, out)
            log.debug("memory allocator: %s", tune_allocator())
            code = 1
            try:
                result = fn(cfg, out)
                code = 0
                return result
            except SIGTERMException:
                # Lightning raises SystemExit(None) on SIGTERM, which would exit 0.
                log.warning("stopped by SIGTERM: " + stopped_hint.format(out=out))
                code = SIGTERM_EXIT
                raise SystemExit(SIGTERM_EXIT) from None
            finally:
                finish_wandb(code)

        return run

    return decorate
