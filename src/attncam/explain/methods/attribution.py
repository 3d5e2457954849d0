"""Input attributions run by captum (optional dependency): integrated_gradients, smoothgrad,
input_x_gradient.

Each is a :class:`~attncam.explain.captum_adapter.CaptumMethod`: captum computes the
``(B, 3, H, W)`` attribution of the target logit, the adapter reduces it over the colour channels
(option ``reduce``, default ``|sum_c a_c|`` as captum displays it) and min-max normalises it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import torch

from attncam.explain.captum_adapter import CaptumMethod
from attncam.explain.methods.base import Pass
from attncam.explain.methods.registry import register_method

IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


@register_method("integrated_gradients")
class IntegratedGradients(CaptumMethod):
    """Integrated Gradients (Sundararajan et al., ICML 2017, eq. 1; captum's implementation).

    ``a_i = (x_i - x'_i) * int_0^1 d f_c(x' + t (x - x')) / d x_i dt`` with the baseline ``x'`` a
    constant image of value ``baseline`` in pixel units (0: black; the network normalises its
    input itself), the integral approximated by ``method`` with ``n_steps`` points. By the
    completeness axiom ``sum_i a_i ~ f_c(x) - f_c(x')``; captum's convergence delta (the gap) is
    kept in the extras as ``"<name>.delta"`` ``(B,)``.

    Options:
        n_steps: integration points.
        baseline: pixel value of the constant baseline image.
        method: captum's rule: gausslegendre, riemann_trapezoid, riemann_left, riemann_right,
            riemann_middle.
        batch_size: scaled images per forward/backward pass (captum's internal_batch_size).
        reduce: channel reduction (abs_of_sum, sum_of_abs, max_abs).
    """

    defaults: ClassVar[dict[str, Any]] = {
        "n_steps": 50,
        "baseline": 0.0,
        "method": "gausslegendre",
        "batch_size": 64,
        "reduce": "abs_of_sum",
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {**CaptumMethod.choices, "method": IG_RULES}

    def attribute(self, attr: ModuleType, p: Pass, x: torch.Tensor) -> torch.Tensor:
        a, delta = attr.IntegratedGradients(p.model).attribute(
            x,
            baselines=float(self.options["baseline"]),
            target=p.targets,
            n_steps=int(self.options["n_steps"]),
            method=self.options["method"],
            internal_batch_size=int(self.options["batch_size"]),
            return_convergence_delta=True,
        )
        p.extras[f"{self.name}.delta"] = delta.detach()
        return a


@register_method("smoothgrad")
class SmoothGrad(CaptumMethod):
    """SmoothGrad (Smilkov et al. 2017, eq. 2): the gradient averaged over noisy copies.

    captum's ``NoiseTunnel`` over ``Saliency``: the mean over ``n`` copies ``x + N(0, sigma^2)``
    of ``|d f_c / d x|`` (``abs=True``, captum's default) or of the signed gradient
    (``abs=False``; ``square=True`` averages its square, captum's ``smoothgrad_sq``). ``sigma`` is
    in pixel units (images in [0, 1]): 0.15 is 15% of the range, the paper's 10-20%.

    Options:
        n: noisy copies per image.
        sigma: noise std in pixel units.
        abs: average absolute gradients.
        square: average squared gradients (``smoothgrad_sq``).
        batch_size: noisy copies per forward/backward pass (captum's nt_samples_batch_size).
        seed: seed the noise (torch's global generator is forked, so other draws are
            unaffected); None draws from the global generator.
        reduce: channel reduction (abs_of_sum, sum_of_abs, max_abs).
    """

    defaults: ClassVar[dict[str, Any]] = {
        "n": 25,
        "sigma": 0.15,
        "abs": True,
        "square": False,
        "batch_size": 32,
        "seed": None,
        "reduce": "abs_of_sum",
    }

    def attribute(self, attr: ModuleType, p: Pass, x: torch.Tensor) -> torch.Tensor:
        tunnel = attr.NoiseTunnel(attr.Saliency(p.model))
        kwargs = {
            "nt_type": "smoothgrad_sq" if self.options["square"] else "smoothgrad",
            "nt_samples": int(self.options["n"]),
            "nt_samples_batch_size": int(self.options["batch_size"]),
            "stdevs": float(self.options["sigma"]),
            "target": p.targets,
            "abs": bool(self.options["abs"]),
        }
        seed = self.options["seed"]
        if seed is None:
            return tunnel.attribute(x, **kwargs)
        devices = [x.device.index or 0] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            return tunnel.attribute(x, **kwargs)


@register_method("input_x_gradient")
class InputXGradient(CaptumMethod):
    """Input x Gradient (Shrikumar et al. 2016; captum's ``InputXGradient``).

    ``a_i = x_i * d f_c / d x_i`` on the pixel image; for a linear model it equals Integrated
    Gradients with a black baseline.

    Options:
        reduce: channel reduction (abs_of_sum, sum_of_abs, max_abs).
    """

    defaults: ClassVar[dict[str, Any]] = {"reduce": "abs_of_sum"}

    def attribute(self, attr: ModuleType, p: Pass, x: torch.Tensor) -> torch.Tensor:
        return attr.InputXGradient(p.model).attribute(x, target=p.targets)


__all__ = ["IG_RULES", "InputXGradient", "IntegratedGradients", "SmoothGrad"]
