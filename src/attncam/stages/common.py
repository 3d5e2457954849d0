"""What both stages share: the task wrapper, loggers and callbacks from config, Trainer plugins.

``task_wrapper`` is the one place that turns a SIGTERM into exit status 143, closes W&B and
resolves the run's output folder (lightning-hydra-template's convention). Loggers and callbacks
are the ``_target_`` entries of ``cfg.logger`` / ``cfg.callbacks``, instantiated in one loop.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from attncam.io import atomic_torch_save, write_json_atomic
from attncam.models.syncbn import DistributedBatchNormPlugin

log = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM (128 + 15): a scheduler sees a killed job, not success.
SIGTERM_EXIT = 128 + signal.SIGTERM

__all__ = [
    "SIGTERM_EXIT",
    "AtomicCheckpointIO",
    "build_callbacks_from_config",
    "build_loggers",
    "finish_wandb",
    "output_dir",
    "task_wrapper",
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


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Logger]:
    """The loggers of ``cfg.logger`` (``_target_`` entries), each saving under ``out_dir``."""
    loggers: list[Logger] = []
    group = cfg.get("logger")
    entries = [(n, c) for n, c in _entries(group, "logger")]
    for name, conf in entries:
        extra: dict[str, Any] = {"save_dir": str(out_dir)}
        if name == "wandb" or str(conf._target_).endswith("WandbLogger"):
            wandb_offline_by_default()
            extra["offline"] = os.environ.get("WANDB_MODE") == "offline"
            extra["config"] = OmegaConf.to_container(cfg, resolve=True)
        # As a partial: WandbLogger's own `config` argument would clash with instantiate's.
        loggers.append(instantiate(conf, _partial_=True)(**extra))
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


def task_wrapper(stopped_hint: str) -> Callable[[TaskFn], Callable[[DictConfig], dict[str, Any]]]:
    """Wrap a stage's ``run(cfg, out)`` into ``run(cfg)``: output folder, SIGTERM, W&B.

    The wrapped function gets the run's folder (created), an interrupted run exits with status
    143 after logging ``stopped_hint`` (formatted with ``out``), and the W&B run is finished in a
    ``finally`` whatever happens, so the next job of a sweep starts its own.

    Args:
        stopped_hint: what the user should know after a SIGTERM, with ``{out}`` for the folder.
    """

    def decorate(fn: TaskFn) -> Callable[[DictConfig], dict[str, Any]]:
        @functools.wraps(fn)
        def run(cfg: DictConfig) -> dict[str, Any]:
            out = output_dir(cfg)
            out.mkdir(parents=True, exist_ok=True)
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
