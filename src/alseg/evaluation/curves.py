"""Learning-curve summaries: AUBC, final Dice and FG-Eff (definitions: shared/reference/evaluation.md)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FgEffFit", "aubc", "fg_eff_model", "final_dice", "fit_fg_eff", "fit_fg_eff_detailed"]


def aubc(dice: Sequence[float], x: Sequence[float] | None = None, x_range: tuple[float, float] | None = None) -> float:
    """Area under the budget curve (trapezoid rule) with x normalised to [0, 1].

    Default ``x`` = round index, so for 5 rounds AUBC = (½D0 + D1 + D2 + D3 + ½D4)/4. ``x`` may be any
    non-decreasing budget (e.g. annotated voxels); it is mapped linearly so that its first value is 0 and
    its last 1. A single point returns that value. NaN in ``dice`` propagates.

    ``x_range = (lo, hi)`` compares runs on one budget axis: the curve (Dice linearly interpolated between its
    points) is cut to ``[lo, hi]`` and that interval is mapped to [0, 1], so runs that spent their budget at
    different rates are measured over the same budget. The curve must cover the range (no extrapolation).
    """
    if x_range is not None:
        if x is None:
            raise ValueError("aubc: x_range needs x")
        lo, hi = (float(v) for v in x_range)
        xr = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(dice, dtype=np.float64).ravel()
        if xr.shape != y.shape or y.size < 2:
            raise ValueError(f"aubc: x has {xr.size} points and dice {y.size}; need two or more of each")
        if not (np.all(np.isfinite(xr)) and np.all(np.diff(xr) >= 0)):
            raise ValueError("aubc: x must be finite and non-decreasing")
        if not hi > lo or xr[0] > lo or xr[-1] < hi:
            raise ValueError(f"aubc: the curve spans [{xr[0]}, {xr[-1]}], which does not cover [{lo}, {hi}]")
        inside = (xr > lo) & (xr < hi)
        xs = np.concatenate([[lo], xr[inside], [hi]])
        ys = np.concatenate([[_interp(lo, xr, y, from_left=False)], y[inside], [_interp(hi, xr, y, from_left=True)]])
        return aubc(ys, xs)
    y = np.asarray(dice, dtype=np.float64).ravel()
    if y.size == 0:
        raise ValueError("aubc: empty curve")
    if y.size == 1:
        return float(y[0])
    if x is None:
        xs = np.linspace(0.0, 1.0, y.size)
    else:
        xr = np.asarray(x, dtype=np.float64).ravel()
        if xr.shape != y.shape:
            raise ValueError(f"aubc: x has {xr.size} points but dice has {y.size}")
        if not np.all(np.isfinite(xr)):
            raise ValueError("aubc: x must be finite")
        if np.any(np.diff(xr) < 0):
            raise ValueError("aubc: x must be non-decreasing")
        span = xr[-1] - xr[0]
        if span <= 0:
            raise ValueError("aubc: x spans zero width; cannot normalise to [0, 1]")
        xs = (xr - xr[0]) / span
    return float(np.sum((xs[1:] - xs[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _interp(at: float, x: np.ndarray, y: np.ndarray, from_left: bool) -> float:
    """Dice at budget ``at`` on the piecewise-linear curve. Where rounds share a budget (a vertical step: a round
    that cost nothing on this axis) the curve's limit from the left (the first of them: the end of a range) or
    from the right (the last: the start of a range)."""
    if from_left:
        i = int(np.searchsorted(x, at, side="left"))
        if x[i] == at or i == 0:
            return float(y[i])
        i -= 1
    else:
        i = int(np.searchsorted(x, at, side="right")) - 1
        if x[i] == at or i == len(x) - 1:
            return float(y[i])
    return float(y[i] + (y[i + 1] - y[i]) * (at - x[i]) / (x[i + 1] - x[i]))


def final_dice(curve: Sequence[float]) -> float:
    """The last round's figure of a learning curve."""
    y = np.asarray(curve, dtype=np.float64).ravel()
    if y.size == 0:
        raise ValueError("final_dice: empty curve")
    return float(y[-1])


