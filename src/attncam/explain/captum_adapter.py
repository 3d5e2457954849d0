"""captum's input attributions behind the :class:`~attncam.explain.explainer.Explainer`.

captum (Kokhlikyan et al. 2020) is an optional dependency (``pip install 'attncam[captum]'``),
imported only when a captum method is built into an Explainer. A :class:`CaptumMethod` runs one
captum attribution on the pixel images of the call, for the Explainer's targets, with the model
in eval mode and its parameters frozen (gradients flow to the input only), and reduces the
``(B, 3, H, W)`` attribution to a ``(B, H, W)`` map in [0, 1] like the other pixel-level methods:

- ``abs_of_sum`` (default): ``|sum_c a_c|``, what captum's ``visualize_image_attr`` shows with its
  default ``sign="absolute_value"`` (it sums the channels, then takes the absolute value);
- ``sum_of_abs``: ``sum_c |a_c|``;
- ``max_abs``: ``max_c |a_c|``, as ``guided_backprop`` here (Simonyan et al. 2014, sec. 3.1);

then min-max normalised per image (captum's display additionally clips the top 2% of values;
attncam does not). The full attribution is kept in the explanation's extras as
``"<name>.attribution"`` ``(B, 3, H, W)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from attncam.explain.methods.base import Method, Pass, normalize_maps

CHANNEL_REDUCTIONS = ("abs_of_sum", "sum_of_abs", "max_abs")


def require_captum() -> ModuleType:
    """``captum.attr``, or an ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module("captum.attr")
    except ImportError as err:
        raise ImportError(
            f"this method runs captum's attribution, and captum cannot be imported ({err}); "
            "install it with pip install 'attncam[captum]' (or pip install 'captum>=0.7')"
        ) from err


def reduce_channels(attr: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, C, H, W)`` attribution -> ``(B, H, W)`` map in [0, 1] (module docstring).

    Raises:
        ValueError: an unknown reduction, naming the valid ones.
    """
    if how == "abs_of_sum":
        out = attr.sum(1).abs()
    elif how == "sum_of_abs":
        out = attr.abs().sum(1)
    elif how == "max_abs":
        out = attr.abs().amax(1)
    else:
        raise ValueError(
            f"unknown channel reduction {how!r}; choose one of: {', '.join(CHANNEL_REDUCTIONS)}"
        )
    return normalize_maps(out.float())


class CaptumMethod(Method):
    """An input attribution computed by captum; subclasses implement :meth:`attribute`.

    Every subclass has the option ``reduce`` (one of :data:`CHANNEL_REDUCTIONS`).
    """

    uses_gradients: ClassVar[bool] = True
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"reduce": CHANNEL_REDUCTIONS}

    def check(self, model: nn.Module, layers: list[str]) -> None:
        """Fail before any forward pass when captum is missing."""
        require_captum()

    def attribute(self, attr: ModuleType, p: Pass, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, 3, H, W)`` attribution of ``p.model``'s ``p.targets`` logits at ``x``.

        Args:
            attr: the ``captum.attr`` module.
            p: the call (``p.model`` in eval mode with frozen parameters maps images to logits;
                side results go to ``p.extras``).
            x: ``(B, 3, H, W)`` pixel images (a detached copy of ``p.images``).
        """
        raise NotImplementedError

    def compute(self, p: Pass) -> torch.Tensor:
        attr = require_captum()
        x = p.images.detach().clone().requires_grad_()
        with torch.enable_grad():
            a = self.attribute(attr, p, x).detach()
        p.extras[f"{self.name}.attribution"] = a
        return reduce_channels(a, self.options["reduce"])


__all__ = ["CHANNEL_REDUCTIONS", "CaptumMethod", "reduce_channels", "require_captum"]
