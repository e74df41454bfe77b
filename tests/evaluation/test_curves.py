from __future__ import annotations

import math

import numpy as np
import pytest

from alseg.evaluation.curves import aubc, fg_eff_model, final_dice, fit_fg_eff, fit_fg_eff_detailed


def test_aubc_constant_curve():
    assert aubc([0.7] * 5) == pytest.approx(0.7)
    assert aubc([0.7] * 3, x=[10, 250, 1000]) == pytest.approx(0.7)


def test_aubc_five_rounds_formula():
    d = [0.2, 0.5, 0.6, 0.65, 0.7]
    expected = (0.5 * d[0] + d[1] + d[2] + d[3] + 0.5 * d[4]) / 4
    assert aubc(d) == pytest.approx(expected)
    # x = round index given explicitly (any offset/scale) gives the same
    assert aubc(d, x=[3, 4, 5, 6, 7]) == pytest.approx(expected)


def test_aubc_uneven_x_and_edge_cases():
    # x normalised to [0, 1]: points at 0, 0.25, 1
    assert aubc([0.0, 1.0, 1.0], x=[100, 200, 500]) == pytest.approx(0.25 * 0.5 + 0.75 * 1.0)
    assert aubc([0.42]) == 0.42
    assert math.isnan(aubc([0.1, float("nan"), 0.3]))
    with pytest.raises(ValueError):
        aubc([])
    with pytest.raises(ValueError):
        aubc([0.1, 0.2], x=[1, 1])
    with pytest.raises(ValueError):
        aubc([0.1, 0.2], x=[2, 1])
    with pytest.raises(ValueError):
        aubc([0.1, 0.2], x=[1, 2, 3])


def test_final_dice():
    assert final_dice([0.1, 0.5, 0.8]) == 0.8
    with pytest.raises(ValueError):
        final_dice([])


C, X0, D0 = 0.89, 0.02, 0.55


def _data(b: float, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # 5 seeds x 6 rounds with slightly different x per seed
    x = np.concatenate([np.linspace(X0, 0.4, 6) + rng.uniform(0, 0.01, 6) for _ in range(5)])
    x[::6] = X0
    y = fg_eff_model(x, b, C, X0, D0) + noise * rng.standard_normal(x.size)
    return x, y


@pytest.mark.parametrize("b_true", [3.0, 12.0, 40.0])
def test_fg_eff_recovers_b_noise_free(b_true):
    x, y = _data(b_true, 0.0, np.random.default_rng(0))
    assert fit_fg_eff(x, y, C, X0, D0) == pytest.approx(b_true, rel=1e-6)


@pytest.mark.parametrize("b_true", [3.0, 12.0])
def test_fg_eff_recovers_b_small_noise(b_true):
    x, y = _data(b_true, 0.001, np.random.default_rng(1))
    fit = fit_fg_eff_detailed(x, y, C, X0, D0)
    assert fit.ok
    assert fit.b == pytest.approx(b_true, rel=0.01)
    assert fit.n_points == x.size
    assert fit.rmse < 0.003


def test_fg_eff_degenerate_inputs():
    x, y = _data(5.0, 0.0, np.random.default_rng(2))
    with pytest.warns(RuntimeWarning, match="a = c - d0"):
        assert math.isnan(fit_fg_eff(x, y, c=0.5, x0=X0, d0=0.6))
    with pytest.warns(RuntimeWarning, match="x > x0"):
        assert math.isnan(fit_fg_eff([X0, X0], [D0, D0], C, X0, D0))
    fit = fit_fg_eff_detailed([float("nan")], [0.7], C, X0, D0)
    assert not fit.ok and math.isnan(fit.b)
    # a flat curve at d0 gives b = 0 (never negative)
    assert fit_fg_eff([0.1, 0.2, 0.3], [D0 - 0.01] * 3, C, X0, D0) == pytest.approx(0.0, abs=1e-8)


def test_aubc_over_a_shared_budget_range():
    # the curve 0.2 -> 0.6 -> 0.8 at 0, 100, 300 cut to [50, 200]: Dice 0.4 at 50, 0.6 at 100, 0.7 at 200
    expected = (50 * (0.4 + 0.6) / 2 + 100 * (0.6 + 0.7) / 2) / 150
    assert aubc([0.2, 0.6, 0.8], x=[0, 100, 300], x_range=(50, 200)) == pytest.approx(expected)
    # the whole span as the range is the plain AUBC
    assert aubc([0.2, 0.6, 0.8], x=[0, 100, 300], x_range=(0, 300)) == pytest.approx(
        aubc([0.2, 0.6, 0.8], [0, 100, 300])
    )
    # a run that spent twice the budget per round scores lower over the same budget
    cheap = aubc([0.2, 0.6, 0.8], x=[0, 100, 200], x_range=(0, 200))
    dear = aubc([0.2, 0.6, 0.8], x=[0, 200, 400], x_range=(0, 200))
    assert cheap > dear
    assert dear == pytest.approx((0.2 + 0.6) / 2)
    # a round that cost nothing (a vertical step): the area is the curve's, whichever end of the range it is at
    assert aubc([0.2, 0.5, 0.9], x=[0, 100, 100], x_range=(0, 100)) == pytest.approx((0.2 + 0.5) / 2)
    assert aubc([0.2, 0.5, 0.9], x=[0, 100, 100], x_range=(0, 100)) == pytest.approx(
        aubc([0.2, 0.5, 0.9], [0, 100, 100])
    )
    assert aubc([0.2, 0.5, 0.9], x=[0, 0, 100], x_range=(0, 100)) == pytest.approx((0.5 + 0.9) / 2)
    steps = aubc([0.2, 0.4, 0.6, 0.9], x=[0, 100, 100, 200], x_range=(50, 150))
    assert steps == pytest.approx((50 * (0.3 + 0.4) / 2 + 50 * (0.6 + 0.75) / 2) / 100)
    with pytest.raises(ValueError, match="does not cover"):
        aubc([0.2, 0.6], x=[0, 100], x_range=(0, 150))
    with pytest.raises(ValueError, match="does not cover"):
        aubc([0.2, 0.6], x=[10, 100], x_range=(0, 100))
    with pytest.raises(ValueError, match="needs x"):
        aubc([0.2, 0.6], x_range=(0, 1))