def fg_eff_model(x: np.ndarray | float, b: float, c: float, x0: float, d0: float) -> np.ndarray:
    """Dice(x) = c − a·exp(−b·(x − x0)), a = c − d0."""
    return c - (c - d0) * np.exp(-b * (np.asarray(x, dtype=np.float64) - x0))


@dataclass(frozen=True)
class FgEffFit:
    """Result of the FG-Eff fit. ``b`` is NaN when the fit was not possible; ``reason`` says why."""

    b: float
    a: float
    b_stderr: float
    rmse: float
    n_points: int
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _nan_fit(a: float, n: int, reason: str) -> FgEffFit:
    return FgEffFit(b=float("nan"), a=a, b_stderr=float("nan"), rmse=float("nan"), n_points=n, reason=reason)


def fit_fg_eff_detailed(x: Sequence[float], dice: Sequence[float], c: float, x0: float, d0: float) -> FgEffFit:
    """Fit b >= 0 of Dice(x) = c − a·exp(−b·(x − x0)) with a = c − d0 fixed (nnActive FG-Eff).

    ``x`` = fraction of the pool's foreground annotated, pooled over all seeds and rounds of one strategy
    in one setting; ``c`` = full-data Dice; ``x0`` = starting budget's x; ``d0`` = Dice at x0. Points with
    non-finite x or Dice are dropped.
    """
    from scipy.optimize import curve_fit

    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(dice, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"fit_fg_eff: x has {xa.size} points but dice has {ya.size}")
    a = float(c) - float(d0)
    if not all(math.isfinite(v) for v in (c, x0, d0)):
        return _nan_fit(a, 0, "c, x0 and d0 must be finite")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    if a <= 0:
        return _nan_fit(a, n, f"a = c - d0 = {a:.4g} <= 0: starting Dice already at or above full-data Dice")
    informative = xa > x0
    if not np.any(informative):
        return _nan_fit(a, n, "no finite points with x > x0 (nothing beyond the starting budget)")

    def model(xv: np.ndarray, b: float) -> np.ndarray:
        return fg_eff_model(xv, b, c, x0, d0)

    # starting value: median of the per-point closed-form b where 0 < (c - dice)/a < 1
    ratio = (c - ya[informative]) / a
    ok = (ratio > 0) & (ratio < 1)
    if np.any(ok):
        b_guess = float(np.median(-np.log(ratio[ok]) / (xa[informative][ok] - x0)))
    else:
        b_guess = 1.0
    b_guess = max(b_guess, 1e-6)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, pcov = curve_fit(model, xa, ya, p0=[b_guess], bounds=([0.0], [np.inf]), maxfev=10000)
    except (RuntimeError, ValueError) as exc:  # no convergence / bad input
        return _nan_fit(a, n, f"curve_fit failed: {exc}")
    b = float(popt[0])
    if not math.isfinite(b):
        return _nan_fit(a, n, "curve_fit returned a non-finite b")
    stderr = float(np.sqrt(pcov[0, 0])) if np.all(np.isfinite(pcov)) else float("nan")
    rmse = float(np.sqrt(np.mean((model(xa, b) - ya) ** 2)))
    return FgEffFit(b=b, a=a, b_stderr=stderr, rmse=rmse, n_points=n)


def fit_fg_eff(x: Sequence[float], dice: Sequence[float], c: float, x0: float, d0: float) -> float:
    """FG-Eff = fitted b (see :func:`fit_fg_eff_detailed`); NaN plus a ``RuntimeWarning`` with the reason."""
    fit = fit_fg_eff_detailed(x, dice, c, x0, d0)
    if fit.reason is not None:
        warnings.warn(f"FG-Eff fit not possible: {fit.reason}", RuntimeWarning, stacklevel=2)
    return fit.b
