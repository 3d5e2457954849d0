"""A fast inference copy of any network, and the precision it runs in.

The metrics' perturbation engine passes hundreds of perturbed copies of every image through the
model (deletion and insertion curves, Average Drop, Percentage-in), so it runs an inference copy:

- **Conv-BN folding, module by module.** A dry run pairs every ``BatchNorm2d`` with the
  convolution whose output it normalises (forward hooks: the conv's output tensor *is* the BN's
  input), folds the BN's affine map and running statistics into the conv's weight and bias
  (``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaces
  the BN by what else it did: nothing (``nn.Identity``) or, for timm's ``BatchNormAct2d``, its
  dropout and activation. No tracing, so networks with Python control flow in ``forward``
  (``AttentionNet``'s fused CBAM, timm's same-padding convs) fold too, where ``torch.fx``
  cannot trace them. The folded copy is checked against the original on the dry-run input; a
  mismatch (a conv output also used elsewhere, say) keeps the unfolded copy and says why.
- **Channels-last** weights and inputs (oneDNN's fast layout on CPU).
- **bfloat16 autocast where it agrees** (``metrics.protocol.precision=auto``, the default: on
  CPUs with bf16 matrix units, ``avx512_bf16`` or AMX, the deletion/insertion curves run in bf16
  and every other metric forward in float32; everything float32 elsewhere). ``precision=bf16``
  runs every metric forward in bf16, ``precision=float32`` none (publication runs). The maps
  are always computed in float32 by the explainer. ``benchmarks/bf16_agreement.md`` measures
  what bf16 changes: the curves agree with float32, Increase in Confidence does not.

This module imports only ``attncam.runtime``, so any package may use it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attncam.runtime import eval_mode

log = logging.getLogger(__name__)

__all__ = [
    "AUTO_BF16",
    "FAMILIES",
    "PRECISIONS",
    "FoldReport",
    "autocast",
    "cpu_bf16_supported",
    "fold_conv_bn",
    "inference_copy",
    "resolve_precision",
]

#: ``precision=`` choices of the perturbation forwards: ``auto`` (the default) picks ``bf16`` for
#: the families in :data:`AUTO_BF16` on CPUs with bf16 matrix units and ``float32`` otherwise.
PRECISIONS: tuple[str, ...] = ("float32", "bf16", "auto")

#: The metric families whose forwards the perturbation engine runs in one precision each:
#: ``scores`` (Average Drop, Increase in Confidence, Percentage-in, ROAD, occlusion: differences
#: of nearly equal scores) and ``curves`` (the deletion/insertion curves).
FAMILIES: tuple[str, ...] = ("scores", "curves")

#: The families ``precision=auto`` runs in bf16 on CPUs with bf16 units: those whose bf16 results
#: agree with float32 in ``benchmarks/bf16_agreement.md`` (the deletion and insertion AUCs on
#: both models measured there; Increase in Confidence did not, so ``scores`` stays float32).
AUTO_BF16: frozenset[str] = frozenset({"curves"})

#: /proc/cpuinfo flags of CPUs whose bf16 matrix arithmetic is fast.
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_bf16_supported(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU reports ``avx512_bf16`` or ``amx_bf16`` (Linux ``/proc/cpuinfo``)."""
    try:
        text = Path(cpuinfo).read_text(errors="ignore")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return any(f in flags for f in BF16_FLAGS)


