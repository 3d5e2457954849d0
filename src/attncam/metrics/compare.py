"""Paired comparison of explanation methods on per-image metric values (docs/METHODS.md, "Comparisons").

The explain stage, run with ``save_per_image=true``, writes ``per_image.json`` into its run
folder: for every method and metric, the value of each image the metric kept, keyed by image id.
This module compares each method with a reference method on those values:

* **Join** on image id (the intersection); ids present on one side only are counted, never used.
* On the paired differences ``d = method - reference``: the mean, a BCa bootstrap 95% interval
  (Efron 1987), the effect size ``d_z = mean(d) / sd(d)``, the win rate, a two-sided sign-flip
  permutation p, the minimum detectable effect (MDE) at 80% power and a TOST equivalence p at the
  endpoint's smallest effect of interest (SESOI).
* On binary metrics (every value in {0, 100} or every value in {0, 1}, e.g. the pointing game):
  exact McNemar on the discordant pairs, which is then the test behind the verdict, and Wilson 95%
  intervals of each method's proportion.
* Holm-Bonferroni over the declared **primary** endpoints only (every method x primary metric);
  the other endpoints are exploratory and keep their unadjusted p.

Verdict rule (one of ``better``, ``worse``, ``equivalent``, ``inconclusive``):

* ``better`` needs all three: the test p (Holm-adjusted when primary) < alpha, the BCa interval of
  the mean difference excludes 0 on the good side, and the mean difference exceeds the SESOI in
  magnitude in the good direction (``|diff| > sesoi``). ``worse`` is the mirror image. A difference
  no larger than the SESOI is therefore never called better or worse, however small its p.
* ``equivalent``: TOST rejects both one-sided nulls at alpha, i.e. the 90% t interval of the mean
  difference lies inside ``(-sesoi, +sesoi)``. With ``sesoi == 0`` nothing can be equivalent.
  ``better``/``worse`` and ``equivalent`` cannot both hold: the 90% interval contains the mean.
* ``inconclusive``: anything else, i.e. the data neither show a difference beyond the SESOI nor
  rule one out; compare the MDE with the SESOI to see whether more images would help.

Identical per-image values (``d`` all 0) are ``equivalent`` when ``sesoi > 0`` and
``inconclusive`` when ``sesoi == 0``; never better or worse.

Everything here is plain NumPy/SciPy on the values read from JSON (no model, no device tensors).
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import special, stats

from attncam.metrics.stats import holm

log = logging.getLogger(__name__)

PerImage = dict[str, dict[str, dict[int, float]]]
Direction = Literal["lower", "higher"]

#: File the explain stage writes into its run folder with ``save_per_image=true``.
PER_IMAGE_FILE = "per_image.json"
#: docs/METHODS.md: the sign-flip p uses at least this many resamples; fewer is allowed (tests), with a
#: warning.
MIN_RESAMPLES = 20_000
VERDICTS: tuple[str, ...] = ("better", "worse", "equivalent", "inconclusive")
#: Metric names (the part before any ``@level``) where a lower value is better; all others are
#: higher-is-better (``lerf_minus_morf`` included).
LOWER_IS_BETTER: frozenset[str] = frozenset({"average_drop", "deletion", "morf"})
#: Metrics reported in percent (0-100), used to put Wilson intervals in the metric's unit.
PERCENT_METRICS: frozenset[str] = frozenset(
    {
        "average_drop",
        "increase_in_confidence",
        "percentage_in",
        "pointing_game",
        "energy_pointing_game",
        "grid_pointing_game",
        "box_accuracy",
    }
)
#: Default smallest effect of interest per metric, in the metric's own unit (the single place the
#: defaults live). A key matches a metric by full name (``percentage_in@5``) or by the name before
#: ``@`` (``percentage_in``). Percent metrics: points; AUCs and IoU: absolute units in [0, 1].
DEFAULT_SESOI: dict[str, float] = {
    "average_drop": 2.0,
    "increase_in_confidence": 5.0,
    "percentage_in": 5.0,
    "pointing_game": 5.0,
    "energy_pointing_game": 2.0,
    "grid_pointing_game": 2.0,
    "box_accuracy": 5.0,
    "deletion": 0.01,
    "insertion": 0.01,
    "morf": 0.01,
    "lerf": 0.01,
    "lerf_minus_morf": 0.01,
    "mask_iou": 0.02,
    "pixel_auc": 0.02,
}

_MAX_ELEMENTS = 1 << 22  # resampled values held at once (bounds memory for large n)
_REL_TOL = 1e-9  # |sum*| equal to |sum| up to rounding counts as "at least as extreme"


# --------------------------------------------------------------------------------------------
# Loading and joining
# --------------------------------------------------------------------------------------------


def load_per_image(path_or_run_dir: str | Path) -> PerImage:
    """Read the per-image results the explain stage writes with ``save_per_image=true``.

    Args:
        path_or_run_dir: A run folder (``per_image.json`` is read from it) or the file itself.
            The file holds ``{"image_ids": [int, ...], "methods": {method: {metric:
            {"<image id>": value}}}}``; an image appears under a metric only if that metric kept it.

    Returns:
        ``{method: {metric: {image_id: value}}}`` with integer image ids and float values.

    Raises:
        FileNotFoundError: No such file (the run was not made with ``save_per_image=true``).
        ValueError: The file is not valid per-image JSON (the message names the bad entry).
    """
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / PER_IMAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no per-image results at {path}: the explain run must be made with "
            f"save_per_image=true, which writes {PER_IMAGE_FILE} into its run folder"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("methods"), dict):
        raise ValueError(f"{path}: expected an object with a 'methods' object; got {type(raw)}")
    known = raw.get("image_ids")
    known_ids = None if known is None else {_image_id(i, path) for i in known}
    return {
        str(method): _parse_method(path, str(method), metrics, known_ids)
        for method, metrics in raw["methods"].items()
    }


def _image_id(raw: Any, where: Any) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: image id {raw!r} is not an integer") from err
    if isinstance(raw, float) and raw != value:
        raise ValueError(f"{where}: image id {raw!r} is not an integer")
    return value


def _parse_method(
    path: Path, method: str, metrics: Any, known_ids: set[int] | None
) -> dict[str, dict[int, float]]:
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: method {method!r} must map metric names to objects")
    out: dict[str, dict[int, float]] = {}
    for metric, values in metrics.items():
        where = f"{path}: {method}/{metric}"
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected {{image id: value}}; got {type(values).__name__}")
        parsed = {_image_id(k, where): _finite(v, f"{where}[{k}]") for k, v in values.items()}
        if known_ids is not None and not parsed.keys() <= known_ids:
            extra = sorted(parsed.keys() - known_ids)[:5]
            raise ValueError(f"{where}: image ids {extra} are not in the file's image_ids")
        out[str(metric)] = parsed
    return out


def _finite(raw: Any, where: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: value {raw!r} is not a number") from err
    if not math.isfinite(value):
        raise ValueError(
            f"{where}: value {raw!r} is not finite; non-finite images must be skipped and "
            "counted by the metric, not stored"
        )
    return value


@dataclass(frozen=True)
class PairedValues:
    """Two methods' values joined on image id; unpacks as ``ids, a, b``.

    Attributes:
        ids: Image ids present on both sides, sorted ascending.
        a: Values of the first side, aligned with ``ids``, shape ``(N,)``.
        b: Values of the second side, aligned with ``ids``, shape ``(N,)``.
        only_in_a: Number of ids present only in the first side (not used).
        only_in_b: Number of ids present only in the second side (not used).
    """

    ids: tuple[int, ...]
    a: np.ndarray
    b: np.ndarray
    only_in_a: int
    only_in_b: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.ids, self.a, self.b))


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> PairedValues:
    """Join two ``{image id: value}`` mappings on image id.

    Args:
        a: Per-image values of one method (keys: image ids, ints or int-like strings).
        b: Per-image values of the other method.

    Returns:
        ``PairedValues``: the sorted common ids, the two aligned value arrays and how many ids were
        only in ``a`` / only in ``b``. Unpacks as ``ids, values_a, values_b``.
    """
    left = {_image_id(k, "paired(a)"): float(v) for k, v in a.items()}
    right = {_image_id(k, "paired(b)"): float(v) for k, v in b.items()}
    ids = tuple(sorted(left.keys() & right.keys()))
    return PairedValues(
        ids=ids,
        a=np.array([left[i] for i in ids], dtype=np.float64),
        b=np.array([right[i] for i in ids], dtype=np.float64),
        only_in_a=len(left.keys() - right.keys()),
        only_in_b=len(right.keys() - left.keys()),
    )


# --------------------------------------------------------------------------------------------
# Statistics on the paired differences
# --------------------------------------------------------------------------------------------


def metric_direction(metric: str) -> Direction:
    """``"lower"`` when a lower value of ``metric`` is better (Average Drop, deletion, MoRF)."""
    return "lower" if metric.split("@", 1)[0] in LOWER_IS_BETTER else "higher"


def bootstrap_means(values: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``values`` (seeded, shape ``(R,)``).

    The values are sorted first, so the result depends only on their multiset.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_ELEMENTS // max(n, 1))
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        out[start : start + r] = x[rng.integers(0, n, size=(r, n))].mean(axis=1)
    return out


def bca_interval(
    values: np.ndarray, confidence: float = 0.95, resamples: int = MIN_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Bias-corrected and accelerated (BCa) bootstrap interval of the mean (Efron 1987).

    ``z0 = Phi^-1(share of bootstrap means below the observed mean)`` (ties count half, as in
    SciPy; the share is clipped to ``[1/(2R), 1 - 1/(2R)]`` so ``z0`` stays finite); the
    acceleration ``a = sum(u^3) / (6 (sum(u^2))^1.5)`` with ``u`` the jackknife deviations
    (Efron 1987, eq. 6.6); the ends are the bootstrap quantiles at
    ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for ``z = Phi^-1((1 -/+ confidence) / 2)``.

    Degenerate cases: with zero variance the interval collapses to the point ``(x, x)``; with
    fewer than 3 values the bootstrap has at most 3 distinct means and the interval is reported
    as the range ``(min, max)`` of the values.

    Args:
        values: Shape ``(N,)``, finite, ``N >= 1``.
        confidence: Coverage in (0, 1).
        resamples: Number of bootstrap resamples ``R``.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bca_interval needs a non-empty 1-D array; got shape {x.shape}")
    if x.size < 3 or float(np.ptp(x)) == 0.0:
        return float(x.min()), float(x.max())
    theta = float(x.mean())
    boot = bootstrap_means(x, resamples, seed)
    share = (np.count_nonzero(boot < theta) + np.count_nonzero(boot <= theta)) / (2.0 * resamples)
    share = min(max(share, 0.5 / resamples), 1.0 - 0.5 / resamples)
    z0 = float(special.ndtri(share))
    jack = (x.sum() - x) / (x.size - 1)
    u = jack.mean() - jack
    denom = 6.0 * float((u**2).sum()) ** 1.5
    accel = float((u**3).sum()) / denom if denom > 0 else 0.0
    tail = (1.0 - confidence) / 2.0
    z = special.ndtri(np.array([tail, 1.0 - tail]))
    shrink = 1.0 - accel * (z0 + z)
    if not np.all(shrink > 0):  # |a| so large the adjustment is undefined: plain percentiles
        log.warning("BCa adjustment undefined (acceleration %.3g); using percentiles", accel)
        shrink, z0 = np.ones_like(z), 0.0
    levels = special.ndtr(z0 + (z0 + z) / shrink)
    low, high = np.quantile(boot, levels)
    return float(low), float(high)


def effect_size_dz(d: np.ndarray) -> float:
    """Cohen's ``d_z = mean(d) / sd(d)`` (``ddof=1``) of paired differences.

    ``0/0`` (all differences zero) gives 0; a non-zero constant difference gives ``+/-inf``.
    """
    x = np.asarray(d, dtype=np.float64)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    if sd == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def win_counts(d: np.ndarray, direction: Direction) -> tuple[int, int, int]:
    """``(wins, ties, losses)`` of the first method: images where it is better / equal / worse."""
    x = np.asarray(d, dtype=np.float64)
    good = x if direction == "higher" else -x
    return int((good > 0).sum()), int((good == 0).sum()), int((good < 0).sum())


@dataclass(frozen=True)
class SignFlipResult:
    """Two-sided sign-flip permutation test of ``mean(d) = 0``.

    Attributes:
        p: The p-value.
        resamples: Sign vectors used: ``2^n`` when exact, else ``R``.
        exact: Whether all ``2^n`` sign vectors were enumerated.
        none_exceeded: Random version only: no resample was at least as extreme as the data, so
            ``p = 1/(R+1)``, reported as ``< 1/R``.
    """

    p: float
    resamples: int
    exact: bool
    none_exceeded: bool


def sign_flip_test(d: np.ndarray, resamples: int = MIN_RESAMPLES, seed: int = 0) -> SignFlipResult:
    """Two-sided sign-flip permutation p of paired differences (Fisher 1935; Good 2005).

    Under the null each ``d_i`` is symmetric about 0, so flipping signs is exchangeable. When
    ``2^n <= resamples`` every sign vector is enumerated and ``p = #{|sum*| >= |sum|} / 2^n``
    (exact; the identity and its mirror always count, so ``p >= 2/2^n``). Otherwise ``R`` random
    sign vectors give ``p = (1 + #{|sum*| >= |sum|}) / (1 + R)``, never 0. Sums equal up to
    rounding (relative 1e-9) count as at least as extreme.

    Args:
        d: Paired differences, shape ``(N,)``.
        resamples: ``R``, the number of random sign vectors (docs/METHODS.md: >= 20,000).
        seed: Seed of the sign generator.
    """
    x = np.asarray(d, dtype=np.float64)
    n = x.size
    observed = abs(float(x.sum()))
    threshold = observed - _REL_TOL * float(np.abs(x).sum())
    if n < 62 and (1 << n) <= resamples:
        codes = np.arange(1 << n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)
        sums = (1.0 - 2.0 * (codes & 1)) @ x
        count = int((np.abs(sums) >= threshold).sum())
        return SignFlipResult(count / (1 << n), 1 << n, exact=True, none_exceeded=False)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_ELEMENTS // n)
    count = 0
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        signs = np.where(rng.random((r, n)) < 0.5, -1.0, 1.0)
        count += int((np.abs(signs @ x) >= threshold).sum())
    return SignFlipResult((1 + count) / (1 + resamples), resamples, False, count == 0)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """Exact McNemar test of paired binary outcomes (McNemar 1947; exact binomial form).

    Args:
        a: Outcomes of the first method (non-zero = success), shape ``(N,)``.
        b: Outcomes of the second method, aligned with ``a``.

    Returns:
        ``(p, n10, n01)``: the two-sided binomial p of ``n10`` successes in ``n10 + n01``
        discordant pairs at probability 1/2 (1.0 with no discordant pair), ``n10`` the pairs where
        only ``a`` succeeds and ``n01`` those where only ``b`` does.
    """
    sa, sb = np.asarray(a) != 0, np.asarray(b) != 0
    n10, n01 = int((sa & ~sb).sum()), int((~sa & sb).sum())
    if n10 + n01 == 0:
        return 1.0, n10, n01
    return float(stats.binomtest(n10, n10 + n01, 0.5).pvalue), n10, n01


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927), in [0, 1].

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``z = Phi^-1(1 - a/2)``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, n >= 1; got {successes}/{n}")
    z = float(special.ndtri(1.0 - (1.0 - confidence) / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The bounds are exactly 0 (1) when no (every) trial succeeded; the formula leaves round-off.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def minimum_detectable_effect(d: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean difference a two-sided paired test at ``alpha`` detects with ``power``.

    Normal approximation from the observed spread: ``(z_{1-alpha/2} + z_{power}) * sd(d) /
    sqrt(n)`` (``ddof=1``); at alpha 0.05 and 80% power the factor is 2.80. For small n the t
    version would be somewhat larger.
    """
    x = np.asarray(d, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"the MDE needs at least 2 differences; got {x.size}")
    factor = float(special.ndtri(1.0 - alpha / 2.0) + special.ndtri(power))
    return factor * float(x.std(ddof=1)) / math.sqrt(x.size)


def tost_p(d: np.ndarray, sesoi: float) -> float:
    """TOST equivalence p of paired differences within ``(-sesoi, +sesoi)`` (Schuirmann 1987).

    Two one-sided t-tests (``df = n - 1``) of ``mean <= -sesoi`` and ``mean >= +sesoi``; the
    p is the larger of the two, so ``p < alpha`` iff the ``1 - 2 alpha`` t interval lies inside
    the bounds. ``sesoi <= 0`` gives 1 (nothing is equivalent); zero variance gives 0 when
    ``|mean| < sesoi`` and 1 otherwise.
    """
    x = np.asarray(d, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"TOST needs at least 2 differences; got {x.size}")
    if sesoi <= 0:
        return 1.0
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0.0:
        return 0.0 if abs(mean) < sesoi else 1.0
    se, df = sd / math.sqrt(x.size), x.size - 1
    p_low = float(stats.t.sf((mean + sesoi) / se, df))
    p_high = float(stats.t.cdf((mean - sesoi) / se, df))
    return max(p_low, p_high)


def decide_verdict(
    diff: float,
    ci: tuple[float, float],
    p: float,
    tost: float,
    sesoi: float,
    direction: Direction,
    alpha: float = 0.05,
) -> str:
    """Verdict of one endpoint (see the module docstring for the rule).

    Args:
        diff: Mean difference ``method - reference``.
        ci: BCa interval of ``diff``.
        p: Test p (Holm-adjusted for primary endpoints).
        tost: TOST equivalence p.
        sesoi: Smallest effect of interest (>= 0).
        direction: ``"lower"`` or ``"higher"`` is better.
        alpha: Level of the tests.

    Returns:
        ``"better"``, ``"worse"``, ``"equivalent"`` or ``"inconclusive"``.
    """
    sign = 1.0 if direction == "higher" else -1.0
    good = sign * diff
    low, high = sorted((sign * ci[0], sign * ci[1]))
    if p < alpha and abs(diff) > sesoi:
        if good > 0 and low > 0:
            return "better"
        if good < 0 and high < 0:
            return "worse"
    if sesoi > 0 and tost < alpha:
        return "equivalent"
    return "inconclusive"


# --------------------------------------------------------------------------------------------
# Comparing methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonRow:
    """One endpoint: a method against the reference on one metric, paired by image id.

    Differences are ``method - reference`` in the metric's unit; ``direction`` says which sign is
    good. ``p_test`` is the test behind the verdict: exact McNemar on binary metrics, else the
    sign-flip p; ``p_holm`` is its Holm adjustment over the primary endpoints (``None`` when
    exploratory). Wilson intervals are in the metric's unit (percent for 0/100 metrics).
    """

    method: str
    reference: str
    metric: str
    direction: Direction
    binary: bool
    n: int
    only_in_method: int
    only_in_reference: int
    mean_method: float
    mean_reference: float
    diff: float
    ci_low: float
    ci_high: float
    ci_method: str
    d_z: float
    win_rate: float
    ties: int
    losses: int
    p_perm: float
    p_perm_resamples: int
    p_perm_exact: bool
    p_perm_none_exceeded: bool
    mcnemar_p: float | None
    mcnemar_discordant: tuple[int, int] | None
    wilson_method: tuple[float, float] | None
    wilson_reference: tuple[float, float] | None
    test: str
    p_test: float
    p_holm: float | None
    mde: float
    sesoi: float
    tost_p: float
    primary: bool
    alpha: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view; infinite values (``d_z`` of a constant difference) as strings."""
        return {k: _json_safe(v) for k, v in asdict(self).items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    return value


def resolve_sesoi(metric: str, sesoi: Mapping[str, float] | None = None) -> float:
    """SESOI of ``metric``: ``sesoi`` then ``DEFAULT_SESOI``, by full name then the name before @.

    Raises:
        ValueError: No value for the metric, or a negative / non-finite one.
    """
    base = metric.split("@", 1)[0]
    for table in (sesoi or {}, DEFAULT_SESOI):
        for key in (metric, base):
            if key in table:
                value = float(table[key])
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"sesoi for {metric!r} must be finite and >= 0; got {value}")
                return value
    raise ValueError(
        f"no smallest effect of interest for metric {metric!r}; pass sesoi={{{metric!r}: ...}} "
        f"or leave the metric out (defaults exist for: {', '.join(sorted(DEFAULT_SESOI))})"
    )


def binary_scale(values: Iterable[float], metric: str) -> float | None:
    """The success value when ``values`` are binary (all in {0, 1} or all in {0, 100}), else None.

    Percent metrics (``PERCENT_METRICS``) that are all 0 are taken as 0/100.
    """
    seen = set(values)
    if seen <= {0.0, 1.0}:
        return 100.0 if 1.0 not in seen and metric.split("@", 1)[0] in PERCENT_METRICS else 1.0
    if seen <= {0.0, 100.0}:
        return 100.0
    return None


def _seed_for(seed: int, method: str, reference: str, metric: str) -> int:
    # Stable per endpoint: a row's resamples do not depend on which other rows are computed.
    words = [seed & 0xFFFFFFFF] + [zlib.crc32(s.encode()) for s in (method, reference, metric)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _binary_fields(pair: PairedValues, scale: float | None) -> dict[str, Any]:
    if scale is None:
        return {
            "binary": False,
            "mcnemar_p": None,
            "mcnemar_discordant": None,
            "wilson_method": None,
            "wilson_reference": None,
        }
    p, n10, n01 = mcnemar_exact(pair.a, pair.b)
    n = len(pair.ids)
    wa = wilson_interval(int((pair.a != 0).sum()), n)
    wb = wilson_interval(int((pair.b != 0).sum()), n)
    return {
        "binary": True,
        "mcnemar_p": p,
        "mcnemar_discordant": (n10, n01),
        "wilson_method": (wa[0] * scale, wa[1] * scale),
        "wilson_reference": (wb[0] * scale, wb[1] * scale),
    }


def _difference_fields(
    d: np.ndarray, direction: Direction, sesoi: float, alpha: float, resamples: int, seed: int
) -> dict[str, Any]:
    n = d.size
    ci = bca_interval(d, 0.95, resamples, seed)
    flip = sign_flip_test(d, resamples, seed + 1)
    wins, ties, losses = win_counts(d, direction)
    return {
        "diff": float(d.mean()),
        "ci_low": ci[0],
        "ci_high": ci[1],
        "ci_method": "range" if n < 3 else ("point" if ci[0] == ci[1] else "bca"),
        "d_z": effect_size_dz(d),
        "win_rate": wins / n,
        "ties": ties,
        "losses": losses,
        "p_perm": flip.p,
        "p_perm_resamples": flip.resamples,
        "p_perm_exact": flip.exact,
        "p_perm_none_exceeded": flip.none_exceeded,
        "mde": minimum_detectable_effect(d, alpha),
        "tost_p": tost_p(d, sesoi),
    }


def _check_pair(pair: PairedValues, method: str, reference: str, metric: str) -> None:
    if len(pair.ids) < 2:
        raise ValueError(
            f"{method} vs {reference} on {metric!r}: {len(pair.ids)} paired image(s) (only in "
            f"{method}: {pair.only_in_a}, only in {reference}: {pair.only_in_b}); at least 2 are "
            "needed"
        )


def compare_pair(
    pair: PairedValues,
    *,
    method: str,
    reference: str,
    metric: str,
    sesoi: float,
    scale: float | None = None,
    primary: bool = False,
    alpha: float = 0.05,
    resamples: int = MIN_RESAMPLES,
    seed: int = 0,
) -> ComparisonRow:
    """Every statistic of one endpoint; the verdict uses the unadjusted test p.

    Args:
        pair: ``paired(method_values, reference_values)``.
        method: Name of the compared method.
        reference: Name of the reference method.
        metric: Metric key (sets the direction, see ``metric_direction``).
        sesoi: Smallest effect of interest, >= 0, in the metric's unit.
        scale: Success value when the metric is binary (``binary_scale``), else ``None``.
        primary: Whether the endpoint is declared primary (``compare_methods`` then Holm-adjusts).
        alpha: Level of the tests.
        resamples: Bootstrap and sign-flip resamples ``R``.
        seed: Base seed; the endpoint's own seed is derived from it and the names.

    Raises:
        ValueError: Fewer than 2 paired images.
    """
    _check_pair(pair, method, reference, metric)
    direction = metric_direction(metric)
    row_seed = _seed_for(seed, method, reference, metric)
    stats_ = _difference_fields(pair.a - pair.b, direction, sesoi, alpha, resamples, row_seed)
    binary = _binary_fields(pair, scale)
    p_test = binary["mcnemar_p"] if binary["binary"] else stats_["p_perm"]
    ci = (stats_["ci_low"], stats_["ci_high"])
    verdict = decide_verdict(stats_["diff"], ci, p_test, stats_["tost_p"], sesoi, direction, alpha)
    return ComparisonRow(
        method=method,
        reference=reference,
        metric=metric,
        direction=direction,
        n=len(pair.ids),
        only_in_method=pair.only_in_a,
        only_in_reference=pair.only_in_b,
        mean_method=float(pair.a.mean()),
        mean_reference=float(pair.b.mean()),
        test="mcnemar" if binary["binary"] else "sign_flip",
        p_test=p_test,
        p_holm=None,
        sesoi=sesoi,
        primary=primary,
        alpha=alpha,
        verdict=verdict,
        **stats_,
        **binary,
    )


def _select_metrics(
    per_image: Mapping[str, Mapping[str, Any]], reference: str, metrics: Sequence[str] | None
) -> list[str]:
    available = sorted({m for by_metric in per_image.values() for m in by_metric})
    if metrics is None:
        return list(per_image[reference])
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from: {', '.join(available)}")
    missing = [m for m in metrics if m not in per_image[reference]]
    if missing:
        raise ValueError(
            f"reference {reference!r} has no values for {missing}; it has: "
            f"{', '.join(per_image[reference]) or 'none'}"
        )
    return list(dict.fromkeys(metrics))


def _check_arguments(
    per_image: Mapping[str, Any],
    reference: str,
    methods: Sequence[str] | None,
    alpha: float,
    resamples: int,
) -> list[str]:
    if reference not in per_image:
        raise ValueError(
            f"unknown reference method {reference!r}; choose one of: {', '.join(per_image)}"
        )
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5); got {alpha}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}")
    if resamples < MIN_RESAMPLES:
        log.warning(
            "resamples=%d is below the %d docs/METHODS.md asks for", resamples, MIN_RESAMPLES
        )
    others = [m for m in per_image if m != reference]
    if methods is not None:
        unknown = [m for m in methods if m not in per_image]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from: {', '.join(per_image)}")
        others = [m for m in dict.fromkeys(methods) if m != reference]
    if not others:
        raise ValueError(f"nothing to compare with {reference!r}: no other method in the results")
    return others


def _check_sesoi_keys(sesoi: Mapping[str, float], metrics: Iterable[str]) -> None:
    known = set(DEFAULT_SESOI)
    for m in metrics:
        known |= {m, m.split("@", 1)[0]}
    unknown = sorted(set(sesoi) - known)
    if unknown:
        raise ValueError(
            f"sesoi for unknown metric(s) {unknown}; known: {', '.join(sorted(known))}"
        )


def compare_methods(
    per_image: Mapping[str, Mapping[str, Mapping[int, float]]],
    reference: str,
    metrics: Sequence[str] | None = None,
    primary: Sequence[str] = (),
    sesoi: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    resamples: int = MIN_RESAMPLES,
    seed: int = 0,
    *,
    methods: Sequence[str] | None = None,
) -> list[ComparisonRow]:
    """Compare every method with ``reference`` on each metric, paired by image id.

    Args:
        per_image: ``{method: {metric: {image id: value}}}`` (``load_per_image``).
        reference: The method every other one is compared with, e.g. ``"gradcam"``.
        metrics: Metrics to compare (default: every metric of the reference). A method without
            values for a requested metric is an error; with the default it is skipped and logged.
        primary: The declared primary metrics; Holm runs over every method x primary metric.
        sesoi: Smallest effect of interest per metric (full name or name before ``@``); missing
            ones come from ``DEFAULT_SESOI``.
        alpha: Level of every test.
        resamples: ``R`` for the bootstrap and the sign-flip test (docs/METHODS.md: >= 20,000).
        seed: Base seed (results are reproducible and a row does not depend on the other rows).
        methods: Methods to compare (default: all but the reference).

    Returns:
        One ``ComparisonRow`` per method x metric, methods in input order, metrics in ``metrics``
        order.

    Raises:
        ValueError: Unknown reference, method, metric or primary metric, a metric without a
            SESOI, or fewer than 2 paired images for an endpoint (the message names the choices).
    """
    others = _check_arguments(per_image, reference, methods, alpha, resamples)
    chosen = _select_metrics(per_image, reference, metrics)
    bad_primary = [m for m in primary if m not in chosen]
    if bad_primary:
        raise ValueError(f"primary metric(s) {bad_primary} not compared; choose from: {chosen}")
    _check_sesoi_keys(sesoi or {}, chosen)
    scales = {m: binary_scale(_all_values(per_image, m), m) for m in chosen}
    margins = {m: resolve_sesoi(m, sesoi) for m in chosen}
    rows = [
        compare_pair(
            paired(per_image[method][metric], per_image[reference][metric]),
            method=method,
            reference=reference,
            metric=metric,
            sesoi=margins[metric],
            scale=scales[metric],
            primary=metric in primary,
            alpha=alpha,
            resamples=resamples,
            seed=seed,
        )
        for method, metric in _endpoints(per_image, others, chosen, explicit=metrics is not None)
    ]
    return apply_holm(rows)


def _all_values(
    per_image: Mapping[str, Mapping[str, Mapping[int, float]]], metric: str
) -> Iterator[float]:
    for by_metric in per_image.values():
        yield from by_metric.get(metric, {}).values()


def _endpoints(
    per_image: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    metrics: Sequence[str],
    explicit: bool,
) -> Iterator[tuple[str, str]]:
    """(method, metric) pairs in method-then-metric order; a missing metric raises if requested."""
    for method in methods:
        for metric in metrics:
            if metric in per_image[method]:
                yield method, metric
            elif explicit:
                raise ValueError(
                    f"method {method!r} has no values for metric {metric!r}; it has: "
                    f"{', '.join(per_image[method]) or 'none'}"
                )
            else:
                log.warning("skipping %s on %s: the method has no values for it", method, metric)


def apply_holm(rows: Sequence[ComparisonRow]) -> list[ComparisonRow]:
    """Holm-adjust ``p_test`` over the primary rows and redo their verdicts with it."""
    index = [i for i, r in enumerate(rows) if r.primary]
    adjusted = holm([rows[i].p_test for i in index])
    out = list(rows)
    for i, p in zip(index, adjusted, strict=True):
        r = rows[i]
        verdict = decide_verdict(
            r.diff, (r.ci_low, r.ci_high), p, r.tost_p, r.sesoi, r.direction, r.alpha
        )
        out[i] = replace(r, p_holm=p, verdict=verdict)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else ("+inf" if x > 0 else "-inf")


def format_p(p: float, none_exceeded: bool = False, resamples: int = 0) -> str:
    """A p-value for a table; ``< 1/R`` when no random resample was as extreme as the data."""
    if none_exceeded:
        return f"< 1/{resamples}"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _wilson(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" [{_num(interval[0])}, {_num(interval[1])}]"


def _row_markdown(r: ComparisonRow) -> str:
    p_perm = format_p(r.p_perm, r.p_perm_none_exceeded, r.p_perm_resamples)
    if r.p_perm_exact:
        p_perm += " (exact)"
    cells = [
        r.method,
        r.metric + (" (binary)" if r.binary else ""),
        "lower" if r.direction == "lower" else "higher",
        f"{r.n} (+{r.only_in_method}/+{r.only_in_reference})",
        f"{_num(r.mean_method)}{_wilson(r.wilson_method)} vs "
        f"{_num(r.mean_reference)}{_wilson(r.wilson_reference)}",
        f"{_num(r.diff)} [{_num(r.ci_low)}, {_num(r.ci_high)}]",
        _num(r.d_z),
        f"{100 * r.win_rate:.1f} ({r.ties} ties)",
        p_perm,
        "-" if r.mcnemar_p is None else format_p(r.mcnemar_p),
        "-" if r.p_holm is None else format_p(r.p_holm),
        format_p(r.tost_p),
        _num(r.mde),
        _num(r.sesoi),
        f"**{r.verdict}**" if r.primary else f"{r.verdict} (exploratory)",
    ]
    return "| " + " | ".join(cells) + " |"


def _footnotes(rows: Sequence[ComparisonRow]) -> list[str]:
    alpha = rows[0].alpha
    sesoi = ", ".join(f"{m} {_num(s)}" for m, s in dict((r.metric, r.sesoi) for r in rows).items())
    binary = sorted({r.metric for r in rows if r.binary})
    notes = [
        "- Diff = method - reference (mean over images present in both; + = ids only in the "
        "method / only in the reference, not used); [BCa 95% interval]. d_z = mean/sd of the "
        "paired differences (0 when all are 0). Win % = share of images where the method is "
        "better (ties counted apart).",
        f"- p: two-sided sign-flip permutation p ('exact' = all 2^n sign flips; '< 1/R' = none of "
        f"R random flips as extreme). Binary metrics ({', '.join(binary) or 'none'}: all values "
        "0/100 or 0/1) use the exact McNemar p instead; their means (proportions) carry Wilson "
        "95% intervals.",
        "- Holm p: Holm-Bonferroni over the primary endpoints (every method x primary metric); "
        "exploratory endpoints keep the unadjusted p and their verdicts are marked exploratory.",
        f"- Verdict: **better/worse** when the (Holm) p < {alpha}, the BCa interval excludes 0 "
        f"and |diff| > SESOI in that direction; **equivalent** when TOST at the SESOI gives "
        f"p < {alpha} (the 90% interval lies within +/- SESOI); otherwise **inconclusive**: the "
        "data neither show a difference beyond the SESOI nor rule one out. A difference no "
        "larger than the SESOI is never called better or worse; with SESOI 0 nothing is "
        "equivalent.",
        f"- SESOI (smallest effect of interest, metric units): {sesoi}.",
        f"- MDE: smallest difference detectable with 80% power at alpha {alpha} two-sided, "
        "(z_{1-alpha/2} + z_0.8) sd(d)/sqrt(n); an MDE above the SESOI: more images needed.",
    ]
    return notes


def format_comparison_markdown(rows: Sequence[ComparisonRow]) -> str:
    """A Markdown table, one row per method x metric, with footnotes explaining the rule."""
    if not rows:
        return "No comparisons.\n"
    primary = sorted({r.metric for r in rows if r.primary})
    header = (
        f"Paired comparison against `{rows[0].reference}` by image id; primary endpoints: "
        f"{', '.join(primary) or 'none (all exploratory)'}.\n\n"
        "| Method | Metric | Better | n (+only M/R) | Mean M vs R | Diff [95% BCa] | d_z "
        "| Win % | p | p McNemar | Holm p | TOST p | MDE | SESOI | Verdict |\n"
        "|" + "---|" * 15
    )
    lines = [header, *(_row_markdown(r) for r in rows), "", *_footnotes(rows)]
    return "\n".join(lines) + "\n"
