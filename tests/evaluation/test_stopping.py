"""The stopping signals and rule (alseg.evaluation.stopping) on hand-made inputs with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alseg.evaluation.curves import fg_eff_model
from alseg.evaluation.stopping import (
    CONTINUE,
    STOP,
    PooledAgreement,
    case_dice_matrix,
    dice_gains,
    draw_stop_set,
    fit_saturation,
    normalised_entropy_sum,
    recommend,
    saturation_interval,
)


# --------------------------------------------------------------------------- stability
def _two_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    # case 1: class 1 at {0, 1} vs {0}; class 2 at {2} vs {2, 3}
    a1, b1 = np.array([[1, 1, 2, 0]]), np.array([[1, 0, 2, 2]])
    # case 2: class 1 everywhere in both; no class 2
    a2, b2 = np.ones((1, 4), dtype=np.uint8), np.ones((1, 4), dtype=np.uint8)
    return [(a1, b1), (a2, b2)]


def test_stability_is_pooled_over_cases_per_class() -> None:
    agree = PooledAgreement((1, 2, 3))
    for a, b in _two_cases():
        agree.add(a, b)
    per_class = agree.per_class()
    # class 1: intersections 1 + 4, sizes (2 + 1) + (4 + 4) -> 2 * 5 / 11 (the mean of per-case Dice would be 0.833)
    assert per_class[1] == pytest.approx(10 / 11)
    # class 2: intersection 1, sizes 1 + 2 -> 2 / 3
    assert per_class[2] == pytest.approx(2 / 3)
    # class 3: empty in both segmentations of every case -> 1
    assert per_class[3] == 1.0
    assert agree.mean() == pytest.approx((10 / 11 + 2 / 3 + 1.0) / 3)
    assert agree.n_cases == 2 and agree.n_voxels == 8


def test_stability_leaves_masked_voxels_out() -> None:
    agree = PooledAgreement((1, 2))
    (a1, b1), (a2, b2) = _two_cases()
    keep1 = np.array([[True, True, True, False]])  # voxel 3 (class 2 in b only) annotated: left out
    agree.add(a1, b1, keep1)
    agree.add(a2, b2, np.zeros((1, 4), dtype=bool))  # case 2 fully annotated: nothing counts
    assert agree.per_class() == {1: pytest.approx(2 / 3), 2: 1.0}
    assert agree.n_voxels == 3
    with pytest.raises(ValueError, match="one shape"):
        agree.add(a1, b1[:, :3])


def test_normalised_entropy() -> None:
    uniform = np.full((2, 4, 3, 3), 0.25, dtype=np.float32)
    total, n = normalised_entropy_sum(uniform)
    assert n == 9 and total / n == pytest.approx(1.0, abs=1e-6)
    onehot = np.zeros((1, 4, 3, 3), dtype=np.float32)
    onehot[0, 2] = 1
    assert normalised_entropy_sum(onehot) == (0.0, 9)
    keep = np.zeros((3, 3), dtype=bool)
    keep[0, :2] = True
    half = np.full((1, 2, 3, 3), 0.5, dtype=np.float32)
    total, n = normalised_entropy_sum(half, keep)
    assert n == 2 and total == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="mask"):
        normalised_entropy_sum(half, keep[:2])


# --------------------------------------------------------------------------- the rule
def test_rule_needs_patience_consecutive_rounds_at_the_threshold() -> None:
    stab = [None, 0.95, 0.98, 0.97, 0.96, 0.99, 0.975, None, 0.99, 0.991]
    recs = recommend(stab, threshold=0.97, patience=2)
    assert [r.stop for r in recs] == [False, False, False, True, False, False, True, False, False, True]
    assert [r.text for r in recs[2:4]] == [CONTINUE, STOP]
    assert recs[1].rule == "stability 0.950 < 0.97"
    assert recs[2].rule == "stability 0.980 ≥ 0.97 for 1 of 2 rounds"
    assert recs[3].rule == "stability 0.970 ≥ 0.97 for 2 rounds (patience 2)"  # equal to the threshold counts
    assert "no stability" in recs[0].rule and "no stability" in recs[7].rule
    assert [r.stop for r in recommend(stab, threshold=0.97, patience=1)] == [s is not None and s >= 0.97 for s in stab]
    assert not any(r.stop for r in recommend(stab, threshold=0.995, patience=1))
    with pytest.raises(ValueError, match="patience"):
        recommend(stab, 0.97, 0)


def test_dice_gains_skip_missing_rounds() -> None:
    gains = dice_gains([0.5, None, 0.6, 0.65, float("nan"), 0.64])
    assert gains[:2] == [None, None]
    assert gains[2] == pytest.approx(0.1) and gains[3] == pytest.approx(0.05)
    assert gains[4] is None and gains[5] == pytest.approx(-0.01)


def test_stop_set_draw_is_seeded_and_sorted() -> None:
    pool = [f"case_{i:02d}" for i in range(30)]
    a = draw_stop_set(pool, 5, np.random.default_rng(3))
    assert a == draw_stop_set(pool[::-1], 5, np.random.default_rng(3))  # the pool's order does not matter
    assert a == sorted(a) and len(set(a)) == 5 and set(a) <= set(pool)
    assert a != draw_stop_set(pool, 5, np.random.default_rng(4))
    assert draw_stop_set(pool[:4], 5, np.random.default_rng(3)) == pool[:4]


# --------------------------------------------------------------------------- the 95% budget
X = [0.02, 0.05, 0.08, 0.11, 0.14]


def test_x95_recovers_a_known_curve() -> None:
    b, c, d0 = 25.0, 0.86, 0.70
    dice = fg_eff_model(np.array(X), b, c, X[0], d0)
    fit = fit_saturation(X, list(dice))
    assert fit.ok and fit.n_points == 5
    assert fit.b == pytest.approx(b, rel=1e-3) and fit.c == pytest.approx(c, abs=1e-4)
    assert fit.x95 == pytest.approx(X[0] + math.log(20) / b, rel=1e-3)
    # 95% of the way from d0 to c at x95
    assert fg_eff_model(fit.x95, b, c, X[0], d0) == pytest.approx(d0 + 0.95 * (c - d0))
    # a slower curve (its x95 beyond the last budget) is recovered too
    slow = fg_eff_model(np.array(X), 8.0, 0.9, X[0], d0)
    fit = fit_saturation(X, list(slow))
    assert fit.x95 == pytest.approx(X[0] + math.log(20) / 8.0, rel=1e-2) and fit.x95 > X[-1]
    assert fit.to_json(X[-1])["beyond_observed"] is True


def test_x95_is_none_with_a_reason() -> None:
    assert "at least 3" in (fit_saturation(X[:2], [0.7, 0.8]).reason or "")
    flat = fit_saturation(X, [0.8] * 5)
    assert flat.x95 is None and "flat" in (flat.reason or "")
    falling = fit_saturation(X, [0.8, 0.78, 0.75, 0.7, 0.69])
    assert falling.x95 is None and falling.reason
    no_budget = fit_saturation([None] * 5, [0.7, 0.75, 0.8, 0.82, 0.83])
    assert no_budget.x95 is None and "at least 3" in (no_budget.reason or "")
    same_x = fit_saturation([0.1] * 5, [0.7, 0.75, 0.8, 0.82, 0.83])
    assert same_x.x95 is None and "round 0" in (same_x.reason or "")


def _noisy_cases(seed: int = 0, n_cases: int = 30) -> np.ndarray:
    curve = fg_eff_model(np.array(X), 25.0, 0.86, X[0], 0.70)
    rng = np.random.default_rng(seed)
    per_case = curve[:, None] + rng.normal(0.0, 0.04, size=(len(X), n_cases)) + rng.normal(0, 0.05, size=n_cases)
    per_case[2, n_cases - 1] = np.nan  # an undefined Dice is left out of that round's mean
    return per_case


def test_bootstrap_interval_contains_the_estimate_and_is_seeded() -> None:
    cases = _noisy_cases()
    fit = fit_saturation(X, list(np.nanmean(cases, axis=1)))
    assert fit.ok
    iv = saturation_interval(X, cases, 200, np.random.default_rng(7), start=(fit.b, fit.c))
    assert iv.reason is None and iv.n_fitted >= 100 and iv.n_resamples == 200
    assert iv.low < fit.x95 < iv.high
    again = saturation_interval(X, cases, 200, np.random.default_rng(7), start=(fit.b, fit.c))
    assert (again.low, again.high) == (iv.low, iv.high)
    other = saturation_interval(X, cases, 200, np.random.default_rng(8), start=(fit.b, fit.c))
    assert (other.low, other.high) != (iv.low, iv.high)


def test_bootstrap_without_enough_cases_says_why() -> None:
    one = saturation_interval(X, _noisy_cases(n_cases=1), 50, np.random.default_rng(0))
    assert one.low is None and "1 held-out case" in (one.reason or "")
    flat = saturation_interval(X, np.full((5, 10), 0.8), 20, np.random.default_rng(0))
    assert flat.low is None and "0 of 20" in (flat.reason or "")
    with pytest.raises(ValueError, match="n_rounds=5"):
        saturation_interval(X, np.zeros((4, 3)), 10, np.random.default_rng(0))


def test_case_dice_matrix_aligns_cases_by_id() -> None:
    m = case_dice_matrix([{"b": 0.5, "a": 0.1}, {"a": 0.2, "c": None}])
    assert m.shape == (2, 3)
    np.testing.assert_array_equal(m[0], [0.1, 0.5, np.nan])
    np.testing.assert_array_equal(m[1], [0.2, np.nan, np.nan])
