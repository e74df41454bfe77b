"""When to stop: the signals of a run and the rule over them (pure functions; the loop side is ``alseg.loop.stopping``).

Label-free, every round:

* **prediction stability** (the stabilising-predictions rule, Bloodgood & Vijay-Shanker 2009): per foreground
  class, the Dice between this round's and the previous round's segmentations of a fixed *stop set* of pool
  cases, pooled over the stop set (sum of intersections over sum of sizes; both empty: 1.0), on the voxels not
  annotated up to this round; and the mean over the classes (:class:`PooledAgreement`);
* **stop-set entropy**: the mean normalised predictive entropy (entropy / log C) over the same voxels
  (:func:`normalised_entropy_sum`).

With held-out labels: the Dice gain per round (:func:`dice_gains`) and the budget at which the fitted curve
Dice(x) = c − (c − d0)·exp(−b·(x − x0)) reaches 95% of the way from d0 to its asymptote c,
x95 = x0 + ln(20)/b (:func:`fit_saturation`), with a bootstrap interval over the held-out cases
(:func:`saturation_interval`).

>>> import numpy as np
>>> agree = PooledAgreement((1,))
>>> agree.add(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
>>> round(agree.per_class()[1], 3)
0.667
>>> [r.stop for r in recommend([None, 0.98, 0.99], threshold=0.97, patience=2)]
[False, False, True]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alseg.evaluation.curves import fg_eff_model
from alseg.uncertainty.measures import predictive_entropy

__all__ = [
    "CONTINUE",
    "STOP",
    "PooledAgreement",
    "Recommendation",
    "SaturationFit",
    "SaturationInterval",
    "case_dice_matrix",
    "dice_gains",
    "draw_stop_set",
    "fit_saturation",
    "normalised_entropy_sum",
    "recommend",
    "saturation_interval",
]

STOP = "stopping looks safe"
CONTINUE = "continue"
LN20 = math.log(20.0)  # x95 = x0 + ln(20) / b: 95% of the way from d0 to c


# --------------------------------------------------------------------------------------------------
# the stop set and the label-free signals
# --------------------------------------------------------------------------------------------------
def draw_stop_set(pool: Sequence[str], size: int, rng: np.random.Generator) -> list[str]:
    """``size`` pool cases drawn without replacement (all of them when the pool is not larger), sorted."""
    if size < 0:
        raise ValueError(f"stop set size must be >= 0, got {size}")
    ids = sorted(pool)
    if size >= len(ids):
        return ids
    return sorted(ids[i] for i in rng.choice(len(ids), size=size, replace=False))


class PooledAgreement:
    """Dice between two segmentations per foreground class, pooled over cases: 2·Σ|A∩B| / Σ(|A| + |B|).

    ``add`` one case at a time (``keep``: the voxels that count, e.g. those not annotated); a class empty in
    both segmentations of every case agrees perfectly (1.0).
    """

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = tuple(int(lab) for lab in labels)
        self.intersection = dict.fromkeys(self.labels, 0)
        self.sizes = dict.fromkeys(self.labels, 0)
        self.n_cases = 0
        self.n_voxels = 0

    def add(self, a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None) -> None:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or (keep is not None and np.shape(keep) != a.shape):
            raise ValueError(
                f"segmentations to compare must have one shape, got {a.shape} and {b.shape}"
                + ("" if keep is None else f" (mask {np.shape(keep)})")
            )
        if keep is not None:
            keep = np.asarray(keep, dtype=bool)
            a, b = a[keep], b[keep]
        self.n_cases += 1
        self.n_voxels += int(a.size)
        for lab in self.labels:
            in_a, in_b = a == lab, b == lab
            self.intersection[lab] += int(np.count_nonzero(in_a & in_b))
            self.sizes[lab] += int(np.count_nonzero(in_a)) + int(np.count_nonzero(in_b))

    def per_class(self) -> dict[int, float]:
        return {
            lab: 1.0 if self.sizes[lab] == 0 else 2.0 * self.intersection[lab] / self.sizes[lab] for lab in self.labels
        }

    def mean(self) -> float:
        values = list(self.per_class().values())
        return float(np.mean(values)) if values else float("nan")


def normalised_entropy_sum(probs: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, int]:
    """(Σ PE/log C over the kept voxels, number of kept voxels) of probability samples ``(K, C, *spatial)``.

    PE is :func:`alseg.uncertainty.measures.predictive_entropy` (of the mean over the K samples), so the ratio of
    two sums is a mean in [0, 1]; with one class it is 0.
    """
    n_classes = int(np.shape(probs)[1])
    pe = predictive_entropy(probs)
    if keep is not None:
        if np.shape(keep) != pe.shape:
            raise ValueError(f"entropy mask has shape {np.shape(keep)}, expected the image's {pe.shape}")
        pe = pe[np.asarray(keep, dtype=bool)]
    total = float(pe.sum(dtype=np.float64)) / math.log(n_classes) if n_classes > 1 else 0.0
    return total, int(pe.size)


# --------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    """One round's advice (``STOP`` or ``CONTINUE``) and the rule that gave it, in words."""

    stop: bool
    rule: str

    @property
    def text(self) -> str:
        return STOP if self.stop else CONTINUE


