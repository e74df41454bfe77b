from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from alseg.evaluation.stats import (
    friedman_nemenyi,
    mean_std_table,
    paired_test,
    pairwise_penalty_matrix,
    pairwise_penalty_tests,
    strategy_setting_scores,
)

SEEDS = [0, 1, 2, 3, 4]
# large between-seed differences (starting budgets differ) so that only seed pairing detects small gaps
SEED_EFFECT = {0: 0.10, 1: 0.30, 2: 0.50, 3: 0.20, 4: 0.40}
JITTER = {0: 0.004, 1: -0.003, 2: 0.001, 3: -0.004, 4: 0.002}  # mean 0
ZERO_MEAN = {0: 0.002, 1: -0.002, 2: 0.001, 3: -0.001, 4: 0.0}  # exactly mean 0 differences


def synthetic_runs(setting: str = "s1", n_budgets: int = 4) -> list[dict]:
    """A beats B and C by 0.05 at every budget; B and C tie (zero-mean differences);
    D is 0.05 below B and C at the first half of the budgets only."""
    rows = []
    for b in range(n_budgets):
        for s in SEEDS:
            base = SEED_EFFECT[s] + 0.1 * b
            rows += [
                {
                    "strategy": "A",
                    "seed": s,
                    "setting": setting,
                    "budget": b,
                    "dice": base + 0.05 + JITTER[s],
                },
                {"strategy": "B", "seed": s, "setting": setting, "budget": b, "dice": base},
                {"strategy": "C", "seed": s, "setting": setting, "budget": b, "dice": base + ZERO_MEAN[s]},
                {
                    "strategy": "D",
                    "seed": s,
                    "setting": setting,
                    "budget": b,
                    "dice": base - (0.05 if b < n_budgets // 2 else 0.0) + JITTER[s] * 0.1,
                },
            ]
    return rows


def test_ppm_marks_constructed_wins():
    matrix, phi = pairwise_penalty_matrix(synthetic_runs())
    expected = pd.DataFrame(
        [
            [0, 1, 1, 1],  # A beats everyone at all 4 budgets
            [0, 0, 0, 0.5],  # B beats D at 2 of 4 budgets
            [0, 0, 0, 0.5],  # C beats D at 2 of 4 budgets
            [0, 0, 0, 0],
        ],
        index=list("ABCD"),
        columns=list("ABCD"),
        dtype=float,
    )
    np.testing.assert_allclose(matrix.to_numpy(), expected.to_numpy())
    assert list(matrix.index) == list("ABCD")
    # Φ_j = mean over i != j of column j
    np.testing.assert_allclose(phi.to_numpy(), [0.0, 1 / 3, 1 / 3, 2 / 3])
    # the Holm variant still finds these (all p-values are tiny)
    m_holm, _ = pairwise_penalty_matrix(synthetic_runs(), correction="holm")
    np.testing.assert_allclose(m_holm.to_numpy(), expected.to_numpy())


def test_ppm_pairs_by_seed_value_not_row_order():
    rows = synthetic_runs()
    # A's rows sorted by seed ascending, B's descending: row-order pairing would mix seeds
    a = sorted([r for r in rows if r["strategy"] == "A" and r["budget"] == 0], key=lambda r: r["seed"])
    b = sorted([r for r in rows if r["strategy"] == "B" and r["budget"] == 0], key=lambda r: -r["seed"])
    row_order_p = stats.ttest_rel([r["dice"] for r in a], [r["dice"] for r in b]).pvalue
    assert row_order_p > 0.05  # row-order pairing would see no significant difference
    by_seed_p = stats.ttest_rel([r["dice"] for r in a], [r["dice"] for r in sorted(b, key=lambda r: r["seed"])]).pvalue
    assert by_seed_p < 1e-4

    reordered = [r for r in rows if r["strategy"] != "B"] + list(reversed([r for r in rows if r["strategy"] == "B"]))
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    reference, _ = pairwise_penalty_matrix(rows)
    for variant in (reordered, shuffled, pd.DataFrame(shuffled)):
        m, _ = pairwise_penalty_matrix(variant)
        pd.testing.assert_frame_equal(m, reference)
    assert reference.loc["A", "B"] == 1.0


def test_ppm_only_common_seeds_are_paired():
    rows = synthetic_runs(n_budgets=1)
    # an extra seed for A alone, terrible: must be ignored when pairing with the others
    rows.append({"strategy": "A", "seed": 99, "setting": "s1", "budget": 0, "dice": -5.0})
    tests = pairwise_penalty_tests(rows)
    ab = tests[(tests.strategy_i == "A") & (tests.strategy_j == "B")].iloc[0]
    assert ab["n"] == 5
    assert ab["mean_diff"] == pytest.approx(0.05)
    assert ab["winner"] == "A"
    m, _ = pairwise_penalty_matrix(rows)
    assert m.loc["A", "B"] == 1.0
    with pytest.raises(ValueError, match="duplicate"):
        pairwise_penalty_matrix([*rows, rows[0]])


def test_ppm_settings_merge_by_averaging():
    s1 = synthetic_runs("s1")
    s2 = [dict(r, setting="s2", dice=r["dice"] if r["strategy"] != "A" else r["dice"] - 0.05) for r in s1]
    m, _ = pairwise_penalty_matrix(s1 + s2)
    assert m.loc["A", "B"] == pytest.approx(0.5)  # 1 in s1, 0 in s2 (A ~ B there)
    assert m.loc["B", "D"] == pytest.approx(0.5)  # 0.5 in both


def test_holm_never_more_permissive():
    rng = np.random.default_rng(42)
    for rep in range(5):
        rows = []
        strategies = [f"S{k}" for k in range(5)]
        gaps = rng.normal(0, 0.02, len(strategies))
        for setting in ("x", "y"):
            for b in range(6):
                for s in range(5):
                    seed_eff = rng.normal(0, 0.1)
                    for k, name in enumerate(strategies):
                        d = 0.5 + seed_eff + gaps[k] + rng.normal(0, 0.01)
                        rows.append({"strategy": name, "seed": s, "setting": setting, "budget": b, "dice": d})
        plain, phi_plain = pairwise_penalty_matrix(rows, correction="none")
        holm, phi_holm = pairwise_penalty_matrix(rows, correction="holm")
        assert (holm.to_numpy() <= plain.to_numpy() + 1e-12).all(), rep
        assert (phi_holm.to_numpy() <= phi_plain.to_numpy() + 1e-12).all()
        t_plain = pairwise_penalty_tests(rows, correction="none")
        t_holm = pairwise_penalty_tests(rows, correction="holm")
        assert (t_holm["pvalue_adj"] >= t_plain["pvalue_adj"] - 1e-15).all()
        assert not (t_holm["winner"].notna() & t_plain["winner"].isna()).any()


def test_paired_test_by_seed():
    x = {3: 1.0, 1: 2.0, 2: 3.5}
    y = pd.Series({1: 1.5, 2: 3.0, 3: 0.4, 7: 9.0})
    t = paired_test(x, y)
    assert t.n == 3 and t.seeds == (1, 2, 3)
    assert t.mean_diff == pytest.approx(np.mean([0.5, 0.5, 0.6]))
    assert t.pvalue == pytest.approx(stats.ttest_rel([2.0, 3.5, 1.0], [1.5, 3.0, 0.4]).pvalue)
    assert math.isnan(paired_test({1: 1.0}, {1: 0.0}).pvalue)  # one pair
    assert math.isnan(paired_test({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0}).pvalue)  # identical


def test_friedman_nemenyi_clear_ordering():
    rng = np.random.default_rng(0)
    settings = [f"set{k}" for k in range(8)]
    base = rng.uniform(0.5, 0.8, len(settings))
    scores = pd.DataFrame(
        [base + 0.09, base + 0.06, base + 0.03, base],
        index=["best", "second", "third", "worst"],
        columns=settings,
    )
    res = friedman_nemenyi(scores)
    # rank sums 8, 16, 24, 32 with n=8, k=4: 12/(n k (k+1)) * sum R^2 - 3 n (k+1) = 24
    assert res.statistic == pytest.approx(24.0)
    assert res.pvalue < 1e-3
    np.testing.assert_allclose(res.mean_ranks.to_numpy(), [1, 2, 3, 4])
    assert list(res.nemenyi.index) == ["best", "second", "third", "worst"]
    assert res.nemenyi.loc["best", "worst"] < 0.05
    assert res.nemenyi.loc["best", "second"] > 0.05
    np.testing.assert_allclose(res.nemenyi.to_numpy(), res.nemenyi.to_numpy().T)
    assert res.n_settings == 8
    # lower-is-better flips the ranks; nested mapping input works
    nested = {s: scores.loc[s].to_dict() for s in scores.index}
    res_low = friedman_nemenyi(nested, higher_is_better=False)
    np.testing.assert_allclose(res_low.mean_ranks.to_numpy(), [4, 3, 2, 1])
    # incomplete settings are dropped with a warning
    scores.loc["worst", "set0"] = np.nan
    with pytest.warns(RuntimeWarning, match="dropping"):
        assert friedman_nemenyi(scores).n_settings == 7


def test_strategy_setting_scores():
    rows = [
        {"strategy": "A", "seed": 0, "setting": "x", "aubc": 0.5},
        {"strategy": "A", "seed": 1, "setting": "x", "aubc": 0.7},
        {"strategy": "B", "seed": 0, "setting": "x", "aubc": 0.4},
    ]
    t = strategy_setting_scores(rows, "aubc")
    assert t.loc["A", "x"] == pytest.approx(0.6)
    assert t.loc["B", "x"] == pytest.approx(0.4)


def test_mean_std_table():
    rows = []
    for s in SEEDS:
        rows.append({"strategy": "random", "seed": s, "setting": "x", "dice": SEED_EFFECT[s]})
        rows.append({"strategy": "better", "seed": s, "setting": "x", "dice": SEED_EFFECT[s] + 0.03 + JITTER[s]})
        rows.append({"strategy": "same", "seed": s, "setting": "x", "dice": SEED_EFFECT[s] + ZERO_MEAN[s]})
    rows = [rows[i] for i in np.random.default_rng(3).permutation(len(rows))]
    table = {r["strategy"]: r for r in mean_std_table(rows, "dice", baseline="random")}
    assert next(iter(table)) == "random"
    base_vals = list(SEED_EFFECT.values())
    assert table["random"]["mean"] == pytest.approx(np.mean(base_vals))
    assert table["random"]["std"] == pytest.approx(np.std(base_vals, ddof=1))
    assert table["random"]["n"] == 5
    assert not table["random"]["significant"] and math.isnan(table["random"]["p_value"])
    assert table["better"]["significant"] and table["better"]["p_value"] < 1e-3
    assert table["better"]["mean_diff"] == pytest.approx(0.03)
    assert table["better"]["n_paired"] == 5
    assert not table["same"]["significant"]
    assert table["same"]["setting"] == "x"
    with pytest.raises(ValueError, match="duplicate"):
        mean_std_table([*rows, rows[0]], "dice", baseline="random")