def resolve_precision(
    requested: str, device: torch.device | str = "cpu", family: str = "scores"
) -> tuple[str, str]:
    """``(precision, why)``: ``bf16`` or ``float32`` for a requested ``auto|bf16|float32``.

    ``auto`` is ``bf16`` for the metric families in :data:`AUTO_BF16` (the deletion/insertion
    curves) on a CPU with bf16 matrix units, and ``float32`` for the others and on any other
    device (a GPU user asks for ``bf16`` explicitly). ``bf16`` on a CPU without them still
    runs, slowly, and the reason says so.

    Args:
        requested: ``float32``, ``bf16`` or ``auto``.
        device: Where the forwards run.
        family: The metric family the forwards serve, one of :data:`FAMILIES`.

    Raises:
        ValueError: On a value outside :data:`PRECISIONS` or :data:`FAMILIES`.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown metric family {family!r}; choose one of: {', '.join(FAMILIES)}")
    kind = torch.device(device).type
    fast = kind == "cpu" and cpu_bf16_supported()
    if requested == "float32":
        return "float32", "asked (precision=float32)"
    if requested == "bf16":
        note = "" if fast or kind != "cpu" else "; this CPU has no bf16 units, so it is slow"
        return "bf16", f"asked (precision=bf16){note}"
    if not fast:
        return "float32", f"auto: no bf16 matrix units on this {kind}"
    if family in AUTO_BF16:
        return "bf16", (
            "auto: the CPU has bf16 matrix units (avx512_bf16/amx_bf16) and these metrics' bf16 "
            "results agree with float32 (benchmarks/bf16_agreement.md)"
        )
    return "float32", (
        "auto: float32, as bf16 does not agree with float32 on these metrics "
        "(benchmarks/bf16_agreement.md)"
    )


@contextmanager
def autocast(precision: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """``torch.autocast`` to bfloat16 when ``precision == "bf16"``, else nothing."""
    kind = torch.device(device).type
    ctx = torch.autocast(kind, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with ctx:
        yield


@dataclass
class FoldReport:
    """What :func:`fold_conv_bn` did: the folded ``(conv, bn)`` names, or why nothing was."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""


def _foldable_bn(module: nn.Module) -> bool:
    """A BN whose forward is ``batch_norm`` with running statistics (then dropout/activation)."""
    if not isinstance(module, nn.BatchNorm2d) or module.running_mean is None:
        return False
    if type(module) is nn.BatchNorm2d:
        return True
    # timm's BatchNormAct2d: batch_norm, then self.drop, then self.act
    return type(module).__name__ == "BatchNormAct2d" and hasattr(module, "act")


def _pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where the BN's input is the conv's output, each called once."""
    calls: dict[str, int] = {}
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    keep: list[torch.Tensor] = []  # outputs stay alive so that ids are not reused
    handles = []

    def conv_hook(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name
                keep.append(out)

        return hook

    def bn_hook(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if args and id(args[0]) in produced:
                pairs.append((produced[id(args[0])], name))

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif _foldable_bn(m):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in pairs if calls.get(c) == 1 and calls.get(b) == 1]


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s statistics and affine map into ``conv`` in place."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def _after_bn(bn: nn.Module) -> nn.Module:
    """What replaces a folded BN: its dropout and activation (timm), or nothing."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(getattr(bn, "drop", nn.Identity()), bn.act)


def fold_conv_bn(model: nn.Module, example: torch.Tensor) -> FoldReport:
    """Fold every conv-BN pair of ``model`` (an eval-mode copy: changed in place).

    Args:
        model: the network to change, in eval mode (its BNs use running statistics).
        example: an input batch for the dry run that pairs convs with BNs.

    Returns:
        The folded pairs; an empty report with a reason when there were none.
    """
    if model.training:
        raise ValueError("fold_conv_bn needs an eval-mode model (BN with running statistics)")
    pairs = _pairs(model, example)
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        _fold_pair(model.get_submodule(conv_name), bn)  # type: ignore[arg-type]
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, _after_bn(bn))
    return FoldReport(folded=pairs, reason="" if pairs else "no conv directly followed by a BN")


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(a.abs().max()) or 1.0
    return bool(torch.isfinite(b).all()) and float((a - b).abs().max()) <= 1e-3 * scale


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no parameter requiring grad."""
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


def inference_copy(
    model: nn.Module, example: torch.Tensor, fold: bool = True, channels_last: bool = True
) -> tuple[nn.Module, FoldReport]:
    """An eval-mode, gradient-free copy of ``model`` with conv-BN folded and channels-last weights.

    The folded copy's output on ``example`` is compared with the original's (float32, within
    1e-3 of the largest logit); on a mismatch the copy is left unfolded and the report says so.

    Args:
        model: the network (left unchanged).
        example: a small input batch like the ones the copy will see.
        fold: fold conv-BN pairs.
        channels_last: convert weights (and expect inputs) to channels-last.

    Returns:
        ``(copy, report)``.
    """
    with eval_mode(model), torch.no_grad():
        reference = model(example).float()
        fast = _frozen_copy(model)
    report = FoldReport(reason="folding off")
    if fold:
        report = fold_conv_bn(fast, example)
        with torch.no_grad():
            if report.folded and not _agree(reference, fast(example).float()):
                with eval_mode(model):
                    fast = _frozen_copy(model)
                report = FoldReport(reason="the folded copy disagreed with the original")
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast, report