def recommend(stabilities: Sequence[float | None], threshold: float, patience: int) -> list[Recommendation]:
    """Per round: stop once the stability has been ``>= threshold`` for ``patience`` consecutive rounds.

    ``stabilities[i]`` is round i's mean-over-classes stability, None where there is none (round 0, or no
    stop-set prediction of an earlier round to compare with); None breaks a run of stable rounds.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    out, run = [], 0
    for s in stabilities:
        if s is None or not math.isfinite(s):
            run = 0
            out.append(Recommendation(False, "no stability yet: no earlier stop-set prediction to compare with"))
            continue
        run = run + 1 if s >= threshold else 0
        if s < threshold:
            rule = f"stability {s:.3f} < {threshold:g}"
        elif run >= patience:
            rule = f"stability {s:.3f} ≥ {threshold:g} for {run} rounds (patience {patience})"
        else:
            rule = f"stability {s:.3f} ≥ {threshold:g} for {run} of {patience} rounds"
        out.append(Recommendation(run >= patience, rule))
    return out


def dice_gains(dice: Sequence[float | None]) -> list[float | None]:
    """Each round's Dice minus the last earlier round that has one; None for the first and for missing values."""
    out: list[float | None] = []
    last: float | None = None
    for d in dice:
        value = float(d) if _finite(d) else None
        out.append(value - last if value is not None and last is not None else None)
        if value is not None:
            last = value
    return out


# --------------------------------------------------------------------------------------------------
# the budget at which the fitted curve saturates
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaturationFit:
    """Dice(x) = c − (c − d0)·exp(−b·(x − x0)) fitted with b and c free (c ≤ 1); ``x95 = x0 + ln(20)/b``.

    ``x95`` is None when the fit was not possible; ``reason`` says why. ``beyond_observed``: x95 lies beyond the
    largest budget of the run (an extrapolation; above 1 it lies beyond the whole pool's foreground).
    ``c_at_bound``: the fitted asymptote is the bound c = 1, i.e. the points do not show where the curve levels off.
    """

    x95: float | None
    b: float | None = None
    c: float | None = None
    x0: float | None = None
    d0: float | None = None
    n_points: int = 0
    rmse: float | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def c_at_bound(self) -> bool:
        """The asymptote sits at its bound 1: the points show no saturation below a perfect Dice."""
        return self.c is not None and self.c >= 1.0 - 1e-6

    def to_json(self, x_max: float | None = None) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("x95", "b", "c", "x0", "d0", "n_points", "rmse", "reason")}
        out["beyond_observed"] = None if self.x95 is None or x_max is None else bool(self.x95 > x_max)
        out["c_at_bound"] = self.c_at_bound
        return out


def _failed(reason: str, n: int, x0: float | None = None, d0: float | None = None) -> SaturationFit:
    return SaturationFit(None, x0=x0, d0=d0, n_points=n, reason=reason)


