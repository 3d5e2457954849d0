"""Forward capture: the only place in attncam where hooks are registered.

``capture(model, names)`` records the forward outputs (or, for ``"name:input"``, the first
positional input) of dotted submodules and removes every hook it registered on any exit, an
exception included. ``intervene(model, name, fn)`` replaces one module's output for the duration of
a perturbation method (Ablation-CAM), and is the only hook that changes a value.

Gradient roots. With every parameter frozen and the input not requiring grad, no autograd graph
is built below the target layer, so the forward costs what an inference forward costs. For
``d score / d A`` the captured tensor ``A`` must still require grad: ``capture(..., grad=names)``
flips ``A.requires_grad_()`` *in place* when ``A`` is a graph leaf. This changes neither the
tensor object nor its values (so it is not a hook that rewrites outputs), and it
makes the head the only part of the network with a graph: the backward then costs almost nothing
and no trunk activation is kept for it (measured in ``benchmarks/explain.md``). If a later in-place
operation (``out += identity``, ``ReLU(inplace=True)``) hits the leaf, PyTorch raises; the caller
then retries with the input requiring grad (:class:`LeafInplaceError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from attncam.explain.model_api import unknown_layer_error

log = logging.getLogger(__name__)

INPUT_SUFFIX = ":input"


class LeafInplaceError(RuntimeError):
    """An in-place operation after the target layer modified the captured gradient root."""


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` (``""`` is the model) with an error listing near names.

    Args:
        model: the network.
        name: a dotted module name, optionally ending in ``":input"``.

    Returns:
        The submodule.
    """
    dotted = name.removesuffix(INPUT_SUFFIX)
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise unknown_layer_error(model, dotted) from None


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(
        f"layer {name!r} produced a {type(value).__name__}, not a tensor; pick another layer "
        "or pass reshape_transform"
    )


@contextmanager
def capture(
    model: nn.Module, names: Iterable[str], grad: Iterable[str] = ()
) -> Iterator[dict[str, torch.Tensor]]:
    """Record forward outputs of submodules while the context is open.

    Args:
        model: any ``nn.Module``.
        names: dotted submodule names; ``"name:input"`` records that module's first input.
            A module called several times keeps its last call.
        grad: the subset of ``names`` that must be gradient roots: each recorded tensor that
            is a graph leaf is made to require grad in place (see the module docstring).

    Yields:
        A dict filled by the forward passes run inside the context: name -> tensor
        (for a CNN layer ``(B, K, h, w)``).
    """
    names = list(dict.fromkeys(names))
    grad_set = set(grad)
    unknown = grad_set - set(names)
    if unknown:
        raise ValueError(f"grad names {sorted(unknown)} are not among the captured names")
    store: dict[str, torch.Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def record(name: str, value: Any) -> None:
        tensor = _as_tensor(value, name)
        if name in grad_set and torch.is_grad_enabled() and not tensor.requires_grad:
            if tensor.grad_fn is None and tensor.is_floating_point():
                tensor.requires_grad_()
        store[name] = tensor

    try:
        for name in names:
            module = resolve_module(model, name)
            if name.endswith(INPUT_SUFFIX):

                def pre_hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                    record(name, args[0] if args else None)

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:

                def hook(_m: nn.Module, _a: tuple[Any, ...], out: Any, name: str = name) -> None:
                    record(name, out)

                handles.append(module.register_forward_hook(hook))
        try:
            yield store
        except RuntimeError as err:
            if "leaf Variable that requires grad" in str(err):
                raise LeafInplaceError(str(err)) from err
            raise
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def intervene(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the output of submodule ``name`` by ``fn(output)`` while the context is open.

    Used by perturbation methods only (Ablation-CAM zeroes channels); the batch size may
    change, e.g. one image's features expanded to one copy per ablated channel.

    Args:
        model: any ``nn.Module``.
        name: dotted submodule name.
        fn: maps the output ``(B, K, h, w)`` to the tensor the rest of the network sees.
    """
    module = resolve_module(model, name)

    def hook(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> torch.Tensor:
        return fn(_as_tensor(out, name))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward, pre-forward and backward hooks on ``model``'s modules (for tests)."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        total += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
    return total


__all__ = ["INPUT_SUFFIX", "LeafInplaceError", "capture", "count_hooks", "intervene"]
