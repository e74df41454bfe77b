"""The held-out split: fixed per split seed, never annotated nor queried."""

from __future__ import annotations

import numpy as np

from alseg.data.dataset import Dataset, split_holdout

__all__ = ["pool_subset", "split_holdout", "split_pool_and_test"]


def split_pool_and_test(ds: Dataset, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(pool, test)``: the held-out test cases are cases that have a label file.

    All cases labelled (always so when the oracle is simulated): :func:`split_holdout`. None labelled (people
    annotate a dataset of images only): every case is in the pool and nothing is evaluated. Some labelled:
    ``max(1, round(fraction * n))`` test cases drawn from the labelled ones (at most all of them, and at most
    ``n - 1``).
    """
    ids = sorted(ds.case_ids)
    labelled = [c for c in ids if ds.has_label(c)]
    if len(labelled) == len(ids):
        return split_holdout(ids, fraction, seed)
    if not labelled:
        return ids, []
    n_test = min(len(labelled), len(ids) - 1, max(1, round(fraction * len(ids))))
    perm = np.random.default_rng(seed).permutation(len(labelled))
    test = sorted(labelled[i] for i in perm[:n_test])
    return [c for c in ids if c not in set(test)], test


def pool_subset(pool: list[str], size: int | None, seed: int) -> list[str]:
    """The first ``size`` cases of a permutation of ``pool`` seeded by ``(seed, 1)`` (a stream apart from the
    held-out split's), sorted; all of ``pool`` when ``size`` is None. Raises ValueError when ``size`` exceeds it."""
    if size is None:
        return list(pool)
    if size > len(pool):
        raise ValueError(f"pool_size is {size} but the pool holds {len(pool)} cases")
    perm = np.random.default_rng((seed, 1)).permutation(len(pool))
    ids = sorted(pool)
    return sorted(ids[i] for i in perm[:size])
