"""What both stages share: loggers, atomic checkpoint writing, Trainer plugins, output folders."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins import LayerSync
from omegaconf import DictConfig, OmegaConf

from attncam.io import atomic_torch_save
from attncam.models.syncbn import DistributedBatchNormPlugin

log = logging.getLogger(__name__)


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def wandb_offline_by_default() -> None:
    """Run W&B offline unless a mode or an API key is set, so it never prompts or hangs."""
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Logger]:
    """Loggers named in ``cfg.logger`` (``wandb``, ``csv``; ``none`` gives none)."""
    loggers: list[Logger] = []
    conf = cfg.get("logger") or {}
    if conf.get("csv"):
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    if conf.get("wandb"):
        wandb_offline_by_default()
        w = conf.wandb
        tags = list(w.get("tags") or [])
        loggers.append(
            WandbLogger(
                project=w.get("project", "attncam"),
                entity=w.get("entity"),
                name=w.get("name"),
                group=w.get("group"),
                tags=tags,
                save_dir=str(out_dir),
                offline=os.environ.get("WANDB_MODE") == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            )
        )
    return loggers


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
