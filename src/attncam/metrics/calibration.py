"""Temperature scaling and expected calibration error (Guo et al., ICML 2017).

A network whose softmax of the explained class is 0.999 on almost every image leaves the
confidence metrics nothing to measure: Average Drop is about 0 and Increase in Confidence about
0 % for any map. ``metrics.protocol.score=calibrated`` scores every metric on
``softmax(z / T)`` instead, with ``T`` fitted on held-out data by minimising the negative
log-likelihood (Guo et al. 2017, sec. 4.2, "temperature scaling"); temperature scaling never
changes the arg-max, so targets and accuracy are those of the uncalibrated model.

The fit is one-dimensional and convex in ``beta = 1 / T``: with ``p = softmax(beta z)``,

    NLL(beta)   = mean_i [ logsumexp(beta z_i) - beta z_i,y_i ]
    NLL'(beta)  = mean_i [ E_p[z_i] - z_i,y_i ]
    NLL''(beta) = mean_i [ Var_p[z_i] ] >= 0,

so a Newton iteration on ``NLL'(beta) = 0``, safeguarded by bisection inside a bracket, finds
the global optimum deterministically (no learning rate, no line search). The bracket is
``T in [TEMPERATURE_MIN, TEMPERATURE_MAX]``; an optimum on its edge (a validation set the model
separates perfectly drives ``T -> 0``) is logged and flagged (``Calibration.at_bound``).

ECE follows Guo et al. 2017, eq. 3: top-1 confidences in ``bins`` equal-width bins
``((m-1)/M, m/M]``, ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``, a fraction in [0, 1].
docs/METHODS.md ("Calibrated scores") has the protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attncam.runtime import eval_mode

log = logging.getLogger(__name__)

#: Bracket of the fitted temperature; an optimum outside it is clamped (and flagged).
TEMPERATURE_MIN: float = 0.01
TEMPERATURE_MAX: float = 100.0


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did to the held-out data it was fitted on.

    Attributes:
        temperature: ``T`` (> 0); calibrated probabilities are ``softmax(z / T)``.
        ece_before: ECE of ``softmax(z)`` (Guo et al. 2017, eq. 3), a fraction in [0, 1].
        ece_after: ECE of ``softmax(z / T)``.
        nll_before: Mean negative log-likelihood of ``softmax(z)`` (nats).
        nll_after: Mean negative log-likelihood of ``softmax(z / T)``.
        n: Number of images the temperature was fitted on.
        bins: ECE bins.
        at_bound: True when the optimum lay on the bracket's edge
            (``TEMPERATURE_MIN`` or ``TEMPERATURE_MAX``) and ``T`` is clamped there.
    """

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int
    bins: int = 15
    at_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view, for ``metrics.json`` and the manifest."""
        return dataclasses.asdict(self)


def _check_logits_labels(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    """Raise on inputs that are not ``(N, C)`` finite floats and ``(N,)`` labels in ``[0, C)``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = (
            f"{logits.dtype} {tuple(logits.shape)}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"{name} must be a floating (N, C) tensor; got {got}")
    n, c = logits.shape
    if n == 0:
        raise ValueError(f"{name} holds no sample (N = 0); calibration needs at least one")
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
        got = (
            f"{labels.dtype} {tuple(labels.shape)}"
            if isinstance(labels, Tensor)
            else type(labels).__name__
        )
        raise ValueError(f"labels must be an integer ({n},) tensor; got {got}")
    bad = labels[(labels < 0) | (labels >= c)]
    if bad.numel():
        raise ValueError(
            f"labels out of range [0, {c}): {sorted(set(bad.tolist()))[:5]} ({bad.numel()} of {n})"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} hold non-finite values; calibrate on finite outputs only")


def negative_log_likelihood(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(logits / T)`` at the labels, in nats (float64 arithmetic).

    Args:
        logits: ``(N, C)`` model outputs.
        labels: ``(N,)`` classes in ``[0, C)``.
        temperature: ``T > 0``.

    Returns:
        ``mean_i -log softmax(z_i / T)[y_i]``.
    """
    _check_logits_labels(logits, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = logits.detach().to(torch.float64) / temperature
    return float(F.cross_entropy(z, labels.to(z.device, torch.long)))


def _nll_derivatives(z: Tensor, zy: Tensor, beta: float) -> tuple[float, float]:
    """``NLL'(beta)`` and ``NLL''(beta)`` of ``softmax(beta z)`` (module docstring).

    Args:
        z: ``(N, C)`` float64 logits.
        zy: ``(N,)`` the labels' logits.
        beta: ``1 / T``.
    """
    p = torch.softmax(beta * z, dim=1)
    ez = (p * z).sum(1)
    var = (p * z * z).sum(1) - ez * ez
    return float((ez - zy).mean()), float(var.clamp_min(0).mean())


def _fit(logits: Tensor, labels: Tensor, max_iter: int) -> tuple[float, bool]:
    """Safeguarded Newton on ``NLL'(beta) = 0``; returns ``(T, at_bound)``."""
    z = logits.detach().to(torch.float64)
    zy = z.gather(1, labels.to(z.device, torch.long)[:, None]).squeeze(1)
    lo, hi = 1.0 / TEMPERATURE_MAX, 1.0 / TEMPERATURE_MIN  # bracket on beta
    g_lo, g_hi = _nll_derivatives(z, zy, lo)[0], _nll_derivatives(z, zy, hi)[0]
    if g_lo >= 0 and g_hi <= 0:  # NLL' is non-decreasing: flat on the bracket, any T fits
        return 1.0, False
    if g_lo >= 0:
        return TEMPERATURE_MAX, True
    if g_hi <= 0:
        return TEMPERATURE_MIN, True
    beta = 1.0
    for _ in range(max_iter):
        g, h = _nll_derivatives(z, zy, beta)
        lo, hi = (beta, hi) if g < 0 else (lo, beta)
        newton = g / h if h > 0 else math.inf
        if abs(newton) <= 1e-12 * beta:  # converged (also g == 0)
            break
        if lo < beta - newton < hi:
            beta -= newton
        else:  # Newton left the bracket: bisect in log beta
            beta = math.sqrt(lo * hi)
            if hi / lo - 1.0 <= 1e-12:
                break
    return 1.0 / beta, False


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al. 2017, sec. 4.2): ``T`` minimising the NLL of ``z / T``.

    Deterministic: a bisection-safeguarded Newton iteration on ``beta = 1 / T`` in float64,
    where the NLL is convex (module docstring); the result is the global optimum within
    ``[TEMPERATURE_MIN, TEMPERATURE_MAX]`` (clamped there, with a warning, when the optimum lies
    beyond, e.g. when every held-out image is classified correctly).

    Args:
        logits: ``(N, C)`` held-out outputs (e.g. the validation split), ``N >= 1``.
        labels: ``(N,)`` ground-truth classes in ``[0, C)``.
        max_iter: Iteration cap (Newton converges in well under 20 on real logits).

    Returns:
        ``T > 0``.

    Raises:
        ValueError: On ``N = 0``, labels out of range, non-finite logits or ``max_iter < 1``.
    """
    return _fit_checked(logits, labels, max_iter)[0]


def _fit_checked(logits: Tensor, labels: Tensor, max_iter: int) -> tuple[float, bool]:
    """``fit_temperature`` with its bound flag: ``(T, at_bound)``."""
    _check_logits_labels(logits, labels)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    t, at_bound = _fit(logits, labels, max_iter)
    if at_bound:
        log.warning(
            "temperature scaling: the NLL optimum lies beyond the bracket [%g, %g]; T clamped "
            "to %g (a held-out set the model separates perfectly drives T -> 0)",
            TEMPERATURE_MIN,
            TEMPERATURE_MAX,
            t,
        )
    return t, at_bound


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (Guo et al. 2017, eq. 3).

    Each sample's confidence ``max_k p_k`` falls in one of ``bins`` equal-width bins
    ``B_m = ((m-1)/M, m/M]`` (a confidence of exactly 0 in the first); per bin, the accuracy
    (arg-max equals the label) and the mean confidence; ``ECE = sum_m |B_m| / n * |acc - conf|``.

    Args:
        probs: ``(N, C)`` probabilities (rows of a softmax).
        labels: ``(N,)`` classes in ``[0, C)``.
        bins: ``M >= 1``.

    Returns:
        ECE, a fraction in [0, 1] (Guo et al. report it in percent).

    Raises:
        ValueError: On ``N = 0``, labels out of range, values outside [0, 1] or ``bins < 1``.
    """
    _check_logits_labels(probs, labels, "probs")
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    p = probs.detach().to(device="cpu", dtype=torch.float64)
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("probs must lie in [0, 1]; pass softmax outputs, not logits")
    conf, pred = p.max(dim=1)
    correct = (pred == labels.cpu()).to(torch.float64)
    idx = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    count = torch.zeros(bins, dtype=torch.float64)
    sum_conf = count.index_add(0, idx, conf)
    sum_acc = count.index_add(0, idx, correct)
    return float((sum_acc - sum_conf).abs().sum() / conf.numel())


def calibrate(logits: Tensor, labels: Tensor, max_iter: int = 200, bins: int = 15) -> Calibration:
    """Fit ``T`` on held-out logits and report NLL and ECE before and after.

    Args:
        logits: ``(N, C)`` outputs on held-out data (the validation split).
        labels: ``(N,)`` ground-truth classes.
        max_iter: ``fit_temperature``'s iteration cap.
        bins: ECE bins.

    Returns:
        The ``Calibration``.
    """
    t, at_bound = _fit_checked(logits, labels, max_iter)
    z = logits.detach().to(torch.float64)
    return Calibration(
        temperature=t,
        ece_before=expected_calibration_error(z.softmax(1), labels, bins),
        ece_after=expected_calibration_error((z / t).softmax(1), labels, bins),
        nll_before=negative_log_likelihood(z, labels),
        nll_after=negative_log_likelihood(z, labels, t),
        n=int(z.shape[0]),
        bins=int(bins),
        at_bound=at_bound,
    )


def collect_logits(model: nn.Module, batches: Iterable[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
    """Logits and labels of every batch, in eval and inference mode (e.g. a val dataloader).

    Args:
        model: Maps ``(B, 3, H, W)`` pixel images to logits ``(B, C)``.
        batches: Items whose first two entries are ``images (B, 3, H, W)`` and
            ``labels (B,)`` (the ``val_dataloader()`` and ``explain_dataloader()`` batches).

    Returns:
        ``(logits (N, C) float32, labels (N,) long)``, on the CPU.

    Raises:
        ValueError: When ``batches`` yields nothing.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    logits_l, labels_l = [], []
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            images, labels = batch[0], batch[1]
            logits_l.append(model(images.to(device)).float().cpu())
            labels_l.append(labels.long().cpu())
    if not logits_l:
        raise ValueError("no batch to collect logits from (empty validation split?)")
    return torch.cat(logits_l), torch.cat(labels_l)


__all__ = [
    "TEMPERATURE_MAX",
    "TEMPERATURE_MIN",
    "Calibration",
    "calibrate",
    "collect_logits",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
]
