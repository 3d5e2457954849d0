"""Forward capture: the only place in attncam where hooks are registered.

``capture(model, names)`` records the forward outputs (or, for ``"name:input"``, the first
positional input) of dotted submodules and removes every hook it registered on any exit, an
exception included. ``intervene(model, name, fn)`` replaces one module's output for the duration of
a perturbation method (Ablation-CAM), and is the only hook that changes a value.

Later in-place operations. A layer's output is often modified in place further on in the forward
pass (a VGG conv followed by ``ReLU(inplace=True)``; a ResNet ``bn2`` followed by
``out += identity``). Recording the tensor itself would then record the *next* operation's
output, and ``d score / d A`` would be the gradient at that operation, with no error. So the
capture hook keeps the recorded tensor ``A`` to itself and hands the rest of the network a copy
``A.clone()`` (same values, same memory layout): later in-place operations change the copy, ``A``
keeps the layer's true output, and the copy's ``CloneBackward`` passes ``d score / d A`` back
unchanged. When the output aliases the module's input (an identity such as ``AttentionTap``, a
view such as ``Flatten``), ``A`` is a private copy, so the caller's own in-place operations cannot
reach it either. The cost is one copy of each captured tensor (measured in
``benchmarks/explain.md``). For ``"name:input"`` the recorded input stays the caller's tensor (its
every use is a path to the score) and the module is given the copy. As a last guard, a recorded
tensor whose version counter moved before the context closes raises a ``RuntimeError`` naming the
layer: a wrong map is never returned silently.

Gradient roots. With every parameter frozen and the input not requiring grad, no autograd graph
is built below the target layer, so the forward costs what an inference forward costs. For
``d score / d A`` the captured tensor ``A`` must still require grad: ``capture(..., grad=names)``
flips ``A.requires_grad_()`` *in place* when ``A`` is a graph leaf. This changes neither the
tensor object nor its values (so it is not a hook that rewrites outputs), and it
makes the head the only part of the network with a graph: the backward then costs almost nothing
and no trunk activation is kept for it (measured in ``benchmarks/explain.md``). Because the network
continues on a copy, no in-place operation can reach a recorded output; only a recorded *input*
(``"name:input"``) that its caller later modifies in place can, and then PyTorch raises: the
caller retries with the input requiring grad (:class:`LeafInplaceError`), and the version guard
above reports the modification if it happens again.
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


def _shares_storage(t: torch.Tensor, args: tuple[Any, ...]) -> bool:
    """Whether ``t`` shares memory with a tensor among ``args`` (an identity or a view of it)."""
    ptr = t.untyped_storage().data_ptr()
    return any(
        isinstance(a, torch.Tensor) and ptr != 0 and a.untyped_storage().data_ptr() == ptr
        for a in args
    )


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its tensor (or its tuple/list's first tensor) replaced by ``tensor``."""
    if isinstance(value, torch.Tensor):
        return tensor
    items = [tensor, *value[1:]]
    if isinstance(value, tuple):
        return value._make(items) if hasattr(value, "_make") else tuple(items)
    return type(value)(items)


@contextmanager
def capture(
    model: nn.Module, names: Iterable[str], grad: Iterable[str] = ()
) -> Iterator[dict[str, torch.Tensor]]:
    """Record forward outputs of submodules while the context is open.

    The network continues on a copy of each recorded tensor, so an in-place operation later in
    the forward pass changes neither the recorded values nor the gradient taken with respect to
    them (see the module docstring).

    Args:
        model: any ``nn.Module``.
        names: dotted submodule names; ``"name:input"`` records that module's first input.
            A module called several times keeps its last call.
        grad: the subset of ``names`` that must be gradient roots: each recorded tensor that
            is a graph leaf is made to require grad in place (see the module docstring).

    Yields:
        A dict filled by the forward passes run inside the context: name -> tensor
        (for a CNN layer ``(B, K, h, w)``).

    Raises:
        LeafInplaceError: a recorded input that is a gradient root was modified in place by its
            caller (retry with the input requiring grad).
        RuntimeError: a recorded tensor was modified in place before the context closed.
    """
    names = list(dict.fromkeys(names))
    grad_set = set(grad)
    unknown = grad_set - set(names)
    if unknown:
        raise ValueError(f"grad names {sorted(unknown)} are not among the captured names")
    recorder = _Recorder(grad_set)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name in names:
            handles.append(recorder.register(resolve_module(model, name), name))
        try:
            yield recorder.store
        except RuntimeError as err:
            if "leaf Variable that requires grad" in str(err):
                raise LeafInplaceError(str(err)) from err
            raise
        recorder.check_unchanged()
    finally:
        for handle in handles:
            handle.remove()


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor`` (torch has no public accessor)."""
    return tensor._version  # noqa: SLF001


class _Recorder:
    """The values :func:`capture` records, and the hooks that record them."""

    def __init__(self, grad_set: set[str]) -> None:
        self.grad_set = grad_set
        self.store: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}

    def record(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Keep ``tensor`` as ``name``'s value; return the copy the network continues on."""
        if name in self.grad_set and torch.is_grad_enabled() and not tensor.requires_grad:
            if tensor.grad_fn is None and tensor.is_floating_point():
                tensor.requires_grad_()
        self.store[name] = tensor
        if not tensor.is_inference():  # inference tensors have no version counter
            self.versions[name] = _version(tensor)
        return tensor.clone()

    def register(self, module: nn.Module, name: str) -> torch.utils.hooks.RemovableHandle:
        """A forward (or, for ``name:input``, pre-forward) hook recording ``name``."""
        if name.endswith(INPUT_SUFFIX):

            def pre_hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                first = args[0] if args else None
                tensor = _as_tensor(first, name)
                return (_replace_first(first, self.record(name, tensor)), *args[1:])

            return module.register_forward_pre_hook(pre_hook)

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            tensor = _as_tensor(out, name)
            if _shares_storage(tensor, args):
                # An identity or a view: the caller still holds the memory, so keep a private
                # copy (the graph runs through it, values can't be changed).
                tensor = tensor.clone()
            return _replace_first(out, self.record(name, tensor))

        return module.register_forward_hook(hook)

    def check_unchanged(self) -> None:
        """Raise when a recorded value was modified in place after it was captured."""
        moved = [n for n, v in self.versions.items() if _version(self.store[n]) != v]
        if moved:
            raise RuntimeError(
                f"the recorded value of {moved} was modified in place after it was captured "
                "(the caller of that module changes its input or output in place later); the "
                "map would explain the modified tensor: pick another layer"
            )


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
        # torch keeps hooks in private dicts and has no public count of them.
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        total += sum(len(getattr(m, h, {})) for h in hooks)
    return total


__all__ = ["INPUT_SUFFIX", "LeafInplaceError", "capture", "count_hooks", "intervene"]
