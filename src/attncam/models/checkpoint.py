"""Checkpoints written by ``train.py``: read (weights-only unless trusted), check, rebuild.

A checkpoint holds the :class:`~attncam.models.lit_module.ClassifierModule`'s hyperparameters
(backbone, classes, attention, ...) next to its weights, so :func:`load_classifier` rebuilds the
exact network with no Hydra and no download. It also describes the run that wrote it
(:func:`checkpoint_metadata`: class names, image size, input mean/std, the data config and the
whole training config), so a checkpoint copied out of its run folder still says what it was
trained on. :func:`read_checkpoint` refuses pickled objects unless the caller trusts the file,
and names what is wrong with a file it cannot use.
"""

from __future__ import annotations

import logging
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from attncam import __version__

if TYPE_CHECKING:
    from attncam.models.lit_module import ClassifierModule

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsafe or of another model."""


#: The checkpoint key of :func:`checkpoint_metadata` (plain values: weights-only loading reads it).
METADATA_KEY = "attncam_metadata"

#: What :func:`checkpoint_metadata` may hold; checkpoints written before attncam 0.1 hold none.
METADATA_FIELDS = ("class_names", "image_size", "mean", "std", "data", "config")


def checkpoint_metadata(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint says about the run that wrote it; ``{}`` for an older checkpoint.

    Args:
        ckpt: a checkpoint as :func:`read_checkpoint` returns it.

    Returns:
        A dict with some of :data:`METADATA_FIELDS`: ``class_names`` (list of str, index = class
        id), ``image_size`` (int, the side of the training images), ``mean`` / ``std`` (the
        per-channel input normalisation the network applies to pixels in [0, 1]), ``data`` (the
        training run's ``data`` config, with ``_target_``) and ``config`` (its whole config).
    """
    meta = ckpt.get(METADATA_KEY)
    return dict(meta) if isinstance(meta, Mapping) else {}


# Hyperparameters that decide the network's shape: a checkpoint resumed or loaded under other
# values cannot hold the right weights. The rest (optimiser, schedule) may change on resume.
ARCHITECTURE_HPARAMS = (
    "backbone",
    "num_classes",
    "attention",
    "placement",
    "reduction",
    "kernel_size",
    "weights_format",  # cbam_official networks gate BAM as the authors' code does
)


def read_checkpoint(
    path: str, trust_checkpoint: bool = False, map_location: str = "cpu"
) -> dict[str, Any]:
    """Load an attncam training checkpoint as a dict, weights-only unless trusted.

    Args:
        path: a checkpoint written by ``train.py``.
        trust_checkpoint: allow arbitrary pickled objects (only for files you trust: unpickling
            can execute code). By default only tensors and plain values are loaded.
        map_location: device to load onto.

    Returns:
        The checkpoint, with at least ``state_dict`` and ``hyper_parameters``.

    Raises:
        CheckpointError: missing, corrupt, unsafe or not an attncam checkpoint.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(p):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint (not a torch zip "
            "archive: truncated, corrupt or another format)"
        )
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint {str(path)!r} is refused by the weights-only loader ({detail}): it holds "
            "objects that would run code when unpickled. Load it only if you trust its source, "
            "with trust_checkpoint=true"
        ) from None
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint: {type(err).__name__}: "
            f"{err}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not an attncam training checkpoint (expected the keys "
            "'state_dict' and 'hyper_parameters')"
        )
    saved = ckpt.get("attncam_version")
    if saved != __version__:
        log.warning(
            "checkpoint %s was written by attncam %s, loading with %s: if the network does not "
            "match, retrain or install that version",
            path,
            saved or "(unknown version)",
            __version__,
        )
    return ckpt


def check_hparams(saved: Any, expected: Any, path: str) -> None:
    """Raise when a checkpoint's network hyperparameters differ from the ones expected.

    Args:
        saved: the checkpoint's ``hyper_parameters``.
        expected: the hyperparameters of the module it is loaded into.
        path: the checkpoint, for the message.

    Raises:
        CheckpointError: naming every differing key with both values.
    """
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, config {expected.get(k)!r}"
        for k in ARCHITECTURE_HPARAMS
        if k in expected and saved.get(k) != expected.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds another network than the config describes ("
            + "; ".join(diff)
            + "): set the config to the checkpoint's values or start a new run"
        )


def load_classifier(
    path: str, trust_checkpoint: bool = False, map_location: str = "cpu"
) -> ClassifierModule:
    """Rebuild a :class:`ClassifierModule` from a checkpoint, with no Hydra and no download.

    The module's ``run_metadata`` is the checkpoint's :func:`checkpoint_metadata`, and its
    network's ``class_names`` are the training data's class names when the checkpoint has them.

    Args:
        path: a checkpoint written by ``train.py``.
        trust_checkpoint: allow arbitrary pickled objects (only for files you trust: unpickling
            can execute code). By default only tensors and plain values are loaded.
        map_location: device to load onto.

    Raises:
        CheckpointError: missing, corrupt, unsafe or not an attncam checkpoint.
    """
    # Imported here: lit_module re-exports this module's names, so it imports this module first.
    from attncam.models.lit_module import ClassifierModule

    ckpt = read_checkpoint(path, trust_checkpoint, map_location)
    hp = dict(ckpt["hyper_parameters"])
    hp.update(pretrained=False, weights=None)
    saved = ckpt.get("attncam_version")
    try:
        module = ClassifierModule(**hp)
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} (attncam {saved}, model {hp.get('backbone')!r}, attention "
            f"{hp.get('attention')!r}) does not rebuild with attncam {__version__}: "
            f"{str(err)[:400]}"
        ) from None
    module.run_metadata = checkpoint_metadata(ckpt)
    names = module.run_metadata.get("class_names")
    if isinstance(names, list) and len(names) == hp.get("num_classes"):
        module.net.class_names = [str(n) for n in names]
    module.eval()
    return module


__all__ = [
    "ARCHITECTURE_HPARAMS",
    "METADATA_FIELDS",
    "METADATA_KEY",
    "CheckpointError",
    "check_hparams",
    "checkpoint_metadata",
    "load_classifier",
    "read_checkpoint",
]
