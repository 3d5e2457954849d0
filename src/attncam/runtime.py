"""Small runtime facts every package may use: eval mode, ImageNet statistics, library versions,
and the memory allocator's settings.

This module imports nothing from attncam, so any package can depend on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata as md
import os
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


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest value ``mallopt`` takes (an ``int``): 2 GiB - 1.
_MALLOPT_MAX = 2**31 - 1
#: ``ATTNCAM_ALLOCATOR=system`` leaves glibc's defaults alone.
ALLOCATOR_ENV = "ATTNCAM_ALLOCATOR"


@functools.cache
def tune_allocator() -> dict[str, object]:
    """Keep freed tensor memory in the process instead of returning it to the OS (glibc only).

    glibc serves every allocation above its mmap threshold (128 KiB, growing to at most 32 MiB)
    with a fresh ``mmap`` and gives it back with ``munmap`` when freed, and trims the heap top
    above 128 KiB. A CNN frees and re-allocates the same activation buffers every forward, so
    the kernel zero-fills and faults those pages back in each time: measured here, most of an
    explain run's CPU time was system time. Raising both thresholds to their maximum (2 GiB)
    keeps the buffers for re-use; ``benchmarks/allocator.md`` measures the speed, peak RSS and
    memory growth side by side. The setting has to be made inside the process (the
    ``MALLOC_*_`` environment variables are read only at start-up), so each stage calls this
    first (once per process: later calls return the first call's record).
    ``ATTNCAM_ALLOCATOR=system`` leaves the defaults alone.

    Returns:
        ``{"allocator": "glibc" | "other", "tuned": bool, "mmap_threshold", "trim_threshold"}``
        (the thresholds in bytes, None when untouched), for the run's manifest.
    """
    info: dict[str, object] = {"allocator": "other", "tuned": False,
                               "mmap_threshold": None, "trim_threshold": None}  # fmt: skip
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() == "system":
        info["allocator"] = "system (ATTNCAM_ALLOCATOR=system)"
        return info
    libc = _glibc()
    if libc is None:
        return info
    info["allocator"] = "glibc"
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MALLOPT_MAX) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _MALLOPT_MAX) == 1 and ok
    if ok:
        info.update(tuned=True, mmap_threshold=_MALLOPT_MAX, trim_threshold=_MALLOPT_MAX)
    return info


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (with ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


__all__ = [
    "ALLOCATOR_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RUN_DISTRIBUTIONS",
    "eval_mode",
    "library_versions",
    "slug",
    "tune_allocator",
]
