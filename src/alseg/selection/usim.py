"""USIM (seed 001): uncertainty-aware submodular mutual information, as pure functions over embeddings.

The pipeline, one function per step:

1. :func:`query_set_size`: Q from the knee of the descending sorted uncertainties (Kneedle, S = 10, convex,
   decreasing), floored at ``5 · query_size``, capped at the pool size; no knee → the floor.
2. :func:`sample_query_set`: X_Q = Q draws with replacement, probability ∝ uncertainty. Returned as unique pool
   indices with their draw counts; the counts become FLQMI query weights, so a region drawn c times counts c times
   in the coverage term (exactly the objective over the multiset) while its column is stored once.
3. Similarity between pool and X_Q, rescaled to [0, 1]: USIMC = cosine of gradient embeddings
   (:func:`alseg.selection.flqmi.cosine_kernel`, ``(cos + 1) / 2``); USIMF = Fisher kernel
   ``g_uᵀ F⁻¹ g_q`` with F the diagonal empirical Fisher (:func:`fisher_kernel`, min-max rescaled).
   Embeddings longer than ``max_dim`` are reduced first (:func:`make_projection`, or for USIMF
   :func:`fisher_parameter_subset`: parameters drawn ∝ F).
4. FLQMI by stochastic greedy (naive greedy below 1,000 candidates): :func:`select_usim` runs it all.

>>> rng = np.random.default_rng(0)
>>> emb, u = rng.standard_normal((300, 16)), rng.random(300)
>>> res = select_usim(emb, u, query_size=5, rng=np.random.default_rng(1))
>>> len(res.selected), res.method
(5, 'naive')
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from alseg.selection.flqmi import (
    MAX_DENSE_BYTES,
    InnerProductKernel,
    SimilarityRows,
    _as_2d_finite,
    cosine_kernel,
    flqmi_maximize,
)

Similarity = Literal["cosine", "fisher"]
ProjectionMethod = Literal["coordinates", "gaussian"]


# --------------------------------------------------------------------------- 1. query-set size
def query_set_size(u_sorted_desc: np.ndarray, query_size: int, pool_size: int | None = None) -> int:
    """Q: the knee of the descending uncertainty curve, at least ``5 · query_size``, at most the pool size.

    The knee is Kneedle's (``kneed.KneeLocator(x = 1..n, y = u, S=10, curve="convex", direction="decreasing")``)
    on x = rank (1-based), so the knee is the number of items up to and including the elbow. When Kneedle finds
    no knee (e.g. a straight or flat curve, or fewer than 3 points) Q is the floor.
    """
    from kneed import KneeLocator

    u = np.asarray(u_sorted_desc, dtype=np.float64)
    if u.ndim != 1 or not np.isfinite(u).all():
        raise ValueError(f"u_sorted_desc must be a 1-D array of finite uncertainties, got shape {u.shape}")
    if u.size > 1 and (np.diff(u) > 0).any():
        raise ValueError("u_sorted_desc must be sorted in descending order (np.sort(u)[::-1])")
    if isinstance(query_size, bool) or not isinstance(query_size, int | np.integer) or query_size < 1:
        raise ValueError(f"query_size must be a positive integer, got {query_size!r}")
    cap = u.size if pool_size is None else int(pool_size)
    if cap < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")
    floor = 5 * int(query_size)
    knee = None
    if u.size >= 3 and u[0] > u[-1]:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            knee = KneeLocator(np.arange(1, u.size + 1), u, S=10, curve="convex", direction="decreasing").knee
    size = floor if knee is None else max(int(knee), floor)
    return int(min(size, cap))


# --------------------------------------------------------------------------- 2. query set
def sample_query_set(u: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """X_Q: ``size`` draws with replacement, probability ∝ ``u``; returns (unique indices, draw counts).

    Indices come sorted; ``counts.sum() == size``. Duplicates are merged: pass ``counts`` as FLQMI's
    ``query_weights`` to keep the multiset objective. If every uncertainty is 0 the draws are uniform.
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 1 or u.size == 0 or not np.isfinite(u).all() or (u < 0).any():
        raise ValueError("u must be a non-empty 1-D array of finite, non-negative uncertainties")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (no global random state)")
    total = u.sum()
    p = u / total if total > 0 else None
    draws = rng.choice(u.size, size=int(size), replace=True, p=p)
    idx, counts = np.unique(draws, return_counts=True)
    return idx.astype(np.int64), counts.astype(np.int64)


