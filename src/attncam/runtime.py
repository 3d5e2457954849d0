"""Small runtime facts every package may use: eval mode, ImageNet statistics, library versions.

This module imports nothing from attncam, so any package can depend on it.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: Mean and standard deviation of ImageNet pixels (RGB, values in [0, 1]), torchvision's constants.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Distributions whose versions describe a run (the manifest's ``versions``).
RUN_DISTRIBUTIONS: tuple[str, ...] = (
    "attncam",
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "timm",
    "wandb",
    "numpy",
)


@contextmanager
def eval_mode(model: nn.Module, freeze: bool = False) -> Iterator[nn.Module]:
    """Every submodule in eval mode (and, with ``freeze``, no parameter requiring grad).

    Each submodule's own ``training`` flag and each parameter's ``requires_grad`` are restored
    exactly on any exit, an exception included (``model.train(flag)`` would not restore a
    submodule that was deliberately kept in another mode).

    Args:
        model: the network.
        freeze: also set ``requires_grad=False`` on every parameter for the duration.

    Yields:
        ``model``.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if freeze else []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def slug(name: str) -> str:
    """A result name as a ``ModuleDict`` key, ``maps.npz`` array name and file-name part.

    ``.`` becomes ``_``, ``[`` becomes ``__``, ``]`` is dropped, ``=`` becomes ``-`` and ``,``
    becomes ``_``: ``gradcampp[torchcam020]`` -> ``gradcampp__torchcam020``,
    ``scacam[channel_weight=fc]`` -> ``scacam__channel_weight-fc``. Here, not in ``explain``, so
    ``metrics`` and ``viz`` (which may not import ``explain``) name results the same way.
    """
    return (
        name.replace(".", "_")
        .replace("[", "__")
        .replace("]", "")
        .replace("=", "-")
        .replace(",", "_")
    )


def library_versions(names: tuple[str, ...] = RUN_DISTRIBUTIONS) -> dict[str, str]:
    """Installed versions of ``names`` (``"not installed"`` when absent), plus Python's.

    torch is reported with its build tag (``2.14.1+cpu``, ``+cu130``).
    """
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    out["torch"] = torch.__version__
    return out


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RUN_DISTRIBUTIONS",
    "eval_mode",
    "library_versions",
    "slug",
]
