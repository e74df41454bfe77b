"""k-means++ seeding as BADGE uses it (Ash et al. 2020) to pick a diverse, high-magnitude batch.

The first centre is, by default, the embedding with the largest L2 norm (what BADGE's reference code does:
for gradient embeddings the norm is a proxy for uncertainty); ``first="random"`` draws it uniformly instead.
Each further centre is drawn with probability ∝ D(x)², the squared distance to the nearest centre so far
(D² sampling), from the seeded ``rng``. Chosen items have D = 0 and are never drawn again; if every remaining
item coincides with a centre (ΣD² = 0) the next one is drawn uniformly from the items not yet chosen, so the
result always has ``k`` distinct indices (BADGE re-draws instead; the effect is the same).

>>> x = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0]])
>>> sel = kmeanspp_seeding(x, 2, np.random.default_rng(0))
>>> int(sel[0]), int(sel[1]) in (0, 1)
(2, True)
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from alseg.selection.kcenter import _check_features, _sq_dist_to_point

FirstPick = Literal["max_norm", "random"]


def kmeanspp_seeding(
    embeddings: np.ndarray,
    k: int,
    rng: np.random.Generator,
    first: FirstPick = "max_norm",
) -> np.ndarray:
    """``k`` distinct row indices of ``embeddings`` ``(n, d)`` by k-means++ seeding, in the order chosen.

    Ties for the largest norm go to the lowest index.
    """
    x = _check_features(embeddings, "embeddings")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, {n}] (the number of embeddings), got {k!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (no global random state)")
    if first not in ("max_norm", "random"):
        raise ValueError(f"first must be 'max_norm' or 'random', got {first!r}")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if first == "max_norm":
        j = int(np.argmax(np.einsum("ij,ij->i", x, x, dtype=np.float64)))
    else:
        j = int(rng.integers(n))
    selected = [j]
    chosen = np.zeros(n, dtype=bool)
    chosen[j] = True
    d2 = _sq_dist_to_point(x, x[j])
    while len(selected) < k:
        weights = np.where(chosen, 0.0, d2)
        total = weights.sum()
        if total > 0 and np.isfinite(total):
            j = int(rng.choice(n, p=weights / total))
        else:
            free = np.flatnonzero(~chosen)
            j = int(free[rng.integers(free.size)])
        selected.append(j)
        chosen[j] = True
        np.minimum(d2, _sq_dist_to_point(x, x[j]), out=d2)
    return np.asarray(selected, dtype=np.int64)