# --------------------------------------------------------------------------- 3. reducing long embeddings
@dataclass(frozen=True)
class Projection:
    """A fixed map from ``in_dim`` to ``out_dim`` numbers; apply the same one to pool and query embeddings.

    ``identity``: nothing to do. ``coordinates``: keep the (sorted) coordinates ``coordinates``.
    ``gaussian``: multiply by a Gaussian matrix N(0, 1/out_dim) that is regenerated block by block from
    ``seed``, so it is never stored whole (cost O(n · in_dim · out_dim): only for moderate ``in_dim``).
    """

    in_dim: int
    out_dim: int
    method: Literal["identity", "coordinates", "gaussian"]
    coordinates: np.ndarray | None = None
    seed: int | None = None

    def apply(self, g: np.ndarray) -> np.ndarray:
        g = np.asarray(g)
        if g.ndim != 2 or g.shape[1] != self.in_dim:
            raise ValueError(f"embeddings must have shape (n, {self.in_dim}), got {g.shape}")
        if self.method == "identity":
            return g.astype(np.float32, copy=False)
        if self.method == "coordinates":
            return g[:, self.coordinates].astype(np.float32, copy=False)
        out = np.zeros((g.shape[0], self.out_dim), dtype=np.float32)
        rows = max(1, (64 * 2**20) // (4 * self.out_dim))
        scale = np.float32(1.0 / math.sqrt(self.out_dim))
        for b, start in enumerate(range(0, self.in_dim, rows)):
            stop = min(start + rows, self.in_dim)
            block = np.random.default_rng([int(self.seed or 0), b]).standard_normal(
                (stop - start, self.out_dim), dtype=np.float32
            )
            block *= scale
            out += g[:, start:stop].astype(np.float32, copy=False) @ block
        return out


def make_projection(
    in_dim: int,
    max_dim: int = 10_000,
    rng: np.random.Generator | None = None,
    method: ProjectionMethod = "coordinates",
) -> Projection:
    """A :class:`Projection` to at most ``max_dim`` numbers (identity when ``in_dim <= max_dim``).

    ``coordinates`` (default, like the published USIM which truncates to 10k numbers, but seeded and uniform
    rather than the first ones) keeps ``max_dim`` coordinates drawn without replacement; ``gaussian`` is a random
    Gaussian projection (angles preserved in expectation, but costly for very long embeddings).
    """
    if in_dim < 1 or max_dim < 1:
        raise ValueError(f"in_dim and max_dim must be >= 1, got {in_dim} and {max_dim}")
    if in_dim <= max_dim:
        return Projection(in_dim, in_dim, "identity")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("reducing embeddings needs rng, a numpy.random.Generator")
    if method == "coordinates":
        coords = np.sort(rng.choice(in_dim, size=max_dim, replace=False)).astype(np.int64)
        return Projection(in_dim, max_dim, "coordinates", coordinates=coords)
    if method == "gaussian":
        return Projection(in_dim, max_dim, "gaussian", seed=int(rng.integers(2**63 - 1)))
    raise ValueError(f"method must be 'coordinates' or 'gaussian', got {method!r}")


def project_embeddings(
    g: np.ndarray,
    max_dim: int = 10_000,
    rng: np.random.Generator | None = None,
    method: ProjectionMethod = "coordinates",
) -> np.ndarray:
    """``g`` ``(n, D)`` reduced to at most ``max_dim`` columns (float32); see :func:`make_projection`.

    Project pool and query rows in one call (in USIM the query rows are pool rows), or build one
    :class:`Projection` and apply it to both.
    """
    g = np.asarray(g)
    if g.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (items × dimensions), got shape {g.shape}")
    return make_projection(g.shape[1], max_dim, rng, method).apply(g)


# --------------------------------------------------------------------------- 3b. Fisher kernel
def empirical_fisher_diagonal(grads: np.ndarray) -> np.ndarray:
    """The diagonal empirical Fisher: mean over rows of ``g²`` (float64), rows = a subset of X_Q."""
    g = _as_2d_finite(grads, "gradients for the Fisher estimate")
    return np.einsum("ij,ij->j", g, g, dtype=np.float64) / g.shape[0]


def fisher_parameter_subset(fisher_diag: np.ndarray, max_dim: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``max_dim`` parameter indices drawn without replacement with probability ∝ F (sorted).

    Sequential weighted sampling without replacement, done as Gumbel-top-k on ``log F``. Parameters with
    F = 0 are never drawn, so fewer than ``max_dim`` come back when fewer are non-zero.
    """
    f = np.asarray(fisher_diag, dtype=np.float64)
    if f.ndim != 1 or not np.isfinite(f).all() or (f < 0).any():
        raise ValueError("fisher_diag must be a 1-D array of finite, non-negative values")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (no global random state)")
    nonzero = np.flatnonzero(f > 0)
    if nonzero.size <= max_dim:
        return nonzero.astype(np.int64)
    keys = np.log(f[nonzero]) + rng.gumbel(size=nonzero.size)
    top = np.argpartition(-keys, max_dim - 1)[:max_dim]
    return np.sort(nonzero[top]).astype(np.int64)


def fisher_kernel(
    grad_pool: np.ndarray,
    grad_query: np.ndarray,
    fisher_diag: np.ndarray,
    damping: float = 1e-3,
    rescale: bool = True,
) -> InnerProductKernel:
    """The Fisher kernel ``g_uᵀ (F + λ)⁻¹ g_q`` as an on-demand kernel, min-max rescaled to [0, 1].

    ``λ = damping · mean(F)`` (relative, so the result does not depend on the gradients' scale; at least 1e-12)
    keeps parameters with tiny Fisher from dominating. Min and max are found in one blocked pass over the
    ``(n, q)`` values without storing them; a constant kernel becomes all ones.
    """
    gp = _as_2d_finite(grad_pool, "pool gradients")
    gq = _as_2d_finite(grad_query, "query gradients")
    f = np.asarray(fisher_diag, dtype=np.float64)
    if f.shape != (gp.shape[1],) or gq.shape[1] != gp.shape[1]:
        raise ValueError(
            f"shapes do not match: pool gradients {gp.shape}, query gradients {gq.shape}, fisher_diag {f.shape}"
        )
    if not np.isfinite(f).all() or (f < 0).any():
        raise ValueError("fisher_diag must be finite and non-negative")
    lam = max(float(damping) * float(f.mean()), 1e-12)
    inv_sqrt = (1.0 / np.sqrt(f + lam)).astype(np.float32)
    up = gp.astype(np.float32) * inv_sqrt
    uq = gq.astype(np.float32) * inv_sqrt
    raw = InnerProductKernel.from_embeddings(up, uq)
    if not rescale:
        return raw
    lo, hi = raw.min_max()
    if hi > lo:
        return InnerProductKernel.from_embeddings(up, uq, scale=1.0 / (hi - lo), offset=-lo / (hi - lo))
    return InnerProductKernel.from_embeddings(up, uq, scale=0.0, offset=1.0)


def fisher_kernel_similarity(
    grad_pool: np.ndarray, grad_query: np.ndarray, fisher_diag: np.ndarray, damping: float = 1e-3
) -> np.ndarray:
    """The dense ``(n_pool, n_query)`` float32 Fisher-kernel similarity, min-max rescaled to [0, 1]."""
    return fisher_kernel(grad_pool, grad_query, fisher_diag, damping).dense()


# --------------------------------------------------------------------------- 4. the whole selection
@dataclass(frozen=True)
class USIMResult:
    """What :func:`select_usim` chose and the numbers that explain it."""

    selected: np.ndarray  # pool indices in selection order
    gains: np.ndarray  # marginal FLQMI gain of each when it was added
    value: float  # FLQMI of the selected set
    query_indices: np.ndarray  # unique pool indices in X_Q (sorted)
    query_counts: np.ndarray  # draws of each (sum = n_query)
    n_query: int  # Q, the number of draws
    method: str  # "naive" or "stochastic"
    similarity: str  # "cosine" or "fisher"
    n_dims: int  # embedding length after reduction


def select_usim(
    embeddings: np.ndarray,
    uncertainty: np.ndarray,
    query_size: int,
    rng: np.random.Generator,
    *,
    similarity: Similarity = "cosine",
    eta: float = 1.0,
    epsilon: float = 0.01,
    naive_below: int = 1000,
    n_query: int | None = None,
    max_dim: int = 10_000,
    projection: ProjectionMethod = "coordinates",
    fisher_subset_size: int = 500,
    damping: float = 1e-3,
    lazy: bool = True,
    max_dense_bytes: int = MAX_DENSE_BYTES,
) -> USIMResult:
    """USIMC (``similarity="cosine"``) or USIMF (``"fisher"``) over ``embeddings`` ``(n, D)``, one per candidate.

    ``uncertainty`` ``(n,)`` is the class-weighted uncertainty u. ``n_query`` overrides the knee-based Q.
    For USIMF the Fisher diagonal is the mean g² over up to ``fisher_subset_size`` distinct query items drawn
    uniformly, and when D > ``max_dim`` the kept parameters are drawn ∝ F (:func:`fisher_parameter_subset`);
    for USIMC embeddings longer than ``max_dim`` go through :func:`make_projection` (``projection``).
    Naive greedy is used when there are fewer than ``naive_below`` candidates, stochastic greedy otherwise.
    Random stages (query set, Fisher subset, reduction, stochastic greedy) use independent child generators
    drawn from ``rng`` in that order.
    """
    emb = _as_2d_finite(embeddings, "embeddings")
    n, dim = emb.shape
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.shape != (n,):
        raise ValueError(f"uncertainty must have shape ({n},) (one per embedding row), got {u.shape}")
    if isinstance(query_size, bool) or not isinstance(query_size, int | np.integer) or not 1 <= query_size <= n:
        raise ValueError(f"query_size must be an integer in [1, {n}] (the number of candidates), got {query_size!r}")
    if similarity not in ("cosine", "fisher"):
        raise ValueError(f"similarity must be 'cosine' or 'fisher', got {similarity!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (no global random state)")
    rng_query, rng_fisher, rng_reduce, rng_greedy = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=4)
    )

    q_draws = n_query if n_query is not None else query_set_size(np.sort(u)[::-1], int(query_size), n)
    q_idx, q_counts = sample_query_set(u, int(q_draws), rng_query)

    kernel: InnerProductKernel
    if similarity == "cosine":
        reduced = make_projection(dim, max_dim, rng_reduce, projection).apply(emb)
        kernel = cosine_kernel(reduced, reduced[q_idx], rescale=True)
    else:
        subset = q_idx
        if subset.size > fisher_subset_size:
            subset = np.sort(rng_fisher.choice(q_idx, size=fisher_subset_size, replace=False))
        fisher = empirical_fisher_diagonal(emb[subset])
        params = np.arange(dim) if dim <= max_dim else fisher_parameter_subset(fisher, max_dim, rng_reduce)
        if params.size == 0:  # every gradient of the subset is zero: nothing to weigh by, keep all
            params = np.arange(min(dim, max_dim))
        reduced = emb[:, params]
        kernel = fisher_kernel(reduced, reduced[q_idx], fisher[params], damping=damping)

    kn, kq = kernel.shape
    src: np.ndarray | SimilarityRows = kernel.dense() if kn * kq * 4 <= max_dense_bytes else kernel
    method = "naive" if n < naive_below else "stochastic"
    sel, gains, value = flqmi_maximize(
        src,
        int(query_size),
        eta=eta,
        method=method,
        epsilon=epsilon,
        rng=rng_greedy,
        query_weights=q_counts.astype(np.float64),
        lazy=lazy,
    )
    return USIMResult(
        selected=sel,
        gains=gains,
        value=value,
        query_indices=q_idx,
        query_counts=q_counts,
        n_query=int(q_draws),
        method=method,
        similarity=similarity,
        n_dims=int(reduced.shape[1]),
    )
