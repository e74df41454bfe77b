"""USIM pieces: query-set size, query set, projections, Fisher kernel, and the whole selection."""

from __future__ import annotations

import numpy as np
import pytest

from alseg.selection.flqmi import flqmi_value
from alseg.selection.usim import (
    empirical_fisher_diagonal,
    fisher_kernel,
    fisher_kernel_similarity,
    fisher_parameter_subset,
    make_projection,
    project_embeddings,
    query_set_size,
    sample_query_set,
    select_usim,
)


# --------------------------------------------------------------------------- query-set size
def test_knee_on_synthetic_elbow_curve() -> None:
    u = np.concatenate([np.linspace(1.0, 0.9, 50), np.linspace(0.1, 0.0, 950)])
    assert abs(query_set_size(u, query_size=2, pool_size=1000) - 50) <= 2
    assert query_set_size(u, query_size=20, pool_size=1000) == 100  # floor 5 · query_size wins
    u_exp = np.exp(-np.arange(1000) / 30.0)
    assert 60 <= query_set_size(u_exp, query_size=1, pool_size=1000) <= 160


def test_no_knee_gives_floor_and_cap_applies() -> None:
    assert query_set_size(np.linspace(1.0, 0.0, 500), query_size=7) == 35  # straight line: no knee
    assert query_set_size(np.ones(500), query_size=7) == 35  # flat: no knee
    assert query_set_size(np.array([1.0, 0.5]), query_size=7) == 2  # capped at the pool size
    assert query_set_size(np.linspace(1.0, 0.0, 50), query_size=30, pool_size=50) == 50


def test_query_set_size_rejects_unsorted() -> None:
    with pytest.raises(ValueError, match="descending"):
        query_set_size(np.array([0.1, 0.5, 0.2]), query_size=1)


