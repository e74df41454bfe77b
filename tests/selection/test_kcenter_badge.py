"""Greedy k-center (Core-Set) and k-means++ seeding (BADGE)."""

from __future__ import annotations

import numpy as np
import pytest

from alseg.selection.kcenter import kcenter_greedy, min_sq_distances
from alseg.selection.kmeanspp import kmeanspp_seeding


def clustered_pool(seed: int, sizes: tuple[int, ...] = (200, 100, 50, 30, 20), d: int = 8):
    rng = np.random.default_rng(seed)
    centres = 30.0 * rng.standard_normal((len(sizes), d))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return centres[labels] + rng.standard_normal((labels.size, d)), labels


def brute_force_kcenter(x: np.ndarray, budget: int, annotated: np.ndarray) -> list[int]:
    centres = list(annotated)
    out: list[int] = []
    for _ in range(budget):
        d = np.min(np.linalg.norm(x[:, None, :] - np.asarray(centres)[None], axis=2), axis=1)
        d[out] = -1
        j = int(np.argmax(d))
        out.append(j)
        centres.append(x[j])
    return out


# --------------------------------------------------------------------------- k-center
def test_kcenter_picks_one_per_cluster() -> None:
    x, labels = clustered_pool(0)
    res = kcenter_greedy(x, 5)
    assert sorted(labels[res.selected].tolist()) == [0, 1, 2, 3, 4]
    assert np.isinf(res.distances[0]) and np.all(np.diff(res.distances[1:]) <= 1e-9)


def test_kcenter_starts_from_annotated_features() -> None:
    x, labels = clustered_pool(1)
    annotated = x[labels <= 1][:3]  # clusters 0 and 1 already annotated
    res = kcenter_greedy(x, 3, annotated_features=annotated)
    assert sorted(labels[res.selected].tolist()) == [2, 3, 4]


def test_kcenter_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    x, annotated = rng.standard_normal((150, 5)), rng.standard_normal((4, 5))
    res = kcenter_greedy(x, 12, annotated_features=annotated)
    assert res.selected.tolist() == brute_force_kcenter(x, 12, annotated)
    d2 = min_sq_distances(x, annotated)
    np.testing.assert_allclose(d2, np.min(((x[:, None] - annotated[None]) ** 2).sum(-1), axis=1), atol=1e-9)


def test_kcenter_ties_by_index_and_no_repeats_with_duplicates() -> None:
    x = np.zeros((6, 2))
    x[3:] = 1.0  # two groups of exact duplicates
    res = kcenter_greedy(x, 6, annotated_features=np.zeros((1, 2)))
    assert res.selected.tolist() == [3, 0, 1, 2, 4, 5]
    assert len(set(res.selected.tolist())) == 6


def test_kcenter_errors() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="budget"):
        kcenter_greedy(x, 5)
    with pytest.raises(ValueError, match="dimensions"):
        kcenter_greedy(x, 1, annotated_features=np.zeros((1, 3)))


# --------------------------------------------------------------------------- k-means++
def test_kmeanspp_distinct_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    x = np.repeat(rng.standard_normal((10, 4)), 3, axis=0)  # 30 rows, only 10 distinct points
    a = kmeanspp_seeding(x, 30, np.random.default_rng(5))
    b = kmeanspp_seeding(x, 30, np.random.default_rng(5))
    assert a.tolist() == b.tolist()
    assert len(set(a.tolist())) == 30
    # the first 10 picks are 10 distinct points (D² sampling never repeats a point while others remain)
    assert len({tuple(x[i]) for i in a[:10]}) == 10


def test_kmeanspp_first_pick_is_largest_norm_or_random() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3))
    x[17] *= 100
    assert kmeanspp_seeding(x, 1, np.random.default_rng(0))[0] == 17
    firsts = {int(kmeanspp_seeding(x, 1, np.random.default_rng(s), first="random")[0]) for s in range(10)}
    assert len(firsts) > 1


def test_kmeanspp_favours_far_points() -> None:
    rng = np.random.default_rng(6)
    near = np.array([10.0, 0.0]) + 0.1 * rng.standard_normal((95, 2))  # holds the largest-norm point
    far = 0.1 * rng.standard_normal((5, 2))  # 5% of the pool, ~10 away
    x = np.vstack([near, far])
    seconds = [int(kmeanspp_seeding(x, 2, np.random.default_rng(s))[1]) for s in range(30)]
    assert sum(j >= 95 for j in seconds) >= 28


def test_kmeanspp_covers_clusters() -> None:
    x, labels = clustered_pool(7)
    hits = [len(set(labels[kmeanspp_seeding(x, 5, np.random.default_rng(s))].tolist())) for s in range(10)]
    assert np.mean(hits) >= 4.5


def test_kmeanspp_errors() -> None:
    with pytest.raises(ValueError, match="Generator"):
        kmeanspp_seeding(np.zeros((3, 2)), 2, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must"):
        kmeanspp_seeding(np.zeros((3, 2)), 4, np.random.default_rng(0))
