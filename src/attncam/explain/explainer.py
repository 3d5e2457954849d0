"""``Explainer``: every registered method behind one call, sharing one forward/backward pass."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attncam.explain.equivalence import equivalent_methods, log_groups, representatives
from attncam.explain.hooks import capture, resolve_module
from attncam.explain.methods.base import (
    Method,
    Pass,
    ReshapeTransform,
    default_layers,
    forward_backward,
)
from attncam.explain.methods.registry import available_methods, get_method
from attncam.runtime import eval_mode

log = logging.getLogger(__name__)

MethodsArg = (
    str | Sequence[str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]] | Mapping[str, Any]
)


@dataclass
class Explanation:
    """What one :meth:`Explainer.explain` call returns.

    Attributes:
        maps: result name -> ``(B, H, W)`` map in [0, 1].
        targets: ``(B,)`` explained class per image.
        logits: ``(B, N)`` of the clean forward pass.
        extras: side results, e.g. ``"scorecam.skipped"`` ``(B,)`` (constant channels skipped),
            ``"guided_backprop.gradient"`` ``(B, 3, H, W)``.
    """

    maps: dict[str, torch.Tensor]
    targets: torch.Tensor
    logits: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


def parse_methods(methods: MethodsArg, shared: Mapping[str, Any] | None = None) -> list[Method]:
    """Build method objects from the accepted spellings.

    Accepted: a key ``"gradcam"``; a list whose items are keys, ``(key, options)`` pairs or
    ``{"key": ..., "options": {...}}`` / ``{key: options}`` mappings; or a mapping
    ``{key: options}``. ``shared`` options (the Explainer's ``**options``) go to every method
    that has that option; an option no method has is an error.

    Returns:
        The methods, in the given order; result names must be unique.
    """
    items: list[tuple[str, dict[str, Any]]] = []
    if isinstance(methods, str):
        items.append((methods, {}))
    elif isinstance(methods, Mapping):
        items.extend((k, dict(v or {})) for k, v in methods.items())
    else:
        for item in methods:
            if isinstance(item, str):
                items.append((item, {}))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                items.append((item[0], dict(item[1] or {})))
            elif isinstance(item, Mapping) and "key" in item:
                items.append((str(item["key"]), dict(item.get("options") or {})))
            elif isinstance(item, Mapping) and len(item) == 1:
                ((k, v),) = item.items()
                items.append((str(k), dict(v or {})))
            else:
                raise ValueError(
                    f"cannot read method spec {item!r}; use 'key', ('key', {{options}}) or "
                    "{'key': ..., 'options': {...}}"
                )
    if not items:
        raise ValueError(f"no methods given; choose from: {', '.join(available_methods())}")
    shared = dict(shared or {})
    built: list[Method] = []
    used: set[str] = set()
    for key, opts in items:
        cls = get_method(key)
        extra = {k: v for k, v in shared.items() if k in cls.defaults and k not in opts}
        used.update(extra)
        built.append(cls(**{**extra, **opts}))
    unused = sorted(set(shared) - used)
    if unused:
        raise ValueError(
            f"option(s) {', '.join(map(repr, unused))} apply to none of the methods "
            f"{[m.key for m in built]}"
        )
    names = [m.name for m in built]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"methods requested twice with the same options: {dupes}")
    return built


def methods_from_config(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Method specs from the composed ``method`` config group (a plain mapping; no Hydra needed).

    Format (each ``conf/method/<key>.yaml`` adds one entry under its own name, so files compose
    as ``method=[gradcam,xgradcam]`` or through a group's ``defaults`` list)::

        gradcam: {key: gradcam, options: {layer: null}}
        gradcampp_torchcam020: {key: gradcampp, options: {variant: torchcam020}}

    Returns:
        ``[(key, options), ...]`` for :class:`Explainer`, in the config's order.
    """
    specs: list[tuple[str, dict[str, Any]]] = []
    for entry_name, entry in cfg.items():
        if not isinstance(entry, Mapping) or "key" not in entry:
            raise ValueError(
                f"method entry {entry_name!r} has no 'key'; each conf/method file holds "
                "{key: <registry key>, options: {...}}"
            )
        specs.append((str(entry["key"]), dict(entry.get("options") or {})))
    return specs


OutputTransform = Callable[[Any], torch.Tensor]


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise a ``ValueError`` listing the layers that exist when a named layer does not.

    Names may end in ``":input"`` (that module's first input). The message lists the children of
    the deepest part of the dotted name that exists, so a typo anywhere in the path is explained
    (:func:`attncam.explain.model_api.unknown_layer_error`).
    """
    for name in layers:
        resolve_module(model, name)


class _Logits(nn.Module):
    """The model seen through ``output_transform``: forwards return checked logits ``(B, N)``.

    Attributes, ``get_submodule`` and ``named_modules`` are the wrapped model's, so dotted layer
    names and the attributes :mod:`attncam.explain.model_api` reads (``cam_layer``, ...) are the
    same through the wrapper.
    """

    def __init__(self, model: nn.Module, transform: OutputTransform | None) -> None:
        super().__init__()
        self.inner = model
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``; a non-tensor or non-2D output is a clear error."""
        out = self.inner(x)
        if self.transform is not None:
            out = self.transform(out)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = (
                f"a tensor of shape {tuple(out.shape)}"
                if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}"
                + (f" with keys {sorted(map(str, out))}" if isinstance(out, Mapping) else "")
            )
            how = (
                "output_transform returned" if self.transform is not None else "the model returned"
            )
            raise TypeError(
                f"{how} {got}, not logits (B, N); pass Explainer(..., output_transform=fn) with fn "
                "picking the logits, e.g. lambda out: out[0] or lambda out: out['logits']"
            )
        return out

    def get_submodule(self, target: str) -> nn.Module:
        """The wrapped model's submodule (names are unchanged by the wrapper)."""
        return self.inner.get_submodule(target)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """The wrapped model's modules, named as in the wrapped model."""
        return self.inner.named_modules(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def explaining(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Eval mode and frozen parameters for the duration; both restored exactly on any exit.

    The same as :func:`attncam.runtime.eval_mode` with ``freeze=True``.
    """
    return eval_mode(model, freeze=True)


class Explainer:
    """Explain a classifier's decisions with any registered methods.

    Example::

        explainer = Explainer(net, ["gradcam", ("gradcampp", {"variant": "torchcam020"})])
        maps = explainer(images)            # {"gradcam": (B, H, W), "gradcampp[torchcam020]": ...}

    Args:
        model: any ``nn.Module`` mapping ``(B, 3, H, W)`` images to logits ``(B, N)``. An
            ``AttentionNet`` supplies defaults (``cam_layer``, ``head_input_layer``, the
            classifier, attention modules); other models need ``layer``.
        methods: see :func:`parse_methods`; keys are listed by ``available_methods()``.
        layer: dotted CAM layer, or a list (each layer's map normalised at the input size, then
            their mean, normalised again); None means ``model.cam_layer``.
        reshape_transform: maps a captured layer output and its gradient to ``(B, K, h, w)``
            (e.g. ViT tokens).
        broadcast: allow one class (an ``int``) for the whole batch.
        upsample: resize maps to the input size (False keeps the layer's size, for CAM methods).
        channels_last: give the model its input in channels-last memory layout (same values;
            oneDNN convolutions run about 1.4x faster on CPU, measured in
            ``benchmarks/explain.md``); False keeps the caller's layout.
        output_transform: maps the model's output to logits ``(B, N)`` for a model that returns a
            tuple or a dict (e.g. ``lambda out: out["logits"]``); None expects logits, and any other
            output is a ``TypeError`` naming what came back.
        **options: options given to every method that has them, e.g. ``counterfactual=True``.

    Attributes:
        equivalent_groups: groups of result names identical by construction at their layer (a
            layer feeding global average pooling and one linear layer, see
            :func:`~attncam.explain.equivalence.equivalent_methods`), logged once at INFO when the
            Explainer is built; ``[]`` when none.

    Raises:
        ValueError: an unknown method, option or layer (listing the valid choices).
    """

    def __init__(
        self,
        model: nn.Module,
        methods: MethodsArg = ("gradcam",),
        layer: str | list[str] | None = None,
        *,
        reshape_transform: ReshapeTransform | None = None,
        broadcast: bool = False,
        upsample: bool = True,
        channels_last: bool = True,
        output_transform: OutputTransform | None = None,
        **options: Any,
    ) -> None:
        self.model = model
        self.methods = parse_methods(methods, options)
        self.layers = default_layers(model, layer)
        check_layers(model, self.layers)
        self.output_transform = output_transform
        self.reshape_transform = reshape_transform
        self.broadcast = broadcast
        self.upsample = upsample
        self.channels_last = channels_last
        for m in self.methods:
            m.check(model, self.layers)
        self.equivalent_groups: list[list[str]] = equivalent_methods(
            model, self.methods, self.layers
        )
        log_groups(self.equivalent_groups, model)
        self.grad_sites = list(
            dict.fromkeys(s for m in self.methods for s in m.grad_sites(model, self.layers))
        )
        self.record_sites = [
            s
            for s in dict.fromkeys(
                s for m in self.methods for s in m.record_sites(model, self.layers)
            )
            if s not in self.grad_sites
        ]

    @property
    def names(self) -> list[str]:
        """Result keys, in order."""
        return [m.name for m in self.methods]

    def target_layers(self) -> dict[str, list[str]]:
        """Per result name, the layers whose activations or gradients the method reads."""
        return {
            m.name: list(
                dict.fromkeys(
                    [
                        *m.grad_sites(self.model, self.layers),
                        *m.record_sites(self.model, self.layers),
                    ]
                )
            )
            for m in self.methods
        }

    def layer_sizes(self, image_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Spatial size ``(h, w)`` of every layer the methods read, for one image of that size."""
        sites = sorted({s for layers in self.target_layers().values() for s in layers})
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        x = torch.zeros(1, 3, *image_size, device=device)
        with explaining(self.model), torch.no_grad(), capture(self.model, sites) as acts:
            self.model(x)
        return {s: tuple(int(d) for d in acts[s].shape[-2:]) for s in sites}  # type: ignore[misc]

    @property
    def duplicate_of(self) -> dict[str, str]:
        """``{name: the first name of its group}`` for the methods whose maps repeat another's.

        See :attr:`equivalent_groups`; a report can score each group once and copy the result.
        """
        return representatives(self.equivalent_groups)

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | int | None = None
    ) -> dict[str, torch.Tensor]:
        """Maps ``{name: (B, H, W)}`` in [0, 1] for ``images`` ``(B, 3, H, W)``.

        Args:
            images: pixel images as the model expects them.
            targets: None (each image's top-1 class), one class per image ``(B,)``, or an
                ``int`` for all images when ``broadcast=True``.
        """
        return self.explain(images, targets).maps

    def _targets(
        self, targets: torch.Tensor | Sequence[int] | int | None, b: int, device: torch.device
    ) -> torch.Tensor | None:
        if targets is None:
            return None
        if isinstance(targets, int) or (isinstance(targets, torch.Tensor) and targets.ndim == 0):
            if not self.broadcast:
                raise ValueError(
                    f"targets={int(targets)} is one class for a batch of {b}; pass one class per "
                    "image, or Explainer(..., broadcast=True) to use it for every image"
                )
            return torch.full((b,), int(targets), dtype=torch.long, device=device)
        t = torch.as_tensor(targets, device=device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
        if t.ndim != 1 or t.shape[0] != b:
            raise ValueError(
                f"targets has shape {tuple(t.shape)} but the batch has {b} images; "
                "pass one class per image"
            )
        return t.long()

    def explain(
        self, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | int | None = None
    ) -> Explanation:
        """Like ``__call__``, also returning targets, logits and side results."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
        images = images.detach()
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}")
        finite = torch.isfinite(images.flatten(1)).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"images {bad[:10]} of the batch hold NaN or inf values; maps of them would be "
                "meaningless (check the data pipeline)"
            )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        b = images.shape[0]
        given = self._targets(targets, b, images.device)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            n = logits.shape[1]
            if given is None:
                return logits.argmax(1)
            bad = (given < 0) | (given >= n)
            if bad.any():
                raise ValueError(
                    f"target class(es) {given[bad].tolist()} out of range for a model with {n} "
                    f"classes (valid: 0..{n - 1})"
                )
            return given

        model = _Logits(self.model, self.output_transform)
        with explaining(self.model), torch.inference_mode(False):
            logits, t, acts, grads = forward_backward(
                model,
                images,
                self.grad_sites,
                self.record_sites,
                pick,
                self.reshape_transform,
                set(self.layers),
            )
            p = Pass(
                model=model,
                images=images,
                targets=t,
                logits=logits,
                acts=acts,
                grads=grads,
                layers=self.layers,
                reshape=self.reshape_transform,
                size=tuple(images.shape[-2:]) if self.upsample else None,
            )
            maps: dict[str, torch.Tensor] = {}
            for m in self.methods:
                maps[m.name] = m.compute(p)
                p.cache[m.name] = maps[m.name]
        return Explanation(maps=maps, targets=t, logits=logits, extras=p.extras)

    def __repr__(self) -> str:
        return f"Explainer(methods={self.names}, layers={self.layers})"


__all__ = [
    "Explainer",
    "Explanation",
    "check_layers",
    "explaining",
    "methods_from_config",
    "parse_methods",
]
