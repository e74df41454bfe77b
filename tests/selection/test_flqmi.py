"""FLQMI: objective, greedy maximisation (naive, stochastic, lazy), on-demand kernels, submodlib cross-check."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from alseg.selection.flqmi import (
    InnerProductKernel,
    cosine_kernel,
    cosine_similarity_matrix,
    flqmi_maximize,
    flqmi_select,
    flqmi_value,
    stochastic_sample_size,
)

HAS_SUBMODLIB = importlib.util.find_spec("submodlib") is not None


def random_problem(seed: int, n: int = 300, q: int = 40, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((q, d))


def clustered_pool(seed: int, sizes: tuple[int, ...] = (200, 100, 50, 30, 20), d: int = 16):
    """Well-separated Gaussian clusters (orthogonal directions, far from the origin) of unequal size."""
    rng = np.random.default_rng(seed)
    centres = 20.0 * np.eye(d)[: len(sizes)]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + rng.standard_normal((labels.size, d))
    return x, labels


def brute_force_cosine(pool: np.ndarray, query: np.ndarray) -> np.ndarray:
    p = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    return (p @ q.T + 1.0) / 2.0


# --------------------------------------------------------------------------- similarity
def test_cosine_matrix_matches_brute_force_and_lies_in_unit_interval() -> None:
    pool, query = random_problem(0)
    S = cosine_similarity_matrix(pool, query)
    assert S.dtype == np.float32 and S.shape == (300, 40)
    np.testing.assert_allclose(S, brute_force_cosine(pool, query), atol=1e-6)
    assert S.min() >= -1e-6 and S.max() <= 1 + 1e-6
    raw = cosine_similarity_matrix(pool, query, rescale=False)
    np.testing.assert_allclose(raw, 2 * brute_force_cosine(pool, query) - 1, atol=1e-6)


def test_kernel_rows_equal_dense_rows_and_zero_embedding_gives_half() -> None:
    pool, query = random_problem(1)
    pool[3] = 0.0
    kernel = cosine_kernel(pool, query)
    S = kernel.dense()
    idx = np.array([0, 3, 299])
    np.testing.assert_allclose(kernel.rows(idx), S[idx], atol=1e-6)
    np.testing.assert_allclose(S[3], 0.5, atol=1e-7)
    lo, hi = kernel.min_max()
    assert lo == pytest.approx(float(S.min()), abs=1e-6) and hi == pytest.approx(float(S.max()), abs=1e-6)


def test_bad_embeddings_are_rejected() -> None:
    pool, query = random_problem(2)
    with pytest.raises(ValueError, match="dimensions"):
        cosine_kernel(pool, query[:, :5])
    pool[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cosine_kernel(pool, query)


# --------------------------------------------------------------------------- objective and greedy
def test_value_of_known_small_case() -> None:
    S = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    # A = {0}: cover (0.9, 0.1) -> 1.0, modular 0.9
    assert flqmi_value(S, [0]) == pytest.approx(1.9)
    # A = {0, 1}: cover (0.9, 0.8) -> 1.7, modular 0.9 + 0.8
    assert flqmi_value(S, [0, 1], eta=2.0) == pytest.approx(1.7 + 2 * 1.7)
    assert flqmi_value(S, []) == 0.0
    sel, gains, value = flqmi_maximize(S, 2, method="naive")
    assert sel.tolist() == [0, 1]
    assert value == pytest.approx(1.9 + 1.5)
    np.testing.assert_allclose(gains, [1.9, 0.7 + 0.8])


def test_gains_sum_to_value_and_value_matches_evaluator() -> None:
    pool, query = random_problem(3)
    S = cosine_similarity_matrix(pool, query)
    for method, rng in (("naive", None), ("stochastic", np.random.default_rng(0))):
        sel, gains, value = flqmi_maximize(S, 15, eta=0.5, method=method, rng=rng)
        assert len(set(sel.tolist())) == 15
        assert value == pytest.approx(float(gains.sum()), rel=1e-6)
        assert value == pytest.approx(flqmi_value(S, sel, eta=0.5), rel=1e-6)
        assert np.all(np.diff(gains) <= 1e-6) or method == "stochastic"  # naive gains never increase


def test_naive_greedy_beats_random_subsets() -> None:
    pool, query = random_problem(4)
    S = cosine_similarity_matrix(pool, query)
    _, _, value = flqmi_maximize(S, 10, method="naive")
    rng = np.random.default_rng(0)
    best_random = max(flqmi_value(S, rng.choice(300, 10, replace=False)) for _ in range(200))
    assert value > best_random


def test_query_weights_equal_duplicated_columns() -> None:
    pool, query = random_problem(5, n=200, q=12)
    counts = np.array([1, 3, 1, 2, 1, 1, 5, 1, 1, 2, 1, 1])
    S = cosine_similarity_matrix(pool, query).astype(np.float64)
    S_dup = np.repeat(S, counts, axis=1)
    weighted = flqmi_maximize(S, 8, method="naive", query_weights=counts)
    expanded = flqmi_maximize(S_dup, 8, method="naive")
    assert weighted.selected.tolist() == expanded.selected.tolist()
    assert weighted.value == pytest.approx(expanded.value, rel=1e-12)
    assert flqmi_value(S, weighted.selected, query_weights=counts) == pytest.approx(weighted.value, rel=1e-12)


def test_same_seed_same_selection_different_seed_differs() -> None:
    pool, query = random_problem(6, n=2000, q=100, d=32)
    S = cosine_similarity_matrix(pool, query)
    runs = [flqmi_maximize(S, 10, rng=np.random.default_rng(seed)).selected.tolist() for seed in (7, 7, 8, 9, 10)]
    assert runs[0] == runs[1]
    assert any(r != runs[0] for r in runs[2:])


def test_stochastic_sample_size() -> None:
    assert stochastic_sample_size(100_000, 100, 0.01) == 4606
    assert stochastic_sample_size(50, 10, 0.01) == 24
    assert stochastic_sample_size(10, 1, 0.01) == 10  # capped at n


def test_lazy_and_plain_stochastic_greedy_agree_and_lazy_saves_rows() -> None:
    x, _ = clustered_pool(0, sizes=(800, 600, 400, 200, 100, 100, 50, 50), d=16)
    rng = np.random.default_rng(1)
    query = x[rng.choice(x.shape[0], 150, replace=False)]
    stats_lazy: dict[str, int] = {}
    stats_plain: dict[str, int] = {}
    lazy = flqmi_select(x, query, 20, rng=np.random.default_rng(3), stats=stats_lazy, max_dense_bytes=0)
    plain = flqmi_select(x, query, 20, rng=np.random.default_rng(3), lazy=False, stats=stats_plain)
    assert lazy.selected.tolist() == plain.selected.tolist()
    assert lazy.value == pytest.approx(plain.value, rel=1e-5)
    assert stats_lazy["rows_evaluated"] <= stats_plain["rows_evaluated"]


def test_on_demand_kernel_matches_dense_matrix() -> None:
    pool, query = random_problem(8, n=1500, q=60)
    dense = flqmi_select(pool, query, 12, rng=np.random.default_rng(0))
    on_demand = flqmi_select(pool, query, 12, rng=np.random.default_rng(0), max_dense_bytes=0)
    assert dense.selected.tolist() == on_demand.selected.tolist()
    np.testing.assert_allclose(dense.gains, on_demand.gains, rtol=1e-5)


def test_inner_product_kernel_folds_affine_rescaling() -> None:
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((30, 4)), rng.standard_normal((7, 4))
    k = InnerProductKernel.from_embeddings(p, q, scale=0.25, offset=0.3)
    np.testing.assert_allclose(k.dense(), 0.25 * p @ q.T + 0.3, atol=1e-5)


@pytest.mark.parametrize("method", ["naive", "stochastic"])
def test_flqmi_covers_every_cluster(method: str) -> None:
    x, labels = clustered_pool(0)
    rng = np.random.default_rng(0)
    # a query set drawn from every cluster, as many from the big ones as from the small ones
    query_idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), 4, replace=False) for c in range(5)])
    for budget in (5, 8):
        sel, _, _ = flqmi_select(x, x[query_idx], budget, method=method, rng=np.random.default_rng(1))
        assert set(labels[sel].tolist()) == set(range(5)), (budget, labels[sel])


def test_argument_errors() -> None:
    S = np.random.default_rng(0).random((10, 3))
    with pytest.raises(ValueError, match="budget"):
        flqmi_maximize(S, 11, method="naive")
    with pytest.raises(ValueError, match="Generator"):
        flqmi_maximize(S, 2)
    with pytest.raises(ValueError, match="eta"):
        flqmi_maximize(S, 2, eta=-1.0, method="naive")
    with pytest.raises(ValueError, match="method"):
        flqmi_maximize(S, 2, method="lazy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query_weights"):
        flqmi_maximize(S, 2, method="naive", query_weights=np.ones(4))
    bad = S.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        flqmi_maximize(bad, 2, method="naive")
    assert flqmi_maximize(S, 0, method="naive").selected.size == 0


# --------------------------------------------------------------------------- reference implementation
@pytest.mark.skipif(not HAS_SUBMODLIB, reason="submodlib (submodlib-py) is not installed")
@pytest.mark.parametrize(("seed", "eta"), [(0, 1.0), (1, 1.0), (2, 0.5)])
def test_naive_greedy_matches_submodlib(seed: int, eta: float) -> None:
    from submodlib import FacilityLocationVariantMutualInformationFunction

    pool, query = random_problem(seed)
    S = cosine_similarity_matrix(pool, query)  # float32: both sides see the same numbers
    fn = FacilityLocationVariantMutualInformationFunction(n=300, num_queries=40, query_sijs=S, queryDiversityEta=eta)
    ref = fn.maximize(
        budget=25, optimizer="NaiveGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, show_progress=False
    )
    ref_sel = [int(i) for i, _ in ref]
    ref_gains = np.array([g for _, g in ref])
    sel, gains, value = flqmi_maximize(S, 25, eta=eta, method="naive")
    assert sel.tolist() == ref_sel
    np.testing.assert_allclose(gains, ref_gains, atol=1e-6)
    ours_on_ref = flqmi_value(S, ref_sel, eta=eta)
    assert abs(ours_on_ref - float(ref_gains.sum())) < 1e-6
    assert abs(value - ours_on_ref) < 1e-6
    assert abs(fn.evaluate(set(ref_sel)) - value) < 1e-6