def fit_saturation(
    x: Sequence[float | None], dice: Sequence[float | None], start: tuple[float, float] | None = None
) -> SaturationFit:
    """Fit b ≥ 0 and c ≤ 1 of Dice(x) = c − (c − d0)·exp(−b·(x − x0)) on one run's rounds.

    ``x``: the fraction of the pool's foreground annotated per round, ``dice`` the held-out Dice; (x0, d0) is
    the first point with both finite (round 0). Needs at least 3 such points, two of them beyond x0, and a Dice
    that rises above d0. ``start``: (b, c) to start from (the bootstrap starts from the point estimate).
    """
    from scipy.optimize import curve_fit

    pts = [(float(a), float(d)) for a, d in zip(x, dice, strict=True) if _finite(a) and _finite(d)]
    n = len(pts)
    if n < 3:
        return _failed(f"{n} evaluated round(s) with a budget and a Dice; the fit needs at least 3", n)
    xa, ya = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    x0, d0 = float(xa[0]), float(ya[0])
    later = xa > x0
    if int(np.count_nonzero(later)) < 2:
        return _failed("fewer than 2 rounds with more annotated foreground than round 0", n, x0, d0)
    if float(ya[later].max()) <= d0 + 1e-9:
        return _failed(f"the Dice never rises above round 0's {d0:.4f} (a flat curve): nothing to saturate", n, x0, d0)
    if d0 >= 1.0:
        return _failed("round 0's Dice is already 1", n, x0, d0)
    span = float(xa.max() - x0)

    def model(xv: np.ndarray, b: float, c: float) -> np.ndarray:
        return fg_eff_model(xv, b, c, x0, d0)

    starts = [start] if start is not None else [(k / span, min(1.0, float(ya.max()))) for k in (0.5, 2.0, 8.0)]
    best: tuple[float, float, float] | None = None
    for b_start, c_start in starts:
        p0 = [min(max(b_start, 1e-6), 1e6), min(max(c_start, d0 + 1e-6), 1.0)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, _ = curve_fit(model, xa, ya, p0=p0, bounds=([0.0, d0], [1e6, 1.0]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((model(xa, *popt) - ya) ** 2))
        if all(map(math.isfinite, popt)) and (best is None or sse < best[2]):
            best = (float(popt[0]), float(popt[1]), sse)
    if best is None:
        return _failed("the curve fit did not converge", n, x0, d0)
    b, c, sse = best
    rmse = math.sqrt(sse / n)
    if c - d0 <= 1e-6 or b <= 1e-9:
        return SaturationFit(
            None, b, c, x0, d0, n, rmse, "the fitted curve does not saturate (b ≈ 0 or c ≈ d0): no 95% budget"
        )
    return SaturationFit(x0 + LN20 / b, b, c, x0, d0, n, rmse)


@dataclass(frozen=True)
class SaturationInterval:
    """A percentile bootstrap interval of x95; ``low``/``high`` None with ``reason`` when not possible."""

    low: float | None
    high: float | None
    level: float
    n_resamples: int
    n_fitted: int
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("low", "high", "level", "n_resamples", "n_fitted", "reason")}


def saturation_interval(
    x: Sequence[float | None],
    case_dice: np.ndarray,
    n_resamples: int,
    rng: np.random.Generator,
    level: float = 0.95,
    start: tuple[float, float] | None = None,
) -> SaturationInterval:
    """Resample the held-out cases with replacement (the same cases for every round), refit, take percentiles.

    ``case_dice``: ``(n_rounds, n_cases)``, each case's foreground-mean Dice per round (NaN where undefined; a
    round's Dice is the mean over its finite cases, as :func:`alseg.evaluation.metrics.summarise_cases`). The
    interval is given when at least half the resamples gave an x95.
    """
    case_dice = np.asarray(case_dice, dtype=np.float64)
    if case_dice.ndim != 2 or case_dice.shape[0] != len(x):
        raise ValueError(f"case_dice must have shape (n_rounds={len(x)}, n_cases), got {case_dice.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_cases = case_dice.shape[1]
    if n_resamples < 1 or n_cases < 2:
        why = "no resamples asked for" if n_resamples < 1 else f"{n_cases} held-out case(s): nothing to resample"
        return SaturationInterval(None, None, level, max(n_resamples, 0), 0, why)
    found = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n_cases, size=n_cases)
        sample = case_dice[:, idx]
        finite = np.isfinite(sample)
        counts = finite.sum(axis=1)
        means = np.where(counts > 0, np.where(finite, sample, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
        fit = fit_saturation(x, list(means), start=start)
        if fit.x95 is not None:
            found.append(fit.x95)
    if len(found) * 2 < n_resamples:
        return SaturationInterval(
            None, None, level, n_resamples, len(found), f"only {len(found)} of {n_resamples} resamples gave a fit"
        )
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(found, [tail, 100.0 - tail])
    return SaturationInterval(float(low), float(high), level, n_resamples, len(found))


def case_dice_matrix(rounds: Sequence[Mapping[str, float | None]]) -> np.ndarray:
    """``(n_rounds, n_cases)`` from one ``{case_id: Dice}`` per round (cases in sorted order; NaN where absent)."""
    ids = sorted({cid for r in rounds for cid in r})
    return np.array([[_nan(r.get(cid)) for cid in ids] for r in rounds], dtype=np.float64).reshape(
        len(rounds), len(ids)
    )


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, int | float) and math.isfinite(v)


def _nan(v: Any) -> float:
    return float(v) if _finite(v) else float("nan")
