"""Greedy k-center (Core-Set, Sener & Savarese 2018) on region features.

Each step adds the pool item farthest (Euclidean) from its nearest centre, where the centres are the annotated
regions' features plus the items chosen so far. Ties go to the lowest pool index. Distances are computed in
blocks, so memory stays O(n · d).

>>> feats = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [9.0, 0.0]])
>>> kcenter_greedy(feats, 2, annotated_features=np.array([[0.0, 0.0]])).selected.tolist()
[3, 2]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Bytes of temporaries per distance block.
CHUNK_BYTES = 32 * 2**20


class KCenterResult(NamedTuple):
    """Selected pool indices in order, and each one's distance to its nearest centre when it was chosen."""

    selected: np.ndarray
    distances: np.ndarray


def _check_features(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (items × dimensions), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)


def _sq_dist_to_point(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances from every row of ``x`` to ``c`` (computed directly, in blocks)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    step = max(1, CHUNK_BYTES // max(1, x.shape[1] * x.itemsize))
    for s in range(0, x.shape[0], step):
        diff = x[s : s + step] - c
        out[s : s + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def min_sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For every row of ``x`` the squared distance to its nearest row of ``centres`` (blocked ‖a‖²+‖b‖²−2a·b)."""
    n, m = x.shape[0], centres.shape[0]
    out = np.full(n, np.inf)
    if m == 0:
        return out
    x_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    c_sq = np.einsum("ij,ij->i", centres, centres, dtype=np.float64)
    step_c = max(1, min(m, CHUNK_BYTES // 8 // max(1, min(n, 4096))))
    step_x = max(1, CHUNK_BYTES // 8 // step_c)
    for cs in range(0, m, step_c):
        cb = centres[cs : cs + step_c].astype(np.float64)
        for xs in range(0, n, step_x):
            d = x[xs : xs + step_x].astype(np.float64) @ cb.T
            d *= -2.0
            d += x_sq[xs : xs + step_x, None]
            d += c_sq[None, cs : cs + step_c]
            np.minimum(out[xs : xs + step_x], d.min(axis=1), out=out[xs : xs + step_x])
    return np.maximum(out, 0.0)


def kcenter_greedy(
    features: np.ndarray,
    budget: int,
    annotated_features: np.ndarray | None = None,
) -> KCenterResult:
    """Greedy k-center: ``budget`` pool indices, each the farthest from all centres so far.

    ``features`` is ``(n, d)`` (one row per candidate region); ``annotated_features`` ``(m, d)`` are the regions
    annotated in earlier rounds (the starting centres). Without annotated regions the first centre is the pool
    item closest to the pool mean (deterministic; its recorded distance is ``inf``). An item is never chosen
    twice; once every remaining item coincides with a centre the rest are taken by index (distance 0).
    """
    x = _check_features(features, "features")
    n = x.shape[0]
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or not 0 <= budget <= n:
        raise ValueError(f"budget must be an integer in [0, {n}] (the number of candidates), got {budget!r}")
    if annotated_features is not None and np.asarray(annotated_features).size:
        a = _check_features(annotated_features, "annotated_features")
        if a.shape[1] != x.shape[1]:
            raise ValueError(f"annotated_features have {a.shape[1]} dimensions but features {x.shape[1]}")
        min_d = min_sq_distances(x, a)
    else:
        min_d = np.full(n, np.inf)
    selected: list[int] = []
    dists: list[float] = []
    chosen = np.zeros(n, dtype=bool)
    for step in range(int(budget)):
        if step == 0 and np.isinf(min_d).all():
            j = int(np.argmin(_sq_dist_to_point(x, x.mean(axis=0, dtype=np.float64).astype(x.dtype))))
        else:
            j = int(np.argmax(np.where(chosen, -1.0, min_d)))
        selected.append(j)
        dists.append(float(np.sqrt(min_d[j])))
        chosen[j] = True
        np.minimum(min_d, _sq_dist_to_point(x, x[j]), out=min_d)
    return KCenterResult(np.asarray(selected, dtype=np.int64), np.asarray(dists, dtype=np.float64))