# --------------------------------------------------------------------------- query set
def test_query_set_draws_proportional_to_uncertainty() -> None:
    u = np.array([0.0, 1.0, 3.0, 0.0, 6.0])
    idx, counts = sample_query_set(u, 10_000, np.random.default_rng(0))
    assert counts.sum() == 10_000 and np.all(np.diff(idx) > 0)
    assert set(idx.tolist()) == {1, 2, 4}  # zero uncertainty is never drawn
    np.testing.assert_allclose(counts / 10_000, [0.1, 0.3, 0.6], atol=0.02)
    a = sample_query_set(u, 50, np.random.default_rng(1))
    b = sample_query_set(u, 50, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    idx0, counts0 = sample_query_set(np.zeros(4), 400, np.random.default_rng(2))  # all zero: uniform
    assert idx0.tolist() == [0, 1, 2, 3] and counts0.min() > 50
    with pytest.raises(ValueError, match="non-negative"):
        sample_query_set(np.array([1.0, -1.0]), 3, np.random.default_rng(0))


# --------------------------------------------------------------------------- projections
def test_projection_is_seeded_and_consistent() -> None:
    rng = np.random.default_rng(0)
    g = rng.standard_normal((20, 500))
    a = project_embeddings(g, max_dim=64, rng=np.random.default_rng(3))
    b = project_embeddings(g, max_dim=64, rng=np.random.default_rng(3))
    assert a.shape == (20, 64) and np.array_equal(a, b)
    assert project_embeddings(g, max_dim=1000).shape == (20, 500)  # short enough: unchanged
    gauss = make_projection(500, 400, np.random.default_rng(4), method="gaussian")
    full, half = gauss.apply(g), gauss.apply(g[:10])
    np.testing.assert_allclose(full[:10], half, rtol=1e-5, atol=1e-5)  # same map whatever the row count
    # a Gaussian projection roughly preserves inner products
    ip, ip_proj = g @ g.T, full.astype(np.float64) @ full.T.astype(np.float64)
    assert np.corrcoef(ip.ravel(), ip_proj.ravel())[0, 1] > 0.9


# --------------------------------------------------------------------------- Fisher kernel
def test_fisher_kernel_matches_formula_and_is_min_max_rescaled() -> None:
    rng = np.random.default_rng(0)
    gp = rng.standard_normal((40, 12)) * np.linspace(0.1, 3, 12)
    gq = gp[[1, 5, 9, 30]]
    f = empirical_fisher_diagonal(gq)
    np.testing.assert_allclose(f, (gq**2).mean(axis=0))
    S = fisher_kernel_similarity(gp, gq, f, damping=1e-3)
    raw = gp @ np.diag(1.0 / (f + 1e-3 * f.mean())) @ gq.T
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(S, expected, atol=1e-5)
    assert S.min() == pytest.approx(0.0, abs=1e-6) and S.max() == pytest.approx(1.0, abs=1e-6)
    k = fisher_kernel(gp, gq, f)
    np.testing.assert_allclose(k.rows(np.array([1, 2])), S[[1, 2]], atol=1e-6)


def test_fisher_parameter_subset_prefers_large_fisher() -> None:
    f = np.concatenate([np.full(900, 1e-3), np.full(100, 1.0), np.zeros(10)])
    picked = fisher_parameter_subset(f, 100, np.random.default_rng(0))
    assert picked.size == 100 and np.all(np.diff(picked) > 0)
    assert np.mean(picked >= 900) > 0.8 and not np.any(picked >= 1000)
    assert fisher_parameter_subset(np.array([0.0, 2.0, 1.0]), 5, np.random.default_rng(0)).tolist() == [1, 2]


# --------------------------------------------------------------------------- whole selection
def redundant_pool(seed: int, n_dup: int = 200, n_diverse: int = 300, d: int = 32):
    """One embedding copied ``n_dup`` times with high uncertainty, plus diverse items (seed 001, Appendix E)."""
    rng = np.random.default_rng(seed)
    dup = np.repeat(rng.standard_normal((1, d)), n_dup, axis=0)
    diverse = rng.standard_normal((n_diverse, d))
    emb = np.vstack([dup, diverse])
    u = np.concatenate([np.full(n_dup, 0.9), rng.uniform(0.2, 0.6, n_diverse)])
    return emb, u


@pytest.mark.parametrize("similarity", ["cosine", "fisher"])
def test_usim_is_robust_to_redundancy(similarity: str) -> None:
    emb, u = redundant_pool(0)
    res = select_usim(emb, u, query_size=20, rng=np.random.default_rng(1), similarity=similarity)
    assert res.selected.size == 20 and len(set(res.selected.tolist())) == 20
    usim_dups = int(np.sum(res.selected < 200))
    # baseline: the batch drawn uniformly from the query set (a multiset drawn ∝ u)
    draws = np.repeat(res.query_indices, res.query_counts)
    share = float(np.mean(draws < 200))
    assert share > 0.4  # the query set is dominated by the duplicate
    rng = np.random.default_rng(2)
    baseline = [int(np.sum(rng.choice(draws, 20, replace=False) < 200)) for _ in range(50)]
    assert usim_dups <= 2 < np.mean(baseline) / 4, (usim_dups, np.mean(baseline))


def test_usim_deterministic_and_seed_dependent() -> None:
    rng = np.random.default_rng(0)
    emb, u = rng.standard_normal((1500, 24)), rng.random(1500)
    a = select_usim(emb, u, query_size=10, rng=np.random.default_rng(5))
    b = select_usim(emb, u, query_size=10, rng=np.random.default_rng(5))
    assert a.method == "stochastic" and a.selected.tolist() == b.selected.tolist()
    others = [select_usim(emb, u, query_size=10, rng=np.random.default_rng(s)).selected.tolist() for s in (6, 7)]
    assert any(o != a.selected.tolist() for o in others)
    assert a.n_query >= 50 and a.query_counts.sum() == a.n_query


def test_usim_records_consistent_numbers_and_reduces_long_embeddings() -> None:
    rng = np.random.default_rng(1)
    emb, u = rng.standard_normal((200, 300)), rng.random(200)
    for similarity in ("cosine", "fisher"):
        res = select_usim(emb, u, query_size=6, rng=np.random.default_rng(0), similarity=similarity, max_dim=50)
        assert res.method == "naive" and res.n_dims == 50 and res.similarity == similarity
        assert res.value == pytest.approx(float(res.gains.sum()), rel=1e-6)
    res = select_usim(emb, u, query_size=6, rng=np.random.default_rng(0), n_query=40)
    assert res.n_query == 40
    from alseg.selection.flqmi import cosine_similarity_matrix

    S = cosine_similarity_matrix(emb, emb[res.query_indices])
    assert flqmi_value(S, res.selected, query_weights=res.query_counts) == pytest.approx(res.value, rel=1e-5)


def test_usim_argument_errors() -> None:
    emb, u = np.ones((10, 3)), np.ones(10)
    with pytest.raises(ValueError, match="uncertainty"):
        select_usim(emb, u[:5], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="similarity"):
        select_usim(emb, u, 2, np.random.default_rng(0), similarity="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query_size"):
        select_usim(emb, u, 11, np.random.default_rng(0))
